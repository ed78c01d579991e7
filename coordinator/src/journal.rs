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
    /// Holds every entry in memory: for `export-model` and tests. The coordinator itself
    /// reads the journal with [`Reader`], one entry at a time, so its memory does not grow
    /// with the number of rounds.
    pub fn read(dir: &Path) -> Result<Self, JournalError> {
        let mut reader = Reader::open(dir)?;
        let mut entries = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            entries.push(entry);
        }
        Ok(Journal {
            entries,
            torn_tail: reader.torn_tail(),
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
                // Back to the end of the last complete line, 4 KiB at a time.
                let mut end = len;
                let mut keep = 0;
                let mut block = [0u8; 4096];
                while end > 0 {
                    let start = end.saturating_sub(block.len() as u64);
                    let part = &mut block[..(end - start) as usize];
                    file.seek(SeekFrom::Start(start)).map_err(io)?;
                    file.read_exact(part).map_err(io)?;
                    if let Some(i) = part.iter().rposition(|b| *b == b'\n') {
                        keep = start + i as u64 + 1;
                        break;
                    }
                    end = start;
                }
                file.set_len(keep).map_err(io)?;
            }
        }
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Replaces the journal with `entries` (repair): written beside it, fsynced, renamed.
    pub fn rewrite(dir: &Path, entries: &[Entry]) -> Result<(), JournalError> {
        let mut w = Rewriter::create(dir)?;
        for e in entries {
            w.push(e)?;
        }
        w.commit()
    }

    /// Rewrites the journal with the per-site detail of rounds before `keep_from` removed
    /// (their summaries and checkpoint identities stay): what `storage.keep_round_detail`
    /// keeps bounded. Streamed, one entry at a time; the old journal is replaced only once
    /// the new one is on disk, so a crash leaves one or the other, both valid.
    pub fn compact(dir: &Path, keep_from: u64) -> Result<(), JournalError> {
        let mut reader = Reader::open(dir)?;
        let mut w = Rewriter::create(dir)?;
        while let Some(mut entry) = reader.next_entry()? {
            if let Entry::Round { record, .. } = &mut entry
                && record.summary.round < keep_from
            {
                record.prune_detail();
            }
            w.push(&entry)?;
        }
        w.commit()
    }
}

/// Reads a journal one entry at a time, checking each line's checksum and the order of the
/// rounds as it goes: only the current line is in memory, whatever the length of the run.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    file: Option<std::io::BufReader<std::fs::File>>,
    line: usize,
    last: Option<u64>,
    torn_tail: usize,
    buf: Vec<u8>,
}

impl Reader {
    /// The journal of `dir`; an absent file reads as an empty journal.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let path = Journal::path(dir);
        let file = match std::fs::File::open(&path) {
            Ok(f) => Some(std::io::BufReader::with_capacity(64 << 10, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        Ok(Reader {
            path,
            file,
            line: 0,
            last: None,
            torn_tail: 0,
            buf: Vec::new(),
        })
    }

    /// The next committed entry, None at the end. An unfinished last line (a crash while
    /// appending) is not an entry: it is counted in [`Reader::torn_tail`] and ends the read.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, JournalError> {
        use std::io::BufRead;
        let Some(file) = &mut self.file else {
            return Ok(None);
        };
        self.buf.clear();
        let n = file
            .read_until(b'\n', &mut self.buf)
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            self.file = None;
            return Ok(None);
        }
        if self.buf.last() != Some(&b'\n') {
            self.torn_tail = n;
            self.file = None;
            return Ok(None);
        }
        self.line += 1;
        let damaged = |detail: String| JournalError::Damaged {
            path: self.path.clone(),
            line: self.line,
            detail,
        };
        let text = std::str::from_utf8(&self.buf[..n - 1])
            .map_err(|_| damaged("not UTF-8 (overwritten?)".into()))?;
        let (sum, json) = text
            .split_once(' ')
            .ok_or_else(|| damaged("no checksum".into()))?;
        if hex(&Sha3_256::digest(json.as_bytes())) != sum {
            return Err(damaged("fails its checksum (the file was damaged)".into()));
        }
        let entry: Entry =
            serde_json::from_str(json).map_err(|e| damaged(format!("does not decode: {e}")))?;
        let expected = self.last.map_or(0, |r| r + 1);
        let order_ok = match &entry {
            Entry::Setup { .. } => self.last.is_none(),
            Entry::Round { .. } => self.last.is_some() && entry.round() == expected,
        };
        if !order_ok || entry.checkpoint().round != entry.round() {
            return Err(damaged(format!(
                "records round {} where round {expected} was due",
                entry.round()
            )));
        }
        self.last = Some(entry.round());
        Ok(Some(entry))
    }

    /// The last round read so far (0 after the setup), None before the setup.
    pub fn last_round(&self) -> Option<u64> {
        self.last
    }

    /// Bytes of an unfinished last line, once the read has reached it.
    pub fn torn_tail(&self) -> usize {
        self.torn_tail
    }
}

/// A new journal written beside the current one and put in its place by [`Rewriter::commit`]:
/// entries are streamed in, so a repair or a compaction never holds the run in memory.
#[derive(Debug)]
pub struct Rewriter {
    path: PathBuf,
    tmp: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
}

impl Rewriter {
    pub fn create(dir: &Path) -> Result<Self, JournalError> {
        let path = Journal::path(dir);
        let tmp = path.with_extension("journal.partial");
        let file = std::fs::File::create(&tmp).map_err(|source| JournalError::Io {
            path: tmp.clone(),
            source,
        })?;
        Ok(Rewriter {
            path,
            tmp,
            w: std::io::BufWriter::with_capacity(64 << 10, file),
        })
    }

    pub fn push(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let line = Journal::line(&self.path, entry)?;
        self.w
            .write_all(line.as_bytes())
            .map_err(|source| JournalError::Io {
                path: self.tmp.clone(),
                source,
            })
    }

    /// Flushes and fsyncs the new journal, renames it over the old one and fsyncs the
    /// directory, so the replacement survives a crash.
    pub fn commit(self) -> Result<(), JournalError> {
        let tmp = self.tmp;
        let io = |source| JournalError::Io {
            path: tmp.clone(),
            source,
        };
        let file = self.w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}
