//! The read-only status API (axum, its own port): what the coordinator is doing, the rounds
//! it has committed, the sites it knows, Prometheus metrics, health and readiness.
//!
//! Everything but `/healthz`, `/readyz` and the dashboard's own files (`/`, see
//! [`crate::dashboard`]) needs `Authorization: Bearer <token>`. Nothing here can change the
//! run, and nothing it returns is a site's data or update: sites appear with their counters
//! and last evaluation metrics only. The OpenAPI document served at `/api/v1/openapi.json`
//! is `coordinator/openapi.json`, checked against live responses by the tests, and against
//! every request the dashboard makes by the browser test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::contention::Contention;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::records::{Evaluation, RoundRecord, RoundSummary};
use crate::store::Store;

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What the run is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Starting,
    WaitingForSites,
    /// Sites declined the round because they pin another federation manifest (see the
    /// driver's `wait_for_manifest`): the operator has something to install.
    WaitingForManifest,
    Statistics,
    Training,
    Evaluating,
    Finished,
    Stopping,
}

#[derive(Debug, Clone, Serialize)]
struct Live {
    state: RunState,
    round: u64,
    attempt: u32,
    stage: Option<String>,
}

/// The last time a model went out to the sites for evaluation: how long the roll-out of a
/// new model to the federation took. Kept in memory only (a restart forgets it).
#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    /// The round whose model it was (0: the initial model).
    pub round: u64,
    pub model_bytes: u64,
    /// Sites that were sent every chunk of the model.
    pub sites: usize,
    /// Sites that verified the model (hash and signature) and reported their evaluation.
    pub acknowledged: usize,
    /// From the first chunk until the last was queued for every site. A site's queue holds
    /// at most [`crate::hub::SITE_OUTBOX_MESSAGES`] chunks, so for a large model this is close
    /// to delivery; a small one fits in the queues and this is only the hand-over.
    pub sent_seconds: f64,
    /// From the first byte sent until the last acknowledgement (or the stage's deadline).
    pub seconds: f64,
}

