//! The Cohort coordinator: accepts agents over mTLS gRPC and runs federated rounds with
//! SecAgg+ secure aggregation.

pub mod cgroup;
pub mod config;
pub mod contention;
pub mod crash;
pub mod dashboard;
pub mod driver;
pub mod enrol;
pub mod export;
pub mod hub;
pub mod journal;
pub mod live_manifest;
pub mod lockfile;
pub mod metrics;
pub mod records;
pub mod registry;
pub mod service;
pub mod sharded;
pub mod status;
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
use tracing::{info, warn};

pub use config::CoordinatorConfig;
pub use driver::RunSummary;

/// Largest gRPC message sent (chunks are at most 4 MiB).
const MAX_MESSAGE: usize = cohort_proto::MAX_MESSAGE_BYTES;

/// Largest message accepted from an agent: a chunk of [`cohort_proto::CHUNK_BYTES`] with room
/// for its envelope, or a Join with its schema. An agent never sends more, so a bigger one is
/// refused by the decoder and its session ends, before it is buffered anywhere.
const MAX_AGENT_MESSAGE: usize = cohort_proto::CHUNK_BYTES + (64 << 10);

/// TLS handshakes in progress at once. More wait in the listen backlog: a crowd of
/// half-open connections costs at most this many tasks and file descriptors, each for at most
/// [`HANDSHAKE_TIMEOUT`].
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// HTTP/2 streams per connection: an agent uses two (its schema request and its session).
const MAX_STREAMS: u32 = 8;

/// Lowercase hex, for hashes and signatures in records and metadata.
pub(crate) use cohort_protocols::hex::{decode as from_hex, encode as hex};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The coordinator's Ed25519 key (its TLS key, made by `enroll`), which also signs models.
pub(crate) fn signing_key(path: &std::path::Path) -> Result<ed25519_dalek::SigningKey> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the coordinator's key {}", path.display()))?;
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{}: the coordinator's key must be an Ed25519 PKCS#8 key, as `cohort-coordinator enroll` makes: {e}",
            path.display()
        )
    })
}

/// A start-up failure caused by the configuration (a file it names, a token, a data_dir of
/// another federation): the binary exits with [`EXIT_CONFIG`] for these.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0:#}")]
pub struct ConfigProblem(pub anyhow::Error);

fn config_problem(e: impl Into<anyhow::Error>) -> anyhow::Error {
    ConfigProblem(e.into()).into()
}

/// A failure of the data directory that a restart cannot fix and an operator must look at:
/// a damaged or disagreeing database and journal, a directory in use by another process, or
/// one changed under the running coordinator. The binary exits with [`EXIT_STORAGE`], which
/// service managers are told not to restart on (a restart loop would only repeat it).
#[derive(Debug, thiserror::Error)]
#[error("storage: {0:#}")]
pub struct StorageProblem(pub anyhow::Error);

fn storage_problem(e: impl Into<anyhow::Error>) -> anyhow::Error {
    StorageProblem(e.into()).into()
}

/// Exit code: a runtime failure a restart may fix (a round that failed all its attempts, a
/// lost runtime).
pub const EXIT_TRANSIENT: u8 = 1;
/// Exit code: the configuration or the command line is wrong.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code: the data directory needs an operator ([`StorageProblem`]).
pub const EXIT_STORAGE: u8 = 4;

/// The exit code for an error of `run`, `repair` or `export-model`.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<ConfigProblem>()) {
        EXIT_CONFIG
    } else if e.chain().any(|c| c.is::<StorageProblem>()) {
        EXIT_STORAGE
    } else {
        EXIT_TRANSIENT
    }
}

/// A store error as the binary reports it: a data_dir of another run is configuration, the
/// rest needs an operator.
pub fn store_problem(e: store::StoreError) -> anyhow::Error {
    match e {
        store::StoreError::NotOurs { .. } | store::StoreError::Foreign { .. } => config_problem(e),
        other => storage_problem(other),
    }
}

/// The resident-memory budget for uploads: `limits.memory_mib`, or by default a margin below
/// the memory limit of the cgroup (container, pod, systemd unit) the coordinator runs in.
fn memory_budget(config: &CoordinatorConfig) -> Option<u64> {
    let cgroup = cgroup::detect();
    match (config.limits.memory_mib, cgroup) {
        (Some(mib), Some(c)) if mib << 20 > c.limit => {
            warn!(
                budget_mib = mib,
                cgroup_limit_mib = c.limit >> 20,
                "limits.memory_mib is above this cgroup's memory limit: the OOM killer would strike first"
            );
            Some(mib << 20)
        }
        (Some(mib), _) => {
            info!(
                budget_mib = mib,
                "memory budget for uploads (limits.memory_mib)"
            );
            Some(mib << 20)
        }
        (None, Some(c)) => {
            info!(
                budget_mib = c.budget >> 20,
                cgroup_limit_mib = c.limit >> 20,
                "memory budget for uploads: a margin below this cgroup's memory limit (set limits.memory_mib to choose)"
            );
            Some(c.budget)
        }
        (None, None) => {
            info!("no memory budget for uploads: no limits.memory_mib and no cgroup memory limit");
            None
        }
    }
}

