//! The CA's registry of enrolled sites as the coordinator sees it (the format is
//! [`cohort_protocols::registry`]): given `tls.registry`, the coordinator admits a session only
//! from a certificate listed there under its site's name, and re-reads the file when it
//! changes, so a revocation or renewal takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

pub use cohort_protocols::registry::{RegisteredSite, Registry, RevokedCertificate};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse {
        path: String,
        error: cohort_protocols::registry::RegistryError,
    },
}

/// Reads the registry file at `path`.
pub fn load(path: &Path) -> Result<Registry, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|error| RegistryError::Io {
        path: path.display().to_string(),
        error,
    })?;
    Registry::parse(&text).map_err(|error| RegistryError::Parse {
        path: path.display().to_string(),
        error,
    })
}

/// The registry file as the coordinator sees it: re-read whenever its modification time
/// changes, so `cohort-ca revoke` or a renewal applies to the next session. The lock is
/// held only to compare and swap the cached copy.
#[derive(Debug)]
pub struct LiveRegistry {
    path: PathBuf,
    cached: Mutex<(Option<SystemTime>, Registry)>,
}

impl LiveRegistry {
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let registry = load(path)?;
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
            match load(&self.path) {
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
    fn a_changed_file_is_reread_and_a_damaged_one_keeps_the_last_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.toml");
        let mut r = Registry::default();
        r.site.push(RegisteredSite {
            name: "va".into(),
            serial: "01".into(),
            not_after_unix: 0,
        });
        std::fs::write(&path, r.encode().unwrap()).unwrap();
        let live = LiveRegistry::open(&path).unwrap();
        assert_eq!(live.get().refusal("va", "01"), None);
        r.site.clear();
        // Modification times can be coarse: make sure this write looks newer.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, r.encode().unwrap()).unwrap();
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
