//! Whom this site trusts: the federation manifest it pins.
//!
//! The CA certificate says who *may* be a member; the manifest says who *is*, with which key.
//! The agent starts from the manifest in its bundle, adopts a newer one when the coordinator
//! relays it (after checking the CA's signature) and never goes back: an older version, a
//! different document under the same version or another federation's manifest is refused and
//! logged. What it adopts it writes back over its manifest file, so a restart does not forget
//! a revocation. The pinned manifest decides every SecAgg+ peer and the coordinator's own
//! certificate, and its digest is the round context the site signs.
//!
//! With `policy.manifest_quorum` set, a newer manifest that adds a training site (or re-keys
//! one) is adopted only with that many countersignatures of sites the pinned manifest lists:
//! the CA's holder alone can then no longer make a puppet a peer. A site makes its
//! countersignature with [`crate::membership::countersign`], after reading what the new version changes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::manifest::{SignedManifest, ca_key};
use ed25519_dalek::VerifyingKey;
use tracing::{info, warn};

/// The site's pinned manifest, shared by its sessions (reconnections keep what was adopted).
#[derive(Debug)]
pub struct Trust {
    ca_key: VerifyingKey,
    /// Where the pinned manifest is kept; `None` for a site configured without one.
    path: Option<PathBuf>,
    /// `policy.manifest_quorum`.
    quorum: usize,
    pinned: Mutex<Option<SignedManifest>>,
}

/// What happened to a manifest the coordinator offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Newer than the pinned one: adopted.
    Adopted { from: u64, to: u64 },
    /// The one already pinned.
    Same,
    /// The site was configured without a manifest: this one (CA-signed) is pinned from now on,
    /// for this process (trust on first use).
    FirstUse { version: u64 },
}

