//! The round driver: one task that runs the statistics round, the training rounds and the
//! evaluations, driving the `cohort-protocols` SecAgg+ server with messages from the hub.
//!
//! The driver never waits forever for an answer: every wait for a site has a deadline (a
//! stage timeout, the training timeout), and a round that loses its quorum is retried with a
//! new attempt number — fresh keys, fresh masks — up to `max_attempts` times. The one wait
//! without a deadline is for enough sites to start a round: a coordinator whose sites are all
//! away keeps waiting (and serving its status API) instead of exiting, and says for whom.

mod aggregation;
mod broadcast;
mod evaluation;
mod site_privacy;
mod statistics;
mod training;

use aggregation::PlainAggregation;
pub use site_privacy::SiteLevelSpent;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cohort_proto::v1::{
    AgentMessage, Chunk, RoundStart, Shutdown, Task, agent_message, coordinator_message,
};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::model::{self, ModelSpec, stats};
use cohort_protocols::round_context::{Announcement, round_context};
use cohort_protocols::secagg::accumulator::Ranges;
use cohort_protocols::secagg::quant::{CLIPPED_INDEX, VALUES_OFFSET, WEIGHT_INDEX};
use cohort_protocols::secagg::{
    AbortReason, ClientMessage, Dequantiser, Modulus, Output, Params, Poll, RoundId, Server,
    ServerStage, StageTimeouts,
};
use cohort_protocols::strategy::Strategy;
use ed25519_dalek::SigningKey;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

use crate::config::CoordinatorConfig;
use crate::hub::{Hub, Inbound, Outgoing, SitePrivacy, SiteState};
use crate::metrics::Metrics;
use crate::records::Setup;
pub use crate::records::{Evaluation, RoundRecord, RoundSummary, SiteResult};
use crate::status::{Progress, RunState};
use crate::store::{CheckpointRef, Resume, Store, StoreError};
use crate::upload::{
    OpenUpload, PlainOutcome, PlainSlot, PlainSum, PlainTotals, SinkWord, UploadSink,
};
use crate::{hex, unix_seconds};

#[derive(Debug, Error)]
pub enum DriverError {
    #[error("round {round} failed (attempts: {attempts}); last reason: {reason}")]
    RoundFailed {
        round: u64,
        attempts: u32,
        reason: String,
    },
    #[error(
        "{count} rounds in a row were given up (the last, round {round}: {reason}); the run stops for the operator: see the rounds' `failed` reasons in the status API"
    )]
    RoundsFailing {
        count: u32,
        round: u64,
        reason: String,
    },
    #[error("the hub closed")]
    HubClosed,
    #[error(
        "round {round} produced a model that is not finite (parameter {index}); it was not committed: lower the learning rate or the clip, then restart to resume from the last committed round"
    )]
    NonFiniteModel { round: u64, index: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the training settings: {0}")]
    Settings(#[from] toml::ser::Error),
    /// Too few sites can afford another round under their privacy budgets: not a fault, the
    /// end of training (see [`Driver::privacy_stop`]). `run` turns it into a finished run.
    #[error("{0}")]
    PrivacyBudget(String),
}

/// How a run ended. It holds the last round, not the history: a run of months would
/// otherwise end holding every round in memory. [`RunSummary::rounds`] reads the history
/// from the data directory when it is wanted.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub secure: bool,
    /// The last committed round (`rounds.count` when the run finished).
    pub rounds_completed: u64,
    pub last: Option<RoundSummary>,
    pub initial: Evaluation,
    pub per_site: BTreeMap<String, SiteResult>,
    pub model: Vec<f32>,
    /// Message kinds the coordinator received over the whole run.
    pub received: crate::hub::ReceivedCounts,
    /// Why training stopped before `rounds.count` (the sites' privacy budgets); None when
    /// every round ran.
    pub stopped: Option<String>,
    /// Each DP site's spend as it last reported it.
    pub privacy: BTreeMap<String, crate::hub::SitePrivacy>,
    /// Site-level DP (`[privacy.site_level]`): what the federation's unmasked sums spent.
    pub site_level: Option<SiteLevelSpent>,
    #[serde(skip)]
    data_dir: std::path::PathBuf,
}

