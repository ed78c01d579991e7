//! A memory budget below what the coordinator already uses: every upload is refused with
//! RESOURCE_EXHAUSTED before it reaches the sum, the agents are told and reconnect, and the
//! coordinator ends the run with a clear error instead of growing or crashing.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use cohort_coordinator::CoordinatorConfig;

use cohort_testkit::prelude::*;

#[test]
fn uploads_over_the_memory_budget_are_refused_and_the_coordinator_survives() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let config = config::coordinator(&pki, &dir.path().join("data"))
        .merge(
            r#"
[limits]
memory_mib = 1
[rounds]
count = 2
wait_for_sites_secs = 30
stage_timeout_secs = 5
train_timeout_secs = 5
max_attempts = 2
[training]
local_steps = 10
"#,
        )
        .build(CoordinatorConfig::parse);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(cohort_coordinator::run(config, Some(tx)));
        let port = rx.await.unwrap().grpc.port();
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| {
                tokio::spawn(cohort_agent::run(
                    config::agent(&pki, s, port)
                        .merge(SCHEMA)
                        .build(cohort_agent::AgentConfig::parse),
                ))
            })
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
