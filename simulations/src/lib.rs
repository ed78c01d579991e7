//! Cohort simulations and benchmarks: many sites in one process.

pub mod fl_bench;
pub mod load;
pub mod plot;
pub mod reference;
pub mod rollout;
pub mod run;
pub mod secagg_bench;
pub mod shapes;
pub mod soak;
