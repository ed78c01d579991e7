//! One agent: dials the coordinator (never listens), keeps a session open, and answers each
//! round. Reconnects with exponential backoff and jitter when the session ends.
//!
//! Local training runs on a blocking thread while the session keeps answering the SecAgg+ key
//! exchange, so key agreement overlaps training as the design intends.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use chacha20::ChaCha20Rng;
use cohort_proto::v1::coordinator_client::CoordinatorClient;
use cohort_proto::v1::{
    AgentMessage, Chunk, Decline, EvalReport, Join, Residuals, RoundStart, SchemaRequest, Task,
    agent_message, coordinator_message,
};
use cohort_protocols::identity::{COORDINATOR_COMMON_NAME, CaVerifier};
use cohort_protocols::model::{self, DataSchema, ModelSpec};
use cohort_protocols::round_context::{Announcement, round_context};
use cohort_protocols::secagg::{
    Client, ClientError, ClientMessage, Modulus, Params, QuantisedInput, RoundId, ServerMessage,
    SiteIdentity, Word, quantise,
};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use rand_core::SeedableRng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{error, info, warn};

use crate::failure::{self, Class, Permanent};

use crate::config::{AgentConfig, Fault, FaultAction, FaultStage, Role};
use crate::data::SiteData;
use crate::site::LocalSite;
use cohort_protocols::model::TrainingConfig;

pub use cohort_proto::PROTOCOL_VERSION;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The coordinator said training is over.
    Shutdown,
    /// The connection closed; reconnect.
    Closed,
}

/// The site's identity material, loaded once.
pub(crate) struct Credentials {
    ca_pem: String,
    pub(crate) ca_der: Vec<u8>,
    cert_pem: String,
    pub(crate) cert_der: Vec<u8>,
    key_pem: String,
    pub(crate) signing_key: SigningKey,
    /// The site certificate's common name: the name peers check this site's keys against.
    pub(crate) name: String,
    /// The federation manifest this site pins (see [`crate::trust`]).
    pub(crate) trust: crate::trust::Trust,
}

fn pem_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow!("{what}: {e}"))?
        .as_ref()
        .to_vec())
}

pub(crate) fn load_credentials(cfg: &AgentConfig) -> Result<Credentials> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let ca_pem = read(&cfg.tls.ca_cert)?;
    let cert_pem = read(&cfg.tls.cert)?;
    let key_pem = read(&cfg.tls.key)?;
    let signing_key = SigningKey::from_pkcs8_pem(&key_pem)
        .map_err(|e| anyhow!("{}: not an Ed25519 PKCS#8 key: {e}", cfg.tls.key.display()))?;
    let ca_der = pem_der(&ca_pem, "CA certificate")?;
    let cert_der = pem_der(&cert_pem, "site certificate")?;
    // Not checked against the CA here: the coordinator refuses a foreign certificate at the
    // handshake, and says so with the peer's address.
    let name = cohort_protocols::identity::common_name(&cert_der)
        .map_err(|e| anyhow!("{}: {e}", cfg.tls.cert.display()))?;
    let trust = crate::trust::Trust::load(
        &ca_der,
        cfg.tls.manifest.as_deref(),
        cfg.policy.manifest_quorum as usize,
    )?;
    Ok(Credentials {
        trust,
        ca_der,
        cert_der,
        name,
        ca_pem,
        cert_pem,
        key_pem,
        signing_key,
    })
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs the agent until the coordinator shuts training down: fetches the federation's
/// schema from the coordinator (signed; checked against `[schema]` when this site pins one),
/// loads the site's data with it, then takes part in rounds.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    run_inner(cfg, None).await
}

/// [`run`] for an agent built with its own model (a network written in Rust, see
/// [`crate::model`] and `examples/custom-model`): rounds of a coordinator whose `[model]`
/// announces this model (`kind = "custom"`, its name and parameter count) train it; the rest
/// — TLS, the schema, SecAgg+, reconnection, policy — is the same agent.
pub async fn run_with_model(cfg: AgentConfig, model: Arc<dyn crate::model::Model>) -> Result<()> {
    run_inner(cfg, Some(model)).await
}

async fn run_inner(
    mut cfg: AgentConfig,
    model: Option<Arc<dyn crate::model::Model>>,
) -> Result<()> {
    let creds = Arc::new(load_credentials(&cfg).map_err(failure::ConfigProblem)?);
    let mut retry = Retry::new(&cfg);
    let schema = loop {
        match fetch_schema(&cfg, &creds).await {
            Ok(s) => break s,
            Err(e) => {
                let class = classify(&cfg, &creds, &e, false).await;
                retry.failed(&cfg, e, class).await?
            }
        }
    };
    if let Some(pinned) = &cfg.schema
        && *pinned != schema
    {
        let differences = schema
            .differences(pinned)
            .join("; ")
            .replace(" here, ", " at the coordinator, ")
            .replace(" there", " at this site");
        let refused = Permanent::new(
            format!("the coordinator's schema differs from this site's [schema] ({differences})"),
            "Remove [schema] from agent.toml to take the coordinator's, or ask its operator which is right.",
        );
        error!(site = %cfg.site, message = %refused, "permanent failure: retrying will not fix this");
        return Err(failure::GaveUp {
            times: 1,
            last: refused.to_string(),
        }
        .into());
    }
    info!(site = %cfg.site, schema = %schema.hash(), "schema received from the coordinator");
    let loaded = load_site_data(&schema, &cfg);
    let mut data = loaded
        .context("loading the site's data with the coordinator's schema")
        .map_err(failure::ConfigProblem)?;
    data.model = model;
    let data = Arc::new(data);
    info!(site = %cfg.site, train = data.train.len(), test = data.test.len(), dropped = data.dropped_rows, inputs = data.inputs, "data loaded");
    cfg.schema = Some(schema);
    run_site(cfg, data).await
}

/// The site's data as its configuration names it: CSV rows, or images (a class-folder tree
/// or a manifest), all test rows for an evaluation-only site.
pub fn load_site_data(
    schema: &DataSchema,
    cfg: &AgentConfig,
) -> Result<SiteData, crate::data::DataError> {
    use crate::images::ImageSource;
    let d = &cfg.data;
    let evaluate = cfg.role == Role::Evaluate;
    let image_source = |p: &std::path::Path| {
        if p.is_dir() {
            ImageSource::Folder(p.to_path_buf())
        } else {
            ImageSource::Manifest(p.to_path_buf())
        }
    };
    let images = d
        .images
        .as_ref()
        .map(|p| ImageSource::Folder(p.clone()))
        .or_else(|| {
            d.manifest
                .as_ref()
                .map(|p| ImageSource::Manifest(p.clone()))
        });
    match (images, &d.csv) {
        (Some(source), _) => SiteData::load_images(
            schema,
            &source,
            d.test_csv.as_deref().map(image_source).as_ref(),
            d.test_fraction,
            d.split_seed,
            evaluate,
        ),
        (None, Some(_)) if schema.images.is_some() => Err(crate::data::DataError::NotImages),
        (None, Some(csv)) if evaluate => SiteData::load_test_only(schema, &d.rename, csv),
        (None, Some(csv)) => SiteData::load_renamed(
            schema,
            &d.rename,
            csv,
            d.test_csv.as_deref(),
            d.test_fraction,
            d.split_seed,
        ),
        (None, None) => Err(crate::data::DataError::NotImages),
    }
}

