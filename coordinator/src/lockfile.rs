//! The data directory's lock: one coordinator, or one repair, at a time.
//!
//! sled locks its own database file, but only while it is open and only for sled: a `repair`
//! run beside a live coordinator saw "could not acquire lock", took the database for a
//! damaged one and moved it aside while the coordinator kept committing rounds into it. The
//! lock here is taken before anything in the directory is read or written, by `run`,
//! `repair` and `repair --undo` alike, and held until the process ends, so none of them can
//! ever act on a directory another one is using.
//!
//! It is an advisory `flock` on `LOCK` in the data directory (released by the kernel when
//! the process dies, `kill -9` included, so a crash never leaves a stale lock). The file
//! also says who holds it — pid, purpose and start time — so a refusal can name the holder.
//! `flock` does not reach across machines on every network file system: a data directory
//! must be local to the coordinator's host (docs/deploy.md).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Who holds a data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// `run`, `repair` or `repair --undo`.
    pub purpose: String,
    pub since_unix: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.purpose == "run" {
            "a running coordinator".to_string()
        } else {
            format!("cohort-coordinator {}", self.purpose)
        };
        write!(
            f,
            "{what} (pid {}, since unix time {})",
            self.pid, self.since_unix
        )
    }
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; `holder` is what it wrote, when it could be read.
    #[error("{}", match holder {
        Some(h) => format!("in use by {h}"),
        None => "in use by another process (it has not said who)".to_string(),
    })]
    Held { holder: Option<Holder> },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A held lock on a data directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir` for `purpose`, without waiting: a directory in use is an
    /// error naming its holder.
    pub fn acquire(dir: &Path, purpose: &str) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| serde_json::from_str(&text).ok());
                return Err(LockError::Held { holder });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let holder = Holder {
            pid: std::process::id(),
            purpose: purpose.to_string(),
            since_unix: crate::unix_seconds(),
        };
        let text = serde_json::to_string(&holder).unwrap_or_default();
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(DirLock { file, path })
    }

    /// Who holds `dir` now, without taking its lock: None when nobody does.
    pub fn holder(dir: &Path) -> Option<Holder> {
        let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(_) => {
                let mut text = String::new();
                file.read_to_string(&mut text).ok()?;
                serde_json::from_str(&text).ok()
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this lock is still the directory's: false when `LOCK` was deleted or replaced
    /// (the directory was moved, restored from a backup, or cleaned by hand under us).
    pub fn still_ours(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(held), Ok(now)) => held.dev() == now.dev() && held.ino() == now.ino(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_a_dropped_lock_is_free() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = DirLock::acquire(dir.path(), "run").unwrap_or_else(|e| panic!("{e}"));
        assert!(first.still_ours());
        let err = DirLock::acquire(dir.path(), "repair").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "in use by a running coordinator (pid {}",
                std::process::id()
            )),
            "{text}"
        );
        assert_eq!(
            DirLock::holder(dir.path()).map(|h| h.purpose),
            Some("run".into())
        );
        drop(first);
        assert_eq!(DirLock::holder(dir.path()), None);
        let again = DirLock::acquire(dir.path(), "repair").unwrap_or_else(|e| panic!("{e}"));
        // The file replaced under the holder: the holder can tell.
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!again.still_ours());
    }
}
