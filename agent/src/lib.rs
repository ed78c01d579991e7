//! The Cohort agent: runs at a site, next to its data, dials out to the coordinator, trains
//! the global model locally and sends back only a masked update.
//!
//! A site that runs a model Cohort ships needs only its configuration:
//!
//! ```no_run
//! use cohort_agent::{Agent, AgentConfig};
//!
//! # async fn site() -> anyhow::Result<()> {
//! let config = AgentConfig::load(std::path::Path::new("agent.toml"))?;
//! Agent::new(config).run().await
//! # }
//! ```
//!
//! A site that brings its own network writes it with burn, implements [`model::Network`],
//! and hands it to the agent as a [`model::BurnModel`]; the agent builds it for the widths
//! the federation's signed schema fixes ([`model::Shape`]), so they are never repeated:
//!
//! ```no_run
//! use burn::nn::{Linear, LinearConfig};
//! use burn::prelude::*;
//! use cohort_agent::model::{BurnModel, Network, Shape};
//! use cohort_agent::{Agent, AgentConfig};
//!
//! #[derive(Module, Debug)]
//! struct Linear1 {
//!     layer: Linear,
//! }
//!
//! impl Network for Linear1 {
//!     fn forward(&self, x: Tensor<2>) -> Tensor<2> {
//!         self.layer.forward(x)
//!     }
//! }
//!
//! # async fn site() -> anyhow::Result<()> {
//! let model = BurnModel::new("linear/1", |shape: Shape, device: &Device| Linear1 {
//!     layer: LinearConfig::new(shape.inputs, shape.outputs).init(device),
//! });
//! let config = AgentConfig::load(std::path::Path::new("agent.toml"))?;
//! Agent::new(config).model(model).run().await
//! # }
//! ```
//!
//! The crate is in layers, each importing only those below it: [`model`] (what trains) and
//! [`data`] (what it trains on) know nothing of each other; the site joins them
//! ([`Site`], [`LocalSite`]); a state machine without I/O decides each round; the session
//! drives it over the network.

pub mod config;
pub mod data;
pub mod model;
pub mod predict;

mod credentials;
mod enroll;
mod failure;
mod ledger;
mod membership;
mod privacy;
mod round;
mod session;
mod site;
mod trust;

pub use config::AgentConfig;
pub use enroll::request as certificate_request;
pub use failure::{ConfigProblem, EXIT_REFUSED, GaveUp};
pub use membership::{countersign, report as status_report};
pub use privacy::PrivacyReport;
pub use session::{Agent, load_site_data, run, run_site};
pub use site::{LocalSite, Site};
pub use trust::Trust;
