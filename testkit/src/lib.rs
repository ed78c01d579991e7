//! The fixtures Cohort's tests share, so that each behaviour's test says only what it is
//! about: who the sites are, what differs in their configuration, what must happen.
//!
//! - [`heart`]: the four hospitals of the UCI heart-disease study shipped in `data/`, and
//!   their schema as the coordinator signs it.
//! - [`pki`]: a consortium CA, the coordinator's certificate and each hospital's bundle,
//!   provisioned into a temporary directory, and what tests read back from it.
//! - [`config`]: coordinator.toml and agent.toml for those hospitals; a test sets only the
//!   keys it is about.
//! - [`process`]: the real binaries as separate processes, their logs read line by line.
//! - [`stub`]: a scripted coordinator served over mutual TLS with the real certificate, for
//!   tests that put the real agent in front of a coordinator that lies or hangs up.
//! - [`predict`]: `examples/predict.py`, the independent reader of an exported model.
//! - [`gpu`]: whether this machine has a device for burn's wgpu backend.
//!
//! This crate depends on nothing above the protocol crate and the CA: the agent's and the
//! coordinator's own tests use it without linking a second copy of the crate they test.
//! Helpers panic with a message instead of returning errors: they run only in tests, where a
//! failed fixture is a failed test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod config;
pub mod gpu;
pub mod heart;
pub mod pki;
pub mod predict;
pub mod process;
pub mod stub;

use std::path::{Path, PathBuf};

/// What most integration tests use, in one import.
pub mod prelude {
    pub use crate::config::{self, Toml};
    pub use crate::heart::{self, LISTED_SCHEMA, SCHEMA, SITES, csv};
    pub use crate::pki::{self, coordinator_tls, provision};
    pub use crate::process::{Proc, copy_dir, free_port, workspace_exe};
}

/// The repository's root, for the shipped data and examples.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ sits in the repository")
        .to_path_buf()
}

/// Whether the tests run in CI (`CI` set, as `.ci/run` does): outside tools a test can skip
/// elsewhere (Python, promtool, a Vulkan driver) are then required.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}