/// The schema agents fetch: the configuration's `[schema]` as TOML, signed like a model.
fn schema_reply(
    config: &CoordinatorConfig,
    key: &ed25519_dalek::SigningKey,
    certificate_der: &[u8],
) -> Result<cohort_proto::v1::SchemaReply> {
    let schema_toml = toml::to_string(&config.schema).context("encoding the schema")?;
    Ok(cohort_proto::v1::SchemaReply {
        signature: cohort_protocols::model::sign_schema(key, &schema_toml).to_vec(),
        schema_toml,
        coordinator_certificate: certificate_der.to_vec(),
        inputs: config.model.inputs as u32,
    })
}

/// Ends the sessions of sites that are no longer admitted (revoked while connected: gone from
/// the registry, or from the federation manifest), looking every second: new sessions are
/// checked as they start, this covers the ones already running. Without it a site removed
/// from the manifest would stay connected and be refused by every round's verifier instead.
async fn close_unadmitted(
    hub: Arc<hub::Hub>,
    registry: Option<Arc<registry::LiveRegistry>>,
    manifest: Option<Arc<live_manifest::LiveManifest>>,
    progress: Arc<status::Progress>,
) {
    loop {
        // A stat of each file a second: a revocation ends the site's session within about a
        // second, and the agent is told it will not be admitted again.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let registry = registry.as_ref().map(|r| r.get());
        let manifest = manifest.as_ref().map(|m| m.get());
        // The round in progress, for the site's record (0 before the first).
        let round = progress.try_position().map_or(0, |(_, round, _, _)| round);
        for (site, _) in hub.connected() {
            if registry
                .as_ref()
                .is_some_and(|r| r.current(&site).is_none())
            {
                hub.close(&site, round, "its certificate was revoked (registry)");
            } else if let Some(m) = &manifest
                && m.signed.manifest().member(&site).is_none()
            {
                let why = format!(
                    "it is no longer a member of the federation (manifest v{})",
                    m.signed.version()
                );
                hub.close(&site, round, &why);
            }
        }
    }
}

/// Where a started coordinator can be reached (the actual ports, useful with port 0).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    /// The status API, when `[status]` is configured.
    pub status: Option<SocketAddr>,
    /// The run's live position, which the status API serves: a program that embeds the
    /// coordinator (a benchmark) can watch it without a status port and token.
    pub progress: Arc<status::Progress>,
}

/// Starts serving on `config.listen` (and the status API, if configured) and runs the
/// configured rounds. `bound` receives the endpoints once they listen. Returns when training
/// is finished.
pub async fn run(
    config: CoordinatorConfig,
    bound: Option<oneshot::Sender<Endpoints>>,
) -> Result<RunSummary> {
    run_with_progress(config, bound, None).await
}

/// Like [`run`], and sends every committed round's record (summary and per-site results) to
/// `report`.
pub async fn run_with_progress(
    config: CoordinatorConfig,
    bound: Option<oneshot::Sender<Endpoints>>,
    report: Option<mpsc::UnboundedSender<driver::RoundRecord>>,
) -> Result<RunSummary> {
    serve(
        config,
        bound,
        report,
        std::future::pending(),
        AfterFinish::Exit,
    )
    .await?
    .context("the run stopped before it finished")
}

/// Like [`run`], but stops cleanly when `stop` resolves (e.g. on SIGTERM): the round in
/// progress is abandoned (it restarts with fresh keys on the next start), storage is flushed,
/// the connections close (agents keep retrying) and `None` is returned.
///
/// With [`AfterFinish::Serve`] a finished run keeps serving until `stop`: the status API
/// answers (operators and Prometheus see the final state instead of a dead target), and an
/// agent that connects is told that training is over.
pub async fn run_until(
    config: CoordinatorConfig,
    stop: impl std::future::Future<Output = ()>,
    after: AfterFinish,
) -> Result<Option<RunSummary>> {
    serve(config, None, None, stop, after).await
}

