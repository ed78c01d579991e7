//! Damaged storage never panics and never loses a committed round.
//!
//! A data directory with a few hundred committed rounds is damaged in each of the ways a disk,
//! a careless copy or a full filesystem damages files: sled's file truncated by 4 KiB, 64 KiB,
//! 512 KiB, half and all of it; bytes flipped in ten random places; the round journal cut in
//! the middle of a line (its last, and one half-way), and a byte of it changed. Each copy must
//! then either open and resume after the last committed round, or be refused with a message
//! that names `repair`, after which `repair` leaves a directory that opens and resumes after
//! the last committed round. sled panics on some of these (an index out of bounds when its
//! file lost 512 KiB or more): the store contains that and reports it as damage.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use cohort_testkit::prelude::copy_dir;

use cohort_coordinator::records::{Evaluation, RoundRecord, RoundSummary, Setup, SiteResult};
use cohort_coordinator::store::{CheckpointRef, Identity, Retention, Store};

const ROUNDS: u64 = 400;

fn identity() -> Identity {
    Identity::new(b"ca", "logreg 13-1".into(), "schema".into())
}

fn record(round: u64) -> RoundRecord {
    let site = SiteResult {
        examples: 200,
        test_examples: 60,
        accuracy: Some(0.8),
        loss: 0.45,
        auc: Some(0.81),
        metrics: Default::default(),
        tally: Default::default(),
        evaluate_only: false,
    };
    RoundRecord {
        summary: RoundSummary {
            round,
            attempts: 1,
            sites: 12,
            dropped: 0,
            clipped: 0,
            seconds: 0.05,
            eval: Evaluation {
                accuracy: Some(0.8),
                loss: 0.45,
                ..Evaluation::default()
            },
            total_weight: 2400,
            model_sha3_512: format!("{round:0128}"),
            rejected: Vec::new(),
            failed: None,
            epsilon: None,
            site_epsilon: None,
            site_clip: None,
            attempt_log: Vec::new(),
        },
        per_site: (0..12)
            .map(|i| (format!("hospital-{i:02}"), site.clone()))
            .collect(),
        per_site_pruned: false,
        site_level_rdp: None,
        site_level_clip: None,
    }
}

/// A run of `ROUNDS` committed rounds in `dir`.
fn committed_run(dir: &Path) {
    let store = Store::open(dir, &identity()).unwrap();
    let retention = Retention {
        checkpoints: 3,
        round_detail: 150,
    };
    for round in 0..=ROUNDS {
        let params = [round as f32; 14];
        let hash = cohort_protocols::model::params_sha3_512(&params);
        let ckpt = CheckpointRef {
            round,
            params: &params,
            sha3_512: &hash,
            signature: &[7; 64],
            strategy_m: &[],
            strategy_v: &[],
        };
        if round == 0 {
            let setup = Setup {
                mean: vec![0.0; 13],
                std: vec![1.0; 13],
                initial: Evaluation::default(),
                initial_per_site: BTreeMap::new(),
            };
            store.commit_setup(&setup, &ckpt).unwrap();
        } else {
            store
                .commit_round(&record(round), &ckpt, &[], retention)
                .unwrap();
        }
    }
}

fn truncate_by(file: &Path, cut: u64) {
    let len = std::fs::metadata(file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.set_len(len.saturating_sub(cut)).unwrap();
}

/// Flips one bit in `n` places, chosen by a fixed-seed generator (so a failure replays).
fn flip(file: &Path, n: usize, seed: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    let mut state = seed;
    for _ in 0..n {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (state >> 16) as usize % bytes.len();
        bytes[at] ^= 1 << ((state >> 8) % 8);
    }
    std::fs::write(file, bytes).unwrap();
}

/// Cuts the journal in the middle of its line `line` (0-based) and drops what follows.
fn cut_journal(dir: &Path, line: usize) {
    let path = dir.join(cohort_coordinator::journal::JOURNAL);
    let text = std::fs::read(&path).unwrap();
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            text.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let (start, end) = (starts[line], starts[line + 1]);
    std::fs::write(&path, &text[..start + (end - start) / 2]).unwrap();
}

/// How a damaged copy ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Resumed,
    RepairedThenResumed,
}

