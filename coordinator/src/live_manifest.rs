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
