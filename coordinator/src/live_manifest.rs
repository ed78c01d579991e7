//! The federation manifest as the coordinator relays it: re-read whenever the file changes,
//! like the registry, so a renewal or a new member published by the CA reaches the agents
//! (and is admitted) without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{Context, Result};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::manifest::{SignedManifest, ca_key};

use crate::registry::modified;

/// One version of the manifest, with what every round start and Welcome needs of it, made
/// once per version: the bytes relayed to agents and the digest that is the round context.
#[derive(Debug)]
pub struct Relayed {
    pub signed: SignedManifest,
    pub bytes: Vec<u8>,
    pub digest: [u8; 32],
}

impl Relayed {
    fn new(signed: SignedManifest) -> Arc<Self> {
        Arc::new(Relayed {
            bytes: signed.to_bytes(),
            digest: signed.digest(),
            signed,
        })
    }
}

#[derive(Debug)]
pub struct LiveManifest {
    path: PathBuf,
    ca_der: Vec<u8>,
    certificate_der: Vec<u8>,
    cached: Mutex<(Option<SystemTime>, Arc<Relayed>)>,
}

impl LiveManifest {
    /// Reads and checks the manifest at `path` before the port opens: signed by the CA and
    /// listing this coordinator's own certificate (agents would refuse it otherwise).
    pub fn open(path: &Path, ca_der: &[u8], certificate_der: &[u8]) -> Result<Self> {
        let signed = load(path, ca_der, certificate_der)?;
        tracing::info!(manifest = %signed.summary(), "federation manifest loaded");
        Ok(LiveManifest {
            path: path.to_path_buf(),
            ca_der: ca_der.to_vec(),
            certificate_der: certificate_der.to_vec(),
            cached: Mutex::new((modified(path), Relayed::new(signed))),
        })
    }

    /// The current manifest. A changed file that does not check out, or is older than the
    /// one in force, leaves the one in force, with a warning: agents would refuse it anyway.
    pub fn get(&self) -> Arc<Relayed> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = modified(&self.path);
        if now != cached.0 {
            cached.0 = now;
            match load(&self.path, &self.ca_der, &self.certificate_der) {
                Ok(m) => match m.supersedes(&cached.1.signed) {
                    Ok(true) => {
                        tracing::info!(manifest = %m.summary(), "newer federation manifest loaded");
                        cached.1 = Relayed::new(m);
                    }
                    // The same version with more countersignatures (the CA attached what
                    // member sites sent): relay it, or sites that ask for a quorum never
                    // get to adopt it. The digest, so the round context, is unchanged.
                    Ok(false)
                        if m.countersignatures().len()
                            > cached.1.signed.countersignatures().len() =>
                    {
                        tracing::info!(
                            version = m.version(),
                            countersignatures = m.countersignatures().len(),
                            "the federation manifest now carries more countersignatures"
                        );
                        cached.1 = Relayed::new(m);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the changed manifest file is refused; the current one stays in force")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the manifest could not be re-read; the current one stays in force")
                }
            }
        }
        cached.1.clone()
    }
}

fn load(path: &Path, ca_der: &[u8], certificate_der: &[u8]) -> Result<SignedManifest> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the federation manifest {}", path.display()))?;
    let signed = ca_key(ca_der)
        .and_then(|key| SignedManifest::verify(&bytes, &key))
        .with_context(|| format!("{} (tls.manifest)", path.display()))?;
    CaVerifier::new(ca_der.to_vec(), crate::unix_seconds() as i64)
        .map(|v| v.with_manifest(&signed))
        .and_then(|v| v.verify_coordinator(certificate_der))
        .with_context(|| {
            format!(
                "{}: the coordinator's certificate (tls.cert) is not the one the manifest lists",
                path.display()
            )
        })?;
    Ok(signed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_ca::demo_keys::{DEFAULT_VALIDITY_DAYS, ProvisionOptions, provision};

    fn demo(dir: &Path) -> PathBuf {
        let pki = dir.join("pki");
        provision(&ProvisionOptions {
            out: pki.clone(),
            sites: vec!["a".into(), "b".into(), "c".into()],
            coordinator_names: vec!["localhost".into()],
            coordinator_url: "https://localhost:1".into(),
            validity_days: DEFAULT_VALIDITY_DAYS,
        })
        .unwrap();
        pki
    }

    fn der(path: &Path) -> Vec<u8> {
        crate::tls::first_cert_der(path).unwrap()
    }

    /// Agents would refuse every round of a coordinator whose certificate the manifest does
    /// not list: it refuses to start instead, saying why.
    #[test]
    fn a_manifest_that_does_not_list_this_coordinator_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let pki = demo(dir.path());
        let ca = der(&pki.join("ca.pem"));
        let ours = der(&pki.join("coordinator/cert.pem"));
        assert!(LiveManifest::open(&pki.join("manifest.toml"), &ca, &ours).is_ok());
        // The CA enrols a new coordinator key: the manifest lists that one, not ours.
        let host = dir.path().join("new-host");
        let csr = crate::enrol::coordinator_request(&host, &["localhost".into()]).unwrap();
        cohort_ca::sign_request(
            &pki,
            &std::fs::read_to_string(csr).unwrap(),
            cohort_ca::Enrolment::Coordinator,
            "https://localhost:1",
            &["localhost".into()],
            DEFAULT_VALIDITY_DAYS,
        )
        .unwrap();
        let e = LiveManifest::open(&pki.join("manifest.toml"), &ca, &ours).unwrap_err();
        assert!(
            format!("{e:#}").contains("is not the one the manifest lists"),
            "{e:#}"
        );
    }

    #[test]
    fn countersignatures_attached_later_are_relayed() {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let dir = tempfile::tempdir().unwrap();
        let pki = demo(dir.path());
        let path = pki.join("coordinator/manifest.toml");
        let live = LiveManifest::open(
            &path,
            &der(&pki.join("ca.pem")),
            &der(&pki.join("coordinator/cert.pem")),
        )
        .unwrap();
        let before = live.get();
        assert!(before.signed.countersignatures().is_empty());
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(
            &std::fs::read_to_string(pki.join("sites/a/key.pem")).unwrap(),
        )
        .unwrap();
        let file = before.signed.countersign("a", &key).to_file(&before.signed);
        assert_eq!(cohort_ca::countersign(&pki, &[file.as_str()]).unwrap(), 1);
        // Modification times can be coarse: make sure the rewrite looks newer.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let after = live.get();
        assert_eq!(after.signed.countersignatures().len(), 1);
        assert_eq!(after.digest, before.digest, "the same round context");
        assert_ne!(after.bytes, before.bytes, "the relayed bytes carry it");
    }
}
