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
//! The directory carries a marker naming the federation (CA), the model and the data schema.
//! A directory that is not ours, belongs to another federation or model, or whose database
//! does not open is refused before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use sled::Transactional;
use thiserror::Error;

use crate::hub::SiteState;
use crate::journal::{CheckpointId, Entry, Journal, JournalError};
pub use crate::records::{RoundRecord, Setup};
use crate::{from_hex, hex};

/// File in the data directory that says whose it is.
pub const MARKER: &str = "COHORT-DATA.json";
const FORMAT: &str = "cohort-coordinator data v1";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "data_dir {path} is not empty and holds no {MARKER}: it is not a Cohort data directory, so it is left alone; point data_dir at a new or empty directory"
    )]
    NotOurs { path: PathBuf },
    #[error(
        "data_dir {path} belongs to another federation or model: its {what} is {stored}, the configuration's is {configured}; nothing was changed (use another data_dir to start afresh)"
    )]
    Foreign {
        path: PathBuf,
        what: &'static str,
        stored: String,
        configured: String,
    },
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

/// What a data directory is for. Rounds of one federated run may only continue with the same
/// CA, model and schema; anything else is a different run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: String,
    /// SHA3-256 of the CA certificate (DER), hex.
    pub ca_sha3_256: String,
    /// e.g. "mlp 13-[32]-1".
    pub model: String,
    pub schema_hash: String,
}

