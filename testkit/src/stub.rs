//! A stub coordinator: the real gRPC service trait, implemented by a test to script what
//! the coordinator says, served over mutual TLS with the real coordinator certificate. The
//! agent under test is cleveland (site 0), the real agent with its real checks.

use std::path::Path;

use cohort_proto::v1::SchemaReply;
use cohort_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use cohort_protocols::model;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::{self, Toml};
use crate::heart;
use crate::pki::{bundle, cert_der, signing_key};

/// The heart-disease schema as the coordinator serves it, signed with the key at `signer` in
/// the PKI (`coordinator/key.pem` for the real signature, another key for a forgery).
pub fn schema_reply(pki: &Path, signer: &str) -> SchemaReply {
    let schema_toml = toml::to_string(
        &toml::from_str::<model::DataSchema>(heart::SCHEMA_BODY).expect("the shipped schema"),
    )
    .unwrap();
    SchemaReply {
        signature: model::sign_schema(&signing_key(&pki.join(signer)), &schema_toml).to_vec(),
        schema_toml,
        coordinator_certificate: cert_der(&pki.join("coordinator/cert.pem")),
        inputs: heart::INPUTS as u32,
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

/// Cleveland's agent.toml for the stub on `port`: all its rows, the manifest of its bundle
/// pinned, the schema pinned (what the stub signs), reconnecting within two seconds.
pub fn cleveland(pki: &Path, port: u16) -> Toml {
    config::agent(pki, "cleveland", port)
        .remove("data.test_fraction")
        .remove("data.split_seed")
        .remove("reconnect.max_refusals")
        .set("reconnect.max_ms", 2000)
        .path(
            "tls.manifest",
            &bundle(pki, "cleveland").join("manifest.toml"),
        )
        .merge(heart::SCHEMA)
}