impl RunSummary {
    /// Every committed round's summary, in order, from the data directory's round journal
    /// (readable while a coordinator holds the directory, and after).
    pub fn rounds(&self) -> Result<Vec<RoundSummary>, crate::journal::JournalError> {
        let mut reader = crate::journal::Reader::open(&self.data_dir)?;
        let mut rounds = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            if let crate::journal::Entry::Round { record, .. } = entry {
                rounds.push(record.summary);
            }
        }
        Ok(rounds)
    }
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
    report: Option<mpsc::UnboundedSender<RoundRecord>>,
    /// Sites left out of the current round's remaining attempts because an upload of theirs
    /// stopped part-way and spoiled an attempt's sum; cleared when a new round starts.
    sidelined: HashSet<String>,
    /// Sites with a refused SecAgg+ message in the current round (any attempt), for its
    /// summary; cleared when a new round starts.
    rejected: std::collections::BTreeSet<String>,
    /// Sites whose masked input reached the coordinator in an attempt of the current round,
    /// or that said they already sent one for it (a restart): their contribution ledgers
    /// refuse any other attempt of the round, so retries go on without them. Cleared when a
    /// new round starts.
    spent: HashSet<String>,
    /// `[privacy.site_level]`: the federation's account of the noisy sums it unmasked.
    site_level: Option<site_privacy::SiteLevel>,
    /// Sites that declined the current attempt because they pin another manifest version
    /// than the one the round ran under, with the version they pin.
    manifest_declines: BTreeMap<String, u64>,
    /// The current round's attempts so far, with their stage durations and abort reasons:
    /// committed with the round (`attempt_log`) so the dashboard can show where time went.
    attempt_log: Vec<crate::records::AttemptLog>,
    store: Store,
    resume: Option<Resume>,
    signing_key: SigningKey,
    progress: Arc<Progress>,
    metrics: Arc<Metrics>,
    manifest: Option<Arc<crate::live_manifest::LiveManifest>>,
}

/// What the driver needs besides the configuration: the data directory's store and the
/// coordinator's key (which signs every model it sends and checkpoints), so a run survives a
/// crash and its models can be verified; and the live progress and metrics operators watch.
#[derive(Debug)]
pub struct Operations {
    /// The run found in the data directory, if any (read once, before anything listens).
    pub resume: Option<Resume>,
    pub store: Store,
    pub signing_key: SigningKey,
    pub progress: Arc<Progress>,
    pub metrics: Arc<Metrics>,
    /// `tls.manifest`: sent with every round; its digest is the round context.
    pub manifest: Option<Arc<crate::live_manifest::LiveManifest>>,
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

/// The result of one aggregation: the sum of the survivors' vectors (ring elements of the
/// round's modulus, or a plain sum), the survivors and the number dropped.
struct Aggregated<T> {
    sum: T,
    survivors: Vec<String>,
    dropped: usize,
    /// Plain mode with a robust `[aggregation]` rule: each survivor's (weight, update).
    updates: Vec<(f64, Vec<f32>)>,
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
/// How long the driver waits after sites refused the manifest before it tries the round
/// again even if the manifest file has not changed.
const MANIFEST_RETRY: Duration = Duration::from_secs(10);

struct WaitingLog {
    opened: Instant,
    next: Instant,
    every: Duration,
}

impl WaitingLog {
    fn new() -> Self {
        Self::every(WAITING_LOG_EVERY)
    }

    fn every(every: Duration) -> Self {
        let now = Instant::now();
        WaitingLog {
            opened: now,
            next: now + every,
            every,
        }
    }

