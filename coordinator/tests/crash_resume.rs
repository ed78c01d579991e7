//! The real `cohort-coordinator` binary is killed with SIGKILL at several points across the
//! stages of a round and started again with the same configuration; four hospital agents (in
//! this process) reconnect by themselves. The run must finish with every round committed
//! exactly once, and a damaged data directory must be refused at start-up.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cohort_coordinator::store::{Identity, MARKER, Store};

use cohort_testkit::prelude::*;

const ROUNDS: u64 = 6;

fn coordinator_toml(pki: &Path, data_dir: &Path, port: u16) -> String {
    config::coordinator(pki, data_dir)
        .set("listen", format!("127.0.0.1:{port}"))
        .merge(&format!(
            r#"
[rounds]
count = {ROUNDS}
wait_for_sites_secs = 60
stage_timeout_secs = 10
train_timeout_secs = 10
max_attempts = 5
[storage]
keep_checkpoints = 2
[training]
optimizer = "adam"
local_steps = 50
"#
        ))
        .to_string()
}

/// The coordinator binary with `run --exit-when-done`, logging in `log_format`.
fn start(config: &Path, log_format: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
    cmd.args([
        "--log-format",
        log_format,
        "run",
        "--exit-when-done",
        "--config",
    ])
    .arg(config)
    .env("NO_COLOR", "1");
    Proc::spawn("coordinator", cmd)
}