/// Reconnection policy: exponential backoff with jitter, and a bound on permanent failures
/// in a row.
struct Retry {
    backoff: u64,
    refusals: u32,
}

impl Retry {
    fn new(cfg: &AgentConfig) -> Self {
        Retry {
            backoff: cfg.reconnect.initial_ms,
            refusals: 0,
        }
    }

    /// The connection worked: start again from the shortest wait.
    fn reset(&mut self, cfg: &AgentConfig) {
        self.backoff = cfg.reconnect.initial_ms;
        self.refusals = 0;
    }

    /// Logs `e` for what it is (`class`) and waits before the next try; gives up (Err) after
    /// `reconnect.max_refusals` permanent failures in a row. Permanent failures are retried
    /// after a short fixed wait, not the growing backoff: the retries only confirm the
    /// refusal (a coordinator that restarted with a newer CRL, say), and a revoked site
    /// should stop within seconds, not after minutes of backoff.
    async fn failed(&mut self, cfg: &AgentConfig, e: anyhow::Error, class: Class) -> Result<()> {
        match class {
            Class::Transient => {
                warn!(site = %cfg.site, error = %format!("{e:#}"), "session failed; reconnecting")
            }
            Class::Duplicate(message) => {
                error!(site = %cfg.site, %message, "the coordinator already has a session for this site; another agent may be running with this bundle. Retrying, in case the old session is a dead one");
            }
            Class::Permanent(message) => {
                self.refusals += 1;
                error!(site = %cfg.site, %message, attempt = self.refusals, of = cfg.reconnect.max_refusals, "permanent failure: retrying will not fix this");
                if self.refusals >= cfg.reconnect.max_refusals {
                    return Err(failure::GaveUp {
                        times: self.refusals,
                        last: message,
                    }
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(cfg.reconnect.initial_ms.min(1000))).await;
                return Ok(());
            }
        }
        self.sleep(cfg).await;
        Ok(())
    }

    async fn sleep(&mut self, cfg: &AgentConfig) {
        // Full jitter: sleep uniformly in [backoff/2, backoff], so agents that lost the
        // coordinator together do not reconnect in lockstep.
        let jitter = rand::random::<u64>() % (self.backoff / 2 + 1);
        tokio::time::sleep(Duration::from_millis(self.backoff / 2 + jitter)).await;
        self.backoff = (self.backoff * 2).min(cfg.reconnect.max_ms);
    }
}

/// Runs the agent for `site` until the coordinator shuts the federation down: connects,
/// reconnects with backoff, and answers rounds. `cfg.schema` must be the federation's.
pub async fn run_site(cfg: AgentConfig, data: Arc<dyn LocalSite>) -> Result<()> {
    let creds = Arc::new(load_credentials(&cfg).map_err(failure::ConfigProblem)?);
    let mut ledger = crate::ledger::Ledger::open(&cfg.state_dir())
        .map_err(|e| failure::ConfigProblem(e.into()))?;
    if let Some(c) = ledger.contributed() {
        info!(site = %cfg.site, round = c.round, attempt = c.attempt, ledger = %ledger.path().display(), "contribution ledger: last input sent");
    }
    let mut retry = Retry::new(&cfg);
    let mut fired: Vec<Fault> = Vec::new();
    loop {
        let mut welcomed = false;
        let result = session(&cfg, &data, &creds, &mut ledger, &mut welcomed, &mut fired).await;
        if welcomed {
            retry.reset(&cfg);
        }
        match result {
            Ok(SessionEnd::Shutdown) => {
                info!(site = %cfg.site, "coordinator finished training; exiting");
                return Ok(());
            }
            Ok(SessionEnd::Closed) => {
                warn!(site = %cfg.site, "session closed");
                retry.sleep(&cfg).await;
            }
            Err(e) => {
                let class = classify(&cfg, &creds, &e, welcomed).await;
                retry.failed(&cfg, e, class).await?
            }
        }
    }
}

/// How a failed session is treated: [`failure::classify`], and — for a failure before
/// the coordinator welcomed the site that looks like a dropped connection — a second look
/// at the TLS handshake ([`handshake_refusal`]). A coordinator that refuses this site's
/// certificate (revoked, from another CA, superseded) says so with a TLS alert, but HTTP/2
/// over that connection often reports only "connection closed" or "broken pipe": taken at
/// its word the agent would retry a refusal forever.
async fn classify(
    cfg: &AgentConfig,
    creds: &Credentials,
    e: &anyhow::Error,
    welcomed: bool,
) -> Class {
    let class = failure::classify(e);
    if class != Class::Transient || welcomed {
        return class;
    }
    match handshake_refusal(cfg, creds).await {
        Some(message) => Class::Permanent(message),
        None => class,
    }
}

/// The coordinator's host and port, and the name its certificate must carry.
fn coordinator_address(cfg: &AgentConfig) -> Option<(String, u16, String)> {
    let uri: tonic::transport::Uri = cfg.coordinator.url.parse().ok()?;
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let name = cfg
        .coordinator
        .server_name
        .clone()
        .unwrap_or_else(|| host.clone());
    Some((host, port, name))
}

/// Opens a bare TLS 1.3 connection to the coordinator with this site's certificate and
/// waits briefly for its first bytes: a coordinator that refused the certificate answers
/// with an alert (revoked, unknown CA, bad certificate), one that accepted it with HTTP/2
/// settings. Returns the refusal, classified, or None when the handshake was accepted or
/// nothing conclusive came back (the coordinator is down: a transient failure after all).
async fn handshake_refusal(cfg: &AgentConfig, creds: &Credentials) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    let (host, port, name) = coordinator_address(cfg)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(creds.ca_der.clone())).ok()?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).ok()?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .ok()?
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![CertificateDer::from(creds.cert_der.clone())], key)
    .ok()?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let wait = Duration::from_secs(5);
    let tcp = tokio::time::timeout(wait, tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
        .ok()?
        .ok()?;
    let server = ServerName::try_from(name).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let refusal = |e: &std::io::Error| {
        let class = match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => failure::classify_tls(tls),
            None => failure::classify(&anyhow::anyhow!("{e}")),
        };
        match class {
            Class::Permanent(m) => Some(m),
            _ => None,
        }
    };
    let mut tls = match tokio::time::timeout(wait, connector.connect(server, tcp))
        .await
        .ok()?
    {
        Ok(stream) => stream,
        Err(e) => return refusal(&e),
    };
    let mut first = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(3), tls.read(&mut first)).await {
        Ok(Err(e)) => refusal(&e),
        _ => None,
    }
}

/// A TLS 1.3 channel to the coordinator with this site's certificate.
async fn connect(cfg: &AgentConfig, creds: &Credentials) -> Result<tonic::transport::Channel> {
    let host = cfg
        .coordinator
        .server_name
        .clone()
        .or_else(|| {
            cfg.coordinator
                .url
                .trim_start_matches("https://")
                .split([':', '/'])
                .next()
                .map(String::from)
        })
        .unwrap_or_else(|| "localhost".into());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem))
        .domain_name(host);
    Endpoint::from_shared(cfg.coordinator.url.clone())
        .context("coordinator.url")?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cfg.coordinator.url))
}

