//! `cohort-sim fl-bench` end to end: a coordinator process and an agents process over mTLS,
//! synthetic updates, both modes, and the report's keys.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

/// Runs `cohort-sim ARGS --out OUT`, which must succeed, and parses its JSON report.
fn json_report(args: &[&str], out: &std::path::Path) -> serde_json::Value {
    let run = Command::new(env!("CARGO_BIN_EXE_cohort-sim"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("cohort-sim runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("one JSON object")
}

#[test]
fn small_benchmark_runs_both_modes_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let v = json_report(
        &[
            "fl-bench", "--sites", "4", "--params", "5000", "--rounds", "2", "--json",
        ],
        dir.path(),
    );
    assert_eq!(v["sites"], 4);
    // 16 inputs → h → 1 with h = (5000 - 1) / 18 = 277: 16·277 + 277 + 277 + 1.
    assert_eq!(v["params"], 4987);
    let modes = v["modes"].as_array().expect("modes");
    assert_eq!(modes.len(), 2);
    for (m, secure) in modes.iter().zip([false, true]) {
        assert_eq!(m["secure"], secure);
        let rounds = m["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), 2, "{m}");
        for r in rounds {
            assert_eq!(r["sites"], 4, "{m}");
            assert_eq!(r["dropped"], 0, "{m}");
            assert_eq!(r["attempts"], 1, "{m}");
        }
        assert!(m["peak_rss_mib"].as_f64().unwrap() > m["start_rss_mib"].as_f64().unwrap());
    }
    assert!(v["secure_over_plain"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    for (args, message) in [
        (vec!["--sites", "2"], "--sites 2: at least 3"),
        (vec!["--modes", "fast"], "\"fast\" is not plain or secure"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cohort-sim"))
            .arg("fl-bench")
            .args(&args)
            .output()
            .expect("cohort-sim runs");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

/// `cohort-sim rollout`: every site receives, verifies and acknowledges the signed model, and
/// the coordinator's own measure of the broadcast comes back with its memory and CPU.
#[test]
fn rollout_reaches_every_site_and_reports_the_coordinators_measure() {
    let dir = tempfile::tempdir().unwrap();
    let v = json_report(
        &["rollout", "--sites", "6", "--params", "300000", "--json"],
        dir.path(),
    );
    // h = (300000 - 1) / 18 = 16666: 16·16666 + 16666 + 16666 + 1 parameters of 4 bytes.
    assert_eq!(v["params"], 299_989);
    assert_eq!(v["model_bytes"], 299_989 * 4);
    assert_eq!(v["sites"], 6);
    assert_eq!(v["acknowledged"], 6);
    let sent = v["sent_seconds"].as_f64().unwrap();
    let seconds = v["seconds"].as_f64().unwrap();
    assert!(sent > 0.0 && seconds >= sent, "{v}");
    // The coordinator holds at least the model's bytes while it goes out.
    assert!(v["peak_rss_mib"].as_f64().unwrap() >= 299_989.0 * 4.0 / 1048576.0);
    assert!(v["verify_seconds_per_site"].as_f64().unwrap() > 0.0);
    assert!(dir.path().join("coordinator.log").exists());
}
