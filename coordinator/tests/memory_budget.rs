//! A memory budget below what the coordinator already uses: every upload is refused with
//! RESOURCE_EXHAUSTED before it reaches the sum, the agents are told and reconnect, and the
//! coordinator ends the run with a clear error instead of growing or crashing.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use cohort_coordinator::CoordinatorConfig;

mod common;
use common::*;

#[test]
fn uploads_over_the_memory_budget_are_refused_and_the_coordinator_survives() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let config = CoordinatorConfig::parse(&format!(
        r#"
listen = "127.0.0.1:0"
data_dir = {data:?}
{tls}
[limits]
memory_mib = 1
[rounds]
count = 2
min_sites = 4
wait_for_sites_secs = 30
stage_timeout_secs = 5
train_timeout_secs = 5
max_attempts = 2
[secagg]
quant_bits = 20
modulus_bits = 64
max_weight = 1000
[model]
kind = "logreg"
inputs = 13
[training]
learning_rate = 0.001
batch_size = 4
local_steps = 10
{SCHEMA}"#,
        data = dir.path().join("data"),
        tls = coordinator_tls(&pki),
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(cohort_coordinator::run(config, Some(tx)));
        let port = rx.await.unwrap().grpc.port();
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| tokio::spawn(cohort_agent::run(agent(&pki, s, port))))
            .collect();
        let result = run.await.expect("the coordinator task does not panic");
        for a in agents {
            a.abort();
        }
        result.expect_err("no round can complete under a 1 MiB budget")
    });
    // The statistics round (round 0) never gets an upload through: every attempt loses its
    // quorum, and the run stops with the reason.
    let msg = format!("{err:#}");
    // Every site sent its input into the refused attempt (it is spent for the round, as its
    // contribution ledger says), so there is no second attempt.
    assert!(msg.contains("round 0 failed (attempts: 1)"), "{msg}");
    assert!(msg.contains("not retried"), "{msg}");
    // Keys and shares went through; not one masked input did.
    assert!(
        msg.contains("aborted in stage MaskedInput") && msg.contains("has only 0 live neighbours"),
        "{msg}"
    );
    assert!(
        !dir.path().join("data").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("crash-")),
        "no panic snapshot"
    );
}