/// The driver's live position, shared with the status API. One small mutex: it is written a
/// few times per stage and read per request.
#[derive(Debug)]
pub struct Progress {
    live: Mutex<Live>,
    /// When `live` last changed: the stall signal.
    changed: Mutex<Instant>,
    started: Instant,
    started_unix: u64,
    /// Rounds completed by this process and their total seconds, for the time estimate.
    timing: Mutex<(u64, f64)>,
    last: Mutex<Option<Evaluation>>,
    rollout: Mutex<Option<Rollout>>,
    /// The last round given up and why (see [`Progress::round_failed`]).
    last_failure: Mutex<Option<(u64, String)>>,
    /// Why training stopped before its last round (see [`Progress::stopped`]).
    stopped: Mutex<Option<String>>,
    /// Site-level DP spent so far (see [`Progress::site_level`]).
    site_level: Mutex<Option<crate::driver::SiteLevelSpent>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            live: Mutex::new(Live {
                state: RunState::Starting,
                round: 0,
                attempt: 0,
                stage: None,
            }),
            changed: Mutex::new(Instant::now()),
            started: Instant::now(),
            started_unix: crate::unix_seconds(),
            timing: Mutex::new((0, 0.0)),
            last: Mutex::new(None),
            rollout: Mutex::new(None),
            last_failure: Mutex::new(None),
            stopped: Mutex::new(None),
            site_level: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Progress {
    pub fn set_state(&self, state: RunState) {
        let mut l = lock(&self.live);
        l.state = state;
        if state != RunState::Training && state != RunState::Statistics {
            l.stage = None;
        }
        *lock(&self.changed) = Instant::now();
    }

    pub fn set_stage(&self, state: RunState, round: u64, attempt: u32, stage: Option<String>) {
        *lock(&self.live) = Live {
            state,
            round,
            attempt,
            stage,
        };
        *lock(&self.changed) = Instant::now();
    }

    /// Seconds since the position last changed; 0 when the run has finished or is stopping
    /// (nothing is expected to move then).
    pub fn seconds_since_progress(&self) -> f64 {
        if matches!(
            lock(&self.live).state,
            RunState::Finished | RunState::Stopping
        ) {
            return 0.0;
        }
        lock(&self.changed).elapsed().as_secs_f64()
    }

    pub fn round_done(&self, summary: &RoundSummary) {
        let mut t = lock(&self.timing);
        t.0 += 1;
        t.1 += summary.seconds;
        *lock(&self.last) = Some(summary.eval.clone());
    }

    /// A round was given up (the model unchanged): shown as `last_failure` until the
    /// process ends (the rounds' records keep every failure).
    pub fn round_failed(&self, round: u64, reason: &str) {
        *lock(&self.last_failure) = Some((round, reason.to_string()));
        *lock(&self.changed) = Instant::now();
    }

    /// Site-level DP: the federation's account after the last unmasked sum.
    pub fn site_level(&self, spent: crate::driver::SiteLevelSpent) {
        *lock(&self.site_level) = Some(spent);
    }

    /// Training ended before `rounds.count`, and why (the sites' privacy budgets).
    pub fn stopped(&self, reason: &str) {
        *lock(&self.stopped) = Some(reason.to_string());
    }

    pub fn last_failure(&self) -> Option<(u64, String)> {
        lock(&self.last_failure).clone()
    }

    /// State, round, attempt and stage, without waiting for the lock (None if it is taken):
    /// for the panic hook.
    pub fn try_position(&self) -> Option<(RunState, u64, u32, Option<String>)> {
        let l = self.live.try_lock().ok()?;
        Some((l.state, l.round, l.attempt, l.stage.clone()))
    }

    pub fn rolled_out(&self, rollout: Rollout) {
        *lock(&self.rollout) = Some(rollout);
    }

    /// The last evaluation broadcast, once one has finished.
    pub fn last_rollout(&self) -> Option<Rollout> {
        lock(&self.rollout).clone()
    }

    /// The current state and round.
    pub fn position(&self) -> (RunState, u64) {
        let l = lock(&self.live);
        (l.state, l.round)
    }

    /// Takes up a run that has committed `done` rounds: the round shown is the next one
    /// (the one the coordinator waits for or runs), not 0, and the last evaluation is the
    /// committed one.
    pub fn resumed(&self, done: u64, last: Option<&RoundSummary>, total: u64) {
        if let Some(s) = last {
            *lock(&self.last) = Some(s.eval.clone());
            if let Some(reason) = &s.failed {
                *lock(&self.last_failure) = Some((s.round, reason.clone()));
            }
        }
        lock(&self.live).round = (done + 1).min(total.max(done));
    }
}

/// Shared state of the API.
#[derive(Debug)]
pub struct StatusApi {
    pub hub: Arc<Hub>,
    pub store: Store,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
    pub rounds_total: u64,
    pub sites_expected: u32,
    /// The coordinator's `privacy.epsilon`.
    pub privacy_target: Option<f64>,
    /// `secagg.enabled`: the coordinator only ever sees sums (else each site's update).
    pub secure: bool,
    /// `tls.manifest`: the federation manifest in force, whose version the page shows.
    pub manifest: Option<Arc<crate::live_manifest::LiveManifest>>,
    /// The sharded maps' lock contention over the last minutes (`/api/v1/shards`).
    pub contention: Arc<Contention>,
    token: String,
    /// Set once the gRPC server is accepting connections.
    pub grpc_serving: AtomicBool,
    /// The counters as last saved in the store.
    saved_counters: Mutex<crate::metrics::Counters>,
}

impl StatusApi {
    /// The API over a run whose counters were saved as `saved` (restored into `metrics`
    /// already).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        saved: crate::metrics::Counters,
        hub: Arc<Hub>,
        store: Store,
        progress: Arc<Progress>,
        metrics: Arc<Metrics>,
        rounds_total: u64,
        sites_expected: u32,
        token: String,
    ) -> Self {
        StatusApi {
            hub,
            store,
            progress,
            metrics,
            rounds_total,
            sites_expected,
            privacy_target: None,
            secure: true,
            manifest: None,
            contention: Arc::new(Contention::default()),
            token,
            grpc_serving: AtomicBool::new(false),
            saved_counters: Mutex::new(saved),
        }
    }
}

#[derive(Debug, Serialize)]
struct StatusDoc {
    state: RunState,
    round: u64,
    attempt: u32,
    stage: Option<String>,
    rounds_total: u64,
    rounds_completed: u64,
    /// Rounds given up (the model unchanged, the run went on), over the run's lifetime.
    rounds_failed: u64,
    /// The last round given up by this process (or the last round, if it failed), and why.
    last_failure: Option<DeclineDoc>,
    sites_connected: usize,
    sites_expected: u32,
    last_round: Option<Evaluation>,
    last_rollout: Option<Rollout>,
    /// Seconds since the run last changed stage or round (0 when finished).
    seconds_since_progress: f64,
    started_unix: u64,
    elapsed_seconds: f64,
    /// Mean round time of this process × rounds left; null until a round has completed.
    estimated_remaining_seconds: Option<f64>,
    /// Why training stopped before `rounds_total` (the sites' privacy budgets); null
    /// otherwise.
    stopped: Option<String>,
    /// The federation's differential privacy; null when no site runs DP-SGD.
    privacy: Option<FederationPrivacyDoc>,
    /// Site-level DP under secure aggregation (`[privacy.site_level]`); null without it.
    site_level_privacy: Option<crate::driver::SiteLevelSpent>,
    /// Secure aggregation is on: the coordinator sees only sums of the sites' updates.
    secure_aggregation: bool,
    /// The version of the federation manifest in force (`tls.manifest`); null without one.
    manifest_version: Option<u64>,
    /// The coordinator's release.
    coordinator_version: &'static str,
}