impl Identity {
    pub fn new(ca_der: &[u8], model: String, schema_hash: String) -> Self {
        Identity {
            format: FORMAT.into(),
            ca_sha3_256: hex(&Sha3_256::digest(ca_der)),
            model,
            schema_hash,
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

/// Everything needed to continue a run.
#[derive(Debug, Clone)]
pub struct Resume {
    pub setup: Setup,
    pub rounds: Vec<RoundRecord>,
    pub checkpoint: Checkpoint,
    pub sites: BTreeMap<String, SiteState>,
}

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    rounds: sled::Tree,
    checkpoints: sled::Tree,
    sites: sled::Tree,
}

const SETUP: &[u8] = b"setup";
const LAST_ROUND: &[u8] = b"last_round";

impl Store {
    /// Opens (or creates) the store in `dir`, refusing a directory that is not this run's.
    pub fn open(dir: &Path, identity: &Identity) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let marker = dir.join(MARKER);
        if Self::check_marker(dir, identity)? {
            if !dir.join("db").is_dir() {
                return Err(StoreError::Corrupt {
                    path: dir.to_path_buf(),
                    detail: "the database directory db/ is missing; if the round journal is intact, `cohort-coordinator repair --config FILE` rebuilds it".into(),
                });
            }
        } else {
            let empty = std::fs::read_dir(dir).map_err(io)?.next().is_none();
            if !empty {
                return Err(StoreError::NotOurs {
                    path: dir.to_path_buf(),
                });
            }
            let text = serde_json::to_string_pretty(identity)
                .map_err(|e| StoreError::Decode(e.to_string()))?;
            std::fs::write(&marker, text).map_err(io)?;
        }
        let db = Self::open_db(dir).map_err(|e| StoreError::Corrupt {
                path: dir.to_path_buf(),
                detail: format!(
                    "the database does not open ({e}); if the round journal is intact, `cohort-coordinator repair --config FILE` rebuilds it"
                ),
            })?;
        let store = Store::from_db(dir, db)?;
        store.check_against_journal()?;
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
        if marker.exists() {
            let text = std::fs::read_to_string(&marker).map_err(io)?;
            let stored: Identity =
                serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
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
                    });
                }
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// The database in `dir/db`. It holds metadata only (models are files): a small page
    /// cache is plenty.
    fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
        sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(16 << 20)
            .open()
    }

    /// sled and the round journal must tell the same story: the same last round (sled may be
    /// one ahead after a crash between the two writes, which is then written into the
    /// journal), the same records, the same checkpoints. Anything else means one of them was
    /// damaged, and starting would silently lose or redo committed rounds.
    fn check_against_journal(&self) -> Result<(), StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let journal = Journal::read(&self.path).map_err(|e| {
            corrupt(format!(
                "the round journal is damaged ({e}); if the database is intact, `cohort-coordinator repair` rewrites the journal from it"
            ))
        })?;
        let db_last = self.db_last_round().map_err(|e| {
            corrupt(format!(
                "the database does not read back ({e}); the round journal holds rounds up to {}: run `cohort-coordinator repair --config FILE` to rebuild the database from it",
                describe(journal.last_round())
            ))
        })?;
        let j_last = journal.last_round();
        if journal.entries.is_empty() && db_last.is_some() && !Journal::path(&self.path).exists() {
            // A data directory from before the journal existed: start one from sled.
            let entries = self.entries_from_db(db_last, &journal)?;
            Journal::rewrite(&self.path, &entries)?;
            return Ok(());
        }
        let ahead_by_one = match (db_last, j_last) {
            (Some(0), None) => true,
            (Some(d), Some(j)) => d == j + 1,
            _ => false,
        };
        if ahead_by_one {
            let entries = self.entries_from_db(db_last, &journal)?;
            if let Some(missing) = entries.last() {
                Journal::append(&self.path, missing)?;
            }
            return Ok(());
        }
        if db_last != j_last {
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
        // Same last round: the records and the checkpoint index must agree too.
        let from_db = self.entries_from_db(db_last, &journal).map_err(|e| {
            corrupt(format!(
                "the database does not read back ({e}); run `cohort-coordinator repair --config FILE` to rebuild it from the journal (rounds up to {})",
                describe(j_last)
            ))
        })?;
        for (d, j) in from_db.iter().zip(&journal.entries) {
            let same = serde_json::to_value(d).ok() == serde_json::to_value(j).ok();
            if !same {
                return Err(corrupt(format!(
                    "round {} differs between the database and the round journal; run `cohort-coordinator repair --config FILE` to rebuild the database from the journal",
                    j.round()
                )));
            }
        }
        Ok(())
    }

    fn db_last_round(&self) -> Result<Option<u64>, StoreError> {
        if self.meta.get(SETUP)?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.last_round()?.unwrap_or(0)))
    }

    /// The journal entries the database holds, rounds 0..=last. A checkpoint that was pruned
    /// is taken from the journal's own copy of the index when the database lost it too.
    fn entries_from_db(
        &self,
        last: Option<u64>,
        prior: &Journal,
    ) -> Result<Vec<Entry>, StoreError> {
        let Some(last) = last else {
            return Ok(Vec::new());
        };
        let id = |round: u64| -> Result<CheckpointId, StoreError> {
            if let Some(index) = self.checkpoints.get(round.to_be_bytes())? {
                if index.len() != 128 {
                    return Err(StoreError::Decode(format!(
                        "the checkpoint index of round {round} has {} bytes",
                        index.len()
                    )));
                }
                return Ok(CheckpointId {
                    round,
                    sha3_512: hex(&index[..64]),
                    signature: hex(&index[64..]),
                });
            }
            if let Some(e) = prior.entry(round) {
                return Ok(e.checkpoint().clone());
            }
            // Pruned before the journal existed: only the hash in the round's summary is
            // known.
            Ok(CheckpointId {
                round,
                sha3_512: String::new(),
                signature: String::new(),
            })
        };
        let setup: Setup = decode_json(
            &self
                .meta
                .get(SETUP)?
                .ok_or_else(|| StoreError::Decode("the setup is missing".into()))?,
        )?;
        let mut entries = vec![Entry::Setup {
            setup,
            checkpoint: id(0)?,
        }];
        for r in 1..=last {
            let bytes = self
                .rounds
                .get(r.to_be_bytes())?
                .ok_or_else(|| StoreError::Decode(format!("round {r} is missing")))?;
            entries.push(Entry::Round {
                record: decode_json(&bytes)?,
                checkpoint: id(r)?,
            });
        }
        Ok(entries)
    }

    /// Rebuilds the database from the round journal (the old database is kept beside it as
    /// `db.damaged-<unix time>`), or rewrites the journal from the database when the journal
    /// is the damaged one. The last round must have its checkpoint file, intact. Site
    /// counters are copied over when the old database still yields them.
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
        let journal = Journal::read(dir);
        let old = Self::open_db(dir).ok();
        // Which witness is intact: a readable journal at least as long as the database wins.
        let empty = Journal::default();
        let prior = journal.as_ref().unwrap_or(&empty);
        let db_entries = old.as_ref().and_then(|db| {
            let s = Store::from_db(dir, db.clone()).ok()?;
            let last = s.db_last_round().ok()?;
            s.entries_from_db(last, prior).ok()
        });
        let (entries, source) = match (journal, db_entries) {
            (Ok(j), Some(d)) if d.len() > j.entries.len() => (d, RepairSource::Database),
            (Ok(j), _) if !j.entries.is_empty() => (j.entries, RepairSource::Journal),
            (Err(_), Some(d)) if !d.is_empty() => (d, RepairSource::Database),
            (Ok(_), Some(d)) if !d.is_empty() => (d, RepairSource::Database),
            (j, _) => {
                return Err(corrupt(format!(
                    "neither the round journal ({}) nor the database holds a committed run to repair from; start afresh with a new data_dir",
                    j.err().map_or("empty".to_string(), |e| e.to_string())
                )));
            }
        };
        let sites: Vec<(sled::IVec, sled::IVec)> = old
            .as_ref()
            .and_then(|db| db.open_tree("sites").ok())
            .map(|t| t.iter().filter_map(Result::ok).collect())
            .unwrap_or_default();
        drop(old);
        let last = entries.last().map_or(0, Entry::round);
        let probe = Store::checkpoint_file(dir, last);
        let bytes = std::fs::read(&probe).map_err(|e| {
            corrupt(format!(
                "the checkpoint of the last committed round {last} ({}) cannot be read ({e}): nothing to resume from",
                probe.display()
            ))
        })?;
        let ckpt = decode_checkpoint(last, &bytes)?;
        let committed = entries
            .last()
            .map(|e| e.checkpoint().sha3_512.clone())
            .unwrap_or_default();
        if hex(&ckpt.sha3_512) != committed {
            return Err(corrupt(format!(
                "{} is not the checkpoint committed for round {last}",
                probe.display()
            )));
        }
        let moved = match source {
            RepairSource::Database => None,
            RepairSource::Journal => {
                let db = dir.join("db");
                let aside = dir.join(format!("db.damaged-{}", crate::unix_seconds()));
                if db.exists() {
                    std::fs::rename(&db, &aside).map_err(|source| StoreError::Io {
                        path: db.clone(),
                        source,
                    })?;
                    Some(aside)
                } else {
                    None
                }
            }
        };
        let store = Store::from_db(dir, Self::open_db(dir)?)?;
        if source == RepairSource::Journal {
            for e in &entries {
                let index = |c: &CheckpointId| -> Option<Vec<u8>> {
                    let mut v = from_hex(&c.sha3_512)?;
                    v.extend(from_hex(&c.signature)?);
                    (v.len() == 128 && Store::checkpoint_file(dir, c.round).exists()).then_some(v)
                };
                match e {
                    Entry::Setup { setup, checkpoint } => {
                        store.meta.insert(SETUP, encode_json(setup)?)?;
                        if let Some(i) = index(checkpoint) {
                            store.checkpoints.insert(0u64.to_be_bytes(), i)?;
                        }
                    }
                    Entry::Round { record, checkpoint } => {
                        let r = record.summary.round;
                        store.rounds.insert(r.to_be_bytes(), encode_json(record)?)?;
                        if let Some(i) = index(checkpoint) {
                            store.checkpoints.insert(r.to_be_bytes(), i)?;
                        }
                    }
                }
            }
            for (k, v) in sites {
                store.sites.insert(k, v)?;
            }
            store.meta.insert(LAST_ROUND, &last.to_be_bytes())?;
            store.db.flush()?;
        }
        Journal::rewrite(dir, &entries)?;
        store.check_against_journal()?;
        Ok(Repaired {
            last_round: last,
            source,
            moved_aside: moved,
        })
    }

    fn from_db(dir: &Path, db: sled::Db) -> Result<Store, StoreError> {
        Ok(Store {
            path: dir.to_path_buf(),
            meta: db.open_tree("meta")?,
            rounds: db.open_tree("rounds")?,
            checkpoints: db.open_tree("checkpoints")?,
            sites: db.open_tree("sites")?,
            db,
        })
    }

    /// Writes everything to disk (commits already do; this is for shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state to continue from, if round 0 was committed.
    pub fn resume(&self) -> Result<Option<Resume>, StoreError> {
        let Some(setup) = self.meta.get(SETUP)? else {
            return Ok(None);
        };
        let setup: Setup = decode_json(&setup)?;
        let last = self.last_round()?.unwrap_or(0);
        let mut rounds = Vec::new();
        for r in 1..=last {
            let bytes = self.rounds.get(r.to_be_bytes())?.ok_or_else(|| {
                StoreError::Decode(format!("round {r} is missing before the last round {last}"))
            })?;
            rounds.push(decode_json(&bytes)?);
        }
        let checkpoint = self.checkpoint(last)?.ok_or_else(|| {
            StoreError::Decode(format!(
                "the checkpoint of the last round ({last}) is missing"
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
            rounds,
            checkpoint,
            sites,
        }))
    }

    pub fn last_round(&self) -> Result<Option<u64>, StoreError> {
        self.meta
            .get(LAST_ROUND)?
            .map(|v| decode_u64(&v))
            .transpose()
    }

    /// Commits round 0: statistics, initial evaluation and the initial model.
    pub fn commit_setup(
        &self,
        setup: &Setup,
        checkpoint: &CheckpointRef,
    ) -> Result<(), StoreError> {
        let setup_bytes = encode_json(setup)?;
        let index = self.write_checkpoint_file(checkpoint)?;
        (&self.meta, &self.checkpoints)
            .transaction(|(meta, checkpoints)| {
                meta.insert(SETUP, setup_bytes.as_slice())?;
                meta.insert(LAST_ROUND, &0u64.to_be_bytes())?;
                checkpoints.insert(&0u64.to_be_bytes(), index.as_slice())?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.db.flush()?;
        Journal::append(
            &self.path,
            &Entry::Setup {
                setup: setup.clone(),
                checkpoint: CheckpointId::new(0, checkpoint.sha3_512, checkpoint.signature),
            },
        )?;
        Ok(())
    }

    /// Commits a finished round atomically and flushes it to disk, then prunes checkpoints
    /// older than the newest `keep`. Returns only once the round is durable.
    pub fn commit_round(
        &self,
        record: &RoundRecord,
        checkpoint: &CheckpointRef,
        sites: &[(String, SiteState)],
        keep: u64,
    ) -> Result<(), StoreError> {
        let round = record.summary.round;
        let rec = encode_json(record)?;
        let index = self.write_checkpoint_file(checkpoint)?;
        let sites: Vec<(String, Vec<u8>)> = sites
            .iter()
            .map(|(n, s)| Ok((n.clone(), encode_json(s)?)))
            .collect::<Result<_, StoreError>>()?;
        (&self.meta, &self.rounds, &self.checkpoints, &self.sites)
            .transaction(|(meta, rounds, checkpoints, site_tree)| {
                rounds.insert(&round.to_be_bytes(), rec.as_slice())?;
                checkpoints.insert(&round.to_be_bytes(), index.as_slice())?;
                for (name, state) in &sites {
                    site_tree.insert(name.as_bytes(), state.as_slice())?;
                }
                meta.insert(LAST_ROUND, &round.to_be_bytes())?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.db.flush()?;
        // After sled, so sled is never behind the journal: a crash here leaves sled one
        // round ahead, which the next start writes into the journal from sled.
        Journal::append(
            &self.path,
            &Entry::Round {
                record: record.clone(),
                checkpoint: CheckpointId::new(round, checkpoint.sha3_512, checkpoint.signature),
            },
        )?;
        self.prune(round, keep)?;
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

    /// One committed round.
    pub fn round(&self, round: u64) -> Result<Option<RoundRecord>, StoreError> {
        self.rounds
            .get(round.to_be_bytes())?
            .map(|v| decode_json(&v))
            .transpose()
    }

    /// Committed rounds `offset..offset + limit` in round order, and how many there are.
    pub fn rounds_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<RoundRecord>, usize), StoreError> {
        let page = self
            .rounds
            .iter()
            .values()
            .skip(offset)
            .take(limit)
            .map(|v| decode_json(&v?))
            .collect::<Result<_, _>>()?;
        Ok((page, self.rounds.len()))
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairSource {
    /// The database was rebuilt from the round journal.
    Journal,
    /// The round journal was rewritten from the database.
    Database,
}

/// What `repair` did.
#[derive(Debug)]
pub struct Repaired {
    pub last_round: u64,
    pub source: RepairSource,
    /// Where the damaged database was moved, when it was replaced.
    pub moved_aside: Option<PathBuf>,
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
                per_site: BTreeMap::new(),
            };
            store.commit_round(&record, &ckpt, &[], keep).unwrap();
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
        let rounds: Vec<u64> = resume.rounds.iter().map(|r| r.summary.round).collect();
        assert_eq!(rounds, vec![1, 2, 3, 4]);
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
        assert!(err.to_string().contains("its model is logreg 3-1"), "{err}");

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