/// The federation's schema from the coordinator, its signature checked against the
/// coordinator's CA-issued certificate.
async fn fetch_schema(cfg: &AgentConfig, creds: &Credentials) -> Result<DataSchema> {
    let mut client = CoordinatorClient::new(connect(cfg, creds).await?);
    let reply = client
        .schema(SchemaRequest {})
        .await
        .context("asking for the schema")?
        .into_inner();
    let key = coordinator_key(creds, &reply.coordinator_certificate)?;
    if !model::verify_schema(&key, &reply.schema_toml, &reply.signature) {
        return Err(Permanent::new(
            "the schema from the coordinator is not signed by the coordinator's certificate",
            "Something between this site and the coordinator altered it; contact its operator.",
        )
        .into());
    }
    toml::from_str(&reply.schema_toml)
        .map_err(|e| anyhow!("the coordinator's schema does not parse: {e}"))
}

/// The key that signs models and the schema: from the coordinator's certificate, which must
/// be issued by the project CA to the coordinator's name and, when the site pins a manifest,
/// be the coordinator member's certificate.
fn coordinator_key(creds: &Credentials, cert_der: &[u8]) -> Result<ed25519_dalek::VerifyingKey> {
    use cohort_protocols::identity::IdentityError;
    let verifier = creds.trust.verifier(&creds.ca_der, now_unix())?;
    let cert = verifier.verify_coordinator(cert_der).map_err(|e| match e {
        IdentityError::NameMismatch { got, .. } => Permanent::new(
            format!("the coordinator's certificate is for {got:?}, not the coordinator"),
            "The server is not this project's coordinator; check coordinator.url.",
        ),
        IdentityError::NotAMember { .. }
        | IdentityError::WrongRole { .. }
        | IdentityError::NotTheMembersKey { .. } => Permanent::new(
            format!("the coordinator's certificate: {e}"),
            "The coordinator is not the one the federation's manifest names; if the consortium re-certified it, install the new manifest.toml.",
        ),
        e => Permanent::new(
            format!("the coordinator's certificate: {e}"),
            "Models could not be verified; check that ca.pem is this project's CA.",
        ),
    })?;
    debug_assert_eq!(cert.common_name, COORDINATOR_COMMON_NAME);
    Ok(cert.key)
}

/// Offers the coordinator's manifest (from Welcome or a round start) to the site's trust.
/// A refused one is logged and changes nothing: the site keeps the version it pins, and a
/// round under another manifest then fails its context check.
/// Returns whether the site now pins the manifest the coordinator relays (none relayed: only
/// if the site pins none either).
fn offer_manifest(creds: &Credentials, bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return creds.trust.current().is_none();
    }
    match creds.trust.offer(bytes) {
        Ok(_) => true,
        Err(e) => {
            let pinned = creds.trust.current().map_or(0, |m| m.version());
            warn!(error = %e, pinned, "refused the coordinator's federation manifest");
            false
        }
    }
}

/// The SecAgg+ client of the current round, for the round's modulus.
enum SecClient {
    B32(Client<u32>),
    B64(Client<u64>),
}

/// What the site will feed into the protocol once the round's parameters are known.
enum Pending {
    Stats(Vec<u64>),
    Delta { delta: Vec<f32>, weight: u64 },
}

struct Round {
    start: RoundStart,
    /// Whether the manifest the coordinator relayed with the start is the one this site pins
    /// (after adopting it, if it was newer): a context mismatch is then not the manifest's.
    manifest_agrees: bool,
    /// The round's model as it arrives (train and evaluate rounds), hashed and decoded chunk
    /// by chunk; taken when complete, so a site holds one copy of the model.
    model: Option<model::Incoming>,
    /// What this round's input is computed from, for the ledger: recorded just before the
    /// masked input leaves.
    input: Option<crate::ledger::Input>,
    /// What the ledger allows: a first contribution, or a redo over the same survivors.
    permit: crate::ledger::Permit,
    /// The round's participants' names by id, from its Setup: survivors are recorded and
    /// compared by name (ids are per session).
    names: std::collections::BTreeMap<u32, String>,
    /// The survivors of the request being answered, recorded before the answer leaves.
    survivors: Option<Vec<String>>,
    secagg_buf: Vec<u8>,
    params: Option<Params>,
    client: Option<SecClient>,
    pending: Option<Pending>,
}

struct Session<'a> {
    cfg: &'a AgentConfig,
    data: &'a Arc<dyn LocalSite>,
    creds: &'a Arc<Credentials>,
    out: mpsc::Sender<AgentMessage>,
    site_id: Option<u32>,
    /// Verifies model signatures; set from the certificate in Welcome.
    coordinator_key: Option<ed25519_dalek::VerifyingKey>,
    /// The project CA's revocation list from Welcome (checked against the CA there), applied
    /// to every SecAgg+ peer's certificate; empty when the coordinator has none.
    crl: Vec<u8>,
    round: Option<Round>,
    mean: Vec<f64>,
    std: Vec<f64>,
    trained: mpsc::Sender<(u64, u32, Result<Vec<f32>, String>)>,
    /// What this site already contributed (see [`crate::ledger`]); outlives the session.
    ledger: &'a mut crate::ledger::Ledger,
    /// Faults already injected (each fires once, across reconnections).
    fired: &'a mut Vec<Fault>,
}

/// An encoded SecAgg+ reply and the stage it belongs to.
struct Outgoing {
    stage: FaultStage,
    bytes: Vec<u8>,
}

fn stage_of<W: Word>(m: &ClientMessage<W>) -> FaultStage {
    match m {
        ClientMessage::AdvertiseKeys(_) => FaultStage::AdvertiseKeys,
        ClientMessage::ShareKeys(_) => FaultStage::ShareKeys,
        ClientMessage::MaskedInput(_) => FaultStage::MaskedInput,
        ClientMessage::ConsistencySignature(_) => FaultStage::ConsistencyCheck,
        ClientMessage::UnmaskShares(_) => FaultStage::Unmask,
    }
}

/// Encodes a reply, applying a `truncate` fault to a masked input.
fn outgoing<W: Word>(mut m: ClientMessage<W>, truncate: bool) -> Outgoing {
    if truncate && let ClientMessage::MaskedInput(x) = &mut m {
        x.values.pop();
    }
    Outgoing {
        stage: stage_of(&m),
        bytes: m.encode(),
    }
}

