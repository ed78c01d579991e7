//! A federation as it lives at real sites: the real `cohort-coordinator` and four real
//! `cohort-agent` processes on the heart-disease hospitals, with sites that disconnect in
//! every SecAgg+ stage, a second agent started with a site's bundle, an agent and the
//! coordinator killed with SIGKILL mid-round and restarted, and agents holding bundles the
//! coordinator must refuse.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_coordinator::status::client::get;

use cohort_testkit::prelude::*;

const ROUNDS: u64 = 10;
const TOKEN: &str = "field-trial-token-0123456789";
/// Far beyond what a round takes here: a round that lasts anywhere near it waited for a
/// deadline instead of noticing that a site had gone.
const DEADLINE_SECS: u64 = 300;

fn coordinator_toml(pki: &Path, data_dir: &Path, port: u16, status: u16) -> String {
    config::coordinator(pki, data_dir)
        .set("listen", format!("127.0.0.1:{port}"))
        .merge(&format!(
            r#"
[rounds]
count = {ROUNDS}
# Every round waits for all four (a site that dropped out reconnects within a second), and
# survives the loss of one of them: SecAgg+ with k = 4 needs t = 3.
wait_for_sites_secs = 120
stage_timeout_secs = {DEADLINE_SECS}
train_timeout_secs = {DEADLINE_SECS}
max_attempts = 5
[status]
listen = "127.0.0.1:{status}"
token = "{TOKEN}"
[secagg]
consistency_check = true
[training]
optimizer = "adam"
local_steps = 200
"#
        ))
        .to_string()
}

