//! Four hospitals train `GatedNet` — a network Cohort does not ship — with secure aggregation
//! over real gRPC and mutual TLS, exactly as they train the TOML models: same agent session,
//! same SecAgg+, same coordinator. The coordinator knows the model only by name, parameter
//! count and initial parameters.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cohort_agent::model::Shape;
use cohort_ca::demo_keys::{DEFAULT_VALIDITY_DAYS, ProvisionOptions, provision};
use cohort_example_custom_model::{NAME, initial, model};

const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];
const ROUNDS: u64 = 6;

fn data(site: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/heart-disease")
        .join(format!("{site}.csv"))
        .canonicalize()
        .unwrap()
}

const SCHEMA: &str = r#"
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
"#;

#[test]
fn hospitals_train_a_users_burn_network_with_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    provision(&ProvisionOptions {
        validity_days: DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        coordinator_names: vec!["localhost".into(), "127.0.0.1".into()],
        coordinator_url: "https://127.0.0.1:0".into(),
    })
    .unwrap();
    let (bytes, parameters) = initial(Shape {
        inputs: 13,
        outputs: 1,
    })
    .unwrap();
    let init = dir.path().join("gated.init");
    std::fs::write(&init, &bytes).unwrap();
    let config = format!(
        r#"
data_dir = {data_dir:?}
listen = "127.0.0.1:0"

[model]
kind = "custom"
name = "{NAME}"
parameters = {parameters}
init_file = {init:?}
inputs = 13

[rounds]
count = {ROUNDS}
min_sites = 4
stage_timeout_secs = 30
train_timeout_secs = 120
wait_for_sites_secs = 60

[schema]
{SCHEMA}

[secagg]
clip = 1.0
quant_bits = 20
max_weight = 1000

[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
manifest = {manifest:?}

[training]
optimizer = "adam"
learning_rate = 0.005
batch_size = 8
local_steps = 100
"#,
        data_dir = dir.path().join("coordinator").display().to_string(),
        init = init.display().to_string(),
        ca = pki.join("ca.pem").display().to_string(),
        cert = pki.join("coordinator/cert.pem").display().to_string(),
        key = pki.join("coordinator/key.pem").display().to_string(),
        manifest = pki.join("coordinator/manifest.toml").display().to_string(),
    );
    let config = cohort_coordinator::CoordinatorConfig::parse(&config).unwrap();
    let schema: toml::Table = toml::from_str(SCHEMA).unwrap();

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
            let data = toml::Table::from_iter([
                (
                    "csv".to_string(),
                    toml::Value::String(data(site).display().to_string()),
                ),
                ("split_seed".to_string(), toml::Value::Integer(42)),
            ]);
            let cfg = cohort_sim::run::agent_config(
                site,
                &pki.join("sites").join(site),
                port,
                data,
                &schema,
                Vec::new(),
            )
            .unwrap();
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