/// Example-level DP across the federation, from what the sites report.
#[derive(Debug, Serialize)]
struct FederationPrivacyDoc {
    /// The largest ε a training site has spent: each patient's rows are at one site, so this
    /// bounds what the federation's releases say about any patient (at `delta`).
    epsilon: f64,
    /// The largest δ among the sites.
    delta: f64,
    /// The coordinator's `privacy.epsilon`, if set.
    target_epsilon: Option<f64>,
    /// Training sites that report a privacy budget, and how many of them cannot afford
    /// another round.
    sites: usize,
    sites_exhausted: usize,
}

/// A site's spend as its accountant reports it.
#[derive(Debug, Serialize)]
struct SitePrivacyDoc {
    epsilon: f64,
    delta: f64,
    budget: f64,
    next_epsilon: Option<f64>,
    noise_multiplier: f64,
    /// Another round would pass the site's budget (or the federation's target): the
    /// coordinator no longer asks it to train.
    exhausted: bool,
}

#[derive(Debug, Serialize)]
struct SiteDoc {
    name: String,
    connected: bool,
    last_seen_unix: Option<u64>,
    rounds_joined: u64,
    dropouts: u64,
    bytes_received: u64,
    bytes_sent: u64,
    last_accuracy: Option<f64>,
    last_loss: Option<f64>,
    last_auc: Option<f64>,
    last_rmse: Option<f64>,
    /// The site holds only a test set (`role = "evaluate"`).
    evaluate_only: bool,
    /// The round and reason of the site's last refusal (its policy, an unverifiable model).
    last_decline: Option<DeclineDoc>,
    /// SecAgg+ messages of the site the coordinator refused (it was excluded from the attempt).
    rejections: u64,
    /// The round and reason of the last of them: what the site did wrong.
    last_rejection: Option<DeclineDoc>,
    /// The site's DP-SGD spend; null for a site without `[privacy]`.
    privacy: Option<SitePrivacyDoc>,
    /// The release the site's agent reported when it last joined.
    agent_version: Option<String>,
    /// When the client certificate of the site's last session expires (Unix seconds): the
    /// site can no longer connect after it. The dashboard warns 30 days ahead.
    certificate_expires_unix: Option<i64>,
}

#[derive(Debug, Serialize)]
struct DeclineDoc {
    round: u64,
    reason: String,
}

#[derive(Debug, Serialize)]
struct RoundsPage {
    rounds: Vec<RoundRecord>,
    page: usize,
    per_page: usize,
    total: usize,
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    page: Option<usize>,
    per_page: Option<usize>,
    /// Rounds after this one instead of a page: how a client that has rounds up to N asks
    /// for the new ones only (the dashboard does, every few seconds).
    after: Option<u64>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The router: public health endpoints, and the rest behind the bearer token.
pub fn router(api: Arc<StatusApi>) -> Router {
    let private = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/rounds", get(rounds))
        .route("/api/v1/rounds/{n}", get(round))
        .route("/api/v1/sites", get(sites))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/shards", get(shards))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(api.clone(), auth));
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(ready))
        .route("/", get(crate::dashboard::index))
        .route("/dashboard.js", get(crate::dashboard::script))
        .route("/dashboard.css", get(crate::dashboard::style))
        .merge(private)
        .with_state(api)
}

/// Serves the API on `listen` until the task is dropped, over TLS when `tls` is given;
/// returns the bound address. The lock-contention sampler lives and dies with it.
pub async fn serve(
    api: Arc<StatusApi>,
    listen: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let sampler = crate::contention::run(api.contention.clone(), api.hub.clone());
    let app = router(api);
    let task = tokio::spawn(async move {
        let served = async move {
            match tls {
                None => axum::serve(listener, app).await,
                Some(tls) => serve_tls(listener, app, tls).await,
            }
        };
        tokio::select! {
            result = served => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "status API stopped");
                }
            }
            () = sampler => {}
        }
    });
    Ok((addr, task))
}