impl Trust {
    /// Loads and checks the manifest at `path` (if any) against the CA certificate.
    pub fn load(ca_der: &[u8], path: Option<&Path>, quorum: usize) -> Result<Self> {
        let ca_key = ca_key(ca_der).map_err(|e| anyhow!("the CA certificate: {e}"))?;
        let pinned = match path {
            None => {
                warn!(
                    "no [tls] manifest: every certificate of the CA is accepted as a peer, so whoever holds the CA key can run this site's rounds with puppets"
                );
                None
            }
            Some(p) => {
                let bytes = std::fs::read(p)
                    .with_context(|| format!("reading the federation manifest {}", p.display()))?;
                let m = SignedManifest::verify(&bytes, &ca_key)
                    .map_err(|e| anyhow!("{}: {e}", p.display()))?;
                info!(manifest = %m.summary(), "trusting the federation manifest");
                Some(m)
            }
        };
        Ok(Trust {
            ca_key,
            path: path.map(Path::to_path_buf),
            quorum,
            pinned: Mutex::new(pinned),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SignedManifest>> {
        // A panic while holding it cannot leave a half-written manifest: it is replaced whole.
        self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pinned manifest.
    pub fn current(&self) -> Option<SignedManifest> {
        self.lock().clone()
    }

    /// The round context this site signs: its pinned manifest's digest.
    pub fn context(&self) -> [u8; 32] {
        self.lock().as_ref().map_or([0; 32], |m| m.digest())
    }

    /// Checks `bytes` from the coordinator and adopts them if they are a newer version of
    /// this federation's manifest. An error says why they were refused; the pinned manifest
    /// is then unchanged.
    pub fn offer(&self, bytes: &[u8]) -> Result<Offer> {
        let offered = SignedManifest::verify(bytes, &self.ca_key)
            .map_err(|e| anyhow!("the manifest from the coordinator: {e}"))?;
        let mut pinned = self.lock();
        let Some(current) = pinned.as_ref() else {
            // No worse than what such a site accepted before (any CA certificate), and from
            // now on no puppet the manifest does not list.
            let version = offered.version();
            warn!(manifest = %offered.summary(), "no [tls] manifest configured: pinning the coordinator's, CA-signed, until this agent stops (configure tls.manifest to pin across restarts)");
            *pinned = Some(offered);
            return Ok(Offer::FirstUse { version });
        };
        let from = current.version();
        if !offered
            .supersedes(current)
            .map_err(|e| anyhow!("the manifest from the coordinator: {e}"))?
        {
            return Ok(Offer::Same);
        }
        offered
            .check_quorum(current, self.quorum)
            .map_err(|e| anyhow!("the manifest from the coordinator: {e}"))?;
        let to = offered.version();
        info!(from, to, manifest = %offered.summary(), "adopted a newer federation manifest");
        if let Some(path) = &self.path
            && let Err(e) = write_atomically(path, &offered.to_bytes())
        {
            warn!(path = %path.display(), error = %e, "the newer manifest could not be saved: after a restart this site starts from the older one again");
        }
        *pinned = Some(offered);
        Ok(Offer::Adopted { from, to })
    }

    /// The CA's key, which signs every manifest this site accepts.
    pub fn ca_key(&self) -> &VerifyingKey {
        &self.ca_key
    }

    /// A verifier of peers' and the coordinator's certificates under the pinned manifest.
    pub fn verifier(&self, ca_der: &[u8], now_unix: i64) -> Result<CaVerifier> {
        let v = CaVerifier::new(ca_der.to_vec(), now_unix).map_err(|e| anyhow!("{e}"))?;
        Ok(match self.lock().as_ref() {
            Some(m) => v.with_manifest(m),
            None => v,
        })
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocols::manifest::{Manifest, Member, Role};
    use ed25519_dalek::SigningKey;

    fn manifest(version: u64, sites: &[&str], federation: &str) -> Manifest {
        Manifest {
            federation: federation.into(),
            version,
            issued_unix: 0,
            members: sites
                .iter()
                .enumerate()
                .map(|(i, n)| Member {
                    name: n.to_string(),
                    role: Role::Site,
                    key: cohort_protocols::hex::encode(
                        SigningKey::from_bytes(&[i as u8 + 1; 32])
                            .verifying_key()
                            .as_bytes(),
                    ),
                    serial: "01".into(),
                    not_after_unix: i64::MAX,
                })
                .collect(),
        }
    }

    /// A site pinning v2 of federation "f", its file in a temporary directory.
    fn pinned(ca: &SigningKey, dir: &Path) -> Trust {
        let path = dir.join("manifest.toml");
        let v2 = manifest(2, &["a", "b"], "f").sign(ca).unwrap();
        std::fs::write(&path, v2.to_bytes()).unwrap();
        Trust {
            ca_key: ca.verifying_key(),
            path: Some(path),
            quorum: 0,
            pinned: Mutex::new(Some(v2)),
        }
    }

    #[test]
    fn refused_manifests_leave_the_pinned_one_in_place() {
        let ca = SigningKey::from_bytes(&[7; 32]);
        let dir = tempfile::tempdir().unwrap();
        let trust = pinned(&ca, dir.path());
        let before = trust.context();
        let forged = manifest(3, &["a", "b", "puppet"], "f")
            .sign(&SigningKey::from_bytes(&[8; 32]))
            .unwrap();
        let older = manifest(1, &["a", "b", "puppet"], "f").sign(&ca).unwrap();
        let forked = manifest(2, &["a", "puppet"], "f").sign(&ca).unwrap();
        let foreign = manifest(9, &["a", "puppet"], "g").sign(&ca).unwrap();
        for (offer, why) in [
            (&forged, "signature is not the CA's"),
            (&older, "version 1, older than version 2"),
            (
                &forked,
                "version 2 like the one this site trusts, but its members differ",
            ),
            (&foreign, "for federation \"g\""),
        ] {
            let e = trust.offer(&offer.to_bytes()).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert_eq!(trust.context(), before);
            assert_eq!(trust.current().unwrap().version(), 2);
        }
        assert_eq!(
            trust.offer(&trust.current().unwrap().to_bytes()).unwrap(),
            Offer::Same
        );
    }

    #[test]
    fn a_newer_manifest_is_adopted_and_survives_a_restart() {
        let ca = SigningKey::from_bytes(&[7; 32]);
        let dir = tempfile::tempdir().unwrap();
        let trust = pinned(&ca, dir.path());
        let before = trust.context();
        let v3 = manifest(3, &["a"], "f").sign(&ca).unwrap();
        assert_eq!(
            trust.offer(&v3.to_bytes()).unwrap(),
            Offer::Adopted { from: 2, to: 3 }
        );
        assert_ne!(trust.context(), before);
        assert_eq!(trust.context(), v3.digest());
        // What a restart reads back.
        let saved = std::fs::read(dir.path().join("manifest.toml")).unwrap();
        let back = SignedManifest::verify(&saved, &ca.verifying_key()).unwrap();
        assert_eq!(back, v3);
        // b was removed in v3: it is no longer a peer.
        assert!(back.manifest().member("b").is_none());
    }
}
