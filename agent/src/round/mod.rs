//! The agent's side of the rounds of one session, as a state machine without I/O.
//!
//! [`Machine::handle`] takes what happened — a message from the coordinator, or a training or
//! evaluation job that finished — together with the time, and queues what to do next
//! ([`Action`]): messages to send, jobs to run. The tokio session ([`crate::session`]) owns the
//! connection, the threads and the clock and does what the machine says. Nothing here opens
//! a socket, spawns a thread, sleeps or reads the clock, and the only randomness is a
//! generator seeded by the caller, so every decision the site makes about a round — each
//! refusal of the round-integrity checks above all — is a unit test (`tests.rs`). The
//! SecAgg+ client ([`cohort_protocols::secagg::Client`]) is built the same way one level down;
//! quinn drives quinn-proto like this.
//!
//! One exception, on purpose: the contribution ledger ([`crate::ledger`]) is written to the
//! site's disk inside `handle`. Its record must be durable *before* the message it permits
//! is queued; an action "record, then send" that a driver could run half of would reopen the
//! differencing attack the ledger closes. So the write is part of the transition, and a
//! write that fails turns into a decline instead of the message.
//!
//! A round is two phases side by side, because key agreement overlaps local training:
//! [`Work`] (what the site computes: model → training or evaluation → input) and [`SecAgg`]
//! (the protocol client, from the round's set-up on). The input goes into the protocol when
//! both are ready, whichever comes first.

mod faults;
mod policy;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use chacha20::ChaCha20Rng;
use cohort_proto::v1::{
    Chunk, Decline, EvalReport, PrivacySpent, Residuals, RoundStart, Task, agent_message,
    coordinator_message,
};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::model::{self, ModelSpec, TrainingConfig};
use cohort_protocols::round_context::{Announcement, round_context};
use cohort_protocols::secagg::{
    Client, ClientError, ClientMessage, Modulus, Params, QuantisedInput, ServerMessage,
    SiteIdentity, Word, quantise,
};
use ed25519_dalek::SigningKey;
use rand_core::{Rng, SeedableRng};
use tracing::{error, info, warn};

use crate::config::{AgentConfig, FaultStage, Role};
use crate::credentials::{Credentials, coordinator_key, offer_manifest};
use crate::failure::Permanent;
use crate::ledger::{self, Ledger, Permit, Refusal};
use crate::site::LocalSite;

pub(crate) use faults::Injector;

/// The largest SecAgg+ message the coordinator may send (reassembled from its chunks): the
/// forwarded shares of a large neighbourhood are a few MiB; anything near this is a broken or
/// hostile coordinator, and the session ends rather than buffer it.
const MAX_SECAGG_MESSAGE: usize = 64 * 1024 * 1024;

/// What happened, as the machine is told it.
#[derive(Debug)]
pub(crate) enum Input {
    /// A message from the coordinator.
    Message(coordinator_message::Kind),
    /// A [`TrainJob`] finished: the update (new parameters minus the global ones) or why not.
    Trained {
        round: u64,
        attempt: u32,
        result: Result<Vec<f32>, String>,
    },
    /// An [`EvalJob`] finished.
    Evaluated {
        round: u64,
        attempt: u32,
        result: Result<crate::model::Evaluation, String>,
    },
}

/// What the driver is to do, in the order queued.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send this to the coordinator.
    Send(agent_message::Kind),
    /// Train on the site's rows, off the session's task, and hand back [`Input::Trained`].
    Train(TrainJob),
    /// Evaluate on the site's test rows and hand back [`Input::Evaluated`].
    Evaluate(EvalJob),
    /// Wait before the next action: an injected interrupted upload lets its half reach the
    /// wire before the connection goes.
    #[cfg(feature = "faults")]
    Pause(std::time::Duration),
    /// The coordinator finished training: end the session and the agent.
    Shutdown,
}

/// Local training for one round attempt.
#[derive(Debug)]
pub(crate) struct TrainJob {
    pub(crate) round: u64,
    pub(crate) attempt: u32,
    pub(crate) spec: ModelSpec,
    pub(crate) params: Vec<f32>,
    pub(crate) training: TrainingConfig,
    /// The batch order's seed: from the split seed, the round and the site, so runs replay
    /// exactly (and secure and plain runs train identically).
    pub(crate) seed: u64,
    pub(crate) mean: Vec<f64>,
    pub(crate) std: Vec<f64>,
}

/// Evaluation of one model for one round attempt.
#[derive(Debug)]
pub(crate) struct EvalJob {
    pub(crate) round: u64,
    pub(crate) attempt: u32,
    pub(crate) spec: ModelSpec,
    pub(crate) params: Vec<f32>,
    pub(crate) mean: Vec<f64>,
    pub(crate) std: Vec<f64>,
}