    /// How long to wait at most before [`WaitingLog::tick`] may have something to say.
    fn until_next(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    /// Logs the sites still awaited once the interval has passed since the last line (or
    /// the stage's opening); returns them when it did.
    fn tick(
        &mut self,
        round: u64,
        stage: &str,
        awaiting: impl FnOnce() -> Vec<String>,
    ) -> Option<Vec<String>> {
        if Instant::now() < self.next {
            return None;
        }
        self.next = Instant::now() + self.every;
        let sites = awaiting();
        if sites.is_empty() {
            return None;
        }
        info!(
            round,
            stage,
            waited_secs = self.opened.elapsed().as_secs(),
            waiting_for = %sites.join(","),
            "stage still waiting for sites"
        );
        Some(sites)
    }
}

impl Driver {
    /// `initial` is the model of round 0 (`ModelConfig::initial`, read once by the caller,
    /// which reports a bad `model.init_file` as configuration).
    pub fn new(
        cfg: CoordinatorConfig,
        initial: Vec<f32>,
        hub: Arc<Hub>,
        inbox: mpsc::Receiver<Inbound>,
        ca_der: Vec<u8>,
        ops: Operations,
        report: Option<mpsc::UnboundedSender<RoundRecord>>,
    ) -> Result<Self, DriverError> {
        let spec = cfg.model.spec();
        let global = initial;
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
        if let Some(c) = &spec.custom {
            training.insert("custom".into(), toml::Value::String(c.name.clone()));
        }
        if let Some(c) = &spec.cnn {
            training.insert("cnn".into(), toml::Value::try_from(&c.layers)?);
        }
        let training_toml = toml::to_string(&training)?;
        let site_level = site_privacy::SiteLevel::new(&cfg);
        Ok(Driver {
            hub,
            inbox,
            ca_der,
            global,
            strategy,
            mean: vec![0.0; spec.inputs + usize::from(cfg.schema.task.standardises_label())],
            std: vec![1.0; spec.inputs + usize::from(cfg.schema.task.standardises_label())],
            spec,
            training_toml,
            cfg,
            report,
            sidelined: HashSet::new(),
            rejected: std::collections::BTreeSet::new(),
            spent: HashSet::new(),
            site_level,
            manifest_declines: BTreeMap::new(),
            attempt_log: Vec::new(),
            store: ops.store,
            resume: ops.resume,
            signing_key: ops.signing_key,
            progress: ops.progress,
            metrics: ops.metrics,
            manifest: ops.manifest,
        })
    }

    /// The hub this driver runs rounds over (shared with the gRPC service).
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    fn secure(&self) -> bool {
        self.cfg.secagg.enabled
    }

