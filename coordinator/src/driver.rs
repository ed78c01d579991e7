//! The round driver: one task that runs the statistics round, the training rounds and the
//! evaluations, driving the `cohort-protocols` SecAgg+ server with messages from the hub.
//!
//! The driver never waits forever: every wait has a deadline (a stage timeout, the training
//! timeout, the wait for sites), and a round that loses its quorum is retried with a new
//! attempt number — fresh keys, fresh masks — up to `max_attempts` times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cohort_proto::v1::{
    AgentMessage, Chunk, RoundStart, Shutdown, Task, agent_message, coordinator_message,
};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::model::{self, ModelSpec, stats};
use cohort_protocols::secagg::accumulator::Ranges;
use cohort_protocols::secagg::quant::{CLIPPED_INDEX, VALUES_OFFSET, WEIGHT_INDEX};
use cohort_protocols::secagg::{
    AbortReason, ClientMessage, Dequantiser, Modulus, Output, Params, Poll, RoundId, Server,
    ServerStage, StageTimeouts,
};
use cohort_protocols::strategy::Strategy;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

use crate::config::CoordinatorConfig;
use crate::hub::{Hub, Inbound};
use crate::metrics::Metrics;
use crate::status::{Progress, RunState};
use crate::store::{CheckpointRef, Resume, RoundRecord, Setup, Store, StoreError};
use crate::upload::{
    OpenUpload, PlainOutcome, PlainSlot, PlainSum, PlainTotals, SinkWord, UploadSink,
};
use crate::{hex, unix_seconds};

