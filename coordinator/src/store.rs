//! Durable state in the coordinator's data directory (sled).
//!
//! What survives a crash: the feature statistics of round 0, every finished round's summary
//! and per-site results, the site registry's counters, and model checkpoints (parameters,
//! SHA3-512, the coordinator's signature, and the strategy's optimiser state so an adaptive
//! strategy resumes exactly). A round is committed in one sled transaction and flushed before
//! the next round is announced, so after `kill -9` the coordinator resumes after the last
//! committed round: a round is either wholly there or not at all, never counted twice.
//!
//! A checkpoint's hash and signature are in sled; its bytes are a file of their own
//! (`checkpoints/round-N.ckpt`), written straight from the model and fsynced before the
//! transaction that names it. Inside sled a model-sized value would be copied twice on the way
//! in and then kept in sled's page cache: measured at 100 sites × 1M parameters, that took the
//! coordinator from 64 to 87 MiB, and at 100M parameters from 1.2 to 2.7 GiB. A file written
//! before a crash but never committed is simply overwritten next time; a committed one is
//! checked against the hash in sled when read.
//!
//! The directory carries a marker naming the federation (CA), the model and the data schema,
//! and a lock ([`crate::lockfile`]) held by whichever process uses it. A directory that is
//! not ours, belongs to another federation or model, is in use, or whose database does not
//! open is refused before anything is written.
//!
//! Nothing here grows with the number of rounds in memory: a resumed run reads only its last
//! round, the start-up check against the journal streams both one round at a time, and the
//! status API reads rounds page by page. On disk, rounds older than the newest
//! `storage.keep_round_detail` keep their summary and lose their per-site results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use sled::Transactional;
use thiserror::Error;

use crate::hub::SiteState;
use crate::journal::{CheckpointId, Entry, Journal, JournalError, Reader, Rewriter};
use crate::lockfile::{DirLock, Holder, LockError};
pub use crate::records::{RoundRecord, Setup};
use crate::{from_hex, hex};

/// File in the data directory that says whose it is.
pub const MARKER: &str = "COHORT-DATA.json";
/// What the last `repair` did, so `repair --undo` can put it back.
pub const REPAIR_RECORD: &str = "REPAIR.json";
const FORMAT: &str = "cohort-coordinator data v1";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "data_dir {path} is not empty and holds no {MARKER}: it is not a Cohort data directory, so it is left alone; point data_dir at a new or empty directory"
    )]
    NotOurs { path: PathBuf },
    #[error("{}", foreign(path, what, stored, configured, detail))]
    Foreign {
        path: PathBuf,
        what: &'static str,
        stored: String,
        configured: String,
        /// What differs, key by key, where it can be told (the schema).
        detail: String,
    },
    #[error(
        "data_dir {path} is {}; nothing was changed. Stop it first (systemctl stop cohort-coordinator, or SIGTERM to that pid) — neither run nor repair ever acts on a data directory in use",
        in_use(holder)
    )]
    InUse {
        path: PathBuf,
        holder: Option<Holder>,
    },
    #[error(
        "data_dir {path} changed under the running coordinator ({detail}); nothing more was written to it. Something outside the coordinator moved, replaced or deleted its files: find out what, then start the coordinator again, which checks the directory and says what to do"
    )]
    Replaced { path: PathBuf, detail: String },
    #[error("data_dir {path}: {detail}; nothing was changed")]
    Corrupt { path: PathBuf, detail: String },
    #[error("data_dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the database: {0}")]
    Db(#[from] sled::Error),
    #[error("a stored record does not decode: {0}")]
    Decode(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

fn in_use(holder: &Option<Holder>) -> String {
    match holder {
        Some(h) => format!("in use by {h}"),
        None => "in use by another process".into(),
    }
}

fn foreign(path: &Path, what: &str, stored: &str, configured: &str, detail: &str) -> String {
    let path = path.display();
    match what {
        "CA" => format!(
            "data_dir {path} belongs to another federation: it was started with the CA whose SHA3-256 is {stored}, and the configuration's tls.ca_cert is {configured}; nothing was changed (point data_dir at a new directory to start afresh)"
        ),
        "data schema" if !detail.is_empty() => format!(
            "data_dir {path} holds a run that started with another [schema] ({detail}); nothing was changed. Restore [schema] as the run started (a renamed or mistyped column is a different schema), or point data_dir at a new directory to start a new run"
        ),
        "data schema" => format!(
            "data_dir {path} holds a run that started with another [schema] (its hash is {stored}, the configuration's {configured}); nothing was changed. Restore [schema] as the run started (a renamed or mistyped column is a different schema), or point data_dir at a new directory to start a new run"
        ),
        "model" => format!(
            "data_dir {path} holds a run of another model: {stored} there, {configured} in the configuration's [model]; nothing was changed. Restore [model] as the run started, or point data_dir at a new directory to start a new run"
        ),
        _ => format!(
            "data_dir {path} was written by another version of Cohort ({what} {stored}, this one reads {configured}); nothing was changed"
        ),
    }
}

/// What a data directory is for. Rounds of one federated run may only continue with the same
/// CA, model and schema; anything else is a different run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: String,
    /// SHA3-256 of the CA certificate (DER), hex.
    pub ca_sha3_256: String,
    /// e.g. `"mlp 13-[32]-1"`.
    pub model: String,
    pub schema_hash: String,
    /// The `[schema]` itself, as TOML: a refusal for a changed schema can then say which key
    /// changed (absent in directories made before it was kept; not part of the check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_toml: Option<String>,
}

impl Identity {
    pub fn new(ca_der: &[u8], model: String, schema_hash: String) -> Self {
        Identity {
            format: FORMAT.into(),
            ca_sha3_256: hex(&Sha3_256::digest(ca_der)),
            model,
            schema_hash,
            schema_toml: None,
        }
    }

    /// The identity of a coordinator configuration's run.
    pub fn of(ca_der: &[u8], config: &crate::CoordinatorConfig) -> Self {
        let mut id = Identity::new(ca_der, config.model.spec().describe(), config.schema.hash());
        id.schema_toml = toml::to_string(&config.schema).ok();
        id
    }

    /// The keys in which the schema this identity was made with differs from `stored`'s, as
    /// "key: value there, value in the configuration".
    fn schema_differences(&self, stored: &Identity) -> String {
        let parse = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| toml::from_str::<cohort_protocols::model::DataSchema>(t).ok())
        };
        match (parse(&stored.schema_toml), parse(&self.schema_toml)) {
            (Some(there), Some(here)) => there
                .differences(&here)
                .join("; ")
                .replace(" here, ", " in data_dir, ")
                .replace(" there", " in the configuration"),
            _ => String::new(),
        }
    }
}

/// A global model as of the end of a round (round 0: the initial model).
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub round: u64,
    pub params: Vec<f32>,
    pub sha3_512: [u8; 64],
    /// The coordinator's Ed25519 signature of the model (see `signing`).
    pub signature: [u8; 64],
    /// The strategy's first and second moments (empty for FedAvg).
    pub strategy_m: Vec<f32>,
    pub strategy_v: Vec<f32>,
}

/// A checkpoint to write, borrowed from the driver's live state (no copy of the model).
#[derive(Debug, Clone, Copy)]
pub struct CheckpointRef<'a> {
    pub round: u64,
    pub params: &'a [f32],
    pub sha3_512: &'a [u8; 64],
    pub signature: &'a [u8; 64],
    pub strategy_m: &'a [f32],
    pub strategy_v: &'a [f32],
}

/// Everything needed to continue a run: the last round, not the history (which stays on
/// disk, so a run of 100 000 rounds resumes in the memory of a run of one).
#[derive(Debug, Clone)]
pub struct Resume {
    pub setup: Setup,
    /// The last committed round (0: only the setup).
    pub last_round: u64,
    /// That round's record (None when it is 0).
    pub last: Option<RoundRecord>,
    pub checkpoint: Checkpoint,
    pub sites: BTreeMap<String, SiteState>,
}

/// How long rounds keep what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Checkpoints kept: the newest N rounds' (at least the latest).
    pub checkpoints: u64,
    /// Rounds whose per-site results are kept: the newest N (at least 1).
    pub round_detail: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    rounds: sled::Tree,
    checkpoints: sled::Tree,
    sites: sled::Tree,
    /// Held for as long as any clone of the store lives: no other coordinator, and no repair,
    /// can use the directory meanwhile.
    lock: Arc<DirLock>,
    /// `db/` as it was opened (device, inode): a directory moved or replaced under us is
    /// noticed before the next commit instead of being written past.
    db_id: (u64, u64),
}

const SETUP: &[u8] = b"setup";
const LAST_ROUND: &[u8] = b"last_round";
const COUNTERS: &[u8] = b"counters";
/// The history digest as of the last committed round ([`chain`]).
const CHAIN: &[u8] = b"history_chain";