    /// Columns of the federated statistics: the model inputs, then the label when the task
    /// standardises it.
    fn stats_columns(&self) -> usize {
        self.spec.inputs + usize::from(self.cfg.schema.task.standardises_label())
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
        // Only the last round is kept in memory: the history is in the store.
        let (setup, mut last) = match self.resume.take() {
            Some(resume) => self.restore(resume)?,
            None => (self.first_setup().await?, None),
        };
        self.resume_site_level(last.as_ref()).map_err(|detail| {
            DriverError::Store(StoreError::Corrupt {
                path: self.store.path().to_path_buf(),
                detail,
            })
        })?;
        let done = last.as_ref().map_or(0, |r: &RoundRecord| r.summary.round);
        let mut failed_in_a_row = 0;
        let mut stopped = None;
        for r in done + 1..=self.cfg.rounds.count {
            let started = Instant::now();
            let span = info_span!("round", round = r);
            // The round's update is applied to the global model inside `train_round`.
            let attempted = async {
                let mut attempts = 0;
                let result = self
                    .with_attempts(r, |d, attempt| {
                        attempts = attempt + 1;
                        Box::pin(d.train_round(r, attempt))
                    })
                    .await?;
                Ok::<_, DriverError>((result, attempts))
            }
            .instrument(span.clone())
            .await;
            let (outcome, attempts) = match attempted {
                Err(DriverError::PrivacyBudget(reason)) => {
                    warn!(round = r, %reason, "training stops: the sites' privacy budgets are spent");
                    stopped = Some(reason);
                    break;
                }
                other => other?,
            };
            let (total_weight, clipped, sites, dropped) = match outcome {
                Ok(done) => done,
                Err(reason) => {
                    let record =
                        self.give_up(r, attempts, started, reason.clone(), &last, &setup)?;
                    if let Some(p) = &self.report {
                        let _ = p.send(record.clone());
                    }
                    last = Some(record);
                    failed_in_a_row += 1;
                    if failed_in_a_row >= self.cfg.rounds.max_failed_rounds {
                        return Err(DriverError::RoundsFailing {
                            count: failed_in_a_row,
                            round: r,
                            reason,
                        });
                    }
                    continue;
                }
            };
            failed_in_a_row = 0;
            // The update is applied in place (no second model-sized copy), so a model that
            // is no longer finite cannot be rolled back here: it is never committed, and the
            // run stops; a restart resumes from the last committed round.
            if let Some(index) = self.global.iter().position(|v| !v.is_finite()) {
                return Err(DriverError::NonFiniteModel { round: r, index });
            }
            let (eval, per_site) = self.evaluate(r).instrument(span).await;
            let hash = model::params_sha3_512(&self.global);
            let summary = RoundSummary {
                round: r,
                attempts,
                sites,
                dropped,
                clipped,
                seconds: started.elapsed().as_secs_f64(),
                eval: eval.clone(),
                total_weight,
                model_sha3_512: hex(&hash),
                rejected: self.rejected.iter().cloned().collect(),
                failed: None,
                epsilon: self.federation_epsilon(),
                site_epsilon: self.site_epsilon(),
                site_clip: self.round_clip(),
                attempt_log: std::mem::take(&mut self.attempt_log),
            };
            let record = RoundRecord {
                summary,
                per_site,
                per_site_pruned: false,
                site_level_rdp: self.site_level_rdp(),
                site_level_clip: self.next_site_clip(),
            };
            // Durable before the next round is announced: a crash from here on resumes
            // after this round, never redoes or loses it.
            self.commit(&record, hash)?;
            let headline = eval.weighted.headline();
            info!(
                round = r,
                epsilon = ?record.summary.epsilon,
                site_epsilon = ?record.summary.site_epsilon,
                metric = headline.map_or("", |h| h.0),
                pooled = headline.map_or(f64::NAN, |h| h.1),
                site_mean = ?eval.site_mean.headline().map(|h| h.1),
                loss = eval.loss,
                auc = ?eval.auc,
                sites,
                dropped,
                clipped,
                "round complete"
            );
            self.progress.round_done(&record.summary);
            let m = &self.metrics;
            m.rounds_completed.inc();
            m.current_round.set(r as i64);
            m.evaluated(&eval);
            m.dropouts.inc_by(dropped as u64);
            m.clipped_values.inc_by(clipped);
            if let Some(p) = &self.report {
                let _ = p.send(record.clone());
            }
            last = Some(record);
        }
        if let Some(reason) = &stopped {
            self.progress.stopped(reason);
        }
        self.progress.set_state(RunState::Finished);
        // Before the shutdown goes out: the sessions that end now end normally.
        self.hub
            .finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let shutdown = Outgoing::Message(coordinator_message::Kind::Shutdown(Shutdown {
            reason: stopped.as_ref().map_or_else(
                || "training finished".into(),
                |r| format!("training stopped: {r}"),
            ),
        }));
        let batches = self
            .hub
            .connected()
            .into_iter()
            .map(|(site, _)| (site, vec![shutdown.clone()]))
            .collect();
        self.hub
            .deliver(self.cfg.rounds.count, batches, self.control_deadline())
            .await;
        let (rounds_completed, last, per_site) = match last {
            Some(r) => (r.summary.round, Some(r.summary), r.per_site),
            None => (0, None, setup.initial_per_site.clone()),
        };
        Ok(RunSummary {
            secure: self.secure(),
            rounds_completed,
            last,
            initial: setup.initial,
            per_site,
            model: self.global.clone(),
            received: self.hub.received.snapshot(),
            stopped,
            site_level: self.site_level_spent(),
            privacy: self
                .hub
                .sites
                .snapshot()
                .into_iter()
                .filter_map(|(name, s)| Some((name, s.privacy?)))
                .collect(),
            data_dir: self.store.path().to_path_buf(),
        })
    }