#[derive(Debug, Error)]
pub enum DriverError {
    #[error("only {connected} sites connected within {waited:?}; rounds.min_sites = {min}")]
    NotEnoughSites {
        connected: usize,
        min: u32,
        waited: Duration,
    },
    #[error("round {round} failed after {attempts} attempts; last reason: {reason}")]
    RoundFailed {
        round: u64,
        attempts: u32,
        reason: String,
    },
    #[error("the hub closed")]
    HubClosed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One finished round, as reported in `summary.json` and `rounds.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub attempts: u32,
    pub sites: usize,
    pub dropped: usize,
    pub clipped: u64,
    pub seconds: f64,
    /// Mean of the sites' local test accuracies after the round.
    pub accuracy: f64,
    /// Example-weighted mean test loss.
    pub loss: f64,
    pub auc: f64,
    pub total_weight: u64,
    pub model_sha3_512: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteResult {
    pub examples: u64,
    pub test_examples: u64,
    pub accuracy: f64,
    pub loss: f64,
    pub auc: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub secure: bool,
    pub rounds: Vec<RoundSummary>,
    pub initial: Evaluation,
    pub per_site: BTreeMap<String, SiteResult>,
    pub model: Vec<f32>,
    /// Message kinds the coordinator received over the whole run.
    pub received: crate::hub::ReceivedCounts,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub auc: f64,
}

pub struct Driver {
    cfg: CoordinatorConfig,
    hub: Arc<Hub>,
    inbox: mpsc::Receiver<Inbound>,
    ca_der: Vec<u8>,
    spec: ModelSpec,
    global: Vec<f32>,
    strategy: Strategy,
    mean: Vec<f64>,
    std: Vec<f64>,
    training_toml: String,
    /// Receives every committed round's summary (simulations show a progress bar with it).
    report: Option<mpsc::UnboundedSender<RoundSummary>>,
    /// Sites left out of the current round's remaining attempts because an upload of theirs
    /// stopped part-way and spoiled an attempt's sum; cleared when a new round starts.
    sidelined: HashSet<String>,
    store: Store,
    signing_key: SigningKey,
    progress: Arc<Progress>,
    metrics: Arc<Metrics>,
}

/// What the driver needs besides the configuration: the data directory's store and the
/// coordinator's key (which signs every model it sends and checkpoints), so a run survives a
/// crash and its models can be verified; and the live progress and metrics operators watch.
#[derive(Debug)]
pub struct Operations {
    pub store: Store,
    pub signing_key: SigningKey,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

fn random_seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    rand::fill(&mut s);
    s
}

/// Removes the sites' upload slots when an aggregation ends, however it ends, so no chunk
/// arriving later is fed to a closed sum and the sum's memory is freed.
struct OpenUploads {
    hub: Arc<Hub>,
    round: u64,
    sites: Vec<String>,
}

impl OpenUploads {
    fn new(hub: &Arc<Hub>, round: u64, sites: &[(String, u32)]) -> Self {
        OpenUploads {
            hub: hub.clone(),
            round,
            sites: sites.iter().map(|(s, _)| s.clone()).collect(),
        }
    }

    fn open(&self, site: &str, sink: UploadSink) {
        let round = self.round;
        self.hub
            .uploads
            .insert(site.to_string(), OpenUpload { round, sink });
    }
}

impl Drop for OpenUploads {
    fn drop(&mut self) {
        for s in &self.sites {
            self.hub.uploads.remove(s);
        }
    }
}

/// A plain aggregation whose slots are open. Opened before the round starts, because a site
/// answers a statistics round at once.
struct PlainAggregation {
    round: u64,
    sum: Arc<PlainSum>,
    slots: Vec<(String, Arc<PlainSlot>)>,
    _uploads: OpenUploads,
}

impl PlainAggregation {
    fn open(
        hub: &Arc<Hub>,
        round: u64,
        sites: &[(String, u32)],
        len: usize,
        integer: bool,
    ) -> Self {
        let sum = Arc::new(PlainSum::new(len, integer));
        let uploads = OpenUploads::new(hub, round, sites);
        let slots = sites
            .iter()
            .map(|(site, _)| {
                let slot = Arc::new(PlainSlot::new(sum.clone()));
                uploads.open(site, UploadSink::Plain(slot.clone()));
                (site.clone(), slot)
            })
            .collect();
        PlainAggregation {
            round,
            sum,
            slots,
            _uploads: uploads,
        }
    }
}

/// Collects chunks of SecAgg+ control messages (keys, shares) into whole messages, per site,
/// with a size limit.
struct Reassembler {
    buffers: HashMap<String, Vec<u8>>,
    limit: usize,
}

impl Reassembler {
    fn new(limit: usize) -> Self {
        Reassembler {
            buffers: HashMap::new(),
            limit,
        }
    }

    /// Some(bytes) when `chunk` completes a message; Err when the site exceeds the limit.
    fn push(&mut self, site: &str, chunk: Chunk) -> Result<Option<Vec<u8>>, usize> {
        let buf = self.buffers.entry(site.to_string()).or_default();
        if buf.len() + chunk.data.len() > self.limit {
            let len = buf.len() + chunk.data.len();
            self.buffers.remove(site);
            return Err(len);
        }
        buf.extend_from_slice(&chunk.data);
        Ok(if chunk.last {
            self.buffers.remove(site)
        } else {
            None
        })
    }
}

/// What the coordinator learns from a secure round besides the update: Σw and the number of
/// clipped values.
struct Unmasked {
    total_weight: u64,
    clipped: u64,
}

/// The result of one aggregation: the sum of the survivors' vectors (ring elements of the
/// round's modulus, or a plain sum), the survivors and the number dropped.
struct Aggregated<T> {
    sum: T,
    survivors: Vec<String>,
    dropped: usize,
}

/// How often a stage that is still waiting says for whom.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(30);

/// The sessions of a round's sites when it started. A site is gone for the round when that
/// session has ended, even if the site has already reconnected: the new session knows
/// nothing of the round, so the site joins the next attempt or round instead.
struct Sessions {
    hub: Arc<Hub>,
    started: HashMap<String, u64>,
}

impl Sessions {
    fn of(hub: &Arc<Hub>, sites: &[(String, u32)]) -> Self {
        let started = sites
            .iter()
            .filter_map(|(s, _)| hub.sites.get(s).map(|st| (s.clone(), st.session)))
            .collect();
        Sessions {
            hub: hub.clone(),
            started,
        }
    }

    /// The sites whose round session has ended.
    fn gone(&self) -> Vec<String> {
        self.started
            .iter()
            .filter(|(site, session)| {
                self.hub
                    .sites
                    .get(*site)
                    .is_none_or(|st| !st.connected || st.session != **session)
            })
            .map(|(site, _)| site.clone())
            .collect()
    }
}

/// Says every [`WAITING_LOG_EVERY`] what a stage is still waiting for, so a long wait is
/// never silent.
struct WaitingLog {
    opened: Instant,
    next: Instant,
}

impl WaitingLog {
    fn new() -> Self {
        let now = Instant::now();
        WaitingLog {
            opened: now,
            next: now + WAITING_LOG_EVERY,
        }
    }

    /// How long to wait at most before [`WaitingLog::tick`] may have something to say.
    fn until_next(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    fn tick(&mut self, round: u64, stage: &str, awaiting: impl FnOnce() -> Vec<String>) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + WAITING_LOG_EVERY;
        let sites = awaiting();
        if !sites.is_empty() {
            info!(
                round,
                stage,
                waited_secs = self.opened.elapsed().as_secs(),
                waiting_for = %sites.join(","),
                "stage still waiting for sites"
            );
        }
    }
}

impl Driver {
    pub fn new(
        cfg: CoordinatorConfig,
        hub: Arc<Hub>,
        inbox: mpsc::Receiver<Inbound>,
        ca_der: Vec<u8>,
        ops: Operations,
        report: Option<mpsc::UnboundedSender<RoundSummary>>,
    ) -> Result<Self, toml::ser::Error> {
        let spec = cfg.model.spec();
        let global = spec.init(cfg.model.seed);
        let strategy = Strategy::new(cfg.strategy.clone(), spec.num_params());
        // The agents get the [training] table plus the model's hidden sizes.
        let mut training = cfg.training.clone();
        training.insert(
            "hidden".into(),
            toml::Value::Array(
                cfg.model
                    .hidden
                    .iter()
                    .map(|h| toml::Value::Integer(*h as i64))
                    .collect(),
            ),
        );
        let training_toml = toml::to_string(&training)?;
        Ok(Driver {
            hub,
            inbox,
            ca_der,
            global,
            strategy,
            mean: vec![0.0; spec.inputs],
            std: vec![1.0; spec.inputs],
            spec,
            training_toml,
            cfg,
            report,
            sidelined: HashSet::new(),
            store: ops.store,
            signing_key: ops.signing_key,
            progress: ops.progress,
            metrics: ops.metrics,
        })
    }

    /// The hub this driver runs rounds over (shared with the gRPC service).
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    fn secure(&self) -> bool {
        self.cfg.secagg.enabled
    }

    /// Runs the whole federated training and returns its summary. Continues a run found in
    /// the data directory after its last committed round.
    pub async fn run(mut self) -> Result<RunSummary, DriverError> {
        if !self.secure() {
            warn!(
                "secure aggregation is OFF: the coordinator sees every site's update (plain FedAvg, for comparison only)"
            );
        }
        self.metrics.model_parameters.set(self.global.len() as i64);
        let (setup, mut records) = match self.store.resume()? {
            Some(resume) => self.restore(resume)?,
            None => (self.first_setup().await?, Vec::new()),
        };
        self.progress.resumed(records.last().map(|r| &r.summary));
        self.metrics.resumed(
            records.len() as u64,
            records
                .last()
                .map(|r| (r.summary.round, r.summary.accuracy, r.summary.loss)),
        );
        let first = records
            .last()
            .map_or(1, |r: &RoundRecord| r.summary.round + 1);
        for r in first..=self.cfg.rounds.count {
            let started = Instant::now();
            let span = info_span!("round", round = r);
            // The round's update is applied to the global model inside `train_round`.
            let (total_weight, clipped, sites, dropped, attempts) = async {
                let mut attempts = 0;
                let result = self
                    .with_attempts(r, |d, attempt| {
                        attempts = attempt + 1;
                        Box::pin(d.train_round(r, attempt))
                    })
                    .await?;
                Ok::<_, DriverError>((result.0, result.1, result.2, result.3, attempts))
            }
            .instrument(span.clone())
            .await?;
            let (eval, per_site) = self.evaluate(r).instrument(span).await;
            let hash = model::params_sha3_512(&self.global);
            let summary = RoundSummary {
                round: r,
                attempts,
                sites,
                dropped,
                clipped,
                seconds: started.elapsed().as_secs_f64(),
                accuracy: eval.accuracy,
                loss: eval.loss,
                auc: eval.auc,
                total_weight,
                model_sha3_512: hex(&hash),
            };
            let record = RoundRecord { summary, per_site };
            // Durable before the next round is announced: a crash from here on resumes
            // after this round, never redoes or loses it.
            self.commit(&record, hash)?;
            info!(
                round = r,
                accuracy = eval.accuracy,
                loss = eval.loss,
                auc = eval.auc,
                sites,
                dropped,
                clipped,
                "round complete"
            );
            self.progress.round_done(&record.summary);
            let m = &self.metrics;
            m.rounds_completed.inc();
            m.current_round.set(r as i64);
            m.round_accuracy.set(eval.accuracy);
            m.round_loss.set(eval.loss);
            m.dropouts.inc_by(dropped as u64);
            m.clipped_values.inc_by(clipped);
            if let Some(p) = &self.report {
                let _ = p.send(record.summary.clone());
            }
            records.push(record);
        }
        self.progress.set_state(RunState::Finished);
        // Before the shutdown goes out: the sessions that end now end normally.
        self.hub
            .finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for (site, _) in self.hub.connected() {
            self.hub
                .send(
                    &site,
                    coordinator_message::Kind::Shutdown(Shutdown {
                        reason: "training finished".into(),
                    }),
                )
                .await;
        }
        let per_site = records
            .last()
            .map_or_else(|| setup.initial_per_site.clone(), |r| r.per_site.clone());
        Ok(RunSummary {
            secure: self.secure(),
            rounds: records.into_iter().map(|r| r.summary).collect(),
            initial: setup.initial,
            per_site,
            model: self.global.clone(),
            received: self.hub.received.snapshot(),
        })
    }

    /// Round 0 of a new run: the federated feature statistics and the initial model's
    /// evaluation, committed with the initial model.
    async fn first_setup(&mut self) -> Result<Setup, DriverError> {
        self.wait_for_sites().await?;
        let sum = self
            .with_attempts(0, |d, attempt| Box::pin(d.stats_round(attempt)))
            .await?;
        let (mean, std) = stats::from_sum(&sum, self.spec.inputs);
        self.mean = mean;
        self.std = std;
        info!(
            round = 0,
            "feature statistics aggregated from {} rows",
            sum.first().copied().unwrap_or(0)
        );
        let (initial, initial_per_site) = self.evaluate(0).await;
        info!(
            round = 0,
            accuracy = initial.accuracy,
            loss = initial.loss,
            "initial model"
        );
        let setup = Setup {
            mean: self.mean.clone(),
            std: self.std.clone(),
            initial,
            initial_per_site,
        };
        let hash = model::params_sha3_512(&self.global);
        let (m, v) = self.strategy.state();
        self.store.commit_setup(
            &setup,
            &CheckpointRef {
                round: 0,
                params: &self.global,
                sha3_512: &hash,
                signature: &model::sign_model(&self.signing_key, &hash),
                strategy_m: m,
                strategy_v: v,
            },
        )?;
        Ok(setup)
    }

    /// Takes up a run from the data directory: the model, the optimiser state, the feature
    /// statistics and the sites' counters of the last committed round.
    fn restore(&mut self, resume: Resume) -> Result<(Setup, Vec<RoundRecord>), DriverError> {
        let Resume {
            setup,
            rounds,
            checkpoint,
            sites,
        } = resume;
        let corrupt = |detail: String| {
            DriverError::Store(StoreError::Corrupt {
                path: self.store.path().to_path_buf(),
                detail,
            })
        };
        if checkpoint.params.len() != self.global.len() || setup.mean.len() != self.spec.inputs {
            return Err(corrupt(format!(
                "checkpoint {} has {} parameters, the model {}",
                checkpoint.round,
                checkpoint.params.len(),
                self.global.len()
            )));
        }
        let verifying = self.signing_key.verifying_key();
        if !model::verify_model(&verifying, &checkpoint.sha3_512, &checkpoint.signature) {
            return Err(corrupt(format!(
                "checkpoint {} is not signed by this coordinator's key",
                checkpoint.round
            )));
        }
        self.strategy
            .restore(&checkpoint.strategy_m, &checkpoint.strategy_v)
            .map_err(|e| corrupt(format!("checkpoint {}: {e}", checkpoint.round)))?;
        self.global = checkpoint.params;
        self.mean = setup.mean.clone();
        self.std = setup.std.clone();
        self.hub.restore(sites);
        info!(
            round = checkpoint.round,
            "resuming after the last committed round"
        );
        Ok((setup, rounds))
    }

    /// Commits a finished round with the current model (signed) and the sites' counters.
    fn commit(&self, record: &RoundRecord, hash: [u8; 64]) -> Result<(), DriverError> {
        let (m, v) = self.strategy.state();
        self.store.commit_round(
            record,
            &CheckpointRef {
                round: record.summary.round,
                params: &self.global,
                sha3_512: &hash,
                signature: &model::sign_model(&self.signing_key, &hash),
                strategy_m: m,
                strategy_v: v,
            },
            &self.hub.sites.snapshot(),
            self.cfg.storage.keep_checkpoints,
        )?;
        Ok(())
    }

    async fn wait_for_sites(&mut self) -> Result<(), DriverError> {
        if self.hub.connected().len() < self.cfg.rounds.min_sites as usize {
            self.progress.set_state(RunState::WaitingForSites);
        }
        let min = self.cfg.rounds.min_sites as usize;
        let waited = Duration::from_secs(self.cfg.rounds.wait_for_sites_secs);
        let deadline = tokio::time::Instant::now() + waited;
        loop {
            let connected = self.hub.connected().len();
            if connected >= min {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::NotEnoughSites {
                    connected,
                    min: self.cfg.rounds.min_sites,
                    waited,
                });
            }
            // Joins do not pass through the inbox: look again at least every 250 ms. Messages
            // that arrive meanwhile belong to no round and are dropped.
            let tick = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
            if let Ok(None) = tokio::time::timeout_at(tick, self.inbox.recv()).await {
                return Err(DriverError::HubClosed);
            }
        }
    }

    async fn with_attempts<T>(
        &mut self,
        round: u64,
        mut f: impl for<'a> FnMut(
            &'a mut Driver,
            u32,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>,
        >,
    ) -> Result<T, DriverError> {
        let mut last = String::new();
        self.sidelined.clear();
        for attempt in 0..self.cfg.rounds.max_attempts {
            if let Err(e) = self.wait_for_sites().await {
                last = e.to_string();
                break;
            }
            match f(self, attempt).await {
                Ok(v) => return Ok(v),
                Err(reason) => {
                    self.metrics.attempts_aborted.inc();
                    warn!(round, attempt, %reason, "round attempt aborted; retrying with fresh keys");
                    last = reason;
                }
            }
        }
        Err(DriverError::RoundFailed {
            round,
            attempts: self.cfg.rounds.max_attempts,
            reason: last,
        })
    }

    /// The sites taking part in a round: connected, ordered by id, at most `sites_per_round`.
    /// The sites of a round: every connected site, or a uniformly random `sites_per_round`
    /// of them (so every site gets its turn), ordered by id.
    fn select(&self) -> Vec<(String, u32)> {
        let mut sites: Vec<(String, u32)> = self
            .hub
            .connected()
            .into_iter()
            .filter(|(name, _)| !self.sidelined.contains(name))
            .map(|(name, s)| (name, s.id))
            .collect();
        if let Some(k) = self.cfg.rounds.sites_per_round {
            sites = choose(sites, k as usize, rand::random::<u64>);
        }
        sites
    }

    async fn start_round(
        &self,
        sites: &[(String, u32)],
        start: RoundStart,
        model: Option<&Bytes>,
    ) -> Vec<(String, u32)> {
        let mut reached = Vec::new();
        for (site, id) in sites {
            let mut ok = self
                .hub
                .send(site, coordinator_message::Kind::RoundStart(start.clone()))
                .await;
            if ok && let Some(bytes) = model {
                ok = self
                    .hub
                    .send_chunked(site, bytes, coordinator_message::Kind::Model)
                    .await;
            }
            if ok {
                reached.push((site.clone(), *id));
            } else {
                warn!(round = start.round, %site, "site unreachable at round start");
            }
        }
        reached
    }

    fn round_start(
        &self,
        round: u64,
        attempt: u32,
        task: Task,
        model: Option<&[u8]>,
    ) -> RoundStart {
        let hash = model.map(model::sha3_512);
        RoundStart {
            round,
            attempt,
            task: task as i32,
            secure: self.secure(),
            model_sha3_512: hash.map(|h| h.to_vec()).unwrap_or_default(),
            model_signature: hash
                .map(|h| model::sign_model(&self.signing_key, &h).to_vec())
                .unwrap_or_default(),
            model_bytes: model.map_or(0, |m| m.len() as u64),
            training_toml: self.training_toml.clone(),
            feature_mean: self.mean.clone(),
            feature_std: self.std.clone(),
        }
    }

    async fn stats_round(&mut self, attempt: u32) -> Result<Vec<u64>, String> {
        let sites = self.select();
        let len = stats::vector_len(self.spec.inputs);
        let plain =
            (!self.secure()).then(|| PlainAggregation::open(&self.hub, 0, &sites, len, true));
        let start = self.round_start(0, attempt, Task::Stats, None);
        let sites = self.start_round(&sites, start, None).await;
        if self.secure() {
            let params = Params {
                modulus: Modulus::Bits64,
                ..self.cfg.secagg.params(sites.len() as u32, (len - 2) as u32)
            };
            let agg = self
                .secagg::<u64>(RoundId::new(0, attempt), &sites, params)
                .await?;
            Ok(agg.sum.to_vec())
        } else {
            match self.plain_sum(plain, &sites).await?.sum {
                PlainTotals::Integer(sum) => Ok(sum.to_vec()),
                PlainTotals::Weighted(_) => Err("statistics must be summed as integers".into()),
            }
        }
    }

    /// One training round, applied to the global model: returns (total weight, clipped,
    /// sites, dropped).
    async fn train_round(
        &mut self,
        round: u64,
        attempt: u32,
    ) -> Result<(u64, u64, usize, usize), String> {
        let sites = self.select();
        let dim = self.spec.num_params();
        let plain = (!self.secure())
            .then(|| PlainAggregation::open(&self.hub, round, &sites, dim + 1, false));
        let bytes = Bytes::from(model::to_bytes(&self.global));
        let start = self.round_start(round, attempt, Task::Train, Some(&bytes));
        let sites = self.start_round(&sites, start, Some(&bytes)).await;
        // The queues to the sites hold views of it until sent; this copy is no longer needed.
        drop(bytes);
        for (s, _) in &sites {
            self.hub.record(s, |st| st.rounds_joined += 1);
        }
        if self.secure() {
            let params = self.cfg.secagg.params(sites.len() as u32, dim as u32);
            let id = RoundId::new(round, attempt);
            // The sum stays in the round's own word size (a 2^32 sum is half the memory) and
            // in its ranges, dequantised and applied range by range.
            let (a, dropped) = match params.modulus {
                Modulus::Bits32 => {
                    let agg = self.secagg::<u32>(id, &sites, params.clone()).await?;
                    (self.apply_masked(&params, &agg)?, agg.dropped)
                }
                Modulus::Bits64 => {
                    let agg = self.secagg::<u64>(id, &sites, params.clone()).await?;
                    (self.apply_masked(&params, &agg)?, agg.dropped)
                }
            };
            if a.clipped > 0 {
                warn!(
                    round,
                    clipped = a.clipped,
                    "values were clipped to [-{}, {}]",
                    params.clip,
                    params.clip
                );
            }
            Ok((a.total_weight, a.clipped, sites.len(), dropped))
        } else {
            let Aggregated { sum, dropped, .. } = self.plain_sum(plain, &sites).await?;
            let PlainTotals::Weighted(sum) = sum else {
                return Err("training updates must be summed as weighted floats".into());
            };
            // sum[0] = Σw, sum[1..] = Σ wΔ
            let total = sum.get(0).unwrap_or(0.0);
            if total <= 0.0 {
                return Err("the surviving sites reported no examples".into());
            }
            self.apply_ranges(&sum, 1, |v| (v / total) as f32)?;
            Ok((total as u64, 0, sites.len(), dropped))
        }
    }

    /// Dequantises the unmasked sum range by range and applies each range of the mean to the
    /// global model, so no second model-sized vector is ever allocated.
    fn apply_masked<W: SinkWord>(
        &mut self,
        params: &Params,
        agg: &Aggregated<Ranges<W>>,
    ) -> Result<Unmasked, String> {
        let sum = &agg.sum;
        let d = Dequantiser::new(
            params,
            sum.len(),
            sum.get(WEIGHT_INDEX),
            agg.survivors.len(),
        )
        .map_err(|e| e.to_string())?;
        self.apply_ranges(sum, VALUES_OFFSET, |z| d.mean(z))?;
        Ok(Unmasked {
            total_weight: d.total_weight,
            clipped: sum.get(CLIPPED_INDEX).map_or(0, |c| c.to_u64()),
        })
    }

    /// Applies the mean delta `mean(sum[head..])` to the global model range by range (the
    /// first `head` elements of the sum are totals, not values).
    fn apply_ranges<T: Copy>(
        &mut self,
        sum: &Ranges<T>,
        head: usize,
        mean: impl Fn(T) -> f32,
    ) -> Result<(), String> {
        if sum.len() != self.global.len() + head {
            return Err(format!(
                "the sum has {} elements for a model of {} parameters",
                sum.len(),
                self.global.len()
            ));
        }
        let mut index = 0;
        let mut block = Vec::new();
        for part in sum.parts() {
            let skip = head.saturating_sub(index).min(part.len());
            if skip == part.len() {
                index += part.len();
                continue;
            }
            block.clear();
            block.extend(part[skip..].iter().map(|z| mean(*z)));
            self.strategy
                .apply_range(&mut self.global, index + skip - head, &block)
                .map_err(|e| e.to_string())?;
            index += part.len();
        }
        Ok(())
    }

    /// Records the end of SecAgg+ stage `stage.0` (its duration) and the start of `now`.
    fn stage_changed(
        &self,
        state: RunState,
        round: RoundId,
        stage: &mut (ServerStage, Instant),
        now: ServerStage,
    ) {
        self.metrics
            .stage(&format!("{:?}", stage.0), stage.1.elapsed().as_secs_f64());
        let open = !matches!(now, ServerStage::Done | ServerStage::Aborted);
        self.progress.set_stage(
            state,
            round.round,
            round.attempt,
            open.then(|| format!("{now:?}")),
        );
        *stage = (now, Instant::now());
    }

    /// Runs one SecAgg+ aggregation among `sites`.
    async fn secagg<W: SinkWord>(
        &mut self,
        round: RoundId,
        sites: &[(String, u32)],
        params: Params,
    ) -> Result<Aggregated<Ranges<W>>, String> {
        let clock = Instant::now();
        let by_id: HashMap<u32, String> = sites.iter().map(|(s, id)| (*id, s.clone())).collect();
        let by_name: HashMap<String, u32> = sites.iter().map(|(s, id)| (s.clone(), *id)).collect();
        let ids: Vec<u32> = sites.iter().map(|(_, id)| *id).collect();
        let stage = self.cfg.rounds.stage_timeout_secs * 1000;
        let timeouts = StageTimeouts {
            advertise_keys: stage,
            share_keys: stage,
            masked_input: self.cfg.rounds.train_timeout_secs * 1000,
            consistency_check: stage,
            unmask: stage,
        };
        let verifier = CaVerifier::new(self.ca_der.clone(), unix_seconds() as i64)
            .map_err(|e| e.to_string())?;
        let (mut server, setup) = Server::<W>::new(
            params.clone(),
            round,
            &ids,
            random_seed(),
            Arc::new(verifier),
            timeouts,
            now_ms(clock),
        )
        .map_err(|e| e.to_string())?;
        let setup_bytes =
            Bytes::from(cohort_protocols::secagg::ServerMessage::Setup(setup).encode());
        info!(round = round.round, attempt = round.attempt, stage = ?server.stage(), sites = sites.len(), "SecAgg+ stage open");
        let state = if round.round == 0 {
            RunState::Statistics
        } else {
            RunState::Training
        };
        let mut stage = (server.stage(), Instant::now());
        self.progress.set_stage(
            state,
            round.round,
            round.attempt,
            Some(format!("{:?}", stage.0)),
        );
        for (site, _) in sites {
            self.hub
                .send_chunked(site, &setup_bytes, coordinator_message::Kind::Secagg)
                .await;
        }
        // Control messages only (masked inputs stream into their slots): an identity, or a
        // share per neighbour, well under 1 MiB + 256 bytes per site.
        let limit = (1 << 20) + 256 * sites.len();
        let mut chunks = Reassembler::new(limit);
        let mut banned: HashSet<String> = HashSet::new();
        let uploads = OpenUploads::new(&self.hub, round.round, sites);
        let sessions = Sessions::of(&self.hub, sites);
        let mut waiting = WaitingLog::new();
        let mut slots_open = false;
        // A site may have gone while the round started (its disconnect went to another wait).
        for site in sessions.gone() {
            if let Some(&id) = by_name.get(&site) {
                server.disconnected(id);
            }
        }
        loop {
            match server.poll(now_ms(clock)) {
                Err(abort) => {
                    if let AbortReason::PartialInput { client } = abort.reason
                        && let Some(site) = by_id.get(&client)
                    {
                        warn!(round = round.round, %site, "site left out of the round's next attempts: its upload stopped part-way");
                        self.sidelined.insert(site.clone());
                    }
                    return Err(abort.to_string());
                }
                Ok(Poll::Done(out)) => {
                    self.stage_changed(state, round, &mut stage, ServerStage::Done);
                    let Output {
                        sum,
                        survivors,
                        dropped,
                        rejections,
                        ..
                    } = *out;
                    for r in &rejections {
                        warn!(round = round.round, site = %by_id.get(&r.client).cloned().unwrap_or_default(), reason = %r.reason, "site dropped from the round");
                    }
                    for d in &dropped {
                        if let Some(s) = by_id.get(d) {
                            self.hub.record(s, |st| st.dropouts += 1);
                        }
                    }
                    return Ok(Aggregated {
                        sum,
                        survivors: survivors
                            .iter()
                            .filter_map(|id| by_id.get(id).cloned())
                            .collect(),
                        dropped: dropped.len(),
                    });
                }
                Ok(Poll::Send(messages)) => {
                    info!(round = round.round, attempt = round.attempt, stage = ?server.stage(), sites = messages.len(), "SecAgg+ stage open");
                    self.stage_changed(state, round, &mut stage, server.stage());
                    waiting = WaitingLog::new();
                    // Open the slots before the shares go out: a fast site may answer with
                    // its masked input before the last share is sent.
                    if !slots_open && server.stage() == ServerStage::MaskedInput {
                        for (id, slot) in server.input_slots() {
                            if let Some(site) = by_id.get(&id) {
                                uploads.open(site, W::sink(slot));
                            }
                        }
                        slots_open = true;
                    }
                    for (id, m) in messages {
                        if let Some(site) = by_id.get(&id) {
                            let bytes = Bytes::from(m.encode());
                            self.hub
                                .send_chunked(site, &bytes, coordinator_message::Kind::Secagg)
                                .await;
                        }
                    }
                }
                Ok(Poll::Pending { deadline }) => {
                    let wait = Duration::from_millis(deadline.saturating_sub(now_ms(clock)))
                        .min(waiting.until_next());
                    let msg = match tokio::time::timeout(wait, self.inbox.recv()).await {
                        Err(_) => {
                            waiting.tick(round.round, &format!("{:?}", server.stage()), || {
                                server
                                    .awaiting()
                                    .iter()
                                    .filter_map(|id| by_id.get(id).cloned())
                                    .collect()
                            });
                            continue;
                        }
                        Ok(None) => return Err("hub closed".into()),
                        Ok(Some(m)) => m,
                    };
                    let (site, msg) = match msg {
                        Inbound::Message { site, msg } => (site, msg),
                        // Inbound::Uploaded only wakes the loop: the next poll sees the slot.
                        Inbound::Uploaded { .. } => continue,
                        Inbound::Disconnected { .. } => {
                            for site in sessions.gone() {
                                if let Some(&id) = by_name.get(&site)
                                    && server.awaiting().contains(&id)
                                {
                                    info!(round = round.round, attempt = round.attempt, %site, stage = ?server.stage(), "site disconnected: the stage no longer waits for it");
                                }
                                if let Some(&id) = by_name.get(&site) {
                                    server.disconnected(id);
                                }
                            }
                            continue;
                        }
                    };
                    let Some(&id) = by_name.get(&site) else {
                        continue;
                    };
                    if banned.contains(&site) {
                        continue;
                    }
                    match msg.kind {
                        Some(agent_message::Kind::Secagg(chunk)) => match chunks.push(&site, chunk)
                        {
                            Err(len) => {
                                warn!(round = round.round, %site, len, "site dropped: message exceeds the size limit");
                                banned.insert(site);
                            }
                            Ok(None) => {}
                            Ok(Some(bytes)) => match ClientMessage::<W>::decode(&bytes) {
                                Err(e) => {
                                    warn!(round = round.round, %site, error = %e, "site dropped: undecodable message");
                                    banned.insert(site);
                                }
                                Ok(m) => {
                                    if let Err(r) = server.receive(id, m, now_ms(clock)) {
                                        warn!(round = round.round, %site, reason = %r.reason, "message rejected");
                                    }
                                }
                            },
                        },
                        Some(agent_message::Kind::Decline(d)) => {
                            warn!(round = round.round, %site, reason = %d.reason, "site declined the round");
                            banned.insert(site);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Plain aggregation for comparison runs. Training rounds: each site sends
    /// [w, Δ...] as f32 and the sum is kept as f64 (w·Δ); stats rounds: u64 wrapping sums.
    /// Updates stream into the sum like masked inputs do.
    async fn plain_sum(
        &mut self,
        plain: Option<PlainAggregation>,
        sites: &[(String, u32)],
    ) -> Result<Aggregated<PlainTotals>, String> {
        let Some(PlainAggregation {
            round,
            sum,
            mut slots,
            _uploads: uploads,
        }) = plain
        else {
            return Err("no plain aggregation was opened".into());
        };
        // Only the sites the round start reached are waited for.
        slots.retain(|(site, _)| sites.iter().any(|(s, _)| s == site));
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.cfg.rounds.train_timeout_secs);
        let mut declined: HashSet<String> = HashSet::new();
        let sessions = Sessions::of(&self.hub, sites);
        let mut waiting = WaitingLog::new();
        declined.extend(sessions.gone());
        while !slots
            .iter()
            .all(|(site, slot)| slot.settled() || declined.contains(site))
        {
            let tick = deadline.min(tokio::time::Instant::now() + waiting.until_next());
            match tokio::time::timeout_at(tick, self.inbox.recv()).await {
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => waiting.tick(round, "plain update", || {
                    slots
                        .iter()
                        .filter(|(site, slot)| !slot.settled() && !declined.contains(site))
                        .map(|(site, _)| site.clone())
                        .collect()
                }),
                Ok(None) => return Err("hub closed".into()),
                Ok(Some(Inbound::Disconnected { .. })) => declined.extend(sessions.gone()),
                Ok(Some(Inbound::Message {
                    site,
                    msg:
                        AgentMessage {
                            kind: Some(agent_message::Kind::Decline(d)),
                        },
                })) => {
                    warn!(round, %site, reason = %d.reason, "site declined the round");
                    declined.insert(site);
                }
                Ok(Some(_)) => {}
            }
        }
        drop(uploads);
        let mut done = Vec::new();
        for (site, slot) in &slots {
            match slot.seal() {
                PlainOutcome::Complete => done.push(site.clone()),
                PlainOutcome::Missing => {}
                PlainOutcome::Partial => {
                    warn!(round, %site, "site left out of the round's next attempts: its update stopped part-way");
                    self.sidelined.insert(site.clone());
                    return Err(format!("site {site} stopped part-way through its update"));
                }
            }
        }
        if done.len() < self.cfg.rounds.min_sites as usize {
            return Err(format!(
                "only {} of {} sites sent their update",
                done.len(),
                sites.len()
            ));
        }
        Ok(Aggregated {
            dropped: sites.len() - done.len(),
            survivors: done,
            sum: sum.take(),
        })
    }

    /// Sends the current model to every connected site for evaluation on its test split.
    async fn evaluate(&mut self, round: u64) -> (Evaluation, BTreeMap<String, SiteResult>) {
        let sites = self.select();
        info!(round, sites = sites.len(), "evaluating the model");
        self.progress
            .set_stage(RunState::Evaluating, round, 0, None);
        let started = Instant::now();
        let bytes = Bytes::from(model::to_bytes(&self.global));
        let start = self.round_start(round, 0, Task::Evaluate, Some(&bytes));
        let sites = self.start_round(&sites, start, Some(&bytes)).await;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.cfg.rounds.stage_timeout_secs);
        let mut results: BTreeMap<String, SiteResult> = BTreeMap::new();
        let sessions = Sessions::of(&self.hub, &sites);
        let mut gone: HashSet<String> = sessions.gone().into_iter().collect();
        let mut waiting = WaitingLog::new();
        while results.len() + gone.iter().filter(|s| !results.contains_key(*s)).count()
            < sites.len()
        {
            let tick = deadline.min(tokio::time::Instant::now() + waiting.until_next());
            let msg = match tokio::time::timeout_at(tick, self.inbox.recv()).await {
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => {
                    waiting.tick(round, "evaluate", || {
                        sites
                            .iter()
                            .filter(|(s, _)| !results.contains_key(s) && !gone.contains(s))
                            .map(|(s, _)| s.clone())
                            .collect()
                    });
                    continue;
                }
                Ok(None) => break,
                Ok(Some(m)) => m,
            };
            if let Inbound::Disconnected { .. } = msg {
                gone.extend(sessions.gone());
                continue;
            }
            let Inbound::Message {
                site,
                msg:
                    AgentMessage {
                        kind: Some(agent_message::Kind::Eval(e)),
                    },
            } = msg
            else {
                continue;
            };
            let valid = e.round == round
                && e.examples > 0
                && [e.loss, e.accuracy, e.auc].iter().all(|v| v.is_finite())
                && (0.0..=1.0).contains(&e.accuracy)
                && (0.0..=1.0).contains(&e.auc);
            if !valid || !sites.iter().any(|(s, _)| *s == site) {
                continue;
            }
            let examples = self.hub.sites.get(&site).map_or(0, |s| s.examples);
            self.hub.record(&site, |s| {
                s.last_accuracy = Some(e.accuracy);
                s.last_loss = Some(e.loss);
                s.last_auc = Some(e.auc);
                s.test_examples = e.examples;
            });
            results.insert(
                site,
                SiteResult {
                    examples,
                    test_examples: e.examples,
                    accuracy: e.accuracy,
                    loss: e.loss,
                    auc: e.auc,
                },
            );
        }
        self.metrics
            .stage("evaluate", started.elapsed().as_secs_f64());
        if results.is_empty() {
            return (Evaluation::default(), results);
        }
        let n = results.len() as f64;
        let total: f64 = results.values().map(|r| r.test_examples as f64).sum();
        let eval = Evaluation {
            accuracy: results.values().map(|r| r.accuracy).sum::<f64>() / n,
            loss: results
                .values()
                .map(|r| r.loss * r.test_examples as f64)
                .sum::<f64>()
                / total,
            auc: results.values().map(|r| r.auc).sum::<f64>() / n,
        };
        (eval, results)
    }
}

/// A uniformly random `k` of `sites` (partial Fisher–Yates), ordered by id.
fn choose(
    mut sites: Vec<(String, u32)>,
    k: usize,
    mut random: impl FnMut() -> u64,
) -> Vec<(String, u32)> {
    let k = k.min(sites.len());
    for i in 0..k {
        let j = i + (random() % (sites.len() - i) as u64) as usize;
        sites.swap(i, j);
    }
    sites.truncate(k);
    sites.sort_by_key(|(_, id)| *id);
    sites
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_draws_k_distinct_sites_and_gives_everyone_a_turn() {
        let sites: Vec<(String, u32)> = (0..10).map(|i| (format!("s{i}"), i)).collect();
        let mut state = 42u64;
        let mut rng = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 11
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let c = choose(sites.clone(), 3, &mut rng);
            assert_eq!(c.len(), 3);
            assert!(c.windows(2).all(|w| w[0].1 < w[1].1), "sorted and distinct");
            seen.extend(c.into_iter().map(|(_, id)| id));
        }
        assert_eq!(seen.len(), 10);
        assert_eq!(choose(sites.clone(), 20, &mut rng).len(), 10);
    }
}