fn api(rt: &tokio::runtime::Runtime, status: u16, path: &str) -> serde_json::Value {
    let (code, body) = rt
        .block_on(get(
            &format!("http://127.0.0.1:{status}{path}"),
            Some(TOKEN),
        ))
        .unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn four_sites_as_separate_processes_survive_dropouts_duplicates_and_kills() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let (port, status) = (free_port(), free_port());
    let data_dir = dir.path().join("coordinator-data");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, coordinator_toml(&pki, &data_dir, port, status)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let mut coordinator = Proc::coordinator(&config);
    // va loses its connection in a different SecAgg+ stage in each of rounds 1 to 5 (and
    // reconnects by itself): advertise keys, share keys, masked input, consistency check,
    // unmask.
    let faults: String = [
        "advertise_keys",
        "share_keys",
        "masked_input",
        "consistency_check",
        "unmask",
    ]
    .iter()
    .enumerate()
    .map(|(i, stage)| format!("[[faults]]\nround = {}\nstage = \"{stage}\"\n", i + 1))
    .collect();
    let mut agents: Vec<Proc> = SITES
        .iter()
        .map(|site| {
            let file = dir.path().join(format!("{site}.toml"));
            let extra = if *site == "va" { faults.as_str() } else { "" };
            let toml = config::agent(&pki, site, port).merge(extra).to_string();
            std::fs::write(&file, toml).unwrap();
            // One agent logs JSON, as a site feeding a log pipeline would.
            Proc::agent(site, &file, *site == "switzerland")
        })
        .collect();

    coordinator.wait_for(&["round complete", "round=5"]);
    let rounds = api(&rt, status, "/api/v1/rounds?per_page=100");
    for r in rounds["rounds"].as_array().unwrap() {
        let s = &r["summary"];
        assert_eq!(s["attempts"], 1, "no attempt was lost to a dropout: {s}");
        // Gone before its masked input: left out of the sum. Gone after it (consistency
        // check, unmask): its input is in the sum and the others reveal what removes its mask.
        let round = s["round"].as_u64().unwrap();
        let dropped = u64::from(round <= 3);
        assert_eq!(s["dropped"], dropped, "va's dropout in round {round}: {s}");
        assert!(
            s["seconds"].as_f64().unwrap() < DEADLINE_SECS as f64 / 3.0,
            "round {} waited for a deadline instead of noticing the disconnect: {s}",
            s["round"]
        );
    }
    assert_eq!(rounds["total"], 5);

    // A second agent with cleveland's bundle is refused with a clear message on both ends;
    // the original keeps its session and keeps training.
    let cleveland = dir.path().join("cleveland.toml");
    let mut duplicate = Proc::agent("duplicate", &cleveland, false);
    duplicate.wait_for(&["already has a session for this site"]);
    coordinator.wait_for(&["join refused: this site is already connected", "cleveland"]);
    duplicate.kill();
    let joined_before = site_rounds(&rt, status, "cleveland");

    // hungary is killed (SIGKILL) in the middle of round 7; the round finishes without it,
    // well before any deadline, and the restarted agent joins the next rounds.
    coordinator.wait_for(&["round=7", "SecAgg+ stage open"]);
    agents[1].kill();
    coordinator.wait_for(&["round complete", "round=7"]);
    agents[1] = Proc::agent("hungary", &dir.path().join("hungary.toml"), false);

    // The coordinator is killed in round 9 and started again: it resumes after round 8.
    coordinator.wait_for(&["round=9", "SecAgg+ stage open"]);
    coordinator.kill();
    let coordinator = Proc::coordinator(&config);
    let seen = coordinator.wait_for(&["training finished; still serving the status API"]);
    assert!(
        seen.iter()
            .any(|l| l.contains("resuming after the last committed round")),
        "{}",
        seen.join("\n")
    );
    let after_finish: Vec<&String> = seen
        .iter()
        .skip_while(|l| !(l.contains("round complete") && l.contains(&format!("round={ROUNDS}"))))
        .collect();
    assert!(!after_finish.is_empty(), "{}", seen.join("\n"));
    assert!(
        after_finish.iter().all(|l| !l.contains("WARN")),
        "a normal end is not a warning:\n{after_finish:#?}"
    );

    // Every agent was told training is over and exited 0.
    for a in &mut agents {
        assert_eq!(a.exit_code(), Some(0), "{}:\n{}", a.name, a.log());
        let log = a.log();
        let tail: Vec<&str> = log
            .lines()
            .skip_while(|l| {
                !l.contains(&format!("\"round\":{ROUNDS}"))
                    && !l.contains(&format!("round={ROUNDS}"))
            })
            .collect();
        assert!(
            tail.iter().all(|l| !l.contains("WARN")),
            "{}: a normal end is not a warning:\n{tail:#?}",
            a.name
        );
    }
    assert!(site_rounds(&rt, status, "cleveland") > joined_before);

    // The status API still answers after the last round, from the committed state.
    let rounds = api(&rt, status, "/api/v1/rounds?per_page=100");
    let numbers: Vec<u64> = rounds["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["summary"]["round"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=ROUNDS).collect::<Vec<_>>(), "each round once");
    for r in rounds["rounds"].as_array().unwrap() {
        assert!(r["summary"]["seconds"].as_f64().unwrap() < DEADLINE_SECS as f64 / 3.0);
    }
    let round7 = &rounds["rounds"][6]["summary"];
    assert!(round7["dropped"].as_u64().unwrap() >= 1, "{round7}");
    let s = api(&rt, status, "/api/v1/status");
    assert_eq!(s["state"], "finished", "{s}");
    assert_eq!(s["rounds_completed"], ROUNDS);
    let (code, text) = rt
        .block_on(get(
            &format!("http://127.0.0.1:{status}/metrics"),
            Some(TOKEN),
        ))
        .unwrap();
    assert_eq!(code, 200);
    // The restarted process ran only rounds 9 and 10; the counters start from what is
    // committed.
    assert_eq!(
        metric(&text, "cohort_rounds_completed_total"),
        ROUNDS as f64
    );
    assert_eq!(metric(&text, "cohort_current_round"), ROUNDS as f64);
    assert_eq!(metric(&text, "cohort_seconds_since_progress"), 0.0);

    // An agent that starts now is told training is over.
    let mut late = Proc::agent("late", &dir.path().join("va.toml"), false);
    assert_eq!(late.exit_code(), Some(0), "{}", late.log());
    assert!(late.log().contains("coordinator finished training"));

    // Logs to a pipe carry no colour codes; the JSON agent wrote only JSON objects.
    for p in agents.iter().chain([&coordinator, &late]) {
        assert!(
            !p.log().contains('\u{1b}'),
            "{}: ANSI escapes in a piped log",
            p.name
        );
    }
    let json = agents[2].log();
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(json.contains("joined the federation"), "{json}");

    // SIGTERM stops the lingering coordinator cleanly.
    let mut coordinator = coordinator;
    let term = Command::new("kill")
        .args(["-TERM", &coordinator.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(coordinator.exit_code(), Some(0), "{}", coordinator.log());
}

fn site_rounds(rt: &tokio::runtime::Runtime, status: u16, site: &str) -> u64 {
    let sites = api(rt, status, "/api/v1/sites");
    sites["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == site)
        .map(|s| s["rounds_joined"].as_u64().unwrap())
        .unwrap()
}

#[test]
fn bundles_the_coordinator_cannot_accept_end_the_agent_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let other = pki_in(&dir.path().join("other-project"));
    let (port, status) = (free_port(), free_port());
    let config = dir.path().join("coordinator.toml");
    let data_dir = dir.path().join("coordinator-data");
    std::fs::write(&config, coordinator_toml(&pki, &data_dir, port, status)).unwrap();
    let coordinator = Proc::coordinator(&config);
    coordinator.wait_for(&["coordinator listening"]);

    // Another project's whole bundle: the agent does not trust the coordinator.
    let file = dir.path().join("foreign.toml");
    std::fs::write(
        &file,
        config::agent_in(&other.join("sites/cleveland"), "cleveland", port).to_string(),
    )
    .unwrap();
    let mut foreign = Proc::agent("foreign", &file, false);
    assert_eq!(foreign.exit_code(), Some(3), "{}", foreign.log());
    assert!(
        foreign
            .log()
            .contains("not issued by the CA in this site's ca.pem"),
        "{}",
        foreign.log()
    );

    // The right CA but a certificate from another CA: the coordinator refuses it and says
    // so, with the peer's address.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(pki.join("sites/hungary/ca.pem"), mixed.join("ca.pem")).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(other.join("sites/hungary").join(f), mixed.join(f)).unwrap();
    }
    let file = dir.path().join("mixed.toml");
    std::fs::write(&file, config::agent_in(&mixed, "hungary", port).to_string()).unwrap();
    let mut refused = Proc::agent("mixed", &file, false);
    assert_eq!(refused.exit_code(), Some(3), "{}", refused.log());
    assert!(
        refused.log().contains("refused this site's certificate"),
        "{}",
        refused.log()
    );
    coordinator.wait_for(&[
        "TLS handshake refused",
        "peer=127.0.0.1",
        "not issued by this project's CA",
    ]);

    // A site that pins a schema the coordinator's differs from: the agent says which key
    // differs, with both values, and stops at once.
    let file = dir.path().join("schema.toml");
    let pinned = SCHEMA.replace("missing = \"drop_row\"", "missing = \"impute_mean\"");
    let toml = config::agent(&pki, "va", port).merge(&pinned).to_string();
    std::fs::write(&file, toml).unwrap();
    let mut schema = Proc::agent("schema", &file, false);
    assert_eq!(schema.exit_code(), Some(3), "{}", schema.log());
    assert!(
        schema
            .log()
            .contains(r#"missing: "drop_row" at the coordinator, "impute_mean" at this site"#),
        "{}",
        schema.log()
    );
    // It never joined: it compared the coordinator's signed schema with its own and stopped.
    assert!(
        !coordinator.log().contains("site joined"),
        "{}",
        coordinator.log()
    );
}

#[test]
fn configuration_problems_exit_with_code_2_and_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let port = free_port();
    // A certificate path that does not exist: found only when the coordinator starts.
    let config = dir.path().join("coordinator.toml");
    let text = coordinator_toml(&pki, &dir.path().join("data"), port, free_port())
        .replace("coordinator/cert.pem", "coordinator/missing.pem");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
    // An agent whose key file is missing.
    let file = dir.path().join("agent.toml");
    let toml = config::agent(&pki, "va", port)
        .to_string()
        .replace("key.pem", "nokey.pem");
    std::fs::write(&file, toml).unwrap();
    let out = Command::new(workspace_exe("cohort-agent"))
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nokey.pem"), "{err}");
}

/// A second, unrelated project's CA and bundles.
fn pki_in(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    provision(dir)
}