    /// Gives round `round` up: the model stays as it was, and the round is committed as
    /// failed (with the evaluation of that model, which is not evaluated again) so a restart
    /// goes on after it — the sites that sent inputs for it will not send them again.
    fn give_up(
        &mut self,
        round: u64,
        attempts: u32,
        started: Instant,
        reason: String,
        last: &Option<RoundRecord>,
        setup: &Setup,
    ) -> Result<RoundRecord, DriverError> {
        let hash = model::params_sha3_512(&self.global);
        let (eval, per_site) = match last {
            Some(l) => (l.summary.eval.clone(), l.per_site.clone()),
            None => (setup.initial.clone(), setup.initial_per_site.clone()),
        };
        let record = RoundRecord {
            summary: RoundSummary {
                round,
                attempts,
                sites: 0,
                dropped: 0,
                clipped: 0,
                seconds: started.elapsed().as_secs_f64(),
                eval,
                total_weight: 0,
                model_sha3_512: hex(&hash),
                rejected: self.rejected.iter().cloned().collect(),
                failed: Some(reason.clone()),
                epsilon: self.federation_epsilon(),
                site_epsilon: self.site_epsilon(),
                site_clip: None,
                attempt_log: std::mem::take(&mut self.attempt_log),
            },
            per_site,
            per_site_pruned: false,
            site_level_rdp: self.site_level_rdp(),
            site_level_clip: self.next_site_clip(),
        };
        self.commit(&record, hash)?;
        warn!(round, %reason, "round given up: the model is unchanged; the run goes on with the next round");
        self.progress.round_failed(round, &reason);
        self.metrics.rounds_failed.inc();
        self.metrics.current_round.set(round as i64);
        Ok(record)
    }

    /// Takes up a run from the data directory: the model, the optimiser state, the feature
    /// statistics and the sites' counters of the last committed round.
    fn restore(&mut self, resume: Resume) -> Result<(Setup, Option<RoundRecord>), DriverError> {
        let Resume {
            setup,
            last,
            checkpoint,
            ..
        } = resume;
        let corrupt = |detail: String| {
            DriverError::Store(StoreError::Corrupt {
                path: self.store.path().to_path_buf(),
                detail,
            })
        };
        if checkpoint.params.len() != self.global.len() || setup.mean.len() != self.stats_columns()
        {
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
        // The sites' counters were restored into the hub before the status API answered.
        info!(
            round = checkpoint.round,
            "resuming after the last committed round"
        );
        Ok((setup, last))
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
            self.cfg.storage.retention(),
        )?;
        Ok(())
    }

    /// Connected sites that train (evaluation-only sites never count towards `min_sites`: a
    /// round's secure sum is over training sites only), leaving out those whose privacy
    /// budget cannot pay for another round: they would only decline.
    fn training_sites_connected(&self) -> usize {
        self.hub
            .connected()
            .iter()
            .filter(|(_, s)| !s.evaluate_only && !self.out_of_budget(s))
            .count()
    }

    /// The site told this process it trains with DP-SGD: every update it sends is a release
    /// its own accountant prices, so it may be asked again in a later attempt of a round.
    fn pays_per_update(&self, site: &str) -> bool {
        self.hub
            .sites
            .get(&site.to_string())
            .is_some_and(|s| !s.evaluate_only && s.privacy_fresh && s.privacy.is_some())
    }

    /// The site reported that another round like its last would pass its privacy budget
    /// (or the federation's `privacy.epsilon`).
    fn out_of_budget(&self, s: &SiteState) -> bool {
        s.privacy
            .is_some_and(|p| p.exhausted(self.cfg.privacy.epsilon))
    }

    /// The largest ε any training site reports: the federation's guarantee per patient,
    /// since each patient's rows are at one site. None when no site runs DP-SGD.
    fn federation_epsilon(&self) -> Option<f64> {
        self.hub
            .training_privacy()
            .iter()
            .map(|p| p.epsilon)
            .reduce(f64::max)
    }