/// The SecAgg+ client of the current round, for the round's modulus.
enum SecClient {
    B32(Client<u32>),
    B64(Client<u64>),
}

/// What the site feeds into the protocol once its set-up has arrived.
enum Pending {
    Stats(Vec<u64>),
    Delta { delta: Vec<f32>, weight: u64 },
}

/// What the site computes for the round.
enum Work {
    /// The round's model is arriving (train and evaluate rounds), hashed and decoded chunk
    /// by chunk: the site holds one copy of it.
    Receiving(model::Incoming),
    /// A [`TrainJob`] is out.
    Training,
    /// An [`EvalJob`] is out.
    Evaluating,
    /// The input is computed and waits for the protocol's set-up. `origin` is what the
    /// ledger records when it leaves.
    Ready {
        input: Pending,
        origin: ledger::Input,
    },
    /// The input is in the protocol client; `origin` is taken when the masked input leaves
    /// (at once, or when the neighbours' shares arrive).
    Fed { origin: Option<ledger::Input> },
    /// Nothing left to compute: the plain update or the evaluation report went out.
    Done,
}

/// The protocol's side of the round.
enum SecAgg {
    /// No set-up yet (and never one in a plain round).
    AwaitingSetup,
    Running(Box<Protocol>),
}

struct Protocol {
    client: SecClient,
    params: Params,
    /// The participants' names by id, from the set-up: survivors are recorded and compared
    /// by name, since ids are per session.
    names: BTreeMap<u32, String>,
    /// The survivors of the request being answered, recorded before the answer leaves.
    survivors: Option<Vec<String>>,
}

/// One round attempt the site takes part in. Declining drops it: a site that declined sends
/// nothing more for it.
struct Round {
    start: RoundStart,
    task: Task,
    /// Whether the manifest relayed with the start is the one this site pins (after adopting
    /// it, if it was newer): a context mismatch is then not the manifest's.
    manifest_agrees: bool,
    /// What the ledger allows: a first contribution, or a redo over the same survivors.
    permit: Permit,
    work: Work,
    secagg: SecAgg,
    /// A SecAgg+ message being reassembled from its chunks.
    secagg_buf: Vec<u8>,
}

/// The agent's side of one session. Lives as long as the session: what outlives it — the
/// ledger, the faults already injected — is borrowed.
pub(crate) struct Machine<'a> {
    cfg: &'a AgentConfig,
    data: &'a Arc<dyn LocalSite>,
    creds: &'a Credentials,
    /// What this site already contributed (see [`crate::ledger`]).
    ledger: &'a mut Ledger,
    faults: &'a mut Injector,
    /// Seeds each round's ephemeral SecAgg+ keys.
    rng: ChaCha20Rng,
    site_id: Option<u32>,
    /// Verifies model signatures; set from the certificate in Welcome.
    coordinator_key: Option<ed25519_dalek::VerifyingKey>,
    /// The project CA's revocation list from Welcome (checked against the CA there), applied
    /// to every SecAgg+ peer's certificate; empty when the coordinator has none.
    crl: Vec<u8>,
    round: Option<Round>,
    /// The federation's feature statistics, from the last round start that carried valid
    /// ones.
    mean: Vec<f64>,
    std: Vec<f64>,
    actions: VecDeque<Action>,
}

