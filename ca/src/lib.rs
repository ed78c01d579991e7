//! `cohort-ca`: the consortium's certificate authority, apart from the coordinator.
//!
//! A site's identity is its certificate and its entry in the federation manifest. Whoever holds
//! the CA key decides both, so the CA is a separate tool, meant to run on an offline machine
//! held by the consortium, never on the coordinator's host; the coordinator binary has no CA
//! operations at all. Keys are born where they are used: a site runs `cohort-agent enroll`,
//! the coordinator's host `cohort-coordinator enroll`, and the CA signs their certificate
//! signing requests ([`sign_request`]), seeing only public keys. What it hands back (a bundle:
//! certificate, CA certificate, manifest, configuration) holds no private key.
//!
//! Every change publishes a new version of the federation manifest
//! ([`cohort_protocols::manifest`]): members, roles, keys and serials, signed with the CA key.
//! Agents pin it and accept as SecAgg+ peers only the sites it lists with the listed key, so a
//! certificate the CA key mints later is not a member until a new manifest says so; with
//! `policy.manifest_quorum` at the agents, not even then, unless enough existing members
//! countersigned it ([`countersign`]).
//!
//! The one exception is [`demo_keys`]: every key made on one machine, for throw-away demos,
//! `cohort-sim` and tests. Its name says what it is.

mod authority;
mod bundle;
pub mod demo_keys;

pub use authority::{
    CaError, DEFAULT_VALIDITY_DAYS, Enrolment, countersign, crl_path, current_manifest,
    federation_id, init, manifest_path, registry_path, revoke, sign_request,
};

use cohort_protocols::hex::{decode as from_hex, encode as hex};

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