async fn session(
    cfg: &AgentConfig,
    data: &Arc<dyn LocalSite>,
    creds: &Arc<Credentials>,
    ledger: &mut crate::ledger::Ledger,
    welcomed: &mut bool,
    fired: &mut Vec<Fault>,
) -> Result<SessionEnd> {
    let channel = connect(cfg, creds).await?;
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(cohort_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(cohort_proto::MAX_MESSAGE_BYTES);
    let schema = cfg
        .schema
        .as_ref()
        .ok_or_else(|| anyhow!("the agent has no schema: run() fetches it before a session"))?;
    let (out, out_rx) = mpsc::channel(256);
    out.send(AgentMessage {
        kind: Some(agent_message::Kind::Join(Join {
            site: cfg.site.clone(),
            examples: data.train_examples(),
            schema_hash: schema.hash(),
            protocol_version: PROTOCOL_VERSION,
            schema_toml: toml::to_string(schema).unwrap_or_default(),
            evaluate_only: cfg.role == Role::Evaluate,
        })),
    })
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await
        .context("opening the session")?
        .into_inner();
    let (trained_tx, mut trained_rx) = mpsc::channel(4);
    let mut s = Session {
        cfg,
        data,
        creds,
        out,
        site_id: None,
        coordinator_key: None,
        crl: Vec::new(),
        round: None,
        mean: vec![0.0; data.stats_columns()],
        std: vec![1.0; data.stats_columns()],
        trained: trained_tx,
        ledger,
        fired,
    };
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg.context("reading from the coordinator")? else {
                    return Ok(SessionEnd::Closed);
                };
                let Some(kind) = msg.kind else { continue };
                if let coordinator_message::Kind::Welcome(w) = &kind {
                    *welcomed = true;
                    info!(site = %cfg.site, id = w.site_id, "joined the federation");
                }
                match s.handle(kind).await {
                    Ok(Some(end)) => return Ok(end),
                    Ok(None) => {}
                    Err(e) => return Err(why_closed(&mut inbound, e).await),
                }
            }
            Some((round, attempt, result)) = trained_rx.recv() => {
                if let Err(e) = s.on_trained(round, attempt, result).await {
                    return Err(why_closed(&mut inbound, e).await);
                }
            }
        }
    }
}

/// A message could not be sent: the session's stream is closed.
#[derive(Debug, thiserror::Error)]
#[error("session closed")]
struct SendClosed;

/// The coordinator's reason for a session that ended under a send. When the coordinator ends
/// a session (a revoked certificate, say) it says why in the stream's status, but an agent
/// busy sending sees only its own send fail ("session closed") and would take a refusal for
/// a dropped connection; so the rest of the stream is read, briefly, for that status.
async fn why_closed(
    inbound: &mut tonic::Streaming<cohort_proto::v1::CoordinatorMessage>,
    e: anyhow::Error,
) -> anyhow::Error {
    if !e.is::<SendClosed>() {
        return e;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Err(status)) => return anyhow::Error::new(status).context(format!("{e:#}")),
            Ok(Ok(None)) | Err(_) => return e,
        }
    }
}

