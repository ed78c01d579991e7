//! The round journal: an append-only, checksummed file of every committed round, next to
//! sled in the data directory.
//!
//! sled recovers from a damaged log by discarding what it cannot read, so garbage written
//! into its files can silently take committed rounds with it: the coordinator would resume
//! three rounds early and say nothing. The journal is a second, independent witness. Each
//! line is `<SHA3-256 of the JSON, hex> <JSON>` and is appended (and fsynced) right after the
//! round's sled transaction is flushed, so sled can be at most one round ahead of it (a crash
//! between the two), never behind. On start the two must agree; when sled has lost rounds
//! the coordinator refuses to start and `cohort-coordinator repair` rebuilds sled from the
//! journal. The journal also lets `export-model` read a run while the coordinator holds
//! sled's lock.
//!
//! It holds what a round commits except the models (which are checkpoint files carrying
//! their own hash and signature) and the sites' counters (statistics, rebuilt on repair when
//! sled still yields them).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use thiserror::Error;

use crate::hex;
use crate::records::{RoundRecord, Setup};

/// The journal's file name in the data directory.
pub const JOURNAL: &str = "rounds.journal";

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {detail}")]
    Damaged {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

/// A checkpoint's identity as committed: its round, SHA3-512 and signature (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointId {
    pub round: u64,
    pub sha3_512: String,
    pub signature: String,
}

impl CheckpointId {
    pub fn new(round: u64, sha3_512: &[u8; 64], signature: &[u8; 64]) -> Self {
        CheckpointId {
            round,
            sha3_512: hex(sha3_512),
            signature: hex(signature),
        }
    }
}

/// One committed step of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// Round 0: feature statistics, the initial evaluation, the initial model.
    Setup {
        setup: Setup,
        checkpoint: CheckpointId,
    },
    Round {
        record: RoundRecord,
        checkpoint: CheckpointId,
    },
}

impl Entry {
    pub fn round(&self) -> u64 {
        match self {
            Entry::Setup { .. } => 0,
            Entry::Round { record, .. } => record.summary.round,
        }
    }

    pub fn checkpoint(&self) -> &CheckpointId {
        match self {
            Entry::Setup { checkpoint, .. } | Entry::Round { checkpoint, .. } => checkpoint,
        }
    }
}

/// A journal as read: its entries in order (setup, then rounds 1, 2, …).
#[derive(Debug, Clone, Default)]
pub struct Journal {
    pub entries: Vec<Entry>,
    /// Bytes of an unfinished last line (a crash while appending), ignored and cut off
    /// before the next append.
    pub torn_tail: usize,
}

impl Journal {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(JOURNAL)
    }

    /// Reads the journal in `dir`; an absent file is an empty journal. Any complete line
    /// that fails its checksum, does not decode or breaks the order is an error naming it.
    pub fn read(dir: &Path) -> Result<Self, JournalError> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Journal::default()),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        Self::parse(&path, &bytes)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, JournalError> {
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in bytes[..complete]
            .split(|b| *b == b'\n')
            .take_while(|l| !l.is_empty())
            .enumerate()
        {
            let damaged = |detail: String| JournalError::Damaged {
                path: path.to_path_buf(),
                line: i + 1,
                detail,
            };
            let text = std::str::from_utf8(line)
                .map_err(|_| damaged("not UTF-8 (overwritten?)".into()))?;
            let (sum, json) = text
                .split_once(' ')
                .ok_or_else(|| damaged("no checksum".into()))?;
            if hex(&Sha3_256::digest(json.as_bytes())) != sum {
                return Err(damaged("fails its checksum (the file was damaged)".into()));
            }
            let entry: Entry =
                serde_json::from_str(json).map_err(|e| damaged(format!("does not decode: {e}")))?;
            let expected = entries.last().map_or(0, |e| e.round() + 1);
            let order_ok = match &entry {
                Entry::Setup { .. } => entries.is_empty(),
                Entry::Round { .. } => !entries.is_empty() && entry.round() == expected,
            };
            if !order_ok || entry.checkpoint().round != entry.round() {
                return Err(damaged(format!(
                    "records round {} where round {expected} was due",
                    entry.round()
                )));
            }
            entries.push(entry);
        }
        Ok(Journal {
            entries,
            torn_tail: bytes.len() - complete,
        })
    }

    /// The last committed round (0 after the setup), or None before the setup.
    pub fn last_round(&self) -> Option<u64> {
        self.entries.last().map(Entry::round)
    }

    pub fn setup(&self) -> Option<(&Setup, &CheckpointId)> {
        match self.entries.first() {
            Some(Entry::Setup { setup, checkpoint }) => Some((setup, checkpoint)),
            _ => None,
        }
    }

    pub fn entry(&self, round: u64) -> Option<&Entry> {
        self.entries.get(usize::try_from(round).ok()?)
    }

    /// `entry` as a journal line: checksum, space, JSON, newline.
    fn line(path: &Path, entry: &Entry) -> Result<String, JournalError> {
        let json = serde_json::to_string(entry).map_err(|e| JournalError::Damaged {
            path: path.to_path_buf(),
            line: 0,
            detail: format!("encoding an entry: {e}"),
        })?;
        Ok(format!(
            "{} {json}\n",
            hex(&Sha3_256::digest(json.as_bytes()))
        ))
    }

    /// Appends `entry` durably (written and fsynced before it returns), first cutting off a
    /// torn tail so the new line starts on a line of its own.
    pub fn append(dir: &Path, entry: &Entry) -> Result<(), JournalError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = Self::path(dir);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let line = Self::line(&path, entry)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(io)?;
            file.read_exact(&mut last).map_err(io)?;
            if last[0] != b'\n' {
                let bytes = std::fs::read(&path).map_err(io)?;
                let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                file.set_len(keep as u64).map_err(io)?;
            }
        }
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Replaces the journal with `entries` (repair): written beside it, fsynced, renamed.
    pub fn rewrite(dir: &Path, entries: &[Entry]) -> Result<(), JournalError> {
        let path = Self::path(dir);
        let tmp = path.with_extension("journal.partial");
        let io = |source| JournalError::Io {
            path: tmp.clone(),
            source,
        };
        let mut text = String::new();
        for e in entries {
            text.push_str(&Self::line(&path, e)?);
        }
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|source| JournalError::Io { path, source })
    }
}
