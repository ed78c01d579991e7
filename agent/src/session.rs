//! One agent: dials the coordinator (never listens), keeps a session open, and answers each
//! round. Reconnects with exponential backoff and jitter when the session ends.
//!
//! What the site does in a round is decided by the state machine in [`crate::round`]; this
//! module is its driver: the connection, retries, the threads that train and evaluate, and
//! the clock. Local training runs on a blocking thread while the session keeps answering the
//! SecAgg+ key exchange, so key agreement overlaps training as the design intends.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use cohort_proto::v1::coordinator_client::CoordinatorClient;
use cohort_proto::v1::{AgentMessage, Join, SchemaRequest, agent_message, coordinator_message};
use cohort_protocols::model::{self, DataSchema};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{error, info, warn};

use crate::config::{AgentConfig, Role};
use crate::credentials::{Credentials, coordinator_key, load_credentials, now_unix};
use crate::data::SiteData;
use crate::failure::{self, Class, Permanent};
use crate::round::{Action, Injector, Input, Machine};
use crate::site::LocalSite;

pub use cohort_proto::PROTOCOL_VERSION;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The coordinator said training is over.
    Shutdown,
    /// The connection closed; reconnect.
    Closed,
}

/// A site's agent: [`Agent::new`] with its configuration, [`Agent::model`] when the site
/// trains a network of its own, then [`Agent::run`].
pub struct Agent {
    cfg: AgentConfig,
    model: Option<Arc<dyn crate::model::Recipe>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("site", &self.cfg.site)
            .field("own_model", &self.model.is_some())
            .finish()
    }
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Self {
        Agent { cfg, model: None }
    }

    /// The site's own model (a network written in Rust, see [`crate::model`] and
    /// `examples/custom-model`): rounds of a coordinator whose `[model]` announces it
    /// (`kind = "custom"`, its name and parameter count) train it; the rest — TLS, the
    /// schema, SecAgg+, reconnection, policy — is the same agent.
    pub fn model(mut self, model: impl crate::model::Recipe) -> Self {
        self.model = Some(Arc::new(model));
        self
    }

    /// Runs until the coordinator shuts training down: fetches the federation's schema from
    /// the coordinator (signed; checked against `[schema]` when this site pins one), loads
    /// the site's data with it, then takes part in rounds.
    pub async fn run(self) -> Result<()> {
        run_inner(self.cfg, self.model).await
    }
}

/// `Agent::new(cfg).run()`: the agent with the models Cohort ships.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    Agent::new(cfg).run().await
}

async fn run_inner(
    mut cfg: AgentConfig,
    model: Option<Arc<dyn crate::model::Recipe>>,
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
    let data = loaded
        .context("loading the site's data with the coordinator's schema")
        .map_err(failure::ConfigProblem)?;
    info!(site = %cfg.site, train = data.train.len(), test = data.test.len(), dropped = data.dropped_rows, inputs = data.inputs, "data loaded");
    cfg.schema = Some(schema);
    // The site's own model takes its widths from the schema and task just received.
    let shape = crate::model::Shape {
        inputs: data.inputs,
        outputs: data.task.outputs(),
    };
    let compute = cfg.compute.device;
    let model = model.map(|recipe| recipe.shaped(shape, compute));
    info!(site = %cfg.site, device = ?compute, "models train on this device");
    let privacy = match cfg.privacy {
        None => None,
        Some(settings) => {
            let budget = crate::privacy::Budget::open(&cfg.state_dir(), settings)
                .map_err(|e| failure::ConfigProblem(anyhow::anyhow!("privacy: {e}")))?;
            let spent = budget
                .spent()
                .map_err(|e| anyhow::anyhow!("privacy: {e}"))?;
            info!(site = %cfg.site, epsilon = spent.epsilon, delta = spent.delta, budget = settings.epsilon, "privacy: DP-SGD on; spent so far");
            Some(Arc::new(budget))
        }
    };
    let site = crate::site::Site {
        data,
        model,
        compute,
        privacy,
    };
    run_site(cfg, Arc::new(site)).await
}

