//! Shared by the coordinator's integration tests: the heart-disease hospitals, their schema,
//! provisioning and agent configurations.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cohort_coordinator::provision::{ProvisionOptions, provision};

pub const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

/// The FLamby heart-disease schema (13 inputs), identical on both sides.
pub const SCHEMA: &str = r#"
[schema]
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

pub fn data(site: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/heart-disease")
        .join(format!("{site}.csv"))
        .canonicalize()
        .expect("shipped data")
}

/// A CA, the coordinator's certificate and the four hospitals' bundles in `dir/pki`.
pub fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    provision(&ProvisionOptions {
        out: pki.clone(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .unwrap();
    pki
}

/// The `[tls]` table of the coordinator's configuration.
pub fn coordinator_tls(pki: &Path) -> String {
    format!(
        "[tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n",
        pki.join("coordinator/ca.pem"),
        pki.join("coordinator/cert.pem"),
        pki.join("coordinator/key.pem"),
    )
}

/// An agent for `site` dialling 127.0.0.1:`port`, reconnecting quickly.
pub fn agent(pki: &Path, site: &str, port: u16) -> cohort_agent::AgentConfig {
    let dir = pki.join("sites").join(site);
    cohort_agent::AgentConfig::parse(&format!(
        r#"
site = "{site}"
[coordinator]
url = "https://127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
[data]
csv = {csv:?}
test_fraction = 0.34
split_seed = 42
[reconnect]
initial_ms = 100
max_ms = 500
{SCHEMA}"#,
        ca = dir.join("ca.pem"),
        cert = dir.join("cert.pem"),
        key = dir.join("key.pem"),
        csv = data(site),
    ))
    .expect("agent configuration")
}
