//! The site's identity material (CA, certificate, key, pinned manifest), loaded once per
//! process, and the checks made with it on what the coordinator presents: its certificate
//! (the key that signs models and the schema) and the manifest it relays.
//!
//! Shared by the connection driver ([`crate::session`]) and the round state machine
//! ([`crate::round`]), which must not depend on each other's I/O.

use anyhow::{Context, Result, anyhow};
use cohort_protocols::identity::COORDINATOR_COMMON_NAME;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use tracing::warn;

use crate::config::AgentConfig;
use crate::failure::Permanent;

/// The site's identity material, loaded once.
pub(crate) struct Credentials {
    pub(crate) ca_pem: String,
    pub(crate) ca_der: Vec<u8>,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_pem: String,
    pub(crate) signing_key: SigningKey,
    /// The site certificate's common name: the name peers check this site's keys against.
    pub(crate) name: String,
    /// The federation manifest this site pins (see [`crate::trust`]).
    pub(crate) trust: crate::trust::Trust,
}

fn pem_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow!("{what}: {e}"))?
        .as_ref()
        .to_vec())
}

pub(crate) fn load_credentials(cfg: &AgentConfig) -> Result<Credentials> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let ca_pem = read(&cfg.tls.ca_cert)?;
    let cert_pem = read(&cfg.tls.cert)?;
    let key_pem = read(&cfg.tls.key)?;
    let signing_key = SigningKey::from_pkcs8_pem(&key_pem)
        .map_err(|e| anyhow!("{}: not an Ed25519 PKCS#8 key: {e}", cfg.tls.key.display()))?;
    let ca_der = pem_der(&ca_pem, "CA certificate")?;
    let cert_der = pem_der(&cert_pem, "site certificate")?;
    // Not checked against the CA here: the coordinator refuses a foreign certificate at the
    // handshake, and says so with the peer's address.
    let name = cohort_protocols::identity::common_name(&cert_der)
        .map_err(|e| anyhow!("{}: {e}", cfg.tls.cert.display()))?;
    let trust = crate::trust::Trust::load(
        &ca_der,
        cfg.tls.manifest.as_deref(),
        cfg.policy.manifest_quorum as usize,
    )?;
    Ok(Credentials {
        trust,
        ca_der,
        cert_der,
        name,
        ca_pem,
        cert_pem,
        key_pem,
        signing_key,
    })
}

/// Seconds since the epoch, for certificate validity. Only the driver reads the clock: the
/// round state machine is handed the time.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The key that signs models and the schema: from the coordinator's certificate, which must
/// be issued by the project CA to the coordinator's name (valid at `now`) and, when the site
/// pins a manifest, be the coordinator member's certificate.
pub(crate) fn coordinator_key(
    creds: &Credentials,
    cert_der: &[u8],
    now: i64,
) -> Result<ed25519_dalek::VerifyingKey> {
    use cohort_protocols::identity::IdentityError;
    let verifier = creds.trust.verifier(&creds.ca_der, now)?;
    let cert = verifier.verify_coordinator(cert_der).map_err(|e| match e {
        IdentityError::NameMismatch { got, .. } => Permanent::new(
            format!("the coordinator's certificate is for {got:?}, not the coordinator"),
            "The server is not this project's coordinator; check coordinator.url.",
        ),
        IdentityError::NotAMember { .. }
        | IdentityError::WrongRole { .. }
        | IdentityError::NotTheMembersKey { .. } => Permanent::new(
            format!("the coordinator's certificate: {e}"),
            "The coordinator is not the one the federation's manifest names; if the consortium re-certified it, install the new manifest.toml.",
        ),
        e => Permanent::new(
            format!("the coordinator's certificate: {e}"),
            "Models could not be verified; check that ca.pem is this project's CA.",
        ),
    })?;
    debug_assert_eq!(cert.common_name, COORDINATOR_COMMON_NAME);
    Ok(cert.key)
}

/// Offers the coordinator's manifest (from Welcome or a round start) to the site's trust.
/// A refused one is logged and changes nothing: the site keeps the version it pins, and a
/// round under another manifest then fails its context check.
/// Returns whether the site now pins the manifest the coordinator relays (none relayed: only
/// if the site pins none either).
pub(crate) fn offer_manifest(creds: &Credentials, bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return creds.trust.current().is_none();
    }
    match creds.trust.offer(bytes) {
        Ok(_) => true,
        Err(e) => {
            let pinned = creds.trust.current().map_or(0, |m| m.version());
            warn!(error = %e, pinned, "refused the coordinator's federation manifest");
            false
        }
    }
}
