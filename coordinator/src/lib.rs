//! The Cohort coordinator: accepts agents over mTLS gRPC and runs federated rounds with
//! SecAgg+ secure aggregation.

pub mod config;
pub mod driver;
pub mod export;
pub mod hub;
pub mod provision;
pub mod service;
pub mod sharded;
pub mod store;
pub mod tls;
pub mod upload;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use cohort_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

pub use config::CoordinatorConfig;
pub use driver::RunSummary;

/// Largest gRPC message accepted (chunks are at most 4 MiB).
const MAX_MESSAGE: usize = cohort_proto::MAX_MESSAGE_BYTES;

/// The coordinator's Ed25519 key (its TLS key, as provisioned), which also signs models.
pub(crate) fn signing_key(path: &std::path::Path) -> Result<ed25519_dalek::SigningKey> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the coordinator's key {}", path.display()))?;
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{}: the coordinator's key must be an Ed25519 PKCS#8 key, as `provision` writes: {e}",
            path.display()
        )
    })
}

/// Starts serving on `config.listen` and runs the configured rounds. `bound` receives the
/// actual address (useful with port 0). Returns when training is finished.
pub async fn run(
    config: CoordinatorConfig,
    bound: Option<oneshot::Sender<SocketAddr>>,
) -> Result<RunSummary> {
    run_with_progress(config, bound, None).await
}

/// Like [`run`], and sends every finished round's summary to `progress`.
pub async fn run_with_progress(
    config: CoordinatorConfig,
    bound: Option<oneshot::Sender<SocketAddr>>,
    progress: Option<mpsc::UnboundedSender<driver::RoundSummary>>,
) -> Result<RunSummary> {
    let tls = tls::server_config(&config.tls.ca_cert, &config.tls.cert, &config.tls.key)
        .context("loading the coordinator's TLS files")?;
    let ca_der = tls::load_certs(&config.tls.ca_cert)?
        .into_iter()
        .next()
        .map(|c| c.as_ref().to_vec())
        .context("the CA file holds no certificate")?;
    let certificate_der = tls::load_certs(&config.tls.cert)?
        .into_iter()
        .next()
        .map(|c| c.as_ref().to_vec())
        .context("the coordinator's certificate file holds no certificate")?;
    let signing_key = signing_key(&config.tls.key)?;
    let identity = store::Identity::new(
        &ca_der,
        config.model.spec().describe(),
        config.schema.hash(),
    );
    // Before the port opens: a data directory that is not this run's stops everything.
    let store = store::Store::open(&config.data_dir, &identity)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    info!(%addr, "coordinator listening (gRPC, TLS 1.3, client certificates required)");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }

    let (inbox_tx, inbox_rx) = mpsc::channel(4096);
    let hub = Arc::new(hub::Hub::new(inbox_tx));
    let service = service::Service {
        hub: hub.clone(),
        ca_der: ca_der.clone(),
        schema_hash: config.schema.hash(),
        certificate_der,
    };

    // TLS handshakes run in their own tasks so a slow or hostile client cannot stall accept.
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let accept_task = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let svc = CoordinatorServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(ReceiverStream::new(conn_rx)),
    );
    let driver = driver::Driver::new(
        config,
        hub,
        inbox_rx,
        ca_der,
        driver::Durability { store, signing_key },
        progress,
    )
    .context("training settings")?;
    let result = driver.run().await;
    // Give the agents a moment to read the shutdown message before the server goes away.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    accept_task.abort();
    server.abort();
    Ok(result?)
}
