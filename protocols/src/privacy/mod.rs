//! Differential-privacy accounting: how much privacy a sequence of noisy releases spends.
//!
//! Cohort's privacy guarantees are stated as (ε, δ)-differential privacy, but composed in
//! Rényi DP (Mironov, CSF 2017): the RDP of a sequence of mechanisms is the sum of theirs at
//! each order α, and converting to (ε, δ) once, at the end, is far tighter than adding ε's.
//! The [`Accountant`] holds the running RDP curve over a fixed grid of orders; a site's
//! agent keeps one for its own patients (example-level DP-SGD: the Poisson-subsampled
//! Gaussian mechanism) and asks it before every release whether the budget allows it.
//!
//! Under secure aggregation the noise is added by the sites themselves, as integers, before
//! masking ([`discrete_gaussian`]); [`distributed_discrete_gaussian`] prices the sum.
//!
//! Pure arithmetic, no I/O: the curve is a vector the caller persists, so a restarted agent
//! cannot forget what it already spent. The numbers are checked against Google's
//! `dp-accounting` (an independent implementation) in `tests/accountant_reference.rs`.

mod discrete;
mod rdp;

pub use discrete::{
    central_gaussian, discrete_gaussian, distributed_discrete_gaussian, sum_divergence,
};
pub use rdp::{Accountant, DEFAULT_ORDERS, Mechanism, PrivacyError, Spent};