fn last_round_after_open(dir: &Path) -> Result<u64, String> {
    let store = Store::open(dir, &identity()).map_err(|e| e.to_string())?;
    let resume = store
        .resume()
        .map_err(|e| e.to_string())?
        .ok_or("nothing to resume")?;
    Ok(resume.last_round)
}

fn survive(dir: &Path) -> Outcome {
    match last_round_after_open(dir) {
        Ok(last) => {
            assert_eq!(
                last, ROUNDS,
                "a start that resumes, resumes after the last round"
            );
            Outcome::Resumed
        }
        Err(refusal) => {
            assert!(
                refusal.contains("cohort-coordinator repair"),
                "a refusal says what to do: {refusal}"
            );
            println!("refused: {refusal}");
            let repaired = Store::repair(dir, &identity())
                .unwrap_or_else(|e| panic!("repair after {refusal:?}: {e}"));
            assert_eq!(repaired.last_round, ROUNDS, "after {refusal}");
            let last = last_round_after_open(dir)
                .unwrap_or_else(|e| panic!("start after repair (refused first: {refusal}): {e}"));
            assert_eq!(last, ROUNDS, "no committed round lost");
            Outcome::RepairedThenResumed
        }
    }
}

#[test]
fn every_kind_of_damage_ends_in_a_resume_or_a_refusal_that_repair_heals() {
    let base = tempfile::tempdir().unwrap();
    let clean = base.path().join("clean");
    committed_run(&clean);
    let db_file = |d: &Path| d.join("db").join("db");
    let size = std::fs::metadata(db_file(&clean)).unwrap().len();
    assert!(
        size > 1 << 20,
        "sled's file is large enough for a 512 KiB cut to leave something: {size} bytes"
    );
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "db cut by 4 KiB",
            Box::new(move |d| truncate_by(&db_file(d), 4 << 10)),
        ),
        (
            "db cut by 64 KiB",
            Box::new(move |d| truncate_by(&db_file(d), 64 << 10)),
        ),
        (
            "db cut by 512 KiB",
            Box::new(move |d| truncate_by(&db_file(d), 512 << 10)),
        ),
        (
            "db cut by half",
            Box::new(move |d| truncate_by(&db_file(d), size / 2)),
        ),
        (
            "db cut to nothing",
            Box::new(move |d| truncate_by(&db_file(d), size)),
        ),
        (
            "db: 10 bits flipped",
            Box::new(move |d| flip(&db_file(d), 10, 1)),
        ),
        (
            "db: 10 other bits flipped",
            Box::new(move |d| flip(&db_file(d), 10, 2)),
        ),
        (
            "db: 10 more bits flipped",
            Box::new(move |d| flip(&db_file(d), 10, 3)),
        ),
        (
            "journal cut in its last line",
            Box::new(|d| cut_journal(d, ROUNDS as usize)),
        ),
        (
            "journal cut half-way",
            Box::new(|d| cut_journal(d, ROUNDS as usize / 2)),
        ),
        (
            "journal: 1 bit flipped",
            Box::new(|d| flip(&d.join(cohort_coordinator::journal::JOURNAL), 1, 4)),
        ),
    ];
    let mut outcomes = Vec::new();
    for (name, damage) in &cases {
        let dir = base.path().join(name.replace([' ', ':'], "-"));
        copy_dir(&clean, &dir);
        damage(&dir);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| survive(&dir)))
            .unwrap_or_else(|_| panic!("{name}: panicked"));
        outcomes.push(format!("{name}: {outcome:?}"));
    }
    println!("sled file {size} bytes\n{}", outcomes.join("\n"));
    // The last journal line cut is a crash between the two writes: healed without repair.
    assert!(outcomes.contains(&"journal cut in its last line: Resumed".to_string()));
    assert!(outcomes.contains(&"journal cut half-way: RepairedThenResumed".to_string()));
    assert!(outcomes.contains(&"db cut to nothing: RepairedThenResumed".to_string()));
}