impl<'a> Machine<'a> {
    /// A machine for a new session. `seed` seeds the ephemeral keys of its rounds: fresh
    /// entropy in the agent, fixed in tests.
    pub(crate) fn new(
        cfg: &'a AgentConfig,
        data: &'a Arc<dyn LocalSite>,
        creds: &'a Credentials,
        ledger: &'a mut Ledger,
        faults: &'a mut Injector,
        seed: [u8; 32],
    ) -> Self {
        Machine {
            cfg,
            data,
            creds,
            ledger,
            faults,
            rng: ChaCha20Rng::from_seed(seed),
            site_id: None,
            coordinator_key: None,
            crl: Vec::new(),
            round: None,
            mean: vec![0.0; data.stats_columns()],
            std: vec![1.0; data.stats_columns()],
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Takes in what happened at `now` (seconds since the epoch: certificate validity).
    /// An error ends the session (a coordinator that is not the project's, a broken stream,
    /// an injected fault); actions queued before it are still to be done.
    pub(crate) fn handle(&mut self, now: i64, input: Input) -> Result<()> {
        match input {
            Input::Message(kind) => self.on_message(now, kind),
            Input::Trained {
                round,
                attempt,
                result,
            } => self.on_trained(round, attempt, result),
            Input::Evaluated {
                round,
                attempt,
                result,
            } => self.on_evaluated(round, attempt, result),
        }
    }

    fn send(&mut self, kind: agent_message::Kind) {
        self.actions.push_back(Action::Send(kind));
    }

    fn send_chunked(&mut self, bytes: Vec<u8>, wrap: fn(Chunk) -> agent_message::Kind) {
        for chunk in cohort_proto::chunks(Bytes::from(bytes)) {
            self.send(wrap(chunk));
        }
    }

    /// The round attempt now running, if it is `(round, attempt)`.
    fn current(&mut self, round: u64, attempt: u32) -> Option<&mut Round> {
        self.round
            .as_mut()
            .filter(|r| r.start.round == round && r.start.attempt == attempt)
    }

    fn round_number(&self) -> u64 {
        self.round.as_ref().map_or(0, |r| r.start.round)
    }

    /// Leaves the round and tells the coordinator why.
    fn decline(&mut self, round: u64, reason: String) {
        self.decline_with(Decline {
            round,
            reason,
            accused: None,
            trusted_manifest: None,
            contributed_round: None,
            privacy: None,
        });
    }

    fn decline_with(&mut self, decline: Decline) {
        warn!(site = %self.cfg.site, round = decline.round, reason = %decline.reason, accused = ?decline.accused, "declining the round");
        self.round = None;
        self.send(agent_message::Kind::Decline(decline));
    }

    /// Declines because the contribution ledger refuses the round (see [`crate::ledger`]).
    fn decline_refusal(&mut self, round: u64, r: Refusal) {
        self.decline_with(Decline {
            round,
            reason: r.reason,
            accused: None,
            trusted_manifest: None,
            contributed_round: r.contributed,
            privacy: None,
        });
    }

    fn on_message(&mut self, now: i64, kind: coordinator_message::Kind) -> Result<()> {
        use coordinator_message::Kind;
        match kind {
            Kind::Welcome(w) => {
                self.site_id = Some(w.site_id);
                // Before the certificate check: a coordinator re-certified in a newer
                // manifest is recognised by it.
                offer_manifest(self.creds, &w.manifest);
                self.coordinator_key = Some(coordinator_key(
                    self.creds,
                    &w.coordinator_certificate,
                    now,
                )?);
                if !w.crl.is_empty() {
                    // A list the CA did not sign is a lying coordinator: no session with it.
                    CaVerifier::new(self.creds.ca_der.clone(), now)
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
            Kind::Shutdown(_) => self.actions.push_back(Action::Shutdown),
            Kind::RoundEnd(_) => {}
            Kind::RoundStart(start) => self.on_round_start(start),
            Kind::Model(chunk) => {
                // A model in a round that announced none (statistics) is ignored like any
                // other stray message.
                let Some(r) = self.round.as_mut() else {
                    return Ok(());
                };
                let Work::Receiving(incoming) = &mut r.work else {
                    return Ok(());
                };
                if let Err(e) = incoming.push(&chunk.data) {
                    let round = r.start.round;
                    self.decline(round, e.to_string());
                    return Ok(());
                }
                if chunk.last {
                    self.on_model();
                }
            }
            Kind::Secagg(chunk) => {
                let Some(r) = self.round.as_mut() else {
                    return Ok(());
                };
                r.secagg_buf.extend_from_slice(&chunk.data);
                if r.secagg_buf.len() > MAX_SECAGG_MESSAGE {
                    bail!("a SecAgg+ message from the coordinator exceeds 64 MiB");
                }
                if chunk.last {
                    let bytes = std::mem::take(&mut r.secagg_buf);
                    self.on_secagg(now, &bytes)?;
                }
            }
        }
        Ok(())
    }

    /// Why the site takes no part in a round announced with `start`, before any work: its
    /// role, its policy, the training settings, and the ledger's say. Otherwise what the
    /// ledger allows.
    fn admit(&self, start: &RoundStart, task: Task) -> Result<Permit, Refusal> {
        let refuse = |reason: String| Refusal {
            reason,
            contributed: None,
        };
        let contributes = matches!(task, Task::Stats | Task::Train);
        if self.cfg.role == Role::Evaluate && contributes {
            return Err(refuse(
                "this site only evaluates (role = \"evaluate\"): it holds no training data".into(),
            ));
        }
        if !start.secure && self.cfg.policy.require_secure && contributes {
            return Err(refuse(
                "policy: this site sends statistics and updates only under secure aggregation (policy.require_secure)".into(),
            ));
        }
        if task == Task::Train
            && let Some(reason) = policy::training_refusal(&self.cfg.policy, &start.training_toml)
        {
            return Err(refuse(reason));
        }
        let round = start.round;
        match task {
            Task::Stats => self.ledger.check_round(round),
            // A site that trains with DP-SGD pays for every update it sends, so it may send
            // another in a later attempt of the round (see `Ledger::check_release`).
            Task::Train if self.data.privacy().is_some() => self.ledger.check_release(
                round,
                &ledger::Input::update(&start.model_sha3_512),
                self.cfg.policy.updates_per_model,
            ),
            Task::Train => self.ledger.check(
                round,
                &ledger::Input::update(&start.model_sha3_512),
                self.cfg.policy.updates_per_model,
            ),
            Task::Evaluate => self
                .ledger
                .check_evaluation(
                    round,
                    &start.model_sha3_512,
                    self.cfg.policy.max_evaluations_per_round,
                )
                .map(|_| Permit::default())
                .map_err(refuse),
            Task::Unspecified => Err(refuse("unknown task".into())),
        }
    }

    fn on_round_start(&mut self, start: RoundStart) {
        let manifest_agrees = offer_manifest(self.creds, &start.manifest);
        let columns = self.data.stats_columns();
        if start.feature_mean.len() == columns
            && start.feature_std.len() == columns
            && start.feature_std.iter().all(|s| s.is_finite() && *s > 0.0)
            && start.feature_mean.iter().all(|m| m.is_finite())
        {
            self.mean = start.feature_mean.clone();
            self.std = start.feature_std.clone();
        }
        let task = Task::try_from(start.task).unwrap_or(Task::Unspecified);
        let round = start.round;
        // A new round start supersedes whatever ran before; its jobs' results are ignored.
        self.round = None;
        // The ledger's say comes before any work: a round this site may not contribute to
        // is not trained for.
        let permit = match self.admit(&start, task) {
            Ok(p) => p,
            Err(refusal) => return self.decline_refusal(round, refusal),
        };
        if let Some(survivors) = &permit.redo_of {
            info!(site = %self.cfg.site, round, survivors = %survivors.join(","), "a redo of a round this site sent its input for: only over the same survivors");
        }
        let (work, permit) = match task {
            Task::Train | Task::Evaluate => match model::Incoming::new(start.model_bytes) {
                Ok(m) => (Work::Receiving(m), permit),
                Err(e) => return self.decline(round, e.to_string()),
            },
            _ => {
                let v = match self.data.stats_vector() {
                    Ok(v) => v,
                    Err(reason) => return self.decline(round, reason),
                };
                let origin = ledger::Input::statistics(&v);
                // The data version's own check: one statistics contribution per version.
                let permit = match self.ledger.check(round, &origin, None) {
                    Ok(p) => p,
                    Err(refusal) => return self.decline_refusal(round, refusal),
                };
                if !start.secure {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    self.send_chunked(bytes, agent_message::Kind::PlainUpdate);
                    (Work::Done, permit)
                } else {
                    let input = Pending::Stats(v);
                    (Work::Ready { input, origin }, permit)
                }
            }
        };
        self.round = Some(Round {
            start,
            task,
            manifest_agrees,
            permit,
            work,
            secagg: SecAgg::AwaitingSetup,
            secagg_buf: Vec::new(),
        });
    }

    /// The model is complete: verify it, then train or evaluate.
    fn on_model(&mut self) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        if !matches!(r.work, Work::Receiving(_)) {
            return;
        }
        let Work::Receiving(incoming) = std::mem::replace(&mut r.work, Work::Done) else {
            return;
        };
        let (start, task) = (r.start.clone(), r.task);
        let (round, attempt) = (start.round, start.attempt);
        let params = match incoming.finish(
            &start.model_sha3_512,
            &start.model_signature,
            self.coordinator_key.as_ref(),
        ) {
            Ok(p) => p,
            Err(e) => {
                warn!(site = %self.cfg.site, round, reason = %e, "refusing to use the model");
                return self.decline(round, e.to_string());
            }
        };
        let spec = match spec::model_spec(self.data.as_ref(), self.cfg.schema.as_ref(), &start)
            .and_then(|s| s.check(&params).map(|()| s).map_err(|e| anyhow!("{e}")))
        {
            Ok(s) => s,
            Err(e) => return self.decline(round, format!("{e:#}")),
        };
        let (mean, std) = (self.mean.clone(), self.std.clone());
        let (work, action) = match task {
            Task::Evaluate => {
                let allowed = self.ledger.check_evaluation(
                    round,
                    &start.model_sha3_512,
                    self.cfg.policy.max_evaluations_per_round,
                );
                match allowed {
                    Err(reason) => return self.decline(round, reason),
                    Ok(ledger::Evaluation::Replay(bytes)) => {
                        match <EvalReport as prost::Message>::decode(bytes.as_slice()) {
                            Ok(report) => {
                                info!(site = %self.cfg.site, round, "the same evaluation again: the report sent before, unevaluated");
                                (Work::Done, Action::Send(agent_message::Kind::Eval(report)))
                            }
                            Err(e) => {
                                return self
                                    .decline(round, format!("the ledger's stored report: {e}"));
                            }
                        }
                    }
                    Ok(ledger::Evaluation::New) => (
                        Work::Evaluating,
                        Action::Evaluate(EvalJob {
                            round,
                            attempt,
                            spec,
                            params,
                            mean,
                            std,
                        }),
                    ),
                }
            }
            Task::Train => {
                let training = match toml::from_str::<TrainingConfig>(&start.training_toml) {
                    Ok(t) => t,
                    Err(e) => return self.decline(round, format!("[training]: {e}")),
                };
                let seed = self.cfg.data.split_seed
                    ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ site_hash(&self.cfg.site);
                (
                    Work::Training,
                    Action::Train(TrainJob {
                        round,
                        attempt,
                        spec,
                        params,
                        training,
                        seed,
                        mean,
                        std,
                    }),
                )
            }
            Task::Stats | Task::Unspecified => return,
        };
        if let Some(r) = self.round.as_mut() {
            r.work = work;
        }
        self.actions.push_back(action);
    }

    fn on_evaluated(
        &mut self,
        round: u64,
        attempt: u32,
        result: Result<crate::model::Evaluation, String>,
    ) -> Result<()> {
        let Some(r) = self.current(round, attempt) else {
            return Ok(());
        };
        if !matches!(r.work, Work::Evaluating) {
            return Ok(());
        }
        r.work = Work::Done;
        let model = r.start.model_sha3_512.clone();
        let eval = match result {
            Ok(e) => e,
            Err(e) => {
                self.decline(round, format!("evaluation failed: {e}"));
                return Ok(());
            }
        };
        let metrics = eval.metrics();
        let g = self.cfg.policy.evaluation_granularity;
        let report = EvalReport {
            round,
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
        };
        let bytes = prost::Message::encode_to_vec(&report);
        if let Err(e) = self.ledger.record_evaluation(round, &model, &bytes) {
            error!(site = %self.cfg.site, error = %e, "evaluation not reported");
            self.decline(round, e.to_string());
            return Ok(());
        }
        self.send(agent_message::Kind::Eval(report));
        Ok(())
    }

    fn on_trained(
        &mut self,
        round: u64,
        attempt: u32,
        result: Result<Vec<f32>, String>,
    ) -> Result<()> {
        let weight = self.data.train_examples();
        let privacy = self.data.privacy();
        let Some(r) = self.current(round, attempt) else {
            return Ok(());
        };
        if !matches!(r.work, Work::Training) {
            return Ok(());
        }
        let delta = match result {
            Ok(d) => self.faults.update(round, d),
            Err(e) => {
                // Over the budget (or training failed and the next round would be): the
                // coordinator is told the figures, so it stops asking.
                self.decline_with(Decline {
                    round,
                    reason: format!("local training failed: {e}"),
                    accused: None,
                    trusted_manifest: None,
                    contributed_round: None,
                    privacy: privacy.filter(|p| p.exhausted()).map(privacy_spent),
                });
                return Ok(());
            }
        };
        // The spend is the site's to publish; it says nothing about a row.
        if let Some(p) = privacy {
            self.send(agent_message::Kind::Privacy(privacy_spent(p)));
        }
        let Some(r) = self.current(round, attempt) else {
            return Ok(());
        };
        if r.start.secure {
            r.work = Work::Ready {
                input: Pending::Delta { delta, weight },
                origin: ledger::Input::update(&r.start.model_sha3_512),
            };
            self.feed_input()
        } else {
            r.work = Work::Done;
            let mut v = Vec::with_capacity(delta.len() + 1);
            v.push(weight as f32);
            v.extend_from_slice(&delta);
            self.send_chunked(model::to_bytes(&v), agent_message::Kind::PlainUpdate);
            Ok(())
        }
    }

    /// Hands the site's input to the SecAgg+ client once both are ready.
    fn feed_input(&mut self) -> Result<()> {
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        let SecAgg::Running(protocol) = &mut r.secagg else {
            return Ok(());
        };
        if !matches!(r.work, Work::Ready { .. }) {
            return Ok(());
        }
        let Work::Ready { input, origin } = std::mem::replace(&mut r.work, Work::Done) else {
            return Ok(());
        };
        r.work = Work::Fed {
            origin: Some(origin),
        };
        let round = r.start.round;
        let faults = &*self.faults;
        let sent: &[f32] = match &input {
            Pending::Delta { delta, .. } => delta,
            Pending::Stats(_) => &[],
        };
        let mut rng = ChaCha20Rng::from_seed(rounding_seed(
            &self.creds.signing_key,
            round,
            &r.start.model_sha3_512,
            sent,
        ));
        let params = &protocol.params;
        let reply = match (&mut protocol.client, input) {
            (SecClient::B64(c), Pending::Stats(v)) => Ok(c
                .set_input(QuantisedInput::from_values(v))
                .map(|m| m.map(|m| outgoing(faults, round, m)))),
            (SecClient::B32(c), Pending::Delta { delta, weight }) => {
                update(c, params, &delta, weight, &mut rng, faults, round)
            }
            (SecClient::B64(c), Pending::Delta { delta, weight }) => {
                update(c, params, &delta, weight, &mut rng, faults, round)
            }
            (SecClient::B32(_), Pending::Stats(_)) => {
                Err("statistics rounds must use modulus 2^64".to_string())
            }
        };
        match reply {
            Ok(reply) => self.after_client(reply),
            Err(reason) => {
                self.decline(round, reason);
                Ok(())
            }
        }
    }

    /// Sends what the SecAgg+ client answered, after the ledger recorded what it must
    /// before the answer leaves; or declines with the client's refusal.
    fn after_client(&mut self, reply: Result<Option<Outgoing>, ClientError>) -> Result<()> {
        let round = self.round_number();
        let out = match reply {
            Ok(Some(out)) => out,
            Ok(None) => return Ok(()),
            Err(e) => {
                warn!(site = %self.cfg.site, round, error = %e, "secure aggregation refused");
                self.decline_with(Decline {
                    round,
                    reason: e.to_string(),
                    accused: e.accused(),
                    trusted_manifest: None,
                    contributed_round: None,
                    privacy: None,
                });
                return Ok(());
            }
        };
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        let attempt = r.start.attempt;
        if out.stage == FaultStage::MaskedInput {
            // Durably on the site's disk before the input leaves: from here on it may be in
            // a sum (see `crate::ledger`).
            let origin = match &mut r.work {
                Work::Fed { origin } => origin.take(),
                _ => None,
            };
            // A noisy training input spends this site's own site-level budget first (checked
            // at the set-up), so a crash between the two over-counts rather than forgets.
            let site_level = match (&r.secagg, self.cfg.policy.site_level_epsilon, r.task) {
                (SecAgg::Running(p), Some(_), Task::Train) => {
                    policy::site_level_mechanism(&p.params)
                }
                _ => None,
            };
            let spent = match site_level {
                Some(m) => self.ledger.spend_site_level(m).inspect(|()| {
                    info!(
                        site = %self.cfg.site,
                        round,
                        site_level_epsilon = ?self.ledger.site_level_epsilon(self.cfg.policy.site_level_delta).ok(),
                        budget = ?self.cfg.policy.site_level_epsilon,
                        "site-level privacy spent (this site's own count)"
                    );
                }),
                None => Ok(()),
            };
            let recorded = match origin {
                _ if spent.is_err() => spent,
                Some(input) if r.permit.fresh => self.ledger.record_release(round, attempt, &input),
                Some(input) => self.ledger.record(round, attempt, &input),
                None => Err(ledger::LedgerError::Corrupt {
                    path: self.ledger.path().to_path_buf(),
                    error: "a masked input without a recorded origin".into(),
                }),
            };
            if let Err(e) = recorded {
                error!(site = %self.cfg.site, round, error = %e, "masked input not sent");
                self.decline(round, e.to_string());
                return Ok(());
            }
        }
        if matches!(out.stage, FaultStage::ConsistencyCheck | FaultStage::Unmask)
            && let SecAgg::Running(protocol) = &mut r.secagg
            && let Some(survivors) = protocol.survivors.take()
        {
            // Before the signature or a share leaves: a redo of this round must then have
            // exactly these survivors.
            if let Err(e) = self.ledger.record_survivors(round, attempt, survivors) {
                error!(site = %self.cfg.site, round, error = %e, "survivors not recorded: nothing sent");
                self.decline(round, e.to_string());
                return Ok(());
            }
        }
        // The masked input has a kind of its own: the coordinator streams it into the sum.
        let wrap = if out.stage == FaultStage::MaskedInput {
            agent_message::Kind::MaskedInput
        } else {
            agent_message::Kind::Secagg
        };
        #[cfg(feature = "faults")]
        if let Some(action) = self.faults.fire(round, out.stage) {
            if action == crate::config::FaultAction::Interrupt {
                let half = out.bytes[..out.bytes.len() / 2].to_vec();
                self.send(wrap(Chunk {
                    data: Bytes::from(half),
                    last: false,
                }));
                self.actions
                    .push_back(Action::Pause(std::time::Duration::from_millis(300)));
            }
            bail!(
                "fault injected: {action:?} at {:?} of round {round}",
                out.stage
            );
        }
        self.send_chunked(out.bytes, wrap);
        Ok(())
    }

    /// The round's context as this site computes it from its own view — the manifest it
    /// pins, the start and the set-up it was sent — never the server's say-so
    /// ([`cohort_protocols::round_context`]). A site told anything else than its peers
    /// computes another context, and neither can verify the other's keys.
    fn context_refusal(
        &self,
        r: &Round,
        setup: &cohort_protocols::secagg::Setup,
    ) -> Option<Decline> {
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
        if setup.round.context == round_context(&announced, setup) {
            return None;
        }
        let pinned = self.creds.trust.current().map_or(0, |m| m.version());
        let manifest = !r.manifest_agrees;
        let reason = if manifest {
            format!(
                "the coordinator runs this round under another federation manifest than the v{pinned} this site trusts"
            )
        } else {
            "the round's context is not the one this site computes from what it was told (the round start and the SecAgg+ set-up)".to_string()
        };
        Some(Decline {
            round: r.start.round,
            reason,
            accused: None,
            trusted_manifest: manifest.then_some(pinned),
            contributed_round: None,
            privacy: None,
        })
    }

    /// The round's set-up: checks its context and the site's policy, then starts the
    /// protocol client.
    fn on_setup(&mut self, now: i64, setup: &cohort_protocols::secagg::Setup) -> Result<()> {
        let Some(r) = self.round.as_ref() else {
            return Ok(());
        };
        let Some(id) = self.site_id else {
            bail!("SecAgg+ setup before Welcome")
        };
        if (setup.round.round, setup.round.attempt) != (r.start.round, r.start.attempt) {
            return Ok(());
        }
        if let Some(decline) = self.context_refusal(r, setup) {
            self.decline_with(decline);
            return Ok(());
        }
        let round = r.start.round;
        if let Some(reason) = policy::policy_refusal(&self.cfg.policy, setup).or_else(|| {
            (Task::try_from(r.start.task) == Ok(Task::Train))
                .then(|| {
                    policy::noise_refusal(&self.cfg.policy, setup).or_else(|| {
                        policy::site_budget_refusal(&self.cfg.policy, self.ledger, setup)
                    })
                })
                .flatten()
        }) {
            self.decline(round, reason);
            return Ok(());
        }
        let identity = SiteIdentity {
            id,
            name: self.creds.name.clone(),
            signing_key: self.creds.signing_key.clone(),
            credential: self.creds.cert_der.clone(),
        };
        let mut verifier = self.creds.trust.verifier(&self.creds.ca_der, now)?;
        if !self.crl.is_empty() {
            verifier = verifier.with_crl(&self.crl).map_err(|e| anyhow!("{e}"))?;
        }
        let verifier = Arc::new(verifier);
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let (live, survivors) = (
            self.cfg.policy.min_live_neighbours,
            self.cfg.policy.min_sites,
        );
        let client = match setup.params.modulus {
            Modulus::Bits32 => SecClient::B32(
                Client::new(identity, verifier, setup.round, seed).requiring(live, survivors),
            ),
            Modulus::Bits64 => SecClient::B64(
                Client::new(identity, verifier, setup.round, seed).requiring(live, survivors),
            ),
        };
        if let Some(r) = self.round.as_mut() {
            r.secagg = SecAgg::Running(Box::new(Protocol {
                client,
                params: setup.params.clone(),
                names: setup
                    .participants
                    .iter()
                    .copied()
                    .zip(setup.names.iter().cloned())
                    .collect(),
                survivors: None,
            }));
        }
        Ok(())
    }

    /// A survivor set the server asks this site to sign or to reveal shares for: a redo must
    /// name exactly the survivors of the attempt it redoes. Returns false when it declined.
    fn on_survivors(&mut self, survivors: &[u32]) -> bool {
        let Some(r) = self.round.as_mut() else {
            return false;
        };
        let SecAgg::Running(protocol) = &mut r.secagg else {
            return true;
        };
        let mut names: Vec<String> = survivors
            .iter()
            .map(|id| {
                protocol
                    .names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}"))
            })
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
            self.decline_refusal(
                round,
                Refusal {
                    reason,
                    contributed: Some(round),
                },
            );
            return false;
        }
        protocol.survivors = Some(names);
        true
    }

    fn on_secagg(&mut self, now: i64, bytes: &[u8]) -> Result<()> {
        let msg = match ServerMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let round = self.round_number();
                self.decline(round, format!("undecodable SecAgg+ message: {e}"));
                return Ok(());
            }
        };
        let Some(r) = self.round.as_ref() else {
            return Ok(());
        };
        let is_setup = matches!(msg, ServerMessage::Setup(_));
        if let ServerMessage::Setup(setup) = &msg
            && matches!(r.secagg, SecAgg::AwaitingSetup)
        {
            self.on_setup(now, setup)?;
        }
        if let ServerMessage::ConsistencyRequest(cohort_protocols::secagg::ConsistencyRequest {
            survivors,
            ..
        })
        | ServerMessage::UnmaskRequest(cohort_protocols::secagg::UnmaskRequest {
            survivors,
            ..
        }) = &msg
            && !self.on_survivors(survivors)
        {
            return Ok(());
        }
        let Some(r) = self.round.as_mut() else {
            return Ok(());
        };
        let round = r.start.round;
        let SecAgg::Running(protocol) = &mut r.secagg else {
            return Ok(());
        };
        let faults = &*self.faults;
        // The masked input may come out here (when the shares arrive after the update).
        let reply = match &mut protocol.client {
            SecClient::B32(c) => c
                .handle(&msg)
                .map(|m| m.map(|m| outgoing(faults, round, m))),
            SecClient::B64(c) => c
                .handle(&msg)
                .map(|m| m.map(|m| outgoing(faults, round, m))),
        };
        self.after_client(reply)?;
        if is_setup {
            self.feed_input()?;
        }
        Ok(())
    }
}