/// HTTPS: each connection's TLS handshake (bounded by 10 s, so a silent client holds
/// nothing) and then HTTP/1.1 on it, in a task of its own. A failed handshake — a
/// scanner, a browser that distrusts the certificate — is logged at debug and forgotten.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: keep serving once it passes.
                tracing::warn!(error = %e, "status API: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "status API: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "status API: connection ended with an error");
            }
        });
    }
}

/// Constant-time comparison, so the response time does not reveal how much of a guess matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(api): State<Arc<StatusApi>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if same(t.as_bytes(), api.token.as_bytes()) => next.run(req).await,
        _ => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <status token>)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

async fn ready(State(api): State<Arc<StatusApi>>) -> Response {
    let storage = api.store.healthy();
    let grpc = api.grpc_serving.load(Ordering::Relaxed);
    let body = Json(json!({ "storage": storage, "grpc": grpc }));
    if storage && grpc {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn status(State(api): State<Arc<StatusApi>>) -> Response {
    let live = lock(&api.progress.live).clone();
    let rounds_completed = api.store.last_round().ok().flatten().unwrap_or(0);
    let (done, seconds) = *lock(&api.progress.timing);
    let left = api.rounds_total.saturating_sub(rounds_completed);
    let doc = StatusDoc {
        state: live.state,
        round: live.round,
        attempt: live.attempt,
        stage: live.stage,
        rounds_total: api.rounds_total,
        rounds_completed,
        rounds_failed: api.metrics.rounds_failed.get(),
        last_failure: api
            .progress
            .last_failure()
            .map(|(round, reason)| DeclineDoc { round, reason }),
        sites_connected: api.hub.connected().len(),
        sites_expected: api.sites_expected,
        last_round: lock(&api.progress.last).clone(),
        last_rollout: api.progress.last_rollout(),
        seconds_since_progress: api.progress.seconds_since_progress(),
        started_unix: api.progress.started_unix,
        elapsed_seconds: api.progress.started.elapsed().as_secs_f64(),
        estimated_remaining_seconds: (done > 0).then(|| seconds / done as f64 * left as f64),
        stopped: lock(&api.progress.stopped).clone(),
        privacy: federation_privacy(&api),
        site_level_privacy: lock(&api.progress.site_level).clone(),
        secure_aggregation: api.secure,
        manifest_version: api.manifest.as_ref().map(|m| m.get().signed.version()),
        coordinator_version: env!("CARGO_PKG_VERSION"),
    };
    Json(doc).into_response()
}

fn federation_privacy(api: &StatusApi) -> Option<FederationPrivacyDoc> {
    let sites = api.hub.training_privacy();
    let first = sites.first()?;
    Some(FederationPrivacyDoc {
        epsilon: sites
            .iter()
            .map(|p| p.epsilon)
            .fold(first.epsilon, f64::max),
        delta: sites.iter().map(|p| p.delta).fold(first.delta, f64::max),
        target_epsilon: api.privacy_target,
        sites: sites.len(),
        sites_exhausted: sites
            .iter()
            .filter(|p| p.exhausted(api.privacy_target))
            .count(),
    })
}

async fn rounds(
    State(api): State<Arc<StatusApi>>,
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    // axum's own rejection is text/plain; every error of this API is JSON.
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{}: page and per_page are positive whole numbers, e.g. ?page=2&per_page=50",
                    e.body_text()
                ),
            );
        }
    };
    let per_page = q.per_page.unwrap_or(50).clamp(1, 500);
    let (offset, page) = match (q.after, q.page.unwrap_or(1).max(1)) {
        (Some(after), _) => (usize::try_from(after).unwrap_or(usize::MAX), 1),
        (None, page) => ((page - 1).saturating_mul(per_page), page),
    };
    match api.store.rounds_page(offset, per_page) {
        Ok((rounds, total)) => Json(RoundsPage {
            rounds,
            page,
            per_page,
            total,
        })
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn round(State(api): State<Arc<StatusApi>>, Path(n): Path<String>) -> Response {
    let Ok(n) = n.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("round {n:?} is not a round number"),
        );
    };
    match api.store.round(n) {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("round {n} has not been committed"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn sites(State(api): State<Arc<StatusApi>>) -> Response {
    let mut sites: Vec<SiteDoc> = api
        .hub
        .sites
        .snapshot()
        .into_iter()
        .map(|(name, s)| SiteDoc {
            name,
            connected: s.connected,
            last_seen_unix: s
                .last_seen
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            rounds_joined: s.rounds_joined,
            dropouts: s.dropouts,
            bytes_received: s.bytes_in,
            bytes_sent: s.bytes_out,
            last_accuracy: s.last_accuracy,
            last_loss: s.last_loss,
            last_auc: s.last_auc,
            last_rmse: s.last_rmse,
            evaluate_only: s.evaluate_only,
            last_decline: s
                .last_decline
                .clone()
                .map(|(round, reason)| DeclineDoc { round, reason }),
            rejections: s.rejections,
            last_rejection: s
                .last_rejection
                .clone()
                .map(|(round, reason)| DeclineDoc { round, reason }),
            privacy: s.privacy.map(|p| SitePrivacyDoc {
                epsilon: p.epsilon,
                delta: p.delta,
                budget: p.budget,
                next_epsilon: p.next_epsilon,
                noise_multiplier: p.noise_multiplier,
                exhausted: p.exhausted(api.privacy_target),
            }),
            agent_version: s.agent_version,
            certificate_expires_unix: s.certificate_expires_unix,
        })
        .collect();
    sites.sort_by(|a, b| a.name.cmp(&b.name));
    Json(json!({ "sites": sites })).into_response()
}

async fn shards(State(api): State<Arc<StatusApi>>) -> Response {
    Json(api.contention.doc()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Serves the metrics, after saving any counter that is above its saved value: a restarted
/// coordinator restores the saved values, so no counter a scrape has seen ever goes down.
/// A scrape whose counters cannot be saved is refused (503) rather than served unsaved.
async fn metrics(State(api): State<Arc<StatusApi>>) -> Response {
    api.metrics
        .seconds_since_progress
        .set(api.progress.seconds_since_progress());
    let (text, counters) = api.metrics.render(&api.hub);
    let ahead = counters.ahead_of(&lock(&api.saved_counters));
    if ahead {
        let store = api.store.clone();
        let json = serde_json::to_vec(&counters).unwrap_or_default();
        let saved = tokio::task::spawn_blocking(move || store.save_counters(&json)).await;
        match saved {
            Ok(Ok(())) => *lock(&api.saved_counters) = counters,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the metric counters could not be saved; scrape refused");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the metric counters could not be saved: {e}"),
                );
            }
            Err(e) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A minimal client for the API over plain HTTP (the `status` command and the tests).
pub mod client {
    use anyhow::{Context, Result};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// GETs `url` with the bearer `token`; returns the status code and the body.
    pub async fn get(url: &str, token: Option<&str>) -> Result<(u16, String)> {
        get_with(url, token, None).await
    }

    /// As [`get`], and an https:// `url` (a status server with `[status.tls]`) is checked
    /// against the CA certificate in the PEM file `ca_cert`.
    pub async fn get_with(
        url: &str,
        token: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<(u16, String)> {
        if url.starts_with("https://") {
            let ca = ca_cert.with_context(|| {
                format!("{url} is https: give the CA certificate of the status server (--ca-cert)")
            })?;
            return tokio::time::timeout(
                std::time::Duration::from_secs(10),
                get_tls(url, token, ca),
            )
            .await
            .with_context(|| format!("{url}: no answer within 10 s"))?;
        }
        get_plain(url, token).await
    }

    /// HTTP/1.1 over TLS 1.3, one request per connection (the `status` command's pace).
    async fn get_tls(
        url: &str,
        token: Option<&str>,
        ca: &std::path::Path,
    ) -> Result<(u16, String)> {
        use std::sync::Arc;
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("{url} is not a valid URL"))?;
        let host = uri
            .host()
            .with_context(|| format!("{url} has no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::load_certs(ca)? {
            roots
                .add(cert)
                .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .with_context(|| format!("{host:?} is not a server name"))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {host}:{port}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .with_context(|| format!("HTTP with {host}:{port}"))?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = hyper::Request::get(path).header(hyper::header::HOST, host.as_str());
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<bytes::Bytes>::new())?)
            .await
            .with_context(|| format!("requesting {url}"))?;
        answer(url, resp).await
    }

    async fn get_plain(url: &str, token: Option<&str>) -> Result<(u16, String)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
        let mut req = hyper::Request::get(url);
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::new())
            .with_context(|| format!("{url} is not a valid URL"))?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
            .await
            .with_context(|| format!("{url}: no answer within 10 s"))?
            .with_context(|| format!("requesting {url}"))?;
        answer(url, resp).await
    }

    /// The status code and the body, read whole (the API's answers are small).
    async fn answer(
        url: &str,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<(u16, String)> {
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer from {url}"))?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
}
