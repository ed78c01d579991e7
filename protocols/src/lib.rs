//! Cohort's sans-IO protocol cores: no tokio, no sockets, no files, no clocks (time is an
//! argument), deterministic given a seed. The coordinator and the agent drive these.
//!
//! - [`secagg`]: SecAgg+ secure aggregation.
//! - [`identity`]: site identities: certificates issued by the project CA.
//! - [`model`]: the model description, flat parameter vectors, the data schema, hashing.
//! - [`strategy`]: how the coordinator turns an aggregated update into the next model.

pub mod identity;
pub mod model;
pub mod secagg;
pub mod strategy;