/// The site's data as its configuration names it: CSV rows, or images (a class-folder tree
/// or a manifest), all test rows for an evaluation-only site.
pub fn load_site_data(
    schema: &DataSchema,
    cfg: &AgentConfig,
) -> Result<SiteData, crate::data::DataError> {
    use crate::data::images::ImageSource;
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
    let mut faults = Injector::new(&cfg.faults);
    loop {
        let mut welcomed = false;
        let result = session(&cfg, &data, &creds, &mut ledger, &mut welcomed, &mut faults).await;
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
    let key = coordinator_key(creds, &reply.coordinator_certificate, now_unix())?;
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

/// One session: joins, then drives the round state machine ([`crate::round::Machine`]) with
/// the coordinator's messages and the results of the jobs it asks for, and does what it says.
/// Training and evaluation run on blocking threads, so the session keeps answering the
/// SecAgg+ key exchange meanwhile.
async fn session(
    cfg: &AgentConfig,
    data: &Arc<dyn LocalSite>,
    creds: &Arc<Credentials>,
    ledger: &mut crate::ledger::Ledger,
    welcomed: &mut bool,
    faults: &mut Injector,
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
            privacy: data.privacy().map(crate::round::privacy_spent),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
    })
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(out_rx))
        .await
        .context("opening the session")?
        .into_inner();
    let (done_tx, mut done_rx) = mpsc::channel::<Input>(4);
    let mut machine = Machine::new(cfg, data, creds, ledger, faults, rand::random());
    loop {
        let input = tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg.context("reading from the coordinator")? else {
                    return Ok(SessionEnd::Closed);
                };
                let Some(kind) = msg.kind else { continue };
                if let coordinator_message::Kind::Welcome(w) = &kind {
                    *welcomed = true;
                    info!(site = %cfg.site, id = w.site_id, "joined the federation");
                }
                Input::Message(kind)
            }
            Some(done) = done_rx.recv() => done,
        };
        let handled = machine.handle(now_unix(), input);
        // What the machine queued before an error is still done (an injected interrupted
        // upload sends its half, then ends the session).
        let acted = act(&mut machine, data, &out, &done_tx).await;
        let ended = match (handled, acted) {
            (Err(e), _) | (Ok(_), Err(e)) => return Err(why_closed(&mut inbound, e).await),
            (Ok(()), Ok(ended)) => ended,
        };
        if let Some(end) = ended {
            return Ok(end);
        }
    }
}

/// Does what the machine queued: sends, starts training (its result comes back on `done`),
/// evaluates to the end. Returns the end of the session, if the machine says so.
async fn act(
    machine: &mut Machine<'_>,
    data: &Arc<dyn LocalSite>,
    out: &mpsc::Sender<AgentMessage>,
    done: &mpsc::Sender<Input>,
) -> Result<Option<SessionEnd>> {
    while let Some(action) = machine.poll_action() {
        match action {
            Action::Send(kind) => out
                .send(AgentMessage { kind: Some(kind) })
                .await
                .map_err(|_| anyhow::Error::new(SendClosed))?,
            Action::Train(job) => {
                let (data, done) = (data.clone(), done.clone());
                tokio::task::spawn_blocking(move || {
                    let result = data.train(
                        &job.spec,
                        &job.params,
                        (&job.mean, &job.std),
                        &job.training,
                        job.seed,
                    );
                    let _ = done.blocking_send(Input::Trained {
                        round: job.round,
                        attempt: job.attempt,
                        result,
                    });
                });
            }
            // Awaited here, before the next message is read: an evaluation round has no key
            // exchange to keep answering, and its report must not be overtaken by the next
            // round start (which would supersede the round and drop the report).
            Action::Evaluate(job) => {
                let data = data.clone();
                let (round, attempt) = (job.round, job.attempt);
                let result = tokio::task::spawn_blocking(move || {
                    data.evaluate(&job.spec, &job.params, (&job.mean, &job.std))
                })
                .await
                .unwrap_or_else(|e| Err(format!("the evaluation thread failed: {e}")));
                machine.handle(
                    now_unix(),
                    Input::Evaluated {
                        round,
                        attempt,
                        result,
                    },
                )?;
            }
            #[cfg(feature = "faults")]
            Action::Pause(d) => tokio::time::sleep(d).await,
            Action::Shutdown => return Ok(Some(SessionEnd::Shutdown)),
        }
    }
    Ok(None)
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
