//! The Cohort agent: runs at a site, next to its data.

pub mod data;
pub mod train;