    /// Why training must stop: too few sites of the federation have privacy budget left for
    /// a round of `rounds.min_sites`. The federation is the manifest's members when there
    /// is one, and every training site the coordinator has seen (this run or before a
    /// restart). Waiting would be forever — a site's spend never goes down — and retrying
    /// would only collect declines. Without a manifest, a site that never joined is not
    /// counted: the coordinator cannot know it exists. Only figures a site sent to this
    /// process count: after a restart, a site may come back with a larger budget, so the
    /// coordinator waits for it like for any site, and stops once it has said it cannot go on.
    fn privacy_stop(&self) -> Option<String> {
        if let Some(reason) = self.site_level_stop() {
            return Some(reason);
        }
        let sites = self.hub.sites.snapshot();
        let mut spent: Vec<(&String, SitePrivacy)> = sites
            .iter()
            .filter(|(_, s)| !s.evaluate_only && s.privacy_fresh && self.out_of_budget(s))
            .filter_map(|(name, s)| Some((name, s.privacy?)))
            .collect();
        if spent.is_empty() {
            return None;
        }
        let mut members: std::collections::BTreeSet<&String> = sites
            .iter()
            .filter(|(_, s)| !s.evaluate_only)
            .map(|(name, _)| name)
            .collect();
        let manifest = self.manifest.as_ref().map(|m| m.get());
        if let Some(m) = &manifest {
            members.extend(
                m.signed
                    .manifest()
                    .members
                    .iter()
                    .filter(|m| m.role == cohort_protocols::manifest::Role::Site)
                    .map(|m| &m.name),
            );
        }
        let left = members.len().saturating_sub(spent.len());
        let min = self.cfg.rounds.min_sites as usize;
        if left >= min {
            return None;
        }
        spent.sort_by(|a, b| a.0.cmp(b.0));
        let spent: Vec<String> = spent
            .iter()
            .map(|(name, p)| {
                format!(
                    "{name} (ε = {:.3} of {}, next round {:.3})",
                    p.epsilon,
                    p.budget,
                    p.next_epsilon.unwrap_or(f64::NAN)
                )
            })
            .collect();
        let cap = self.cfg.privacy.epsilon.map_or(String::new(), |c| {
            format!(" or the federation's privacy.epsilon = {c}")
        });
        Some(format!(
            "privacy budget: {} cannot afford another round within its budget{cap}; {left} site(s) left, rounds.min_sites = {min}",
            spent.join(", ")
        ))
    }

    /// Waits until `min_sites` training sites are connected — for as long as it takes. A
    /// federation whose hospitals are all away for an hour (a network outage, a maintenance
    /// window) must find its coordinator waiting, still serving its status API, not exited.
    /// Who is missing is logged every [`WAITING_LOG_EVERY`]; past `wait_for_sites_secs` the
    /// wait is also a warning and `cohort_waiting_for_sites_seconds` says how long (the
    /// alert's signal), but the coordinator keeps waiting.
    async fn wait_for_sites(&mut self, round: u64) -> Result<(), DriverError> {
        let min = self.cfg.rounds.min_sites as usize;
        if let Some(reason) = self.privacy_stop() {
            return Err(DriverError::PrivacyBudget(reason));
        }
        if self.training_sites_connected() >= min {
            return Ok(());
        }
        self.progress
            .set_stage(RunState::WaitingForSites, round, 0, None);
        let alert_after = Duration::from_secs(self.cfg.rounds.wait_for_sites_secs);
        let started = Instant::now();
        let mut log = WaitingLog::new();
        let mut warned = false;
        info!(
            round,
            connected = self.training_sites_connected(),
            min_sites = min,
            "waiting for sites before the round"
        );
        loop {
            if let Some(reason) = self.privacy_stop() {
                self.metrics.waiting_for_sites_seconds.set(0.0);
                return Err(DriverError::PrivacyBudget(reason));
            }
            let connected = self.training_sites_connected();
            if connected >= min {
                self.metrics.waiting_for_sites_seconds.set(0.0);
                return Ok(());
            }
            let waited = started.elapsed();
            self.metrics
                .waiting_for_sites_seconds
                .set(waited.as_secs_f64());
            if !warned && waited >= alert_after {
                warned = true;
                warn!(
                    round,
                    connected,
                    min_sites = min,
                    waited_secs = waited.as_secs(),
                    missing = %self.missing_sites().join(","),
                    "still too few sites after rounds.wait_for_sites_secs; the coordinator keeps waiting"
                );
            }
            if Instant::now() >= log.next {
                log.next = Instant::now() + log.every;
                info!(
                    round,
                    connected,
                    min_sites = min,
                    waited_secs = waited.as_secs(),
                    missing = %self.missing_sites().join(","),
                    "still waiting for sites"
                );
            }
            // Joins do not pass through the inbox: look again at least every 250 ms. Messages
            // that arrive meanwhile belong to no round and are dropped.
            let tick = tokio::time::Instant::now() + Duration::from_millis(250);
            if let Ok(None) = tokio::time::timeout_at(tick, self.inbox.recv()).await {
                return Err(DriverError::HubClosed);
            }
        }
    }

