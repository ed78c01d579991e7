//! The Cohort agent: runs at a site, next to its data, dials out to the coordinator, trains
//! the global model locally and sends back only a masked update.

pub mod cnn;
pub mod config;
pub mod data;
pub mod enroll;
pub mod failure;
pub mod images;
pub mod ledger;
pub mod model;
pub mod predict;
pub mod session;
pub mod site;
pub mod train;
pub mod trust;

pub use config::AgentConfig;
pub use session::{run, run_site, run_with_model};
pub use site::LocalSite;