#[test]
fn killed_at_any_stage_the_coordinator_resumes_and_finishes_every_round_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let port = free_port();
    let data_dir = dir.path().join("coordinator-data");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, coordinator_toml(&pki, &data_dir, port)).unwrap();

    // The agents live through every restart and reconnect on their own.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agents: Vec<_> = SITES
        .iter()
        .map(|s| {
            rt.spawn(cohort_agent::run(
                config::agent(&pki, s, port)
                    .merge(SCHEMA)
                    .build(cohort_agent::AgentConfig::parse),
            ))
        })
        .collect();

    let minute = Duration::from_secs(60);
    // Kill points: before round 0 is committed, then inside rounds at successive stages.
    let kills: [&[&str]; 5] = [
        &["feature statistics aggregated"],
        &["round=2", "stage=ShareKeys"],
        &["round=3", "stage=MaskedInput"],
        &["round=4", "stage=Unmask"],
        &["round=5", "evaluating the model"],
    ];
    for (i, pattern) in kills.iter().enumerate() {
        let mut c = start(&config, "text");
        let seen = c.wait_for_within(pattern, minute);
        // The first kill may land before or after round 0 is committed. Start i follows the
        // kill inside round i, so it resumes after round i - 1 (or i, had the commit won the
        // race with the kill).
        if i > 1 {
            let resumed = |r: usize| format!("round={r}");
            assert!(
                seen.iter()
                    .any(|l| l.contains("resuming after the last committed round")
                        && (l.ends_with(&resumed(i - 1)) || l.ends_with(&resumed(i)))),
                "restart {i} did not resume:\n{}",
                seen.join("\n")
            );
        }
        c.kill();
    }
    // SIGTERM inside round 5 (JSON logs this time): a clean stop, exit 0, storage flushed.
    let mut c = start(&config, "json");
    let seen = c.wait_for_within(&["\"stage\":\"MaskedInput\"", "\"round\":5"], minute);
    for line in &seen {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    let status = Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = c.wait_for_within(&["stopped: committed rounds are on disk"], minute);
    assert!(
        c.child.wait().unwrap().success(),
        "exit 0 on SIGTERM:\n{}",
        stopped.join("\n")
    );

    let mut last = start(&config, "text");
    let seen = last.wait_for_within(&["finished 6 rounds"], minute);
    // Killed while evaluating round 5: it resumes after round 4 (or 5, had the commit won
    // the race with the kill).
    assert!(
        seen.iter()
            .any(|l| l.contains("resuming after the last committed round")
                && (l.contains("round=4") || l.contains("round=5"))),
        "the last start resumes after round 4 or 5:\n{}",
        seen.join("\n")
    );
    assert!(last.child.wait().unwrap().success());
    for a in agents {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), a).await })
            .expect("agents stop after the shutdown")
            .expect("agent task")
            .expect("agent ends cleanly");
    }

    // Every round is committed once, in order, with all four hospitals' examples.
    let ca = std::fs::read(pki.join("ca.pem")).unwrap();
    let ca_der = rustls_pemfile_der(&ca);
    let identity = Identity::new(&ca_der, "logreg 13-1".into(), schema_hash());
    let store = Store::open(&data_dir, &identity).expect("the run's own directory opens");
    let resume = store.resume().unwrap().expect("a committed run");
    let (records, total) = store.rounds_page(0, 1000).unwrap();
    assert_eq!(total as u64, ROUNDS);
    let rounds: Vec<u64> = records.iter().map(|r| r.summary.round).collect();
    assert_eq!(rounds, (1..=ROUNDS).collect::<Vec<_>>());
    // A round killed after the sites sent their inputs but before they accepted its
    // survivors cannot be run again (their contribution ledgers refuse: a second sum over
    // other survivors would difference out an input), so it is given up and the run goes on;
    // killed later, it is run again over the same survivors. Round 3 is killed as its
    // masked-input stage opens, round 4 as its unmasking opens (a site may not have accepted
    // the survivors yet) and round 5 is stopped in the masked-input stage of its redo: those
    // may be given up. The statistics round (killed after its sum) and round 2 (killed
    // before any input) are run again. A round not given up sums the four sites once, or —
    // when one had sent its input before the kill and the others had not — the others, with
    // that one a dropout. The redo itself is tested deterministically in
    // lying_coordinator.rs.
    let all_four = records[0].summary.total_weight;
    for r in &records {
        match &r.summary.failed {
            None if r.summary.dropped == 0 => assert_eq!(r.summary.total_weight, all_four),
            None => assert!(
                r.summary.dropped == 1 && r.summary.total_weight < all_four,
                "{:?}",
                r.summary
            ),
            Some(reason) => {
                assert!(
                    [3, 4, 5].contains(&r.summary.round),
                    "round {} given up: {reason}",
                    r.summary.round
                );
                assert!(
                    reason.contains("already sent their input for this round"),
                    "{reason}"
                );
            }
        }
    }
    assert_eq!(
        records[1].summary.failed, None,
        "round 2 was killed before any input"
    );
    assert_eq!(resume.checkpoint.round, ROUNDS);
    assert_eq!(resume.last_round, ROUNDS);
    assert_eq!(
        resume.last.as_ref().unwrap().summary.model_sha3_512,
        hex(&resume.checkpoint.sha3_512)
    );
    assert_eq!(store.checkpoint_rounds().unwrap(), vec![ROUNDS - 1, ROUNDS]);
    let last_params = resume.checkpoint.params.clone();
    drop(store);

    // The final model exported for PyTorch: names, shapes, values and provenance.
    let file = dir.path().join("model.safetensors");
    let export = |round: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
        cmd.args(["export-model", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&file);
        if let Some(r) = round {
            cmd.args(["--round", r]);
        }
        cmd.output().unwrap()
    };
    let out = export(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let weight = st.tensor("0.weight").unwrap();
    assert_eq!(weight.shape(), [1, 13]);
    let values: Vec<f32> = weight
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, last_params[..13]);
    assert_eq!(st.tensor("0.bias").unwrap().shape(), [1]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["cohort.round"], ROUNDS.to_string());
    assert_eq!(meta["cohort.sha3_512"], hex(&resume.checkpoint.sha3_512));
    // A pruned round is refused with the rounds that are kept.
    let out = export(Some("2"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no checkpoint of round 2; kept: [5, 6]"),
        "{err}"
    );

    // A damaged data directory is refused at start-up, and left as it was: exit 4, the data
    // directory needs an operator (a restart would only repeat it).
    std::fs::write(data_dir.join(MARKER), "not json").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not parse") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(data_dir.join(MARKER)).unwrap(),
        "not json"
    );
}

fn schema_hash() -> String {
    let cfg = cohort_coordinator::CoordinatorConfig::parse(&coordinator_toml(
        Path::new("/p"),
        Path::new("/d"),
        1,
    ))
    .unwrap();
    cfg.schema.hash()
}

fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem)
        .unwrap()
        .as_ref()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