    /// Sites declined an attempt because they pin another version of the federation manifest
    /// than the one the coordinator relays: typically a new version that adds a site without
    /// the countersignatures their `policy.manifest_quorum` asks for, or an older file at the
    /// coordinator. Retrying at once cannot help, and failing the run would only repeat on
    /// restart, so the driver waits — until the manifest file changes, or [`MANIFEST_RETRY`]
    /// (a site may adopt a version out of band) — and says what the operator can do.
    async fn wait_for_manifest(&mut self, round: u64) -> Result<(), DriverError> {
        let current = self.manifest.as_ref().map(|m| m.get());
        let version = current.as_ref().map_or(0, |m| m.signed.version());
        let sites = self
            .manifest_declines
            .iter()
            .map(|(site, v)| format!("{site} (trusts v{v})"))
            .collect::<Vec<_>>()
            .join(", ");
        warn!(
            round,
            manifest = version,
            %sites,
            "sites refuse the federation manifest this round runs under; waiting for them to agree (if they ask for countersignatures, attach them with `cohort-ca countersign` and install the manifest again; if they trust a newer version, install it here)"
        );
        self.progress
            .set_stage(RunState::WaitingForManifest, round, 0, None);
        let until = Instant::now() + MANIFEST_RETRY;
        while Instant::now() < until {
            // A new version, or the same one with more countersignatures: either is a new
            // `Relayed`.
            let now = self.manifest.as_ref().map(|m| m.get());
            if let (Some(now), Some(before)) = (&now, &current)
                && !Arc::ptr_eq(now, before)
            {
                info!(
                    round,
                    "the federation manifest changed; trying the round again"
                );
                return Ok(());
            }
            let tick = tokio::time::Instant::now() + Duration::from_millis(250);
            if let Ok(None) = tokio::time::timeout_at(tick, self.inbox.recv()).await {
                return Err(DriverError::HubClosed);
            }
        }
        Ok(())
    }

    /// Training sites the coordinator has known (this run or before a restart) that are not
    /// connected, each with when it was last seen.
    fn missing_sites(&self) -> Vec<String> {
        let now = std::time::SystemTime::now();
        let mut sites = self.hub.sites.snapshot();
        sites.sort_by(|a, b| a.0.cmp(&b.0));
        sites
            .into_iter()
            .filter(|(_, s)| !s.connected && !s.evaluate_only)
            .map(
                |(name, s)| match s.last_seen.and_then(|t| now.duration_since(t).ok()) {
                    Some(ago) => format!("{name} (last seen {}s ago)", ago.as_secs()),
                    None => format!("{name} (never seen)"),
                },
            )
            .collect()
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
    ) -> Result<Result<T, String>, DriverError> {
        let mut last = String::new();
        self.sidelined.clear();
        self.rejected.clear();
        self.spent.clear();
        self.attempt_log.clear();
        // Every attempt gets a number of its own (fresh keys, a fresh round id); only the
        // failures that a retry may fix count towards max_attempts.
        let mut failures = 0;
        let mut attempt = 0u32;
        while failures < self.cfg.rounds.max_attempts {
            self.wait_for_sites(round).await?;
            self.manifest_declines.clear();
            let begun = Instant::now();
            self.attempt_log.push(crate::records::AttemptLog {
                attempt,
                ..Default::default()
            });
            let result = f(self, attempt).await;
            if let Some(log) = self.attempt_log.last_mut() {
                log.seconds = begun.elapsed().as_secs_f64();
                log.aborted = result.as_ref().err().cloned();
            }
            attempt = attempt.saturating_add(1);
            match result {
                Ok(v) => {
                    // Spent for this round's attempts only: every site evaluates the result.
                    self.spent.clear();
                    return Ok(Ok(v));
                }
                Err(reason) => {
                    self.metrics.attempts_aborted.inc();
                    last = reason;
                    // A retry may only ask sites that sent nothing for this round: another
                    // sum over an overlapping set would difference out a site's input (the
                    // sites' ledgers refuse it anyway). DP-SGD sites are the exception (each
                    // update is a release they pay for; see `pays_per_update`). A refused sum
                    // spends every other survivor, so without them it ends here.
                    let left = self.eligible();
                    if !self.spent.is_empty() && left < self.cfg.rounds.min_sites as usize {
                        let mut spent: Vec<_> = self.spent.iter().cloned().collect();
                        spent.sort();
                        return Ok(Err(format!(
                            "{last}; not retried: {} already sent their input for this round and {left} other site(s) are left",
                            spent.join(", ")
                        )));
                    }
                    warn!(round, attempt = attempt - 1, reason = %last, "round attempt aborted; retrying with fresh keys");
                    if self.manifest_declines.is_empty() {
                        failures += 1;
                    } else {
                        self.wait_for_manifest(round).await?;
                    }
                }
            }
        }
        Ok(Err(format!(
            "{} attempts failed; the last: {last}",
            self.cfg.rounds.max_attempts
        )))
    }