/// [`run_until`] that also hands over its [`Endpoints`] once it listens: for programs that
/// embed the coordinator and stop it on an event of their own (the roll-out benchmark stops
/// it once the first model has gone out).
pub async fn run_observed(
    config: CoordinatorConfig,
    bound: oneshot::Sender<Endpoints>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<RunSummary>> {
    serve(config, Some(bound), None, stop, AfterFinish::Exit).await
}

/// What a coordinator does when its last round is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFinish {
    /// Return at once.
    Exit,
    /// Keep serving the status API (and tell joining agents training is over) until stopped.
    Serve,
}

async fn serve(
    config: CoordinatorConfig,
    bound: Option<oneshot::Sender<Endpoints>>,
    report: Option<mpsc::UnboundedSender<driver::RoundRecord>>,
    stop: impl std::future::Future<Output = ()>,
    after: AfterFinish,
) -> Result<Option<RunSummary>> {
    // Read first, so a missing token stops the start before anything listens.
    let status_token = config
        .status
        .as_ref()
        .map(|s| s.token())
        .transpose()
        .map_err(config_problem)?;
    // Before anything listens, like the token: a status certificate that does not load is
    // configuration to fix, not a dashboard that silently falls back to plain HTTP.
    let status_tls = config
        .status
        .as_ref()
        .and_then(|s| s.tls.as_ref())
        .map(|t| tls::status_server_config(&t.cert, &t.key))
        .transpose()
        .context("loading the status server's certificate (status.tls)")
        .map_err(config_problem)?;
    // Read once: the handshake checks it, and Welcome hands it to the agents.
    let crls = config
        .tls
        .crl
        .as_deref()
        .map(tls::load_crls)
        .transpose()
        .map_err(config_problem)?
        .unwrap_or_default();
    let tls = tls::server_config(
        &config.tls.ca_cert,
        &config.tls.cert,
        &config.tls.key,
        &crls,
    )
    .context("loading the coordinator's TLS files")
    .map_err(config_problem)?;
    let registry = config
        .tls
        .registry
        .as_deref()
        .map(registry::LiveRegistry::open)
        .transpose()
        .context("loading the site registry (tls.registry)")
        .map_err(config_problem)?
        .map(Arc::new);
    // A custom model's initial parameters are a file: a missing or wrong one is configuration.
    let initial = config
        .model
        .initial()
        .map_err(|e| config_problem(anyhow::anyhow!(e)))?;
    let ca_der = tls::first_cert_der(&config.tls.ca_cert).map_err(config_problem)?;
    let certificate_der = tls::first_cert_der(&config.tls.cert).map_err(config_problem)?;
    let signing_key = signing_key(&config.tls.key).map_err(config_problem)?;
    let manifest = config
        .tls
        .manifest
        .as_deref()
        .map(|path| live_manifest::LiveManifest::open(path, &ca_der, &certificate_der))
        .transpose()
        .map_err(config_problem)?
        .map(Arc::new);
    let identity = store::Identity::of(&ca_der, &config);
    // Before the port opens: a data directory that is not this run's, is in use, or is
    // damaged stops everything. Only the last round is read back.
    let store = store::Store::open(&config.data_dir, &identity).map_err(store_problem)?;
    let resume = store.resume().map_err(store_problem)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))
        .map_err(config_problem)?;
    let addr = listener.local_addr()?;
    info!(%addr, "coordinator listening (gRPC, TLS 1.3, client certificates required)");

    let (inbox_tx, inbox_rx) = mpsc::channel(4096);
    let hub = Arc::new(hub::Hub::new(inbox_tx));
    let progress = Arc::new(status::Progress::default());
    let metrics = Arc::new(metrics::Metrics::new());
    if let Some(target) = config.privacy.epsilon {
        let _ = metrics.privacy_target.set(target);
    }
    metrics.min_sites.set(i64::from(config.rounds.min_sites));
    // Restored before the status API answers: the sites' counters, the run's position, and
    // every metric counter at least as high as any scrape has seen.
    let saved_counters: metrics::Counters = match store.counters().map_err(store_problem)? {
        Some(json) => serde_json::from_slice(&json).unwrap_or_else(|e| {
            warn!(error = %e, "the saved metric counters do not decode; counters start from the committed rounds");
            metrics::Counters::default()
        }),
        None => metrics::Counters::default(),
    };
    if let Some(r) = &resume {
        hub.restore(r.sites.clone());
        progress.resumed(
            r.last_round,
            r.last.as_ref().map(|l| &l.summary),
            config.rounds.count,
        );
        metrics.resumed(
            r.last_round,
            r.last.as_ref().map(|l| (l.summary.round, &l.summary.eval)),
        );
    }
    metrics.restore(&saved_counters, &hub);
    let status_api = match (&config.status, status_token) {
        (Some(cfg), Some(token)) => {
            let mut api = status::StatusApi::new(
                saved_counters,
                hub.clone(),
                store.clone(),
                progress.clone(),
                metrics.clone(),
                config.rounds.count,
                config.rounds.min_sites,
                token,
            );
            api.privacy_target = config.privacy.epsilon;
            api.secure = config.secagg.enabled;
            api.manifest = manifest.clone();
            let api = Arc::new(api);
            let (at, task) = status::serve(api.clone(), cfg.listen, status_tls.clone())
                .await
                .with_context(|| format!("binding the status API on {}", cfg.listen))
                .map_err(config_problem)?;
            info!(addr = %at, tls = status_tls.is_some(), "status API and dashboard listening (bearer token required)");
            Some((api, at, task))
        }
        _ => None,
    };
    if let Some(tx) = bound {
        let _ = tx.send(Endpoints {
            grpc: addr,
            status: status_api.as_ref().map(|(_, at, _)| *at),
            progress: progress.clone(),
        });
    }
    let service = service::Service {
        hub: hub.clone(),
        ca_der: ca_der.clone(),
        schema_hash: config.schema.hash(),
        schema: config.schema.clone(),
        schema_reply: schema_reply(&config, &signing_key, &certificate_der)?,
        certificate_der,
        memory_budget: memory_budget(&config),
        registry: registry.clone(),
        crl_der: crls
            .first()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default(),
        manifest: manifest.clone(),
        require_privacy: config.privacy.require,
    };
    let registry_task = (registry.is_some() || manifest.is_some()).then(|| {
        tokio::spawn(close_unadmitted(
            hub.clone(),
            registry.clone(),
            manifest.clone(),
            progress.clone(),
        ))
    });

    // TLS handshakes run in their own tasks so a slow or hostile client cannot stall accept.
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let rejected = Arc::new(tls::RejectLog::new(std::time::Duration::from_secs(60)));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let accept_task = tokio::spawn(async move {
        loop {
            let Ok(slot) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accepting a connection failed; retrying in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            let rejected = rejected.clone();
            tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible())
                        .await;
                match accepted {
                    Ok(Ok(stream)) => {
                        drop(slot);
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err((e, tcp))) => {
                        rejected.handshake_failed(peer, &tls::handshake_reason(&e));
                        // Still holding the handshake slot: a crowd of refused clients
                        // lingers in at most MAX_HANDSHAKES sockets.
                        tls::close_refused(tcp).await;
                        drop(slot);
                    }
                    Err(_) => {
                        rejected.handshake_failed(peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    let svc = CoordinatorServer::new(service)
        .max_decoding_message_size(MAX_AGENT_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            // A session whose agent vanished without a FIN (power loss, a dropped NAT entry)
            // is found by keepalive within 40 s, so the site can connect again.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            .max_concurrent_streams(Some(MAX_STREAMS))
            .add_service(svc)
            .serve_with_incoming(ReceiverStream::new(conn_rx)),
    );
    if let Some((api, _, _)) = &status_api {
        api.grpc_serving
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    crash::watch(&hub, &progress, &config.data_dir);
    let driver = driver::Driver::new(
        config,
        initial,
        hub,
        inbox_rx,
        ca_der,
        driver::Operations {
            resume,
            store: store.clone(),
            signing_key,
            progress: progress.clone(),
            metrics,
            manifest,
        },
        report,
    )
    .context("training settings")?;
    let hub = driver.hub();
    tokio::pin!(stop);
    let result = tokio::select! {
        r = driver.run() => Some(r),
        () = &mut stop => None,
    };
    if let Some(r) = &result {
        hub.finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Give the agents a moment to read the shutdown message before the server goes away.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if r.is_ok() && after == AfterFinish::Serve {
            info!(
                "training finished; still serving the status API until SIGTERM (run with --exit-when-done to exit instead)"
            );
            stop.await;
        }
    } else {
        progress.set_state(status::RunState::Stopping);
        info!("stopping: the round in progress is abandoned and restarts on the next start");
    }
    accept_task.abort();
    server.abort();
    if let Some(task) = registry_task {
        task.abort();
    }
    if let Some((_, _, task)) = status_api {
        task.abort();
    }
    store
        .flush()
        .context("flushing the data directory")
        .map_err(storage_problem)?;
    match result {
        Some(Ok(summary)) => Ok(Some(summary)),
        Some(Err(e @ driver::DriverError::Store(_))) => Err(storage_problem(e)),
        Some(Err(e)) => Err(e.into()),
        None => Ok(None),
    }
}
