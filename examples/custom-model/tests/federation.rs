//! Four hospitals train `GatedNet` — a network Cohort does not ship — with secure aggregation
//! over real gRPC and mutual TLS, exactly as they train the TOML models: same agent session,
//! same SecAgg+, same coordinator. The coordinator knows the model only by name, parameter
//! count and initial parameters.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use cohort_agent::AgentConfig;
use cohort_agent::model::Shape;
use cohort_coordinator::CoordinatorConfig;
use cohort_example_custom_model::{NAME, initial, model};
use cohort_testkit::prelude::*;

const ROUNDS: u64 = 6;

#[test]
fn hospitals_train_a_users_burn_network_with_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let (bytes, parameters) = initial(Shape {
        inputs: 13,
        outputs: 1,
    })
    .unwrap();
    let init = dir.path().join("gated.init");
    std::fs::write(&init, &bytes).unwrap();
    let config = config::coordinator(&pki, &dir.path().join("coordinator"))
        .merge(&format!(
            r#"
[model]
kind = "custom"
name = "{NAME}"
parameters = {parameters}
[rounds]
count = {ROUNDS}
stage_timeout_secs = 30
train_timeout_secs = 120
wait_for_sites_secs = 60
[secagg]
clip = 1.0
[training]
optimizer = "adam"
learning_rate = 0.005
batch_size = 8
local_steps = 100
"#
        ))
        .path("model.init_file", &init)
        .build(CoordinatorConfig::parse);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let coordinator = tokio::spawn(cohort_coordinator::run_with_progress(
            config,
            Some(tx),
            None,
        ));
        let port = rx.await.unwrap().grpc.port();
        for site in SITES {
            // The agent pins the federation's manifest and the schema it trains on.
            let cfg = config::agent(&pki, site, port)
                .path(
                    "tls.manifest",
                    &pki.join("sites").join(site).join("manifest.toml"),
                )
                .merge(SCHEMA)
                .build(AgentConfig::parse);
            tokio::spawn(cohort_agent::Agent::new(cfg).model(model()).run());
        }
        coordinator.await.unwrap().unwrap()
    });

    assert!(summary.secure);
    assert_eq!(summary.rounds().unwrap().len() as u64, ROUNDS);
    assert!(
        summary
            .rounds()
            .unwrap()
            .iter()
            .all(|r| r.sites == 4 && r.dropped == 0)
    );
    assert_eq!(
        summary.received.plain_updates, 0,
        "updates only inside SecAgg+"
    );
    // The committed model is GatedNet's vector: its length, and it moved from the file's.
    assert_eq!(summary.model.len(), parameters);
    assert_ne!(cohort_protocols::model::to_bytes(&summary.model), bytes);
    let (before, after) = (&summary.initial, &summary.last.as_ref().unwrap().eval);
    assert!(
        after.loss < before.loss,
        "{} -> {}",
        before.loss,
        after.loss
    );
    let accuracy = after.weighted.accuracy.unwrap();
    assert!(accuracy > 0.7, "GatedNet learned heart disease: {accuracy}");
    eprintln!(
        "GatedNet ({parameters} parameters), {ROUNDS} secure rounds: pooled test accuracy {accuracy:.4}, loss {:.4} -> {:.4}",
        before.loss, after.loss
    );
}