/// The newest rounds that are read from sled: the start-up check compares them with the
/// journal record by record, and the status API serves them from sled. Older rounds are
/// checked through the history digest and served from the journal. sled keeps in memory
/// every page it has read — iterating 30 000 rounds took a process from 5.7 to 21.3 MiB with
/// a 1 MiB cache — so reading the whole history at every start made memory after a restart
/// grow with the run; reading this window keeps it bounded.
pub const HOT_ROUNDS: u64 = 1000;

/// The history digest: SHA3-256 chained over every committed entry in round order, each as
/// its JSON with per-site results left out (they are pruned with age; a round's summary and
/// its checkpoint's hash and signature never change). Kept in sled beside the last round, and
/// recomputed from the journal at start: equal digests mean equal histories, without reading
/// sled's old rounds.
fn chain(prev: &[u8; 32], entry: &Entry) -> [u8; 32] {
    let mut entry = entry.clone();
    if let Entry::Round { record, .. } = &mut entry {
        record.prune_detail();
    }
    let mut h = Sha3_256::new();
    h.update(b"cohort history v1");
    h.update(prev);
    h.update(serde_json::to_vec(&entry).unwrap_or_default());
    h.finalize().into()
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Takes the directory's lock for `purpose`, as a store error.
fn lock(dir: &Path, purpose: &str) -> Result<DirLock, StoreError> {
    DirLock::acquire(dir, purpose).map_err(|e| match e {
        LockError::Held { holder } => StoreError::InUse {
            path: dir.to_path_buf(),
            holder,
        },
        LockError::Io { path, source } => StoreError::Io { path, source },
    })
}

/// The database in `dir/db`, opened where sled's panics cannot end the process
/// ([`crate::crash::contain`]). It holds metadata only (models are files), so a small page
/// cache is plenty — and sled counts its cache loosely against the cap. Measured with the
/// store alone over 30 000 commits: 5.5 → 21.1 MiB with a 16 MiB cache, 5.3 → 12.4 MiB with
/// 1 MiB; and reopening that directory (the start-up check reads every round) added 7.2 MiB
/// with a 4 MiB cache, 4.5 MiB with 1 MiB.
///
/// sled's lock on its file lives as long as the file does, and sled's own I/O threads can
/// hold the file for a moment after the last `Db` handle was dropped: `repair` drops its
/// handle and at once opens the directory again to check it, and on a loaded machine that
/// second open found the lock still held. Our directory `LOCK` is held before this is
/// called, so another coordinator of ours cannot be the holder: a held lock is waited out
/// for up to [`LOCK_GRACE`] before it is reported.
fn open_db(dir: &Path) -> Result<sled::Db, String> {
    let path = dir.join("db");
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        match crate::crash::contain(|| {
            sled::Config::new()
                .path(&path)
                .cache_capacity(1 << 20)
                .open()
        }) {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(e)) => {
                let e = e.to_string();
                if e.contains("could not acquire lock") && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
                return Err(e);
            }
            Err(panic) => return Err(format!("sled panicked reading it: {panic}")),
        }
    }
}

/// How long [`open_db`] waits for sled's own threads to let go of the database file.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the database did not open, with what to do: damage is for `repair`; a file the
/// process may not read or write, a full or read-only disk, or a lock held by a process that
/// is not a coordinator of ours (ours hold `LOCK` first) are not, and rebuilding would not
/// help.
fn open_refusal(dir: &Path, e: &str) -> StoreError {
    let io_problem = [
        "Permission denied",
        "Read-only file system",
        "No space left",
        "could not acquire lock",
        "Too many open files",
    ]
    .iter()
    .find(|p| e.contains(*p));
    let detail = match io_problem {
        Some(_) => format!(
            "the database does not open ({e}): it is not damaged, the process cannot use it — check that the coordinator's user may read and write {} and that the disk has room, and that no other program holds it",
            dir.join("db").display()
        ),
        None => format!(
            "the database does not open ({e}); `cohort-coordinator repair --config FILE` rebuilds it from the round journal (docs/deploy.md, \"Recovering storage\")"
        ),
    };
    StoreError::Corrupt {
        path: dir.to_path_buf(),
        detail,
    }
}

/// Runs a read of a possibly damaged database, turning a sled panic into an error.
fn contained<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    crate::crash::contain(f)
        .unwrap_or_else(|panic| Err(StoreError::Decode(format!("sled panicked: {panic}"))))
}