    /// Connected training sites a new attempt of the round may ask.
    fn eligible(&self) -> usize {
        self.candidates().len()
    }

    /// Connected training sites not left out of the round (sidelined, or spent: they sent
    /// their input in an earlier attempt). Evaluation-only sites hold no training data.
    /// Sites out of privacy budget are not asked to train (they would decline).
    fn candidates(&self) -> Vec<(String, u32)> {
        self.candidates_to(true)
    }

    /// As [`Driver::candidates`]; `train` false for an evaluation, which spends no privacy
    /// budget, so every site can take part in it.
    fn candidates_to(&self, train: bool) -> Vec<(String, u32)> {
        self.hub
            .connected()
            .into_iter()
            .filter(|(name, s)| {
                let left_out = s.evaluate_only
                    || self.sidelined.contains(name)
                    || self.spent.contains(name)
                    || (train && self.out_of_budget(s));
                !left_out
            })
            .map(|(name, s)| (name, s.id))
            .collect()
    }

    /// The sites taking part in a round: connected, ordered by id, at most `sites_per_round`.
    /// The sites of a round: every connected site, or a uniformly random `sites_per_round`
    /// of them (so every site gets its turn), ordered by id.
    /// Evaluation-only sites are never selected: they hold no training data.
    fn select(&self) -> Vec<(String, u32)> {
        self.select_to(true)
    }

    fn select_to(&self, train: bool) -> Vec<(String, u32)> {
        let mut sites = self.candidates_to(train);
        if let Some(k) = self.cfg.rounds.sites_per_round {
            sites = choose(sites, k as usize, rand::random::<u64>);
        }
        sites
    }

    /// The sites of an evaluation: the training sites of [`Driver::select`] and every
    /// connected evaluation-only site.
    fn select_for_evaluation(&self) -> Vec<(String, u32)> {
        let mut sites = self.select_to(false);
        sites.extend(
            self.hub
                .connected()
                .into_iter()
                .filter(|(_, s)| s.evaluate_only)
                .map(|(name, s)| (name, s.id)),
        );
        sites.sort_by_key(|(_, id)| *id);
        sites
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
    fn a_long_wait_names_the_sites_once_per_interval() {
        let mut log = WaitingLog::every(Duration::from_millis(30));
        let awaited = || vec!["va".to_string(), "hungary".to_string()];
        assert_eq!(log.tick(1, "MaskedInput", awaited), None, "not yet");
        std::thread::sleep(log.until_next());
        assert_eq!(
            log.tick(1, "MaskedInput", awaited),
            Some(vec!["va".into(), "hungary".into()])
        );
        assert_eq!(
            log.tick(1, "MaskedInput", awaited),
            None,
            "once per interval"
        );
        std::thread::sleep(log.until_next());
        assert_eq!(
            log.tick(1, "MaskedInput", Vec::new),
            None,
            "nobody awaited: silent"
        );
    }

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