impl Session<'_> {
    async fn send(&self, kind: agent_message::Kind) -> Result<()> {
        self.out
            .send(AgentMessage { kind: Some(kind) })
            .await
            .map_err(|_| anyhow::Error::new(SendClosed))
    }

    async fn send_chunked(
        &self,
        bytes: Vec<u8>,
        wrap: fn(Chunk) -> agent_message::Kind,
    ) -> Result<()> {
        let bytes = Bytes::from(bytes);
        for chunk in cohort_proto::chunks(bytes) {
            self.send(wrap(chunk)).await?;
        }
        Ok(())
    }

    async fn decline(&self, round: u64, reason: String) -> Result<()> {
        self.decline_accusing(round, reason, None).await
    }

    /// Declines, naming the site whose signed shares proved it at fault (see
    /// `ClientError::accused`).
    async fn decline_accusing(
        &self,
        round: u64,
        reason: String,
        accused: Option<u32>,
    ) -> Result<()> {
        warn!(site = %self.cfg.site, round, %reason, ?accused, "declining the round");
        self.send(agent_message::Kind::Decline(Decline {
            round,
            reason,
            accused,
            trusted_manifest: None,
            contributed_round: None,
        }))
        .await
    }

    /// Declines because the contribution ledger refuses the round (see [`crate::ledger`]).
    async fn decline_refusal(&mut self, round: u64, r: crate::ledger::Refusal) -> Result<()> {
        warn!(site = %self.cfg.site, round, reason = %r.reason, "declining the round");
        self.round = None;
        self.send(agent_message::Kind::Decline(Decline {
            round,
            reason: r.reason,
            accused: None,
            trusted_manifest: None,
            contributed_round: r.contributed,
        }))
        .await
    }

    fn spec(&self, start: &RoundStart) -> Result<ModelSpec> {
        // The model family is implied by the parameter count: logistic regression has
        // inputs + 1 parameters; anything else is described by the training settings, which
        // name a custom model when the coordinator runs one.
        let params = start.model_bytes as usize / 4;
        let cfg: TrainingConfig =
            toml::from_str(&start.training_toml).context("the coordinator's [training] table")?;
        if let Some(name) = cfg.custom {
            // Which custom model, and whether this site has it, is the site's model's check.
            return Ok(ModelSpec {
                kind: model::ModelKind::Custom,
                inputs: self.data.inputs(),
                hidden: Vec::new(),
                outputs: self.data.outputs(),
                custom: Some(model::CustomSpec {
                    name,
                    parameters: params,
                }),
                cnn: None,
            });
        }
        if let Some(layers) = cfg.cnn {
            let input = self
                .cfg
                .schema
                .as_ref()
                .and_then(|s| s.images)
                .ok_or_else(|| {
                    anyhow!("the coordinator's model is a CNN but the schema has no images")
                })?;
            let spec = ModelSpec {
                kind: model::ModelKind::Cnn,
                inputs: self.data.inputs(),
                hidden: Vec::new(),
                outputs: self.data.outputs(),
                custom: None,
                cnn: Some(model::cnn::CnnSpec { input, layers }),
            };
            if spec.num_params() != params {
                bail!(
                    "the coordinator's CNN has {params} parameters, its declaration gives {} here: do the schemas match?",
                    spec.num_params()
                );
            }
            return Ok(spec);
        }
        let hidden = cfg.hidden.clone();
        let kind = if hidden.is_empty() {
            model::ModelKind::Logreg
        } else {
            model::ModelKind::Mlp
        };
        let spec = ModelSpec {
            kind,
            inputs: self.data.inputs(),
            hidden,
            outputs: self.data.outputs(),
            custom: None,
            cnn: None,
        };
        if spec.num_params() != params {
            bail!(
                "the coordinator's model has {params} parameters but this site's data gives {} inputs ({} parameters): do the schemas match?",
                self.data.inputs(),
                spec.num_params()
            );
        }
        Ok(spec)
    }

    async fn handle(&mut self, kind: coordinator_message::Kind) -> Result<Option<SessionEnd>> {
        use coordinator_message::Kind;
        match kind {
            Kind::Welcome(w) => {
                self.site_id = Some(w.site_id);
                // Before the certificate check: a coordinator re-certified in a newer
                // manifest is recognised by it.
                offer_manifest(self.creds, &w.manifest);
                self.coordinator_key =
                    Some(coordinator_key(self.creds, &w.coordinator_certificate)?);
                if !w.crl.is_empty() {
                    // A list the CA did not sign is a lying coordinator: no session with it.
                    CaVerifier::new(self.creds.ca_der.clone(), now_unix())
                        .and_then(|v| v.with_crl(&w.crl))
                        .map_err(|e| {
                            Permanent::new(
                                format!("the coordinator's Welcome carries a bad revocation list: {e}"),
                                "The coordinator is misconfigured or not the project's: tell its operator.",
                            )
                        })?;
                }
                self.crl = w.crl;
            }
            Kind::Shutdown(_) => return Ok(Some(SessionEnd::Shutdown)),
            Kind::RoundEnd(_) => {}
            Kind::RoundStart(start) => self.on_round_start(start).await?,
            Kind::Model(chunk) => {
                let Some(r) = self.round.as_mut() else {
                    return Ok(None);
                };
                // A model in a round that announced none (statistics) is ignored like any
                // other stray message.
                let Some(incoming) = r.model.as_mut() else {
                    return Ok(None);
                };
                if let Err(e) = incoming.push(&chunk.data) {
                    let round = r.start.round;
                    self.round = None;
                    self.decline(round, e.to_string()).await?;
                    return Ok(None);
                }
                if chunk.last {
                    self.on_model().await?;
                }
            }
            Kind::Secagg(chunk) => {
                let Some(r) = self.round.as_mut() else {
                    return Ok(None);
                };
                r.secagg_buf.extend_from_slice(&chunk.data);
                if r.secagg_buf.len() > 64 * 1024 * 1024 {
                    bail!("a SecAgg+ message from the coordinator exceeds 64 MiB");
                }
                if chunk.last {
                    let bytes = std::mem::take(&mut r.secagg_buf);
                    self.on_secagg(&bytes).await?;
                }
            }
        }
        Ok(None)
    }

    async fn on_round_start(&mut self, start: RoundStart) -> Result<()> {
        let manifest_agrees = offer_manifest(self.creds, &start.manifest);
        if start.feature_mean.len() == self.data.stats_columns()
            && start.feature_std.len() == self.data.stats_columns()
            && start.feature_std.iter().all(|s| s.is_finite() && *s > 0.0)
            && start.feature_mean.iter().all(|m| m.is_finite())
        {
            self.mean = start.feature_mean.clone();
            self.std = start.feature_std.clone();
        }
        let task = Task::try_from(start.task).unwrap_or(Task::Unspecified);
        let round = start.round;
        let secure = start.secure;
        if self.cfg.role == Role::Evaluate && matches!(task, Task::Stats | Task::Train) {
            self.round = None;
            return self
                .decline(
                    round,
                    "this site only evaluates (role = \"evaluate\"): it holds no training data"
                        .into(),
                )
                .await;
        }
        if !secure && self.cfg.policy.require_secure && matches!(task, Task::Stats | Task::Train) {
            self.round = None;
            return self
                .decline(
                    round,
                    "policy: this site sends statistics and updates only under secure aggregation (policy.require_secure)".into(),
                )
                .await;
        }
        if task == Task::Train
            && let Some(reason) = training_refusal(&self.cfg.policy, &start.training_toml)
        {
            self.round = None;
            return self.decline(round, reason).await;
        }
        // The ledger's say comes before any work: a round this site may not contribute to
        // is not trained for.
        let ledger = match task {
            Task::Stats => self.ledger.check_round(round),
            Task::Train => self.ledger.check(
                round,
                &crate::ledger::Input::update(&start.model_sha3_512),
                self.cfg.policy.updates_per_model,
            ),
            Task::Evaluate => self
                .ledger
                .check_evaluation(
                    round,
                    &start.model_sha3_512,
                    self.cfg.policy.max_evaluations_per_round,
                )
                .map(|_| crate::ledger::Permit::default())
                .map_err(|reason| crate::ledger::Refusal {
                    reason,
                    contributed: None,
                }),
            Task::Unspecified => Ok(crate::ledger::Permit::default()),
        };
        let permit = match ledger {
            Ok(p) => p,
            Err(refusal) => return self.decline_refusal(round, refusal).await,
        };
        if let Some(survivors) = &permit.redo_of {
            info!(site = %self.cfg.site, round, survivors = %survivors.join(","), "a redo of a round this site sent its input for: only over the same survivors");
        }
        let model = if matches!(task, Task::Train | Task::Evaluate) {
            match model::Incoming::new(start.model_bytes) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.round = None;
                    return self.decline(round, e.to_string()).await;
                }
            }
        } else {
            None
        };
        self.round = Some(Round {
            start,
            manifest_agrees,
            model,
            input: None,
            permit,
            names: std::collections::BTreeMap::new(),
            survivors: None,
            secagg_buf: Vec::new(),
            params: None,
            client: None,
            pending: None,
        });
        if task == Task::Stats {
            let v = match self.data.stats_vector() {
                Ok(v) => v,
                Err(reason) => {
                    warn!(site = %self.cfg.site, round, %reason, "declining the statistics round");
                    self.round = None;
                    return self.decline(round, reason).await;
                }
            };
            let input = crate::ledger::Input::statistics(&v);
            let permit = match self.ledger.check(round, &input, None) {
                Ok(p) => p,
                Err(refusal) => return self.decline_refusal(round, refusal).await,
            };
            if secure {
                if let Some(r) = self.round.as_mut() {
                    r.input = Some(input);
                    r.permit = permit;
                }
                self.provide(Pending::Stats(v)).await?;
            } else {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                self.send_chunked(bytes, agent_message::Kind::PlainUpdate)
                    .await?;
            }
        } else if task == Task::Unspecified {
            self.decline(round, "unknown task".into()).await?;
        }
        Ok(())
    }

    /// The model is complete: verify it, then train or evaluate.
    async fn on_model(&mut self) -> Result<()> {
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        let Some(incoming) = r.model.take() else {
            return Ok(());
        };
        let start = r.start.clone();
        let params = match incoming.finish(
            &start.model_sha3_512,
            &start.model_signature,
            self.coordinator_key.as_ref(),
        ) {
            Ok(p) => p,
            Err(e) => {
                warn!(site = %self.cfg.site, round = start.round, reason = %e, "refusing to use the model");
                self.round = None;
                return self.decline(start.round, e.to_string()).await;
            }
        };
        let spec = match self.spec(&start) {
            Ok(s) => s,
            Err(e) => return self.decline(start.round, format!("{e:#}")).await,
        };
        if let Err(e) = spec.check(&params) {
            return self.decline(start.round, e.to_string()).await;
        }
        match Task::try_from(start.task).unwrap_or(Task::Unspecified) {
            Task::Evaluate => {
                let allowed = self.ledger.check_evaluation(
                    start.round,
                    &start.model_sha3_512,
                    self.cfg.policy.max_evaluations_per_round,
                );
                let report = match allowed {
                    Err(reason) => return self.decline(start.round, reason).await,
                    Ok(crate::ledger::Evaluation::Replay(bytes)) => {
                        info!(site = %self.cfg.site, round = start.round, "the same evaluation again: the report sent before, unevaluated");
                        <EvalReport as prost::Message>::decode(bytes.as_slice())
                            .map_err(|e| anyhow!("the ledger's stored report: {e}"))?
                    }
                    Ok(crate::ledger::Evaluation::New) => {
                        let report = self.evaluate(&start, spec, params).await?;
                        let bytes = prost::Message::encode_to_vec(&report);
                        if let Err(e) = self.ledger.record_evaluation(
                            start.round,
                            &start.model_sha3_512,
                            &bytes,
                        ) {
                            error!(site = %self.cfg.site, error = %e, "evaluation not reported");
                            return self.decline(start.round, e.to_string()).await;
                        }
                        report
                    }
                };
                self.send(agent_message::Kind::Eval(report)).await?;
            }
            Task::Train => {
                let cfg: TrainingConfig =
                    toml::from_str(&start.training_toml).context("[training]")?;
                let data = self.data.clone();
                let (mean, std) = (self.mean.clone(), self.std.clone());
                let tx = self.trained.clone();
                let (round, attempt) = (start.round, start.attempt);
                // Batch order is derived from the split seed, the round and the site, so runs
                // replay exactly (and secure and plain runs train identically).
                let seed = self.cfg.data.split_seed
                    ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ site_hash(&self.cfg.site);
                tokio::task::spawn_blocking(move || {
                    let result = data.train(&spec, &params, (&mean, &std), &cfg, seed);
                    let _ = tx.blocking_send((round, attempt, result));
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// Evaluates `params` on the site's test rows: the report, counts coarsened as the
    /// site's policy says.
    async fn evaluate(
        &self,
        start: &RoundStart,
        spec: ModelSpec,
        params: Vec<f32>,
    ) -> Result<EvalReport> {
        let data = self.data.clone();
        let (mean, std) = (self.mean.clone(), self.std.clone());
        let eval =
            tokio::task::spawn_blocking(move || data.evaluate(&spec, &params, (&mean, &std)))
                .await?
                .map_err(|e| anyhow!("evaluation failed: {e}"))?;
        let metrics = eval.metrics();
        let g = self.cfg.policy.evaluation_granularity;
        Ok(EvalReport {
            round: start.round,
            examples: eval.examples as u64,
            loss: eval.loss,
            accuracy: metrics.accuracy,
            auc: eval.auc,
            confusion: eval
                .tally
                .confusion
                .iter()
                .map(|c| coarsen(*c, g))
                .collect(),
            residuals: eval.tally.residuals.map(|r| Residuals {
                n: r.n,
                sse: r.sse,
                sae: r.sae,
                sum_y: r.sum_y,
                sum_y2: r.sum_y2,
            }),
        })
    }

    async fn on_trained(
        &mut self,
        round: u64,
        attempt: u32,
        result: Result<Vec<f32>, String>,
    ) -> Result<()> {
        let current = self
            .round
            .as_ref()
            .is_some_and(|r| r.start.round == round && r.start.attempt == attempt);
        if !current {
            return Ok(());
        }
        let delta = match result {
            Ok(d) => d,
            Err(e) => {
                return self
                    .decline(round, format!("local training failed: {e}"))
                    .await;
            }
        };
        let weight = self.data.train_examples();
        let secure = self.round.as_ref().is_some_and(|r| r.start.secure);
        if secure {
            if let Some(r) = self.round.as_mut() {
                r.input = Some(crate::ledger::Input::update(&r.start.model_sha3_512));
            }
            self.provide(Pending::Delta { delta, weight }).await
        } else {
            let mut v = Vec::with_capacity(delta.len() + 1);
            v.push(weight as f32);
            v.extend_from_slice(&delta);
            self.send_chunked(model::to_bytes(&v), agent_message::Kind::PlainUpdate)
                .await
        }
    }

    /// Hands the site's input to the SecAgg+ client once the round's parameters are known.
    async fn provide(&mut self, pending: Pending) -> Result<()> {
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        r.pending = Some(pending);
        self.flush_input().await
    }

    async fn flush_input(&mut self) -> Result<()> {
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        let (Some(params), true) = (r.params.clone(), r.client.is_some()) else {
            return Ok(());
        };
        let Some(pending) = r.pending.take() else {
            return Ok(());
        };
        let truncate = masked_input_fault(&self.cfg.faults, r.start.round, FaultAction::Truncate);
        let out_of_range =
            masked_input_fault(&self.cfg.faults, r.start.round, FaultAction::OutOfRange);
        let Some(client) = r.client.as_mut() else {
            return Ok(());
        };
        let mut rng = ChaCha20Rng::from_seed(rounding_seed(
            &self.creds.signing_key,
            r.start.round,
            &r.start.model_sha3_512,
        ));
        let reply = match (client, pending) {
            (SecClient::B64(c), Pending::Stats(v)) => c
                .set_input(QuantisedInput::from_values(v))
                .map(|m| m.map(|m| outgoing(m, truncate))),
            (SecClient::B32(c), Pending::Delta { delta, weight }) => {
                let faults = (truncate, out_of_range);
                input(c, &params, &delta, weight, &mut rng, faults)?
            }
            (SecClient::B64(c), Pending::Delta { delta, weight }) => {
                let faults = (truncate, out_of_range);
                input(c, &params, &delta, weight, &mut rng, faults)?
            }
            (SecClient::B32(_), Pending::Stats(_)) => {
                bail!("statistics rounds must use modulus 2^64")
            }
        };
        self.after_client(reply).await
    }

    async fn after_client(&mut self, reply: Result<Option<Outgoing>, ClientError>) -> Result<()> {
        match reply {
            Ok(Some(out)) => {
                let round = self.round.as_ref().map_or(0, |r| r.start.round);
                if out.stage == FaultStage::MaskedInput
                    && let Some(r) = self.round.as_mut()
                {
                    // Durably on the site's disk before the input leaves: from here on it may
                    // be in a sum (see `crate::ledger`).
                    let attempt = r.start.attempt;
                    let recorded = match r.input.take() {
                        Some(input) => self.ledger.record(round, attempt, &input),
                        None => Err(crate::ledger::LedgerError::Corrupt {
                            path: self.ledger.path().to_path_buf(),
                            error: "a masked input without a recorded origin".into(),
                        }),
                    };
                    if let Err(e) = recorded {
                        error!(site = %self.cfg.site, round, error = %e, "masked input not sent");
                        self.round = None;
                        return self.decline(round, e.to_string()).await;
                    }
                }
                if matches!(out.stage, FaultStage::ConsistencyCheck | FaultStage::Unmask)
                    && let Some(r) = self.round.as_mut()
                    && let Some(survivors) = r.survivors.take()
                {
                    // Before the signature or a share leaves: a redo of this round must then
                    // have exactly these survivors.
                    let attempt = r.start.attempt;
                    if let Err(e) = self.ledger.record_survivors(round, attempt, survivors) {
                        error!(site = %self.cfg.site, round, error = %e, "survivors not recorded: nothing sent");
                        self.round = None;
                        return self.decline(round, e.to_string()).await;
                    }
                }
                let fault = self.cfg.faults.iter().find(|f| {
                    f.round == round
                        && f.stage == out.stage
                        && matches!(f.action, FaultAction::Vanish | FaultAction::Interrupt)
                });
                if let Some(f) = fault.filter(|f| !self.fired.contains(f)).cloned() {
                    self.fired.push(f.clone());
                    if f.action == FaultAction::Interrupt {
                        let half = out.bytes[..out.bytes.len() / 2].to_vec();
                        let kind = if out.stage == FaultStage::MaskedInput {
                            agent_message::Kind::MaskedInput
                        } else {
                            agent_message::Kind::Secagg
                        };
                        self.send(kind(Chunk {
                            data: Bytes::from(half),
                            last: false,
                        }))
                        .await?;
                        // Let the half reach the wire before the connection goes.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    bail!(
                        "fault injected: {:?} at {:?} of round {round}",
                        f.action,
                        out.stage
                    );
                }
                // The masked input has a kind of its own: the coordinator streams it into the sum.
                let wrap = if out.stage == FaultStage::MaskedInput {
                    agent_message::Kind::MaskedInput
                } else {
                    agent_message::Kind::Secagg
                };
                self.send_chunked(out.bytes, wrap).await
            }
            Ok(None) => Ok(()),
            Err(e) => {
                let round = self.round.as_ref().map_or(0, |r| r.start.round);
                warn!(site = %self.cfg.site, round, error = %e, "secure aggregation refused");
                self.round = None;
                self.decline_accusing(round, e.to_string(), e.accused())
                    .await
            }
        }
    }

    async fn on_secagg(&mut self, bytes: &[u8]) -> Result<()> {
        let msg = match ServerMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let round = self.round.as_ref().map_or(0, |r| r.start.round);
                return self
                    .decline(round, format!("undecodable SecAgg+ message: {e}"))
                    .await;
            }
        };
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        if let ServerMessage::Setup(setup) = &msg
            && r.client.is_none()
        {
            let Some(id) = self.site_id else {
                bail!("SecAgg+ setup before Welcome")
            };
            let expected = RoundId::new(r.start.round, r.start.attempt);
            if (setup.round.round, setup.round.attempt) != (expected.round, expected.attempt) {
                return Ok(());
            }
            // The context is this site's own view — the manifest it pins, the start and the
            // set-up it was sent — never the server's say-so
            // ([`cohort_protocols::round_context`]). A round under another manifest is
            // refused here; a site told anything else than its peers computes another
            // context, and neither can verify the other's keys.
            let announced = Announcement {
                round: r.start.round,
                attempt: r.start.attempt,
                task: r.start.task,
                secure: r.start.secure,
                model_sha3_512: &r.start.model_sha3_512,
                training_toml: &r.start.training_toml,
                feature_mean: &r.start.feature_mean,
                feature_std: &r.start.feature_std,
            }
            .digest(&self.creds.trust.context());
            if setup.round.context != round_context(&announced, setup) {
                let round = r.start.round;
                let pinned = self.creds.trust.current().map_or(0, |m| m.version());
                let manifest = !r.manifest_agrees;
                self.round = None;
                let reason = if manifest {
                    format!(
                        "the coordinator runs this round under another federation manifest than the v{pinned} this site trusts"
                    )
                } else {
                    "the round's context is not the one this site computes from what it was told (the round start and the SecAgg+ set-up)".to_string()
                };
                warn!(site = %self.cfg.site, round, %reason, "declining the round");
                return self
                    .send(agent_message::Kind::Decline(Decline {
                        round,
                        reason,
                        accused: None,
                        trusted_manifest: manifest.then_some(pinned),
                        contributed_round: None,
                    }))
                    .await;
            }
            if let Some(reason) = policy_refusal(&self.cfg.policy, setup) {
                let round = r.start.round;
                self.round = None;
                return self.decline(round, reason).await;
            }
            let identity = SiteIdentity {
                id,
                name: self.creds.name.clone(),
                signing_key: self.creds.signing_key.clone(),
                credential: self.creds.cert_der.clone(),
            };
            let mut verifier = self.creds.trust.verifier(&self.creds.ca_der, now_unix())?;
            if !self.crl.is_empty() {
                verifier = verifier.with_crl(&self.crl).map_err(|e| anyhow!("{e}"))?;
            }
            let verifier = Arc::new(verifier);
            let seed: [u8; 32] = rand::random();
            let (live, survivors) = (
                self.cfg.policy.min_live_neighbours,
                self.cfg.policy.min_sites,
            );
            r.client = Some(match setup.params.modulus {
                Modulus::Bits32 => SecClient::B32(
                    Client::new(identity, verifier, setup.round, seed).requiring(live, survivors),
                ),
                Modulus::Bits64 => SecClient::B64(
                    Client::new(identity, verifier, setup.round, seed).requiring(live, survivors),
                ),
            });
            r.params = Some(setup.params.clone());
            r.names = setup
                .participants
                .iter()
                .copied()
                .zip(setup.names.iter().cloned())
                .collect();
        }
        if let ServerMessage::ConsistencyRequest(cohort_protocols::secagg::ConsistencyRequest {
            survivors,
            ..
        })
        | ServerMessage::UnmaskRequest(cohort_protocols::secagg::UnmaskRequest {
            survivors,
            ..
        }) = &msg
        {
            let mut names: Vec<String> = survivors
                .iter()
                .map(|id| r.names.get(id).cloned().unwrap_or_else(|| format!("#{id}")))
                .collect();
            names.sort();
            if let Some(before) = &r.permit.redo_of
                && *before != names
            {
                let round = r.start.round;
                let reason = format!(
                    "ledger: this round was run before with survivors [{}]; a redo is answered only over the same survivors, not [{}]",
                    before.join(", "),
                    names.join(", ")
                );
                self.round = None;
                return self
                    .decline_refusal(
                        round,
                        crate::ledger::Refusal {
                            reason,
                            contributed: Some(round),
                        },
                    )
                    .await;
            }
            r.survivors = Some(names);
        }
        let truncate = masked_input_fault(&self.cfg.faults, r.start.round, FaultAction::Truncate);
        let Some(client) = r.client.as_mut() else {
            return Ok(());
        };
        // The masked input may come out here (when the shares arrive after the update).
        let reply = match client {
            SecClient::B32(c) => c.handle(&msg).map(|m| m.map(|m| outgoing(m, truncate))),
            SecClient::B64(c) => c.handle(&msg).map(|m| m.map(|m| outgoing(m, truncate))),
        };
        let is_setup = matches!(msg, ServerMessage::Setup(_));
        self.after_client(reply).await?;
        if is_setup {
            self.flush_input().await?;
        }
        Ok(())
    }
}

/// Why this site's policy refuses a SecAgg+ round with `setup`, if it does.
/// Why this site will not train with the coordinator's training settings: they do not parse or
/// validate (the checks the coordinator's own configuration passes), or the learning rate is
/// outside the site's `policy.learning_rate`.
fn training_refusal(policy: &crate::config::Policy, training_toml: &str) -> Option<String> {
    let cfg: TrainingConfig = match toml::from_str(training_toml) {
        Ok(c) => c,
        Err(e) => {
            return Some(format!(
                "the coordinator's training settings do not parse: {}",
                e.message()
            ));
        }
    };
    if let Err(e) = cfg.validate() {
        return Some(format!(
            "the coordinator's training settings are invalid: {e}"
        ));
    }
    if let Some([low, high]) = policy.learning_rate
        && !(low..=high).contains(&cfg.learning_rate)
    {
        return Some(format!(
            "policy: training.learning_rate = {} is outside [{low}, {high}] (policy.learning_rate)",
            cfg.learning_rate
        ));
    }
    None
}

fn policy_refusal(
    policy: &crate::config::Policy,
    setup: &cohort_protocols::secagg::Setup,
) -> Option<String> {
    let p = &setup.params;
    if let Some([low, high]) = policy.clip
        && !(low..=high).contains(&p.clip)
    {
        return Some(format!(
            "policy: the round's clipping bound {} is outside [{low}, {high}] (policy.clip)",
            p.clip
        ));
    }
    if (setup.participants.len() as u32) < policy.min_sites {
        return Some(format!(
            "policy: the round has {} participants, this site requires at least {} (policy.min_sites)",
            setup.participants.len(),
            policy.min_sites
        ));
    }
    if p.neighbours.saturating_sub(1) < policy.min_live_neighbours {
        return Some(format!(
            "policy: the round's neighbourhood has {} other sites, this site requires at least {} of them live (policy.min_live_neighbours; a federation of fewer sites must lower it)",
            p.neighbours.saturating_sub(1),
            policy.min_live_neighbours
        ));
    }
    if p.neighbours < policy.min_neighbours {
        return Some(format!(
            "policy: the round's neighbourhood is {} sites, this site requires at least {} (policy.min_neighbours)",
            p.neighbours, policy.min_neighbours
        ));
    }
    if p.threshold < policy.min_threshold {
        return Some(format!(
            "policy: the round's threshold is {}, this site requires at least {} (policy.min_threshold)",
            p.threshold, policy.min_threshold
        ));
    }
    if p.tolerated_colluders() < policy.max_colluders {
        return Some(format!(
            "policy: the round's threshold {} of {} neighbours resists {} colluding sites, this site requires {} (policy.max_colluders)",
            p.threshold,
            p.neighbours,
            p.tolerated_colluders(),
            policy.max_colluders
        ));
    }
    if policy.require_consistency_check && !p.consistency_check {
        return Some(
            "policy: the round has no consistency check, this site requires one (policy.require_consistency_check)"
                .into(),
        );
    }
    None
}

fn input<W: Word>(
    client: &mut Client<W>,
    params: &Params,
    delta: &[f32],
    weight: u64,
    rng: &mut ChaCha20Rng,
    (truncate, out_of_range): (bool, bool),
) -> Result<Result<Option<Outgoing>, ClientError>> {
    let (mut q, report) =
        quantise::<W, _>(params, delta, weight, rng).map_err(|e| anyhow!("{e}"))?;
    if out_of_range {
        let mut values = q.values().to_vec();
        if let Some(c) = values.get_mut(cohort_protocols::secagg::quant::CLIPPED_INDEX) {
            *c = W::from_u64_wrapping(u64::from(u32::MAX));
        }
        q = QuantisedInput::from_values(values);
    }
    if report.clipped > 0 {
        warn!(
            clipped = report.clipped,
            "update values clipped to [-{}, {}] (reported to the coordinator only as a sum)",
            params.clip,
            params.clip
        );
    }
    Ok(client
        .set_input(q)
        .map(|m| m.map(|m| outgoing(m, truncate))))
}

/// Whether a fault with `action` applies to this round's masked input. A free function over
/// the fault list so it can be asked while the round state is borrowed.
fn masked_input_fault(faults: &[Fault], round: u64, action: FaultAction) -> bool {
    faults
        .iter()
        .any(|f| f.round == round && f.stage == FaultStage::MaskedInput && f.action == action)
}

/// The seed of the stochastic rounding of this site's update in `round` from `model`: secret
/// (derived from the site's key, so the coordinator cannot predict the rounding), and the same
/// in every attempt of the round, so a redo after a coordinator crash sends exactly the input
/// it sent before and the coordinator gets exactly the sum it had (see [`crate::ledger`]);
/// with fresh randomness the redo's sum would differ by rounding noise, a second look at it.
fn rounding_seed(key: &SigningKey, round: u64, model_sha3_512: &[u8]) -> [u8; 32] {
    use sha3::{Digest, Sha3_256};
    let mut h = Sha3_256::new();
    h.update(b"cohort stochastic rounding v1");
    h.update(key.to_bytes());
    h.update(round.to_le_bytes());
    h.update(model_sha3_512);
    h.finalize().into()
}

/// `count` rounded to the nearest multiple of `granularity` (`policy.evaluation_granularity`).
fn coarsen(count: u64, granularity: u64) -> u64 {
    let g = granularity.max(1);
    (count.saturating_add(g / 2) / g).saturating_mul(g)
}

fn site_hash(site: &str) -> u64 {
    site.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;

    fn setup(n: u32, threshold: u32, consistency_check: bool) -> cohort_protocols::secagg::Setup {
        cohort_protocols::secagg::Setup {
            round: RoundId::new(1, 0),
            params: Params {
                threshold,
                consistency_check,
                ..Params::with_defaults(n, 10)
            },
            graph_seed: [0; 32],
            participants: (0..n).collect(),
            names: (0..n).map(cohort_protocols::secagg::pinned_name).collect(),
        }
    }

    /// A redo of a round must send the very input sent before: the stochastic rounding is
    /// seeded by the site's key, the round and the model, never by the attempt.
    #[test]
    fn the_rounding_of_an_update_is_the_same_in_every_attempt_and_secret_to_others() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let seed = rounding_seed(&key, 5, &[1; 64]);
        assert_eq!(seed, rounding_seed(&key, 5, &[1; 64]));
        assert_ne!(seed, rounding_seed(&key, 6, &[1; 64]));
        assert_ne!(seed, rounding_seed(&key, 5, &[2; 64]));
        assert_ne!(seed, rounding_seed(&other, 5, &[1; 64]));
        let params = Params::with_defaults(4, 8);
        let delta = [0.123_f32, -0.456, 0.789, 0.001, -0.999, 0.5, 0.25, -0.3];
        let q = |seed| {
            let mut rng = ChaCha20Rng::from_seed(seed);
            quantise::<u32, _>(&params, &delta, 10, &mut rng)
                .map(|(q, _)| q.values().to_vec())
                .unwrap_or_default()
        };
        assert_eq!(q(seed), q(rounding_seed(&key, 5, &[1; 64])));
    }

    #[test]
    fn the_policy_refuses_small_rounds_low_thresholds_and_no_consistency_check() {
        let policy = Policy {
            min_sites: 4,
            min_threshold: 3,
            min_live_neighbours: 3,
            ..Policy::default()
        };
        let live = policy_refusal(&Policy::default(), &setup(5, 4, true)).unwrap_or_default();
        assert!(
            live.contains("neighbourhood has 4 other sites")
                && live.contains("policy.min_live_neighbours"),
            "{live}"
        );
        assert_eq!(policy_refusal(&policy, &setup(5, 4, true)), None);
        let small = policy_refusal(&policy, &setup(3, 2, true)).unwrap_or_default();
        assert!(
            small.contains("3 participants") && small.contains("policy.min_sites"),
            "{small}"
        );
        let low = policy_refusal(&policy, &setup(5, 2, true)).unwrap_or_default();
        assert!(
            low.contains("threshold is 2") && low.contains("policy.min_threshold"),
            "{low}"
        );
        let narrow = Policy {
            min_neighbours: 6,
            ..policy.clone()
        };
        let few = policy_refusal(&narrow, &setup(5, 4, true)).unwrap_or_default();
        assert!(
            few.contains("neighbourhood is 5") && few.contains("policy.min_neighbours"),
            "{few}"
        );
        // t = 3 of k = 5: a server with one colluding site can split the honest neighbours
        // (2 told "survived", 2 told "dropped") and reach 3 shares of each kind.
        let colluders = policy_refusal(&policy, &setup(5, 3, true)).unwrap_or_default();
        assert!(
            colluders.contains("resists 0 colluding sites")
                && colluders.contains("policy.max_colluders"),
            "{colluders}"
        );
        let trusting = Policy {
            max_colluders: 0,
            ..policy.clone()
        };
        assert_eq!(policy_refusal(&trusting, &setup(5, 3, true)), None);
        let unchecked = policy_refusal(&policy, &setup(5, 4, false)).unwrap_or_default();
        assert!(
            unchecked.contains("policy.require_consistency_check"),
            "{unchecked}"
        );
        let lenient = Policy {
            require_consistency_check: false,
            ..policy
        };
        assert_eq!(policy_refusal(&lenient, &setup(5, 4, false)), None);
    }
}
