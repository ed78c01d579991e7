//! Cohort's sans-IO protocol cores: no tokio, no sockets, no files, no clocks (time is an
//! argument), deterministic given a seed. The coordinator and the agent drive these.
//!
//! - [`secagg`]: SecAgg+ secure aggregation.
//! - [`hex`]: the one spelling of keys, digests and serials in the files above.
//! - [`identity`]: site identities: certificates issued by the project CA.
//! - [`manifest`]: the CA-signed list of the federation's members that every agent pins.
//! - [`registry`]: the CA's list of enrolled certificates the coordinator admits.
//! - [`round_context`]: one digest of everything a site is told about a round, which every
//!   SecAgg+ signature covers.
//! - [`privacy`]: differential-privacy accounting (Rényi DP), what a release spends.
//! - [`model`]: the model description, flat parameter vectors, the data schema, hashing.
//! - [`strategy`]: how the coordinator turns an aggregated update into the next model.

pub mod hex;
pub mod identity;
pub mod manifest;
pub mod model;
pub mod privacy;
pub mod registry;
pub mod round_context;
pub mod secagg;
pub mod strategy;