/// An encoded SecAgg+ reply and the stage it belongs to.
struct Outgoing {
    stage: FaultStage,
    bytes: Vec<u8>,
}

/// Encodes a reply (as a faulty site would send it, in a build with faults).
fn outgoing<W: Word>(faults: &Injector, round: u64, mut m: ClientMessage<W>) -> Outgoing {
    faults.message(round, &mut m);
    let stage = match &m {
        ClientMessage::AdvertiseKeys(_) => FaultStage::AdvertiseKeys,
        ClientMessage::ShareKeys(_) => FaultStage::ShareKeys,
        ClientMessage::MaskedInput(_) => FaultStage::MaskedInput,
        ClientMessage::ConsistencySignature(_) => FaultStage::ConsistencyCheck,
        ClientMessage::UnmaskShares(_) => FaultStage::Unmask,
    };
    Outgoing {
        stage,
        bytes: m.encode(),
    }
}

/// Quantises a training update and feeds it to the client; a value that cannot be
/// quantised (not finite) is the round's refusal, named.
fn update<W: Word>(
    client: &mut Client<W>,
    params: &Params,
    delta: &[f32],
    weight: u64,
    rng: &mut ChaCha20Rng,
    faults: &Injector,
    round: u64,
) -> Result<Result<Option<Outgoing>, ClientError>, String> {
    let (q, report) = quantise::<W, _>(params, delta, weight, rng).map_err(|e| e.to_string())?;
    if report.clipped > 0 && params.noise.is_some() {
        // Site-level DP: the whole update is scaled, and not reported (it says something
        // about this site's data that the noise does not cover).
        warn!(
            clip = params.clip,
            "update scaled down to L2 norm {} before noise (site-level DP; not reported)",
            params.clip
        );
    } else if report.norm_scaled || report.clipped > 0 {
        warn!(
            clipped = report.clipped,
            norm_scaled = report.norm_scaled,
            norm_bound = ?params.norm_bound,
            "update scaled to the round's norm bound, or values clipped to [-{}, {}] (the clipped count reaches the coordinator only as a sum)",
            params.clip,
            params.clip
        );
    }
    let q = faults.quantised(round, q);
    Ok(client
        .set_input(q)
        .map(|m| m.map(|m| outgoing(faults, round, m))))
}

