//! The registry of provisioned sites: which certificate (by serial) each site currently holds,
//! and which certificates were revoked.
//!
//! `provision` keeps it in `coordinator/registry.toml` beside the CRL it signs from the same
//! list. The coordinator, given `tls.registry`, admits a session only from a certificate that
//! is listed there under its site's name; the file is re-read when it changes, so a revocation
//! or renewal takes effect without a restart. The CA check still comes first: the registry
//! narrows what the CA admits (a certificate minted with the CA key outside `provision`, or a
//! superseded one, is refused), it never widens it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse {
        path: String,
        error: Box<toml::de::Error>,
    },
    #[error("encoding the registry: {0}")]
    Encode(#[from] toml::ser::Error),
}

/// A site's current certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredSite {
    pub name: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// The end of the certificate's validity, Unix seconds.
    pub not_after_unix: i64,
}

/// A certificate that must no longer be admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedCertificate {
    pub name: String,
    pub serial: String,
    pub revoked_unix: i64,
    /// "revoked" (`provision --revoke`) or "superseded" (`provision --renew`).
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Incremented with every CRL signed from this registry.
    #[serde(default)]
    pub crl_number: u64,
    #[serde(default)]
    pub site: Vec<RegisteredSite>,
    #[serde(default)]
    pub revoked: Vec<RevokedCertificate>,
}

impl Registry {
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|error| RegistryError::Io {
            path: path.display().to_string(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| RegistryError::Parse {
            path: path.display().to_string(),
            error: Box::new(error),
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), RegistryError> {
        let text = format!(
            "# Written by `cohort-coordinator provision`: the sites' current certificates and the\n\
             # revoked ones. The coordinator admits only the certificates listed under [[site]].\n{}",
            toml::to_string(self)?
        );
        std::fs::write(path, text).map_err(|error| RegistryError::Io {
            path: path.display().to_string(),
            error,
        })
    }

    /// Moves `name`'s current certificate to the revoked list with `reason`; false if the
    /// site has none.
    pub fn retire(&mut self, name: &str, reason: &str, now_unix: i64) -> bool {
        let Some(at) = self.site.iter().position(|s| s.name == name) else {
            return false;
        };
        let old = self.site.remove(at);
        self.revoked.push(RevokedCertificate {
            name: old.name,
            serial: old.serial,
            revoked_unix: now_unix,
            reason: reason.into(),
        });
        true
    }

    pub fn current(&self, name: &str) -> Option<&RegisteredSite> {
        self.site.iter().find(|s| s.name == name)
    }

    /// Why the certificate `serial` of site `name` is not admitted, or None if it is.
    pub fn refusal(&self, name: &str, serial: &str) -> Option<String> {
        if let Some(r) = self.revoked.iter().find(|r| r.serial == serial) {
            return Some(format!(
                "the certificate of site {name:?} (serial {serial}) was {} by `provision`",
                r.reason
            ));
        }
        match self.current(name) {
            Some(s) if s.serial == serial => None,
            Some(s) => Some(format!(
                "site {name:?} presents certificate {serial}, but its registered certificate is {}: install the bundle from `provision --renew`",
                s.serial
            )),
            None => Some(format!(
                "site {name:?} is not in the coordinator's registry of provisioned sites"
            )),
        }
    }
}

/// The registry file as the coordinator sees it: re-read whenever its modification time
/// changes, so `provision --revoke` or `--renew` applies to the next session. The lock is
/// held only to compare and swap the cached copy.
#[derive(Debug)]
pub struct LiveRegistry {
    path: PathBuf,
    cached: Mutex<(Option<SystemTime>, Registry)>,
}

impl LiveRegistry {
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let registry = Registry::load(path)?;
        Ok(LiveRegistry {
            path: path.to_path_buf(),
            cached: Mutex::new((modified(path), registry)),
        })
    }

    /// The current registry. A file that cannot be read or parsed right now (being rewritten,
    /// or damaged) keeps the last good copy in force, with a warning: failing open would
    /// admit revoked sites, failing closed would stop the federation over a typo.
    pub fn get(&self) -> Registry {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = modified(&self.path);
        if now != cached.0 {
            match Registry::load(&self.path) {
                Ok(r) => *cached = (now, r),
                Err(e) => {
                    tracing::warn!(error = %e, "the site registry could not be re-read; the previous one stays in force");
                }
            }
        }
        cached.1.clone()
    }
}

/// A file's modification time: what the live registry and manifest compare to notice a change.
pub(crate) fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_current_unrevoked_certificate_of_a_registered_site_is_admitted() {
        let r = Registry {
            crl_number: 2,
            site: vec![RegisteredSite {
                name: "va".into(),
                serial: "0b".into(),
                not_after_unix: 0,
            }],
            revoked: vec![RevokedCertificate {
                name: "va".into(),
                serial: "0a".into(),
                revoked_unix: 0,
                reason: "superseded".into(),
            }],
        };
        assert_eq!(r.refusal("va", "0b"), None);
        assert!(r.refusal("va", "0a").unwrap().contains("superseded"));
        assert!(r.refusal("va", "0c").unwrap().contains("--renew"));
        assert!(r.refusal("mallory", "0d").unwrap().contains("not in"));
    }

    #[test]
    fn a_changed_file_is_reread_and_a_damaged_one_keeps_the_last_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.toml");
        let mut r = Registry::default();
        r.site.push(RegisteredSite {
            name: "va".into(),
            serial: "01".into(),
            not_after_unix: 0,
        });
        r.save(&path).unwrap();
        let live = LiveRegistry::open(&path).unwrap();
        assert_eq!(live.get().refusal("va", "01"), None);
        r.site.clear();
        // Modification times can be coarse: make sure this write looks newer.
        std::thread::sleep(std::time::Duration::from_millis(20));
        r.save(&path).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(live.get().refusal("va", "01").is_some(), "re-read");
        std::fs::write(&path, "site = 7").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(
            live.get().refusal("va", "01").is_some(),
            "the last good copy stays in force"
        );
    }
}