/// Whether two entries record the same committed step, compared as JSON (floats and maps
/// as they were written). Per-site results are compared only where both still have them: a
/// round pruned in one witness and not yet in the other (a crash between the two) is the
/// same round.
fn same_entry(a: &Entry, b: &Entry) -> bool {
    fn json<T: Serialize>(v: &T) -> Option<serde_json::Value> {
        serde_json::to_value(v).ok()
    }
    match (a, b) {
        (
            Entry::Setup {
                setup: s1,
                checkpoint: c1,
            },
            Entry::Setup {
                setup: s2,
                checkpoint: c2,
            },
        ) => c1 == c2 && json(s1) == json(s2),
        (
            Entry::Round {
                record: r1,
                checkpoint: c1,
            },
            Entry::Round {
                record: r2,
                checkpoint: c2,
            },
        ) => {
            c1 == c2
                && json(&r1.summary) == json(&r2.summary)
                && (r1.per_site_pruned
                    || r2.per_site_pruned
                    || json(&r1.per_site) == json(&r2.per_site))
        }
        _ => false,
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` for a run, refusing a directory that is not this
    /// run's, is in use, or whose database and journal do not agree.
    pub fn open(dir: &Path, identity: &Identity) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let ours = Self::check_marker(dir, identity)?;
        if !ours {
            // Empty, or holding only the lock of a first start that stopped before its marker.
            let empty = std::fs::read_dir(dir)
                .map_err(io)?
                .filter_map(Result::ok)
                .all(|e| e.file_name() == crate::lockfile::LOCK_FILE);
            if !empty {
                return Err(StoreError::NotOurs {
                    path: dir.to_path_buf(),
                });
            }
        }
        let lock = lock(dir, "run")?;
        if !ours {
            let text = serde_json::to_string_pretty(identity)
                .map_err(|e| StoreError::Decode(e.to_string()))?;
            std::fs::write(dir.join(MARKER), text).map_err(io)?;
        } else if identity.schema_toml.is_some() {
            Self::complete_marker(dir, identity)?;
        }
        if ours && !dir.join("db").is_dir() {
            return Err(StoreError::Corrupt {
                path: dir.to_path_buf(),
                detail: "the database directory db/ is missing; `cohort-coordinator repair --config FILE` rebuilds it from the round journal".into(),
            });
        }
        let db = open_db(dir).map_err(|e| open_refusal(dir, &e))?;
        let store = Store::from_db(dir, db, lock)?;
        contained(|| store.check_against_journal())?;
        Ok(store)
    }

    /// Whether `dir` holds a marker, which must then name `identity`: false when there is no
    /// marker; an error when it is unreadable or names another federation, model or schema.
    pub fn check_marker(dir: &Path, identity: &Identity) -> Result<bool, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let marker = dir.join(MARKER);
        if !marker.exists() {
            return Ok(false);
        }
        let text = std::fs::read_to_string(&marker).map_err(io)?;
        let stored: Identity = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: dir.to_path_buf(),
            detail: format!("{MARKER} does not parse ({e})"),
        })?;
        let fields = [
            ("format", &stored.format, &identity.format),
            ("CA", &stored.ca_sha3_256, &identity.ca_sha3_256),
            ("model", &stored.model, &identity.model),
            ("data schema", &stored.schema_hash, &identity.schema_hash),
        ];
        for (what, s, c) in fields {
            if s != c {
                return Err(StoreError::Foreign {
                    path: dir.to_path_buf(),
                    what,
                    stored: s.clone(),
                    configured: c.clone(),
                    detail: if what == "data schema" {
                        identity.schema_differences(&stored)
                    } else {
                        String::new()
                    },
                });
            }
        }
        Ok(true)
    }

    /// Adds the schema's TOML to a marker written before it was kept (the same run: the
    /// hashes agree), so a later change of `[schema]` can be named key by key.
    fn complete_marker(dir: &Path, identity: &Identity) -> Result<(), StoreError> {
        let path = dir.join(MARKER);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let stored: Identity = serde_json::from_str(&std::fs::read_to_string(&path).map_err(io)?)
            .map_err(|e| StoreError::Decode(e.to_string()))?;
        if stored.schema_toml.is_some() {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(identity)
            .map_err(|e| StoreError::Decode(e.to_string()))?;
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn from_db(dir: &Path, db: sled::Db, lock: DirLock) -> Result<Store, StoreError> {
        Self::from_shared(dir, db, Arc::new(lock))
    }

    fn from_shared(dir: &Path, db: sled::Db, lock: Arc<DirLock>) -> Result<Store, StoreError> {
        Ok(Store {
            path: dir.to_path_buf(),
            meta: db.open_tree("meta")?,
            rounds: db.open_tree("rounds")?,
            checkpoints: db.open_tree("checkpoints")?,
            sites: db.open_tree("sites")?,
            db_id: file_id(&dir.join("db")).unwrap_or_default(),
            db,
            lock,
        })
    }

    /// Refuses to write when the directory is no longer the one opened: `db/` or `LOCK`
    /// moved, replaced or deleted by something else. Writing on would put rounds into a
    /// database nobody will open again while the journal moves on without it.
    fn check_in_place(&self) -> Result<(), StoreError> {
        let replaced = |detail: &str| StoreError::Replaced {
            path: self.path.clone(),
            detail: detail.into(),
        };
        if file_id(&self.path.join("db")) != Some(self.db_id) {
            return Err(replaced("db/ is no longer the database it opened"));
        }
        if !self.lock.still_ours() {
            return Err(replaced("its LOCK file was removed or replaced"));
        }
        Ok(())
    }

    /// sled and the round journal must tell the same story: the same last round (sled may be
    /// one ahead after a crash between the two writes, which is then written into the
    /// journal), the same records, the same checkpoints. Anything else means one of them was
    /// damaged, and starting would silently lose or redo committed rounds. The journal is
    /// streamed whole; of sled, the newest [`HOT_ROUNDS`] rounds are compared record by record
    /// and the older ones through the history digest ([`chain`]), so a start reads the same
    /// amount of sled at round 100 and at round 100 000. A directory without a digest (written
    /// before it existed) is compared in full once, and the digest stored.
    fn check_against_journal(&self) -> Result<(), StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let db_last = self.db_last_round().map_err(|e| {
            corrupt(format!(
                "the database does not read back ({e}); run `cohort-coordinator repair --config FILE` to rebuild it from the round journal"
            ))
        })?;
        if db_last.is_some() && !Journal::path(&self.path).exists() {
            // A data directory from before the journal existed: start one from sled.
            return self.rewrite_journal_from_db(db_last);
        }
        let stored_chain = self.stored_chain()?;
        // Rounds before this are checked through the digest (when there is one).
        let compare_from = match (stored_chain, db_last) {
            (Some(_), Some(d)) => d.saturating_sub(HOT_ROUNDS - 1),
            _ => 0,
        };
        let mut reader = Reader::open(&self.path)?;
        let mut digest = [0u8; 32];
        let mut digest_at_db_last = None;
        loop {
            let entry = reader.next_entry().map_err(|e| {
                corrupt(format!(
                    "the round journal is damaged ({e}); if the database is intact, `cohort-coordinator repair --config FILE` rewrites the journal from it"
                ))
            })?;
            let Some(journal_entry) = entry else {
                break;
            };
            let round = journal_entry.round();
            digest = chain(&digest, &journal_entry);
            if db_last == Some(round) {
                digest_at_db_last = Some(digest);
            }
            if db_last.is_none_or(|d| round > d) || round < compare_from {
                continue;
            }
            let from_db = self
                .entry_from_db(round, Some(journal_entry.checkpoint()))
                .map_err(|e| {
                    corrupt(format!(
                        "the database does not read back at round {round} ({e}); run `cohort-coordinator repair --config FILE` to rebuild it from the round journal"
                    ))
                })?;
            if !same_entry(&from_db, &journal_entry) {
                return Err(corrupt(format!(
                    "round {round} differs between the database and the round journal; run `cohort-coordinator repair --config FILE` to rebuild the database from the journal"
                )));
            }
        }
        let j_last = reader.last_round();
        let ahead_by_one = match (db_last, j_last) {
            (Some(0), None) => true,
            (Some(d), Some(j)) => d == j + 1,
            _ => false,
        };
        if let (true, Some(d)) = (ahead_by_one, db_last) {
            let missing = self.entry_from_db(d, None)?;
            digest_at_db_last = Some(chain(&digest, &missing));
            Journal::append(&self.path, &missing)?;
        } else if db_last != j_last {
            let repair = if db_last < j_last {
                "the database lost committed rounds (it was damaged): run `cohort-coordinator repair --config FILE` to rebuild it from the journal"
            } else {
                "the journal lost committed rounds (it was damaged or truncated): run `cohort-coordinator repair --config FILE` to rewrite it from the database"
            };
            return Err(corrupt(format!(
                "the database's last committed round is {} but the round journal's is {}; {repair}",
                describe(db_last),
                describe(j_last)
            )));
        }
        match (stored_chain, digest_at_db_last) {
            (Some(stored), Some(computed)) if stored != computed => Err(corrupt(format!(
                "the rounds before round {compare_from} differ between the database and the round journal (their history digests differ); run `cohort-coordinator repair --config FILE`, which rebuilds whichever of the two is damaged"
            ))),
            (None, Some(computed)) => {
                // Compared in full above: the digest of the journal is the database's too.
                self.meta.insert(CHAIN, &computed[..])?;
                self.db.flush()?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The history digest sled holds, if any.
    fn stored_chain(&self) -> Result<Option<[u8; 32]>, StoreError> {
        Ok(self
            .meta
            .get(CHAIN)?
            .and_then(|v| <[u8; 32]>::try_from(v.as_ref()).ok()))
    }

    fn db_last_round(&self) -> Result<Option<u64>, StoreError> {
        if self.meta.get(SETUP)?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.last_round()?.unwrap_or(0)))
    }

    /// Round `round` as a journal entry, from the database. A checkpoint whose index sled
    /// no longer has (pruned) takes `fallback`, the journal's copy, when there is one.
    fn entry_from_db(
        &self,
        round: u64,
        fallback: Option<&CheckpointId>,
    ) -> Result<Entry, StoreError> {
        let checkpoint = match self.checkpoints.get(round.to_be_bytes())? {
            Some(index) if index.len() == 128 => CheckpointId {
                round,
                sha3_512: hex(&index[..64]),
                signature: hex(&index[64..]),
            },
            Some(index) => {
                return Err(StoreError::Decode(format!(
                    "the checkpoint index of round {round} has {} bytes",
                    index.len()
                )));
            }
            None => fallback.cloned().unwrap_or(CheckpointId {
                // Pruned before the journal existed: only the hash in the summary is known.
                round,
                sha3_512: String::new(),
                signature: String::new(),
            }),
        };
        if round == 0 {
            let setup: Setup = decode_json(
                &self
                    .meta
                    .get(SETUP)?
                    .ok_or_else(|| StoreError::Decode("the setup is missing".into()))?,
            )?;
            return Ok(Entry::Setup { setup, checkpoint });
        }
        let bytes = self
            .rounds
            .get(round.to_be_bytes())?
            .ok_or_else(|| StoreError::Decode(format!("round {round} is missing")))?;
        Ok(Entry::Round {
            record: decode_json(&bytes)?,
            checkpoint,
        })
    }

    /// Writes the journal anew from the database, rounds 0..=last, one at a time (an empty
    /// journal when nothing was committed). The checkpoint identity of a round whose index
    /// sled pruned is taken from the old journal while it still reads.
    fn rewrite_journal_from_db(&self, last: Option<u64>) -> Result<(), StoreError> {
        let mut w = Rewriter::create(&self.path)?;
        let mut digest = None;
        if let Some(last) = last {
            let mut prior = Reader::open(&self.path).ok();
            let mut d = [0u8; 32];
            for round in 0..=last {
                let fallback = match prior.as_mut().map(Reader::next_entry) {
                    Some(Ok(Some(e))) if e.round() == round => Some(e.checkpoint().clone()),
                    _ => {
                        prior = None;
                        None
                    }
                };
                let entry = self.entry_from_db(round, fallback.as_ref())?;
                d = chain(&d, &entry);
                w.push(&entry)?;
            }
            digest = Some(d);
        }
        w.commit()?;
        if let Some(d) = digest {
            self.meta.insert(CHAIN, &d[..])?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// Whether the data directory passes the start-up check as it is (read by
    /// `repair`: a directory that would start needs no repair).
    fn verify(dir: &Path, lock: Arc<DirLock>) -> Result<Store, StoreError> {
        if !dir.join("db").is_dir() {
            return Err(StoreError::Corrupt {
                path: dir.to_path_buf(),
                detail: "db/ is missing".into(),
            });
        }
        let db = open_db(dir).map_err(|e| StoreError::Corrupt {
            path: dir.to_path_buf(),
            detail: e,
        })?;
        let store = Self::from_shared(dir, db, lock)?;
        contained(|| store.check_against_journal())?;
        Ok(store)
    }

    /// Repairs a data directory that `run` refuses, from whichever witness is intact: the
    /// database is rebuilt from the round journal (the old one kept beside it as
    /// `db.damaged-<unix time>`), or the journal is rewritten from the database (the old one
    /// kept as `rounds.journal.before-repair-<unix time>`). What was done is recorded in
    /// [`REPAIR_RECORD`] for [`Store::undo_repair`].
    ///
    /// It never touches a directory in use (it takes the directory's lock, and refuses while
    /// anybody holds it), never changes a directory that already passes the start-up check,
    /// and never leaves one that does not: the repaired directory is checked as `run` checks
    /// it, and the repair is undone if it fails.
    pub fn repair(dir: &Path, identity: &Identity) -> Result<Repaired, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: dir.to_path_buf(),
            detail,
        };
        if !Self::check_marker(dir, identity)? {
            return Err(corrupt(format!(
                "no {MARKER}: not a Cohort data directory, nothing to repair"
            )));
        }
        let lock = Arc::new(lock(dir, "repair")?);
        match Self::verify(dir, lock.clone()) {
            Ok(store) => {
                let last = store.db_last_round()?.unwrap_or(0);
                return Ok(Repaired {
                    last_round: last,
                    source: RepairSource::NothingToDo,
                    moved_aside: None,
                    journal_backup: None,
                });
            }
            Err(StoreError::Io { path, source }) => return Err(StoreError::Io { path, source }),
            Err(_) => {}
        }
        // Which witness is intact: a journal that reads to its end, at least as long as a
        // database that reads back, wins.
        let journal_last = {
            let mut reader = Reader::open(dir)?;
            let mut ok = true;
            loop {
                match reader.next_entry() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            ok.then(|| reader.last_round()).flatten()
        };
        let old = if dir.join("db").is_dir() {
            open_db(dir).ok()
        } else {
            None
        };
        let old_store = old
            .as_ref()
            .and_then(|db| Self::from_shared(dir, db.clone(), lock.clone()).ok());
        let db_last = old_store.as_ref().and_then(|s| {
            contained(|| {
                let last = s.db_last_round()?;
                // Readable all the way: every round decodes.
                for r in 0..=last.unwrap_or(0) {
                    if last.is_some() {
                        s.entry_from_db(r, None)?;
                    }
                }
                Ok(last)
            })
            .ok()
            .flatten()
        });
        let source = match (journal_last, db_last) {
            (Some(j), Some(d)) if d > j => RepairSource::Database,
            (Some(_), _) => RepairSource::Journal,
            (None, Some(_)) => RepairSource::Database,
            (None, None) => {
                return Err(corrupt(
                    "neither the round journal nor the database holds a readable committed run to repair from; start afresh with a new data_dir (keep this one for inspection)".into(),
                ));
            }
        };
        let last = match source {
            RepairSource::Database => db_last.unwrap_or(0),
            _ => journal_last.unwrap_or(0),
        };
        // The last round's checkpoint must be there and be the committed one: without it
        // there is nothing to resume from, and nothing is changed.
        let committed = match source {
            RepairSource::Database => old_store
                .as_ref()
                .map(|s| s.entry_from_db(last, None))
                .transpose()?
                .map(|e| e.checkpoint().sha3_512.clone()),
            _ => {
                let mut reader = Reader::open(dir)?;
                let mut hash = None;
                while let Some(e) = reader.next_entry()? {
                    hash = Some(e.checkpoint().sha3_512.clone());
                }
                hash
            }
        }
        .unwrap_or_default();
        let probe = Store::checkpoint_file(dir, last);
        let bytes = std::fs::read(&probe).map_err(|e| {
            corrupt(format!(
                "the checkpoint of the last committed round {last} ({}) cannot be read ({e}): nothing to resume from",
                probe.display()
            ))
        })?;
        let ckpt = decode_checkpoint(last, &bytes)?;
        if hex(&ckpt.sha3_512) != committed {
            return Err(corrupt(format!(
                "{} is not the checkpoint committed for round {last}: nothing to resume from",
                probe.display()
            )));
        }
        let sites: Vec<(sled::IVec, sled::IVec)> = old_store
            .as_ref()
            .and_then(|s| contained(|| Ok(s.sites.iter().filter_map(Result::ok).collect())).ok())
            .unwrap_or_default();
        let stamp = crate::unix_seconds();
        let mut record = RepairRecord {
            at_unix: stamp,
            source,
            last_round: last,
            moved_db: None,
            journal_backup: None,
        };
        match source {
            RepairSource::Database => {
                let store = old_store.ok_or_else(|| corrupt("the database vanished".into()))?;
                drop(old);
                let journal = Journal::path(dir);
                if journal.exists() {
                    let backup = format!("{}.before-repair-{stamp}", crate::journal::JOURNAL);
                    std::fs::copy(&journal, dir.join(&backup)).map_err(|source| {
                        StoreError::Io {
                            path: journal.clone(),
                            source,
                        }
                    })?;
                    record.journal_backup = Some(backup);
                }
                write_repair_record(dir, &record)?;
                store.rewrite_journal_from_db(Some(last))?;
                store.flush()?;
            }
            RepairSource::Journal | RepairSource::NothingToDo => {
                drop(old_store);
                drop(old);
                let db = dir.join("db");
                if db.exists() {
                    let aside = format!("db.damaged-{stamp}");
                    std::fs::rename(&db, dir.join(&aside)).map_err(|source| StoreError::Io {
                        path: db.clone(),
                        source,
                    })?;
                    record.moved_db = Some(aside);
                }
                write_repair_record(dir, &record)?;
                let fresh = open_db(dir).map_err(|e| corrupt(format!("a new database: {e}")))?;
                let store = Self::from_shared(dir, fresh, lock.clone())?;
                store.fill_from_journal(&sites, last)?;
            }
        }
        // Every handle on the database is gone here (sled locks its file while one lives),
        // so the check below opens it as `run` will.
        match Self::verify(dir, lock.clone()) {
            Ok(_) => Ok(Repaired {
                last_round: last,
                source,
                moved_aside: record.moved_db.as_ref().map(|m| dir.join(m)),
                journal_backup: record.journal_backup.as_ref().map(|b| dir.join(b)),
            }),
            Err(e) => {
                let undone = Self::undo_locked(dir, &record);
                Err(corrupt(format!(
                    "the repaired directory did not pass the start-up check ({e}); the repair was {}",
                    match undone {
                        Ok(()) => "undone".to_string(),
                        Err(u) => format!("not undone either ({u}): see {REPAIR_RECORD}"),
                    }
                )))
            }
        }
    }

    /// Rebuilds an empty database from the journal, one entry at a time, with the site
    /// counters the old database still yielded.
    fn fill_from_journal(
        &self,
        sites: &[(sled::IVec, sled::IVec)],
        last: u64,
    ) -> Result<(), StoreError> {
        let index = |c: &CheckpointId| -> Option<Vec<u8>> {
            let mut v = from_hex(&c.sha3_512)?;
            v.extend(from_hex(&c.signature)?);
            (v.len() == 128 && Store::checkpoint_file(&self.path, c.round).exists()).then_some(v)
        };
        let mut reader = Reader::open(&self.path)?;
        let mut digest = [0u8; 32];
        while let Some(e) = reader.next_entry()? {
            digest = chain(&digest, &e);
            match &e {
                Entry::Setup { setup, checkpoint } => {
                    self.meta.insert(SETUP, encode_json(setup)?)?;
                    if let Some(i) = index(checkpoint) {
                        self.checkpoints.insert(0u64.to_be_bytes(), i)?;
                    }
                }
                Entry::Round { record, checkpoint } => {
                    let r = record.summary.round;
                    self.rounds.insert(r.to_be_bytes(), encode_json(record)?)?;
                    if let Some(i) = index(checkpoint) {
                        self.checkpoints.insert(r.to_be_bytes(), i)?;
                    }
                }
            }
        }
        for (k, v) in sites {
            self.sites.insert(k, v.clone())?;
        }
        self.meta.insert(LAST_ROUND, &last.to_be_bytes())?;
        self.meta.insert(CHAIN, &digest[..])?;
        self.db.flush()?;
        Ok(())
    }

    /// Puts back what the last `repair` changed (`repair --undo`): the database it moved
    /// aside and the journal it replaced. Refused while the directory is in use, when no
    /// repair is recorded, and when rounds were committed after the repair (undoing it would
    /// lose them).
    pub fn undo_repair(dir: &Path, identity: &Identity) -> Result<RepairRecord, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: dir.to_path_buf(),
            detail,
        };
        if !Self::check_marker(dir, identity)? {
            return Err(corrupt(format!("no {MARKER}: not a Cohort data directory")));
        }
        let _lock = lock(dir, "repair --undo")?;
        let path = dir.join(REPAIR_RECORD);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt(format!(
                    "no repair to undo: {REPAIR_RECORD} is absent (only the last repair can be undone, once)"
                )));
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let record: RepairRecord = serde_json::from_str(&text)
            .map_err(|e| corrupt(format!("{REPAIR_RECORD} does not parse ({e})")))?;
        let mut reader = Reader::open(dir)?;
        while reader.next_entry().ok().flatten().is_some() {}
        if reader.last_round().is_some_and(|j| j > record.last_round) {
            return Err(corrupt(format!(
                "rounds were committed after the repair (the journal reaches round {}, the repair left round {}): undoing it would lose them",
                describe(reader.last_round()),
                record.last_round
            )));
        }
        Self::undo_locked(dir, &record)?;
        Ok(record)
    }

    /// The undo itself, under a lock the caller holds.
    fn undo_locked(dir: &Path, record: &RepairRecord) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let stamp = crate::unix_seconds();
        // A rebuild made the present db/: it goes aside, and the one it replaced (if there
        // was one) comes back.
        if record.source == RepairSource::Journal {
            let db = dir.join("db");
            if db.exists() {
                std::fs::rename(&db, dir.join(format!("db.undone-{stamp}"))).map_err(io(&db))?;
            }
            if let Some(moved) = &record.moved_db {
                std::fs::rename(dir.join(moved), &db).map_err(io(&db))?;
            }
        }
        if let Some(backup) = &record.journal_backup {
            let journal = Journal::path(dir);
            if journal.exists() {
                std::fs::rename(
                    &journal,
                    dir.join(format!("{}.undone-{stamp}", crate::journal::JOURNAL)),
                )
                .map_err(io(&journal))?;
            }
            std::fs::rename(dir.join(backup), &journal).map_err(io(&journal))?;
        }
        let path = dir.join(REPAIR_RECORD);
        std::fs::rename(&path, dir.join(format!("REPAIR.undone-{stamp}.json"))).map_err(io(&path))
    }

    /// Writes everything to disk (commits already do; this is for shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state to continue from, if round 0 was committed: the last round only.
    pub fn resume(&self) -> Result<Option<Resume>, StoreError> {
        contained(|| {
            let Some(setup) = self.meta.get(SETUP)? else {
                return Ok(None);
            };
            let setup: Setup = decode_json(&setup)?;
            let last_round = self.last_round()?.unwrap_or(0);
            let last = if last_round == 0 {
                None
            } else {
                Some(self.db_round(last_round)?.ok_or_else(|| {
                    StoreError::Decode(format!("the last round ({last_round}) is missing"))
                })?)
            };
            let checkpoint = self.checkpoint(last_round)?.ok_or_else(|| {
                StoreError::Decode(format!(
                    "the checkpoint of the last round ({last_round}) is missing"
                ))
            })?;
            let mut sites = BTreeMap::new();
            for entry in self.sites.iter() {
                let (k, v) = entry?;
                let name = String::from_utf8_lossy(&k).into_owned();
                sites.insert(name, decode_json(&v)?);
            }
            Ok(Some(Resume {
                setup,
                last_round,
                last,
                checkpoint,
                sites,
            }))
        })
    }

    pub fn last_round(&self) -> Result<Option<u64>, StoreError> {
        self.meta
            .get(LAST_ROUND)?
            .map(|v| decode_u64(&v))
            .transpose()
    }

    /// The metric counters as last saved (`metrics::Counters`, JSON), if ever.
    pub fn counters(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(COUNTERS)?.map(|v| v.to_vec()))
    }

    /// Saves the metric counters durably: called before a scrape is answered with values
    /// above the saved ones, so a restart never serves less than was served.
    pub fn save_counters(&self, json: &[u8]) -> Result<(), StoreError> {
        self.check_in_place()?;
        self.meta.insert(COUNTERS, json)?;
        self.db.flush()?;
        Ok(())
    }

    /// Commits round 0: statistics, initial evaluation and the initial model.
    pub fn commit_setup(
        &self,
        setup: &Setup,
        checkpoint: &CheckpointRef,
    ) -> Result<(), StoreError> {
        self.check_in_place()?;
        let setup_bytes = encode_json(setup)?;
        let index = self.write_checkpoint_file(checkpoint)?;
        let entry = Entry::Setup {
            setup: setup.clone(),
            checkpoint: CheckpointId::new(0, checkpoint.sha3_512, checkpoint.signature),
        };
        let digest = chain(&[0; 32], &entry);
        (&self.meta, &self.checkpoints)
            .transaction(|(meta, checkpoints)| {
                meta.insert(SETUP, setup_bytes.as_slice())?;
                meta.insert(LAST_ROUND, &0u64.to_be_bytes())?;
                meta.insert(CHAIN, &digest[..])?;
                checkpoints.insert(&0u64.to_be_bytes(), index.as_slice())?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.db.flush()?;
        Journal::append(&self.path, &entry)?;
        Ok(())
    }

    /// Commits a finished round atomically and flushes it to disk, then prunes what
    /// `retention` no longer keeps: checkpoints older than the newest `retention.checkpoints`,
    /// and the per-site results of the round that just fell out of the newest
    /// `retention.round_detail` (in the same transaction, so one round a commit: the cost
    /// of a commit does not grow with the run). Returns only once the round is durable.
    pub fn commit_round(
        &self,
        record: &RoundRecord,
        checkpoint: &CheckpointRef,
        sites: &[(String, SiteState)],
        retention: Retention,
    ) -> Result<(), StoreError> {
        self.check_in_place()?;
        let round = record.summary.round;
        let rec = encode_json(record)?;
        let index = self.write_checkpoint_file(checkpoint)?;
        let sites: Vec<(String, Vec<u8>)> = sites
            .iter()
            .map(|(n, s)| Ok((n.clone(), encode_json(s)?)))
            .collect::<Result<_, StoreError>>()?;
        let entry = Entry::Round {
            record: record.clone(),
            checkpoint: CheckpointId::new(round, checkpoint.sha3_512, checkpoint.signature),
        };
        let prev = self.stored_chain()?.ok_or_else(|| {
            StoreError::Decode("the history digest of the last round is missing".into())
        })?;
        let digest = chain(&prev, &entry);
        let aged = round
            .checked_sub(retention.round_detail.max(1))
            .filter(|r| *r >= 1);
        let pruned = match aged {
            Some(r) => match self.db_round(r)? {
                Some(mut old) if !old.per_site_pruned => {
                    old.prune_detail();
                    Some((r, encode_json(&old)?))
                }
                _ => None,
            },
            None => None,
        };
        (&self.meta, &self.rounds, &self.checkpoints, &self.sites)
            .transaction(|(meta, rounds, checkpoints, site_tree)| {
                rounds.insert(&round.to_be_bytes(), rec.as_slice())?;
                if let Some((r, bytes)) = &pruned {
                    rounds.insert(&r.to_be_bytes(), bytes.as_slice())?;
                }
                checkpoints.insert(&round.to_be_bytes(), index.as_slice())?;
                for (name, state) in &sites {
                    site_tree.insert(name.as_bytes(), state.as_slice())?;
                }
                meta.insert(LAST_ROUND, &round.to_be_bytes())?;
                meta.insert(CHAIN, &digest[..])?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.db.flush()?;
        // After sled, so sled is never behind the journal: a crash here leaves sled one
        // round ahead, which the next start writes into the journal from sled.
        Journal::append(&self.path, &entry)?;
        // The journal is compacted every `round_detail` rounds: a rewrite of the whole file,
        // so not at every commit.
        let detail = retention.round_detail.max(1);
        if round > detail && round.is_multiple_of(detail) {
            Journal::compact(&self.path, round + 1 - detail)?;
        }
        self.prune(round, retention.checkpoints)?;
        Ok(())
    }

    /// Removes checkpoints before the newest `keep` (at least the latest is always kept).
    fn prune(&self, latest: u64, keep: u64) -> Result<(), StoreError> {
        let first_kept = latest.saturating_sub(keep.max(1) - 1);
        for entry in self.checkpoints.range(..first_kept.to_be_bytes()) {
            let (k, _) = entry?;
            self.checkpoints.remove(&k)?;
            match std::fs::remove_file(self.checkpoint_path(decode_u64(&k)?)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn checkpoint_path(&self, round: u64) -> PathBuf {
        Self::checkpoint_file(&self.path, round)
    }

    /// Where round `round`'s checkpoint lives in data directory `dir`.
    pub fn checkpoint_file(dir: &Path, round: u64) -> PathBuf {
        dir.join("checkpoints")
            .join(format!("round-{round:08}.ckpt"))
    }

    /// Writes the checkpoint's file durably (temporary file, fsync, rename, fsync of the
    /// directory) and returns its index entry for sled: the hash and the signature.
    fn write_checkpoint_file(&self, c: &CheckpointRef) -> Result<Vec<u8>, StoreError> {
        let path = self.checkpoint_path(c.round);
        let dir = self.path.join("checkpoints");
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let tmp = path.with_extension("partial");
        let file = std::fs::File::create(&tmp).map_err(io)?;
        // 64 KiB buffers stay below glibc's mmap threshold: freeing a larger one raises the
        // threshold, after which the sum's ranges come from the heap and are not returned.
        let mut w = std::io::BufWriter::with_capacity(64 << 10, file);
        write_checkpoint(&mut w, c).map_err(io)?;
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        let mut index = Vec::with_capacity(128);
        index.extend_from_slice(c.sha3_512);
        index.extend_from_slice(c.signature);
        Ok(index)
    }

    /// One committed round: one of the newest [`HOT_ROUNDS`] from sled, an older one from
    /// the journal (streamed; sled would keep every page it read in memory).
    pub fn round(&self, round: u64) -> Result<Option<RoundRecord>, StoreError> {
        let last = self.last_round()?.unwrap_or(0);
        if round == 0 || round > last {
            return Ok(None);
        }
        if round + HOT_ROUNDS <= last {
            let mut reader = Reader::open(&self.path)?;
            while let Some(e) = reader.next_entry()? {
                if let Entry::Round { record, .. } = e
                    && record.summary.round == round
                {
                    return Ok(Some(record));
                }
            }
            return Ok(None);
        }
        self.db_round(round)
    }

    /// One round as sled holds it.
    fn db_round(&self, round: u64) -> Result<Option<RoundRecord>, StoreError> {
        self.rounds
            .get(round.to_be_bytes())?
            .map(|v| decode_json(&v))
            .transpose()
    }

    /// Committed rounds `offset + 1 ..= offset + limit` in round order, and how many there
    /// are: read by key range, so a page costs the same at round 10 and at round 100 000.
    pub fn rounds_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<RoundRecord>, usize), StoreError> {
        let total = self.last_round()?.unwrap_or(0);
        let first = (offset as u64).saturating_add(1);
        let page = if first + HOT_ROUNDS <= total {
            // Old rounds: streamed from the journal, not read into sled's page cache.
            let mut reader = Reader::open(&self.path)?;
            let mut page = Vec::with_capacity(limit.min(500));
            while page.len() < limit
                && let Some(e) = reader.next_entry()?
            {
                if let Entry::Round { record, .. } = e
                    && record.summary.round >= first
                {
                    page.push(record);
                }
            }
            page
        } else {
            self.rounds
                .range(first.to_be_bytes()..)
                .values()
                .take(limit)
                .map(|v| decode_json(&v?))
                .collect::<Result<_, _>>()?
        };
        Ok((page, usize::try_from(total).unwrap_or(usize::MAX)))
    }

    /// Whether the database answers (for readiness).
    pub fn healthy(&self) -> bool {
        self.meta.get(LAST_ROUND).is_ok()
    }

    pub fn checkpoint(&self, round: u64) -> Result<Option<Checkpoint>, StoreError> {
        let Some(index) = self.checkpoints.get(round.to_be_bytes())? else {
            return Ok(None);
        };
        let path = self.checkpoint_path(round);
        let bytes = std::fs::read(&path).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!(
                "checkpoint {round} is committed but {} cannot be read ({e})",
                path.display()
            ),
        })?;
        let c = decode_checkpoint(round, &bytes)?;
        if index.len() != 128 || index[..64] != c.sha3_512 || index[64..] != c.signature {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!(
                    "{} is not the checkpoint committed for round {round} (hash or signature differs)",
                    path.display()
                ),
            });
        }
        Ok(Some(c))
    }

    /// Rounds that still have a checkpoint, ascending.
    pub fn checkpoint_rounds(&self) -> Result<Vec<u64>, StoreError> {
        self.checkpoints
            .iter()
            .keys()
            .map(|k| decode_u64(&k?))
            .collect()
    }
}

/// Which witness a repair rebuilt the other from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairSource {
    /// The database was rebuilt from the round journal.
    Journal,
    /// The round journal was rewritten from the database.
    Database,
    /// The directory passed the start-up check: nothing was changed.
    NothingToDo,
}

/// What `repair` did.
#[derive(Debug)]
pub struct Repaired {
    pub last_round: u64,
    pub source: RepairSource,
    /// Where the damaged database was moved, when it was replaced.
    pub moved_aside: Option<PathBuf>,
    /// Where the replaced journal was kept, when it was rewritten.
    pub journal_backup: Option<PathBuf>,
}

/// What the last repair changed, in [`REPAIR_RECORD`]: enough to put it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairRecord {
    pub at_unix: u64,
    pub source: RepairSource,
    /// The last committed round the repair left.
    pub last_round: u64,
    /// The database moved aside (a name in the data directory).
    pub moved_db: Option<String>,
    /// The journal as it was before (a name in the data directory).
    pub journal_backup: Option<String>,
}

/// Written (and fsynced) before the repair changes anything, so an interrupted repair can
/// still be undone.
fn write_repair_record(dir: &Path, record: &RepairRecord) -> Result<(), StoreError> {
    let path = dir.join(REPAIR_RECORD);
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let text =
        serde_json::to_string_pretty(record).map_err(|e| StoreError::Decode(e.to_string()))?;
    let file = std::fs::File::create(&path).map_err(io)?;
    std::io::Write::write_all(&mut &file, text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn describe(round: Option<u64>) -> String {
    round.map_or("none (no run committed)".into(), |r| r.to_string())
}

fn tx_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Decode("transaction aborted".into())
        }
    }
}

fn encode_json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Decode(e.to_string()))
}

fn decode_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode(e.to_string()))
}

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Decode(format!("{} bytes for a round number", bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// `[sha3 64][signature 64]` then parameters, first and second moments, each as a big-endian
/// u64 count followed by that many little-endian f32. Streamed: no copy of the model.
fn write_checkpoint(w: &mut impl std::io::Write, c: &CheckpointRef) -> std::io::Result<()> {
    w.write_all(c.sha3_512)?;
    w.write_all(c.signature)?;
    for v in [c.params, c.strategy_m, c.strategy_v] {
        w.write_all(&(v.len() as u64).to_be_bytes())?;
        for block in v.chunks(16 * 1024) {
            let bytes: Vec<u8> = block.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.write_all(&bytes)?;
        }
    }
    Ok(())
}

pub fn decode_checkpoint(round: u64, bytes: &[u8]) -> Result<Checkpoint, StoreError> {
    let bad = |what: &str| StoreError::Decode(format!("checkpoint {round}: {what}"));
    let mut rest = bytes;
    let mut take = |n: usize, what: &str| -> Result<&[u8], StoreError> {
        if rest.len() < n {
            return Err(bad(what));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let mut sha3_512 = [0u8; 64];
    sha3_512.copy_from_slice(take(64, "hash")?);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(take(64, "signature")?);
    let mut vectors = Vec::new();
    for what in ["parameters", "first moments", "second moments"] {
        let n = decode_u64(take(8, what)?).map_err(|_| bad(what))? as usize;
        let raw = take(n.checked_mul(4).ok_or_else(|| bad(what))?, what)?;
        vectors.push(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>(),
        );
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let strategy_v = vectors.pop().unwrap_or_default();
    let strategy_m = vectors.pop().unwrap_or_default();
    let params = vectors.pop().unwrap_or_default();
    let c = Checkpoint {
        round,
        params,
        sha3_512,
        signature,
        strategy_m,
        strategy_v,
    };
    if cohort_protocols::model::params_sha3_512(&c.params) != c.sha3_512 {
        return Err(bad("the parameters do not match their SHA3-512"));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Evaluation, RoundSummary};

    fn identity(ca: &[u8]) -> Identity {
        Identity::new(ca, "logreg 3-1".into(), "schema".into())
    }

    fn summary(round: u64) -> RoundSummary {
        RoundSummary {
            round,
            attempts: 1,
            sites: 3,
            dropped: 0,
            clipped: 0,
            seconds: 0.5,
            eval: Evaluation {
                accuracy: Some(0.7),
                loss: 0.5,
                auc: Some(0.6),
                ..Evaluation::default()
            },
            total_weight: 30,
            model_sha3_512: String::new(),
            rejected: Vec::new(),
            failed: None,
            epsilon: None,
            site_epsilon: None,
            site_clip: None,
            attempt_log: Vec::new(),
        }
    }

    fn setup() -> Setup {
        Setup {
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            initial: Evaluation::default(),
            initial_per_site: BTreeMap::new(),
        }
    }

    fn commit(store: &Store, round: u64, params: &[f32], keep: u64) {
        commit_with(
            store,
            round,
            params,
            Retention {
                checkpoints: keep,
                round_detail: 1000,
            },
        );
    }

    fn site_result() -> crate::records::SiteResult {
        crate::records::SiteResult {
            examples: 100,
            test_examples: 30,
            accuracy: Some(0.8),
            loss: 0.4,
            auc: Some(0.7),
            metrics: Default::default(),
            tally: Default::default(),
            evaluate_only: false,
        }
    }

    fn commit_with(store: &Store, round: u64, params: &[f32], retention: Retention) {
        let hash = cohort_protocols::model::params_sha3_512(params);
        let ckpt = CheckpointRef {
            round,
            params,
            sha3_512: &hash,
            signature: &[round as u8; 64],
            strategy_m: &[],
            strategy_v: &[],
        };
        if round == 0 {
            store.commit_setup(&setup(), &ckpt).unwrap();
        } else {
            let record = RoundRecord {
                summary: summary(round),
                per_site: BTreeMap::from([
                    ("cleveland".to_string(), site_result()),
                    ("va".to_string(), site_result()),
                ]),
                per_site_pruned: false,
                site_level_rdp: None,
                site_level_clip: None,
            };
            store.commit_round(&record, &ckpt, &[], retention).unwrap();
        }
    }

    #[test]
    fn rounds_survive_reopening_and_old_checkpoints_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        {
            let store = Store::open(dir.path(), &id).unwrap();
            assert!(store.resume().unwrap().is_none());
            for r in 0..=4u64 {
                commit(&store, r, &[r as f32, 1.0, 2.0, 3.0], 2);
            }
        }
        let store = Store::open(dir.path(), &id).unwrap();
        let resume = store.resume().unwrap().expect("a run to resume");
        assert_eq!(resume.last_round, 4);
        assert_eq!(resume.last.as_ref().map(|r| r.summary.round), Some(4));
        let (page, total) = store.rounds_page(0, 10).unwrap();
        let rounds: Vec<u64> = page.iter().map(|r| r.summary.round).collect();
        assert_eq!(rounds, vec![1, 2, 3, 4]);
        assert_eq!(total, 4);
        let (page, _) = store.rounds_page(2, 1).unwrap();
        assert_eq!(page[0].summary.round, 3, "a page starts where it says");
        assert_eq!(resume.checkpoint.round, 4);
        assert_eq!(resume.checkpoint.params, vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(resume.checkpoint.signature, [4u8; 64]);
        assert_eq!(store.checkpoint_rounds().unwrap(), vec![3, 4]);
        let files: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(files, ["round-00000003.ckpt", "round-00000004.ckpt"]);

        // A committed checkpoint whose file was replaced or lost is refused, not used.
        let other = dir.path().join("checkpoints/round-00000003.ckpt");
        std::fs::copy(&other, dir.path().join("checkpoints/round-00000004.ckpt")).unwrap();
        let err = store.checkpoint(4).unwrap_err();
        assert!(
            err.to_string()
                .contains("is not the checkpoint committed for round 4"),
            "{err}"
        );
        std::fs::remove_file(&other).unwrap();
        let err = store.checkpoint(3).unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }

    #[test]
    fn foreign_or_unknown_directories_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        // Somebody else's files.
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let err = Store::open(dir.path(), &identity(b"ca")).unwrap_err();
        assert!(matches!(err, StoreError::NotOurs { .. }), "{err}");
        assert!(
            err.to_string().contains("not a Cohort data directory"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // Another federation's directory.
        let ours = tempfile::tempdir().unwrap();
        drop(Store::open(ours.path(), &identity(b"ca")).unwrap());
        let err = Store::open(ours.path(), &identity(b"another ca")).unwrap_err();
        assert!(
            matches!(err, StoreError::Foreign { what: "CA", .. }),
            "{err}"
        );
        let other_model = Identity::new(b"ca", "mlp 3-8-1".into(), "schema".into());
        let err = Store::open(ours.path(), &other_model).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds a run of another model: logreg 3-1 there, mlp 3-8-1 in the configuration's [model]"),
            "{err}"
        );

        // A damaged marker or a missing database.
        std::fs::write(ours.path().join(MARKER), "{").unwrap();
        let err = Store::open(ours.path(), &identity(b"ca")).unwrap_err();
        assert!(err.to_string().contains("does not parse"), "{err}");
        let fresh = tempfile::tempdir().unwrap();
        drop(Store::open(fresh.path(), &identity(b"ca")).unwrap());
        std::fs::remove_dir_all(fresh.path().join("db")).unwrap();
        let err = Store::open(fresh.path(), &identity(b"ca")).unwrap_err();
        assert!(err.to_string().contains("db/ is missing"), "{err}");
    }

    /// The directory's files and their bytes: what "left untouched" means.
    fn listing(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn a_directory_in_use_is_refused_by_a_second_run_and_by_repair_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        let live = Store::open(dir.path(), &id).unwrap();
        for r in 0..=3u64 {
            commit(&live, r, &[r as f32, 1.0], 5);
        }
        live.flush().unwrap();
        let before = listing(dir.path());
        let pid = std::process::id();
        for err in [
            Store::open(dir.path(), &id).unwrap_err(),
            Store::repair(dir.path(), &id).unwrap_err(),
            Store::undo_repair(dir.path(), &id).unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::InUse { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(&format!("in use by a running coordinator (pid {pid}")),
                "{text}"
            );
            assert!(text.contains("nothing was changed"), "{text}");
        }
        assert!(listing(dir.path()) == before, "nothing was touched");
        // The live run goes on committing.
        commit(&live, 4, &[4.0, 1.0], 5);
        drop(live);
        let store = Store::open(dir.path(), &id).unwrap();
        assert_eq!(store.last_round().unwrap(), Some(4));
    }

    #[test]
    fn old_rounds_lose_their_per_site_detail_in_both_witnesses_and_still_agree() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        let retention = Retention {
            checkpoints: 2,
            round_detail: 10,
        };
        let store = Store::open(dir.path(), &id).unwrap();
        for r in 0..=25u64 {
            commit_with(&store, r, &[r as f32], retention);
        }
        // sled: rounds 1..=15 pruned at each commit; 16..=25 whole.
        let kept: Vec<bool> = (1..=25)
            .map(|r| !store.round(r).unwrap().unwrap().per_site_pruned)
            .collect();
        assert_eq!(kept.iter().filter(|k| **k).count(), 10);
        assert!(kept[15..].iter().all(|k| *k), "{kept:?}");
        let old = store.round(3).unwrap().unwrap();
        assert!(old.per_site.is_empty());
        assert_eq!(old.summary.round, 3, "the summary stays");
        // The journal was compacted at round 20: rounds before 11 pruned there, 11..=25 not
        // yet (a different state from sled's, which is the same run).
        let journal = Journal::read(dir.path()).unwrap();
        let pruned: Vec<u64> = journal
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Round { record, .. } if record.per_site_pruned => Some(e.round()),
                _ => None,
            })
            .collect();
        assert_eq!(pruned, (1..=10).collect::<Vec<_>>());
        drop(store);
        let store = Store::open(dir.path(), &id).unwrap();
        assert_eq!(store.resume().unwrap().unwrap().last_round, 25);
        // A pruned round that differs in its summary is still caught.
        drop(store);
        let text = std::fs::read_to_string(Journal::path(dir.path())).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let (_, json) = lines[5].split_once(' ').unwrap();
        let mut entry: Entry = serde_json::from_str(json).unwrap();
        if let Entry::Round { record, .. } = &mut entry {
            record.summary.total_weight += 1;
        }
        let json = serde_json::to_string(&entry).unwrap();
        lines[5] = format!("{} {json}", hex(&Sha3_256::digest(json.as_bytes())));
        std::fs::write(Journal::path(dir.path()), lines.join("\n") + "\n").unwrap();
        let err = Store::open(dir.path(), &id).unwrap_err();
        assert!(
            err.to_string()
                .contains("round 5 differs between the database and the round journal"),
            "{err}"
        );
    }

    #[test]
    fn repair_leaves_a_sound_directory_alone_rebuilds_a_lost_database_and_can_be_undone() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        {
            let store = Store::open(dir.path(), &id).unwrap();
            for r in 0..=6u64 {
                commit(&store, r, &[r as f32, 2.0], 5);
            }
        }
        // Nothing to do: nothing changes.
        let before = listing(dir.path());
        let r = Store::repair(dir.path(), &id).unwrap();
        assert_eq!(r.source, RepairSource::NothingToDo);
        assert_eq!(r.last_round, 6);
        // sled rewrites its own file when it opens; everything else is byte for byte the same.
        let outside_db = |l: BTreeMap<PathBuf, Vec<u8>>| {
            l.into_iter()
                .filter(|(p, _)| {
                    !p.ends_with(crate::lockfile::LOCK_FILE)
                        && !p.starts_with(dir.path().join("db"))
                })
                .collect::<BTreeMap<_, _>>()
        };
        assert!(outside_db(listing(dir.path())) == outside_db(before));
        assert!(!dir.path().join(REPAIR_RECORD).exists());
        assert!(
            Store::undo_repair(dir.path(), &id).is_err(),
            "no repair recorded"
        );

        // The database directory lost: run refuses naming repair; repair rebuilds it.
        std::fs::rename(dir.path().join("db"), dir.path().join("db.lost")).unwrap();
        let err = Store::open(dir.path(), &id).unwrap_err();
        assert!(err.to_string().contains("repair"), "{err}");
        let r = Store::repair(dir.path(), &id).unwrap();
        assert_eq!((r.source, r.last_round), (RepairSource::Journal, 6));
        {
            let store = Store::open(dir.path(), &id).unwrap();
            assert_eq!(store.resume().unwrap().unwrap().last_round, 6);
        }
        // Undo puts the directory back as it was before the repair (db/ absent again), which
        // run refuses the same way; repairing again works.
        let undone = Store::undo_repair(dir.path(), &id).unwrap();
        assert_eq!(undone.last_round, 6);
        assert!(!dir.path().join("db").exists());
        assert!(Store::open(dir.path(), &id).is_err());
        Store::repair(dir.path(), &id).unwrap();
        // Rounds committed after a repair are never undone.
        {
            let store = Store::open(dir.path(), &id).unwrap();
            commit(&store, 7, &[7.0, 2.0], 5);
        }
        let err = Store::undo_repair(dir.path(), &id).unwrap_err();
        assert!(
            err.to_string()
                .contains("rounds were committed after the repair"),
            "{err}"
        );
        let store = Store::open(dir.path(), &id).unwrap();
        assert_eq!(store.last_round().unwrap(), Some(7));
    }

    #[test]
    fn a_journal_that_lost_rounds_is_rewritten_from_the_database_and_the_old_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        {
            let store = Store::open(dir.path(), &id).unwrap();
            for r in 0..=5u64 {
                commit(&store, r, &[r as f32], 5);
            }
        }
        let path = Journal::path(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let cut: Vec<&str> = text.lines().take(3).collect();
        std::fs::write(&path, cut.join("\n") + "\n").unwrap();
        let err = Store::open(dir.path(), &id).unwrap_err();
        assert!(
            err.to_string()
                .contains("the database's last committed round is 5 but the round journal's is 2"),
            "{err}"
        );
        let r = Store::repair(dir.path(), &id).unwrap();
        assert_eq!((r.source, r.last_round), (RepairSource::Database, 5));
        let backup = r.journal_backup.unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap().lines().count(), 3);
        assert_eq!(Journal::read(dir.path()).unwrap().last_round(), Some(5));
        drop(Store::open(dir.path(), &id).unwrap());
        Store::undo_repair(dir.path(), &id).unwrap();
        assert_eq!(Journal::read(dir.path()).unwrap().last_round(), Some(2));
    }

    #[test]
    fn a_database_moved_under_the_running_coordinator_stops_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        let store = Store::open(dir.path(), &id).unwrap();
        for r in 0..=2u64 {
            commit(&store, r, &[r as f32], 5);
        }
        // What the old `repair` did to a live run.
        std::fs::rename(dir.path().join("db"), dir.path().join("db.damaged-1")).unwrap();
        let hash = cohort_protocols::model::params_sha3_512(&[3.0]);
        let record = RoundRecord {
            summary: summary(3),
            per_site: BTreeMap::new(),
            per_site_pruned: false,
            site_level_rdp: None,
            site_level_clip: None,
        };
        let err = store
            .commit_round(
                &record,
                &CheckpointRef {
                    round: 3,
                    params: &[3.0],
                    sha3_512: &hash,
                    signature: &[3; 64],
                    strategy_m: &[],
                    strategy_v: &[],
                },
                &[],
                Retention {
                    checkpoints: 5,
                    round_detail: 100,
                },
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Replaced { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("db/ is no longer the database it opened")
        );
        assert_eq!(
            Journal::read(dir.path()).unwrap().last_round(),
            Some(2),
            "the journal did not move on without the database"
        );
        drop(store);
        std::fs::rename(dir.path().join("db.damaged-1"), dir.path().join("db")).unwrap();
        let store = Store::open(dir.path(), &id).unwrap();
        assert_eq!(store.last_round().unwrap(), Some(2));
    }

    #[test]
    fn a_changed_schema_is_named_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let schema = |features: &str| {
            let text = format!(
                "label = {{ column = \"num\", greater_than = 0 }}\nfeatures = [{features}]\nmissing = \"drop_row\""
            );
            let s: cohort_protocols::model::DataSchema = toml::from_str(&text).unwrap();
            let mut id = Identity::new(b"ca", "logreg 2-1".into(), s.hash());
            id.schema_toml = toml::to_string(&s).ok();
            id
        };
        drop(Store::open(dir.path(), &schema("\"age\", \"chol\"")).unwrap());
        let err = Store::open(dir.path(), &schema("\"age\", \"chl\"")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("started with another [schema]"), "{text}");
        assert!(
            text.contains(
                r#"features: ["age", "chol"] in data_dir, ["age", "chl"] in the configuration"#
            ),
            "{text}"
        );
        assert!(!text.contains("another federation"), "{text}");
    }

    #[test]
    fn old_rounds_are_checked_by_their_digest_and_served_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        let last = HOT_ROUNDS + 20;
        let retention = Retention {
            checkpoints: 2,
            round_detail: 50,
        };
        {
            let store = Store::open(dir.path(), &id).unwrap();
            for r in 0..=last {
                commit_with(&store, r, &[r as f32], retention);
            }
            // Rounds older than the hot window come from the journal, newer ones from sled;
            // both are the committed rounds.
            assert_eq!(store.round(7).unwrap().unwrap().summary.round, 7);
            assert_eq!(store.round(last).unwrap().unwrap().summary.round, last);
            let (page, total) = store.rounds_page(2, 3).unwrap();
            let rounds: Vec<u64> = page.iter().map(|r| r.summary.round).collect();
            assert_eq!((rounds, total), (vec![3, 4, 5], last as usize));
            // A directory written before the digest existed is checked in full once, and
            // gets its digest.
            store.meta.remove(CHAIN).unwrap();
            store.flush().unwrap();
        }
        drop(Store::open(dir.path(), &id).unwrap());
        let store = Store::open(dir.path(), &id).unwrap();
        assert!(store.stored_chain().unwrap().is_some());
        drop(store);
        // A round outside the window that differs between the witnesses is caught through
        // the digest, without sled's old rounds being read.
        let path = Journal::path(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let (_, json) = lines[7].split_once(' ').unwrap();
        let mut entry: Entry = serde_json::from_str(json).unwrap();
        if let Entry::Round { record, .. } = &mut entry {
            record.summary.total_weight += 1;
        }
        let json = serde_json::to_string(&entry).unwrap();
        lines[7] = format!("{} {json}", hex(&Sha3_256::digest(json.as_bytes())));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let err = Store::open(dir.path(), &id).unwrap_err().to_string();
        assert!(err.contains("history digests differ"), "{err}");
        assert!(err.contains("cohort-coordinator repair"), "{err}");
        // Repair finds the damaged witness by reading everything, and the run resumes.
        let r = Store::repair(dir.path(), &id).unwrap();
        assert_eq!(r.last_round, last);
        let store = Store::open(dir.path(), &id).unwrap();
        assert_eq!(store.resume().unwrap().unwrap().last_round, last);
    }

    #[test]
    fn a_database_another_program_holds_is_not_called_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(b"ca");
        {
            let store = Store::open(dir.path(), &id).unwrap();
            commit(&store, 0, &[0.0], 5);
        }
        // sled's own lock taken by something that is not a coordinator of ours (ours take
        // LOCK first): the start says so, and does not send the operator to `repair`.
        let other = sled::open(dir.path().join("db")).unwrap();
        let err = Store::open(dir.path(), &id).unwrap_err().to_string();
        assert!(err.contains("it is not damaged"), "{err}");
        assert!(!err.contains("repair"), "{err}");
        drop(other);
        assert!(Store::open(dir.path(), &id).is_ok());
    }

    #[test]
    fn a_checkpoint_whose_parameters_do_not_match_its_hash_is_refused() {
        let params = [1.0f32, 2.0];
        let hash = cohort_protocols::model::params_sha3_512(&params);
        let mut bytes = Vec::new();
        write_checkpoint(
            &mut bytes,
            &CheckpointRef {
                round: 1,
                params: &params,
                sha3_512: &hash,
                signature: &[0; 64],
                strategy_m: &[],
                strategy_v: &[],
            },
        )
        .unwrap();
        assert_eq!(decode_checkpoint(1, &bytes).unwrap().params, params);
        let last = bytes.len() - 20;
        bytes[last] ^= 1;
        let err = decode_checkpoint(1, &bytes).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        assert!(decode_checkpoint(1, &bytes[..100]).is_err());
    }
}