/// The site's privacy figures as the wire carries them.
pub(crate) fn privacy_spent(r: crate::PrivacyReport) -> PrivacySpent {
    PrivacySpent {
        epsilon: r.epsilon,
        delta: r.delta,
        budget: r.budget,
        next_epsilon: r.next_epsilon,
        noise_multiplier: r.noise_multiplier,
    }
}

/// The seed of the stochastic rounding of this site's update in `round` from `model`: secret
/// (derived from the site's key, so the coordinator cannot predict the rounding), and the same
/// in every attempt of the round, so a redo after a coordinator crash sends exactly the input
/// it sent before and the coordinator gets exactly the sum it had (see [`crate::ledger`]);
/// with fresh randomness the redo's sum would differ by rounding noise, a second look at it.
/// With site-level DP the noise is drawn from the same generator, for the same reason: a
/// redo releases the very same noisy input, not a second independent draw to average.
///
/// The update itself is hashed in too. A site whose training is not deterministic (DP-SGD
/// draws fresh noise every time it trains) sends a different update in a redo; with a seed
/// of the round and model alone its site-level noise would then be the same draw on a
/// different update, and the difference of the two sums would hold the two updates'
/// difference with no site-level noise at all. Bound to the update, the same update gets
/// the same noise (a redo tells nothing new) and another update fresh noise (a new release,
/// which the coordinator's account counts at every unmasking).
fn rounding_seed(key: &SigningKey, round: u64, model_sha3_512: &[u8], update: &[f32]) -> [u8; 32] {
    use sha3::{Digest, Sha3_256};
    let mut h = Sha3_256::new();
    h.update(b"cohort stochastic rounding v2");
    h.update(key.to_bytes());
    h.update(round.to_le_bytes());
    h.update(model_sha3_512);
    h.update((update.len() as u64).to_le_bytes());
    for v in update {
        h.update(v.to_bits().to_le_bytes());
    }
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
