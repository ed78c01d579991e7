//! Shared by the tests that put the real agent in front of a stub coordinator: the project's
//! PKI for the four hospitals, the signed schema, the stub served over mTLS with the real
//! coordinator certificate, and cleveland's agent configuration.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cohort_ca::demo_keys::{DEFAULT_VALIDITY_DAYS, ProvisionOptions, provision};
use cohort_proto::v1::SchemaReply;
use cohort_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use cohort_protocols::model;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// The sites provisioned for every stub run; the agent under test is cleveland, id 0.
pub const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

pub const SCHEMA: &str = r#"
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

pub fn pem_der(path: &Path) -> Vec<u8> {
    cohort_coordinator::tls::load_certs(path).unwrap()[0]
        .as_ref()
        .to_vec()
}

/// The Ed25519 key in a PKCS#8 PEM file of the PKI.
pub fn key(path: &Path) -> ed25519_dalek::SigningKey {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    ed25519_dalek::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A CA, the coordinator's certificate and the four sites' bundles in `dir/pki`.
pub fn provision_sites(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    provision(&ProvisionOptions {
        validity_days: DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .unwrap();
    pki
}

/// The round context of the provisioned federation: its manifest's digest, as the agents
/// (which pin that manifest) expect it in every SecAgg+ round.
pub fn context(pki: &Path) -> [u8; 32] {
    use cohort_protocols::manifest::{SignedManifest, ca_key};
    let ca = ca_key(&pem_der(&pki.join("ca.pem"))).unwrap();
    SignedManifest::verify(&std::fs::read(pki.join("manifest.toml")).unwrap(), &ca)
        .unwrap()
        .digest()
}

/// [`SCHEMA`] as the coordinator serves it, signed with the key at `signer` in the PKI (the
/// coordinator's own, or another for a forgery).
pub fn schema_reply(pki: &Path, signer: &str) -> SchemaReply {
    let schema_toml =
        toml::to_string(&toml::from_str::<model::DataSchema>(SCHEMA).unwrap()).unwrap();
    SchemaReply {
        signature: model::sign_schema(&key(&pki.join(signer)), &schema_toml).to_vec(),
        schema_toml,
        coordinator_certificate: pem_der(&pki.join("coordinator/cert.pem")),
        inputs: 13,
    }
}

/// Serves `stub` on 127.0.0.1 with the coordinator's certificate, requiring client
/// certificates of the project CA; its port.
pub async fn serve<S: Coordinator>(pki: &Path, stub: S) -> u16 {
    let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("coordinator/cert.pem"),
            read("coordinator/key.pem"),
        ))
        .client_ca_root(Certificate::from_pem(read("ca.pem")));
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(CoordinatorServer::new(stub))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    port
}

/// Cleveland's agent, dialling the stub on `port`.
pub fn cleveland(pki: &Path, port: u16) -> cohort_agent::AgentConfig {
    let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/heart-disease/cleveland.csv");
    let data: toml::Table =
        toml::from_str(&format!("csv = {:?}", csv.display().to_string())).unwrap();
    let schema: toml::Table = toml::from_str(SCHEMA).unwrap();
    cohort_sim::run::agent_config(
        "cleveland",
        &pki.join("sites/cleveland"),
        port,
        data,
        &schema,
        vec![],
    )
    .unwrap()
}
