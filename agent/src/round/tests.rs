//! The round state machine without a network: real machines (the project's PKI, the real
//! ledger on disk) driven by hand-written coordinator messages, or by the real SecAgg+ server
//! of `cohort_protocols` for whole rounds. Each test is a decision the site makes about a
//! round; the ones named after an attack are the round-integrity rows of the threat model in
//! docs/ARCHITECTURE.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cohort_ca::demo_keys::DEFAULT_VALIDITY_DAYS;
use cohort_proto::v1::{RoundStart, Welcome};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::model::metrics::Tally;
use cohort_protocols::secagg::{
    ClientId, Output, Poll, RoundId, Server, Setup, StageTimeouts, Word,
};
use cohort_testkit::pki;

use super::*;
use crate::model::Evaluation;

/// A site whose data are fixed numbers: statistics, an update, an evaluation. The machine
/// never looks inside a site; it only asks.
struct Fixed {
    stats: Vec<u64>,
    delta: Vec<f32>,
    /// What the site's DP accountant says, if it has one.
    privacy: Option<crate::PrivacyReport>,
    /// Training fails with this (a privacy budget that refuses the round).
    refuse: Option<String>,
}

impl Fixed {
    fn new(stats: Vec<u64>) -> Self {
        Fixed {
            stats,
            delta: vec![0.25, -0.5, 0.125],
            privacy: None,
            refuse: None,
        }
    }
}

/// Two inputs: logistic regression has three parameters.
const INPUTS: usize = 2;

impl LocalSite for Fixed {
    fn inputs(&self) -> usize {
        INPUTS
    }
    fn train_examples(&self) -> u64 {
        10
    }
    fn stats_vector(&self) -> Result<Vec<u64>, String> {
        Ok(self.stats.clone())
    }
    fn train(
        &self,
        _: &ModelSpec,
        _: &[f32],
        _: (&[f64], &[f64]),
        _: &TrainingConfig,
        _: u64,
    ) -> Result<Vec<f32>, String> {
        match &self.refuse {
            Some(e) => Err(e.clone()),
            None => Ok(self.delta.clone()),
        }
    }
    fn privacy(&self) -> Option<crate::PrivacyReport> {
        self.privacy
    }
    fn evaluate(
        &self,
        _: &ModelSpec,
        _: &[f32],
        _: (&[f64], &[f64]),
    ) -> Result<Evaluation, String> {
        Ok(Evaluation {
            examples: 7,
            loss: 0.5,
            auc: None,
            tally: Tally {
                confusion: vec![3, 1, 1, 2],
                residuals: None,
            },
        })
    }
}

const TRAINING: &str = "learning_rate = 0.1\nbatch_size = 8\nlocal_steps = 2\n";

/// The project's PKI: a CA, the coordinator and `sites`, each with its bundle.
struct Pki {
    dir: tempfile::TempDir,
    sites: Vec<String>,
}

impl Pki {
    fn new(sites: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        pki::provision_sites(dir.path(), sites);
        Pki {
            dir,
            sites: sites.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join("pki").join(p)
    }

    fn der(&self, p: &str) -> Vec<u8> {
        pki::cert_der(&self.path(p))
    }

    fn coordinator_key(&self) -> SigningKey {
        pki::signing_key(&self.path("coordinator/key.pem"))
    }

    /// The federation manifest's digest: the context every round runs under.
    fn manifest_context(&self) -> [u8; 32] {
        pki::manifest_digest(&self.path(""))
    }

    /// The configuration of `site`'s agent, its ledger in `state`; `policy` lines replace
    /// the four-hospital policy.
    fn config(&self, site: &str, state: &Path, policy: &str) -> AgentConfig {
        let bundle = self.path(&format!("sites/{site}"));
        let p = |f: &str| bundle.join(f).display().to_string();
        let manifest = self.path("manifest.toml").display().to_string();
        AgentConfig::parse(&format!(
            r#"
site = "{site}"
state_dir = {state:?}
[coordinator]
url = "https://localhost:1"
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
manifest = {manifest:?}
[data]
csv = "unused.csv"
[policy]
{policy}
"#,
            state = state.display().to_string(),
            ca = p("ca.pem"),
            cert = p("cert.pem"),
            key = p("key.pem"),
        ))
        .unwrap()
    }
}

/// The four-hospital policy: every other site of a neighbourhood of four live.
const FOUR: &str = "min_sites = 3\nmin_live_neighbours = 2\n";

/// One site: its machine and what it sent. The machine borrows its configuration, data,
/// credentials and ledger for as long as the session lives; a test leaks them, and
/// "restarts" a site by leaking fresh ones opened from the same files.
struct Site {
    name: String,
    id: ClientId,
    cfg: &'static AgentConfig,
    machine: Machine<'static>,
    sent: Vec<agent_message::Kind>,
    /// A SecAgg+ reply being reassembled from its chunks.
    partial: Vec<u8>,
    /// Whether jobs wait for [`Site::release`] instead of finishing at once.
    hold: bool,
    held: Vec<Action>,
}

/// The time every machine is told: the certificates' validity is checked against it, so a
/// test can also move it past their end.
fn now() -> i64 {
    crate::credentials::now_unix()
}

impl Site {
    fn open(
        pki: &Pki,
        name: &str,
        id: ClientId,
        state: &Path,
        policy: &str,
        stats: Vec<u64>,
    ) -> Site {
        Self::open_with(pki, name, id, state, policy, Fixed::new(stats))
    }

    fn open_with(
        pki: &Pki,
        name: &str,
        id: ClientId,
        state: &Path,
        policy: &str,
        fixed: Fixed,
    ) -> Site {
        std::fs::create_dir_all(state).unwrap();
        let cfg: &'static AgentConfig = Box::leak(Box::new(pki.config(name, state, policy)));
        let data: &'static Arc<dyn LocalSite> =
            Box::leak(Box::new(Arc::new(fixed) as Arc<dyn LocalSite>));
        let creds = Box::leak(Box::new(crate::credentials::load_credentials(cfg).unwrap()));
        let ledger = Box::leak(Box::new(Ledger::open(&cfg.state_dir()).unwrap()));
        let faults = Box::leak(Box::new(Injector::new(&cfg.faults)));
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&id.to_le_bytes());
        let mut site = Site {
            name: name.to_string(),
            id,
            cfg,
            machine: Machine::new(cfg, data, creds, ledger, faults, seed),
            sent: Vec::new(),
            partial: Vec::new(),
            hold: false,
            held: Vec::new(),
        };
        site.welcome(pki);
        site
    }

    /// Hands the machine `input`, runs its jobs at once (as the driver's threads would) —
    /// or, with `hold`, when [`Site::release`] is called — and keeps what it sends. Returns
    /// the machine's verdict on the session.
    fn handle(&mut self, input: Input) -> Result<()> {
        let mut result = self.machine.handle(now(), input);
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Send(kind) => self.sent.push(kind),
                job @ (Action::Train(_) | Action::Evaluate(_)) if self.hold => self.held.push(job),
                job @ (Action::Train(_) | Action::Evaluate(_)) => {
                    result = result.and(self.finish(job));
                }
                #[cfg(feature = "faults")]
                Action::Pause(_) => {}
                Action::Shutdown => {}
            }
        }
        result
    }

    /// Runs a job and hands its result to the machine.
    fn finish(&mut self, job: Action) -> Result<()> {
        let data = self.machine.data;
        let done = match job {
            Action::Train(job) => Input::Trained {
                round: job.round,
                attempt: job.attempt,
                result: data.train(
                    &job.spec,
                    &job.params,
                    (&job.mean, &job.std),
                    &job.training,
                    job.seed,
                ),
            },
            Action::Evaluate(job) => Input::Evaluated {
                round: job.round,
                attempt: job.attempt,
                result: data.evaluate(&job.spec, &job.params, (&job.mean, &job.std)),
            },
            _ => return Ok(()),
        };
        self.handle(done)
    }

    /// Finishes the jobs held back so far: their results arrive now, after whatever the
    /// coordinator sent meanwhile (the SecAgg+ set-up, the keys).
    fn release(&mut self) -> Result<()> {
        let mut result = Ok(());
        for job in std::mem::take(&mut self.held) {
            result = result.and(self.finish(job));
        }
        result
    }

    fn message(&mut self, kind: coordinator_message::Kind) -> Result<()> {
        self.handle(Input::Message(kind))
    }

    fn welcome(&mut self, pki: &Pki) {
        self.message(coordinator_message::Kind::Welcome(Welcome {
            site_id: self.id,
            protocol_version: cohort_proto::PROTOCOL_VERSION,
            coordinator_certificate: pki.der("coordinator/cert.pem"),
            crl: Vec::new(),
            manifest: std::fs::read(pki.path("manifest.toml")).unwrap(),
        }))
        .unwrap();
    }

    fn secagg(&mut self, msg: &ServerMessage) -> Result<()> {
        self.message(coordinator_message::Kind::Secagg(Chunk {
            data: Bytes::from(msg.encode()),
            last: true,
        }))
    }

    /// The declines sent since the last call, and the SecAgg+ replies, decoded.
    fn drain<W: Word>(&mut self) -> (Vec<Decline>, Vec<ClientMessage<W>>) {
        let mut declines = Vec::new();
        let mut replies = Vec::new();
        for kind in std::mem::take(&mut self.sent) {
            match kind {
                agent_message::Kind::Decline(d) => declines.push(d),
                agent_message::Kind::Secagg(c) | agent_message::Kind::MaskedInput(c) => {
                    self.partial.extend_from_slice(&c.data);
                    if c.last {
                        let bytes = std::mem::take(&mut self.partial);
                        replies.push(ClientMessage::<W>::decode(&bytes).unwrap());
                    }
                }
                _ => {}
            }
        }
        (declines, replies)
    }

    fn declines(&mut self) -> Vec<Decline> {
        self.drain::<u64>().0
    }
}

/// Cleveland's machine alone (id 0), its ledger under `state`.
fn cleveland(pki: &Pki, state: &Path, policy: &str) -> Site {
    Site::open(pki, "cleveland", 0, &state.join("c"), policy, stats_of(0))
}

/// A round start as an honest coordinator announces it.
fn start(round: u64, attempt: u32, task: Task, model: &[u8], pki: &Pki) -> RoundStart {
    let sha = model::sha3_512(model);
    RoundStart {
        round,
        attempt,
        task: task as i32,
        secure: true,
        model_sha3_512: if model.is_empty() {
            Vec::new()
        } else {
            sha.to_vec()
        },
        model_bytes: model.len() as u64,
        training_toml: if model.is_empty() {
            String::new()
        } else {
            TRAINING.into()
        },
        feature_mean: Vec::new(),
        feature_std: Vec::new(),
        model_signature: if model.is_empty() {
            Vec::new()
        } else {
            model::sign_model(&pki.coordinator_key(), &sha).to_vec()
        },
        manifest: std::fs::read(pki.path("manifest.toml")).unwrap(),
    }
}

/// The context of the round `start` and `setup` describe, as the coordinator computes it.
fn context(pki: &Pki, start: &RoundStart, setup: &Setup) -> [u8; 32] {
    let announced = Announcement {
        round: start.round,
        attempt: start.attempt,
        task: start.task,
        secure: start.secure,
        model_sha3_512: &start.model_sha3_512,
        training_toml: &start.training_toml,
        feature_mean: &start.feature_mean,
        feature_std: &start.feature_std,
    }
    .digest(&pki.manifest_context());
    round_context(&announced, setup)
}

fn model_chunk(model: &[u8]) -> coordinator_message::Kind {
    coordinator_message::Kind::Model(Chunk {
        data: Bytes::copy_from_slice(model),
        last: true,
    })
}

/// What a whole SecAgg+ round of `sites` against the real server came to.
struct Ran<W: Word> {
    result: Result<Output<W>, cohort_protocols::secagg::Abort>,
    declines: BTreeMap<String, Vec<Decline>>,
}

/// Runs a round attempt of `roster` (ids into `sites`; ids listed but not among `sites`
/// never answer) through the real server: every site is sent `start`, then the server's
/// messages, and the server gets every reply.
fn run_round<W: Word>(
    pki: &Pki,
    sites: &mut [Site],
    roster: &[ClientId],
    params: Params,
    start: &RoundStart,
    model: &[u8],
) -> Ran<W> {
    let names: Vec<(ClientId, String)> = roster
        .iter()
        .map(|&id| (id, pki.sites[id as usize].clone()))
        .collect();
    let graph_seed = [start.attempt as u8 + 1; 32];
    let probe = Setup::new(
        RoundId::new(start.round, start.attempt),
        params.clone(),
        graph_seed,
        &names,
    );
    let round = RoundId::new(start.round, start.attempt).with_context(context(pki, start, &probe));
    let verifier = Arc::new(CaVerifier::new(pki.der("ca.pem"), now()).unwrap());
    let (mut server, setup) = Server::<W>::new(
        params,
        round,
        &names,
        graph_seed,
        verifier,
        StageTimeouts::default(),
        0,
    )
    .unwrap();
    let mut declines: BTreeMap<String, Vec<Decline>> = BTreeMap::new();
    let mut outbox: Vec<(ClientId, ServerMessage)> = roster
        .iter()
        .map(|&id| (id, ServerMessage::Setup(setup.clone())))
        .collect();
    for site in sites.iter_mut().filter(|s| roster.contains(&s.id)) {
        site.message(coordinator_message::Kind::RoundStart(start.clone()))
            .unwrap();
        if !model.is_empty() {
            site.message(model_chunk(model)).unwrap();
        }
    }
    let mut now = 0;
    loop {
        for (to, msg) in outbox.drain(..) {
            let Some(site) = sites.iter_mut().find(|s| s.id == to) else {
                continue;
            };
            site.secagg(&msg).unwrap();
        }
        // Held jobs finish after the set-up (or a later message): the order in which a
        // slow training meets the key exchange.
        for site in sites.iter_mut() {
            site.release().unwrap();
        }
        for site in sites.iter_mut() {
            let (d, replies) = site.drain::<W>();
            declines.entry(site.name.clone()).or_default().extend(d);
            for reply in replies {
                let _ = server.receive(site.id, reply, now);
            }
        }
        match server.poll(now) {
            Ok(Poll::Pending { deadline }) => now = deadline,
            Ok(Poll::Send(msgs)) => outbox = msgs,
            Ok(Poll::Done(out)) => {
                return Ran {
                    result: Ok(*out),
                    declines,
                };
            }
            Err(abort) => {
                return Ran {
                    result: Err(abort),
                    declines,
                };
            }
        }
    }
}

const HOSPITALS: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

fn stats_of(id: ClientId) -> Vec<u64> {
    (0..6)
        .map(|i| u64::MAX / 3 + 1_000 * id as u64 + i)
        .collect()
}

fn hospitals(pki: &Pki, state: &Path, policy: &str) -> Vec<Site> {
    HOSPITALS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Site::open(
                pki,
                name,
                i as ClientId,
                &state.join(name),
                policy,
                stats_of(i as ClientId),
            )
        })
        .collect()
}

fn stats_params(sites: u32) -> Params {
    Params {
        modulus: Modulus::Bits64,
        consistency_check: true,
        ..Params::with_defaults(sites, 4)
    }
}

/// Four machines and the real server: the exact sum of the four statistics vectors, modulo
/// 2^64, and each ledger holds the contribution with its survivors.
#[test]
fn four_machines_and_the_real_server_sum_their_statistics_exactly() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut sites = hospitals(&pki, state.path(), FOUR);
    let start = start(0, 0, Task::Stats, &[], &pki);
    let ran = run_round::<u64>(
        &pki,
        &mut sites,
        &[0, 1, 2, 3],
        stats_params(4),
        &start,
        &[],
    );
    let out = ran.result.unwrap();
    let expected: Vec<u64> = (0..6)
        .map(|i| (0..4).fold(0u64, |s, id| s.wrapping_add(stats_of(id)[i])))
        .collect();
    assert_eq!(out.sum.to_vec(), expected);
    assert_eq!(out.survivors, vec![0, 1, 2, 3]);
    assert!(
        ran.declines.values().all(Vec::is_empty),
        "{:?}",
        ran.declines
    );
    for site in &sites {
        let c = site.machine.ledger.contributed().unwrap();
        assert_eq!((c.round, c.attempt), (0, 0));
        assert_eq!(c.survivors.as_ref().unwrap().len(), 4);
    }
}

/// Differencing (issue 20, attack 2): after a complete attempt, a second attempt of the same
/// round without one site would give that site's input as the difference of the sums. Every
/// site refuses it when it sees the other survivors, before it signs or reveals anything —
/// also after a restart between the attempts, from the ledger on disk.
#[test]
fn a_second_attempt_over_other_survivors_is_refused_even_after_a_restart() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut sites = hospitals(&pki, state.path(), FOUR);
    let first = start(5, 0, Task::Stats, &[], &pki);
    let ran = run_round::<u64>(
        &pki,
        &mut sites,
        &[0, 1, 2, 3],
        stats_params(4),
        &first,
        &[],
    );
    assert!(ran.result.is_ok());
    // Every agent restarts: new machines over the same ledgers.
    let mut sites = hospitals(&pki, state.path(), FOUR);
    let second = start(5, 1, Task::Stats, &[], &pki);
    // va is listed and never answers: the other three are what the coordinator differences.
    let ran = run_round::<u64>(
        &pki,
        &mut sites[..3],
        &[0, 1, 2, 3],
        stats_params(4),
        &second,
        &[],
    );
    assert!(
        ran.result.is_err(),
        "the server got a sum: {:?}",
        ran.result
    );
    for name in &HOSPITALS[..3] {
        let d = &ran.declines[*name];
        assert_eq!(d.len(), 1, "{name}: {d:?}");
        assert_eq!(d[0].contributed_round, Some(5));
        assert!(
            d[0].reason
                .contains("a redo is answered only over the same survivors"),
            "{}",
            d[0].reason
        );
    }
    // The ledger still binds the round to the first attempt's four survivors, so a third
    // attempt over all four is answered, with the first attempt's sum exactly.
    for site in &sites[..3] {
        assert_eq!(
            site.machine
                .ledger
                .contributed()
                .unwrap()
                .survivors
                .as_ref()
                .unwrap()
                .len(),
            4
        );
    }
    let third = start(5, 2, Task::Stats, &[], &pki);
    let ran = run_round::<u64>(
        &pki,
        &mut sites,
        &[0, 1, 2, 3],
        stats_params(4),
        &third,
        &[],
    );
    let expected: Vec<u64> = (0..6)
        .map(|i| (0..4).fold(0u64, |s, id| s.wrapping_add(stats_of(id)[i])))
        .collect();
    assert_eq!(ran.result.unwrap().sum.to_vec(), expected);
    // An earlier round is refused at its start.
    let mut late = Site::open(&pki, "va", 3, &state.path().join("va"), FOUR, stats_of(3));
    late.message(coordinator_message::Kind::RoundStart(start(
        4,
        0,
        Task::Stats,
        &[],
        &pki,
    )))
    .unwrap();
    assert_eq!(late.declines()[0].contributed_round, Some(5));
}

/// The redo after a coordinator crash: the same attempt again over the same four survivors
/// gives exactly the same sum, which tells the coordinator nothing new. Some sites finish
/// training before the round's set-up arrives, others after it: the input goes into the
/// protocol either way (a set-up during training once lost the training result).
#[test]
fn a_redo_over_the_same_survivors_gives_the_same_sum() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut sites = hospitals(&pki, state.path(), FOUR);
    let model = model::to_bytes(&[0.0, 0.0, 0.0]);
    let train = |attempt| start(1, attempt, Task::Train, &model, &pki);
    let params = Params {
        consistency_check: true,
        ..Params::with_defaults(4, 3)
    };
    // Two sites finish training before the SecAgg+ set-up arrives, two after it.
    sites[0].hold = true;
    sites[2].hold = true;
    let a = run_round::<u32>(
        &pki,
        &mut sites,
        &[0, 1, 2, 3],
        params.clone(),
        &train(0),
        &model,
    );
    let mut sites = hospitals(&pki, state.path(), FOUR);
    sites[1].hold = true;
    sites[3].hold = true;
    let b = run_round::<u32>(&pki, &mut sites, &[0, 1, 2, 3], params, &train(1), &model);
    let (a, b) = (a.result.unwrap(), b.result.unwrap());
    assert_eq!(a.sum.to_vec(), b.sum.to_vec());
    // The weights sum exactly: four sites of ten examples.
    assert_eq!(
        a.sum.to_vec()[cohort_protocols::secagg::quant::WEIGHT_INDEX],
        40
    );
}

/// Withheld advertisements (issue 20, attack 3): a set-up listing five sites of which only
/// three take part looks like two dropouts, and the threshold (3) is still met. A site
/// requiring three live others refuses at the key exchange, before it shares a key.
#[test]
fn a_round_with_fewer_live_neighbours_than_the_policy_asks_is_refused_at_the_key_exchange() {
    let names = ["a1", "a2", "a3", "a4", "a5"];
    let pki = Pki::new(&names);
    let state = tempfile::tempdir().unwrap();
    let policy = "min_sites = 3\nmin_live_neighbours = 3\nmax_colluders = 0\n";
    let mut sites: Vec<Site> = (0..3)
        .map(|i| {
            Site::open(
                &pki,
                names[i],
                i as ClientId,
                &state.path().join(names[i]),
                policy,
                stats_of(i as ClientId),
            )
        })
        .collect();
    let start = start(0, 0, Task::Stats, &[], &pki);
    let params = Params {
        neighbours: 5,
        threshold: 3,
        ..stats_params(5)
    };
    let ran = run_round::<u64>(&pki, &mut sites, &[0, 1, 2, 3, 4], params, &start, &[]);
    assert!(ran.result.is_err());
    for name in &names[..3] {
        let d = &ran.declines[*name];
        assert_eq!(d.len(), 1, "{name}: {d:?}");
        assert!(
            d[0].reason.contains("only 2 other live sites")
                && d[0].reason.contains("AwaitingNeighbourKeys"),
            "{}",
            d[0].reason
        );
    }
    for site in &sites {
        assert!(site.machine.ledger.contributed().is_none());
    }
}

/// Per-site rounds (issue 20, attack 1): a site told other training settings than the round
/// its set-up was built for computes another context and refuses the set-up, naming it.
#[test]
fn a_site_told_another_round_than_its_peers_refuses_the_set_up() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut site = cleveland(&pki, state.path(), FOUR);
    let model = model::to_bytes(&[0.0, 0.0, 0.0]);
    let honest = start(1, 0, Task::Train, &model, &pki);
    let mut told = honest.clone();
    told.training_toml = "learning_rate = 0.5\nbatch_size = 8\nlocal_steps = 2\n".into();
    let names: Vec<(ClientId, String)> = (0..4)
        .map(|i| (i, HOSPITALS[i as usize].to_string()))
        .collect();
    let params = Params::with_defaults(4, 3);
    let mut setup = Setup::new(RoundId::new(1, 0), params, [1; 32], &names);
    setup.round = setup.round.with_context(context(&pki, &honest, &setup));
    site.message(coordinator_message::Kind::RoundStart(told))
        .unwrap();
    site.message(model_chunk(&model)).unwrap();
    site.secagg(&ServerMessage::Setup(setup)).unwrap();
    let d = site.declines();
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].reason.contains("context"), "{}", d[0].reason);
    assert!(site.drain::<u32>().1.is_empty(), "no key left the site");
}

/// The agent validates the training settings it is sent, before it trains.
#[test]
fn invalid_training_settings_are_refused_before_any_work() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let policy = format!("{FOUR}learning_rate = [0.001, 1.0]\n");
    let mut site = cleveland(&pki, state.path(), &policy);
    let model = model::to_bytes(&[0.0, 0.0, 0.0]);
    for (training, named) in [
        (
            "learning_rate = 0.1\nbatch_size = 0\nlocal_steps = 2\n",
            "batch_size = 0",
        ),
        (
            "learning_rate = -1.0\nbatch_size = 8\nlocal_steps = 2\n",
            "learning_rate = -1",
        ),
        (
            "learning_rate = 1e-30\nbatch_size = 8\nlocal_steps = 2\n",
            "policy.learning_rate",
        ),
        ("learning_rate = \"fast\"\n", "do not parse"),
    ] {
        let mut s = start(1, 0, Task::Train, &model, &pki);
        s.training_toml = training.into();
        site.message(coordinator_message::Kind::RoundStart(s))
            .unwrap();
        site.message(model_chunk(&model)).unwrap();
        let d = site.declines();
        assert_eq!(d.len(), 1, "{training}: {d:?}");
        assert!(d[0].reason.contains(named), "{training}: {}", d[0].reason);
        assert!(site.machine.round.is_none());
    }
}

/// Evaluation with limits (issue 20, attack 5): a model is evaluated once; asked again in the
/// same round the site sends the same report unevaluated; in a later round, or a model
/// out of order, it declines.
#[test]
fn evaluation_of_the_same_model_twice_or_out_of_order_is_declined() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut site = cleveland(&pki, state.path(), FOUR);
    let a = model::to_bytes(&[0.0, 0.0, 0.0]);
    let b = model::to_bytes(&[1.0, 0.0, 0.0]);
    let evaluate = |site: &mut Site, round: u64, model: &[u8]| {
        let mut s = start(round, 0, Task::Evaluate, model, &pki);
        s.secure = false;
        site.message(coordinator_message::Kind::RoundStart(s))
            .unwrap();
        site.message(model_chunk(model)).unwrap();
        std::mem::take(&mut site.sent)
    };
    let reports = |sent: &[agent_message::Kind]| -> Vec<EvalReport> {
        sent.iter()
            .filter_map(|k| match k {
                agent_message::Kind::Eval(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    };
    let first = reports(&evaluate(&mut site, 3, &a));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].confusion, vec![3, 1, 1, 2]);
    // The same round asks again (a coordinator that restarted): the same report.
    assert_eq!(reports(&evaluate(&mut site, 3, &a)), first);
    for (round, model, named) in [(4, &a, "already evaluated this model"), (2, &b, "order")] {
        let sent = evaluate(&mut site, round, model);
        let declined: Vec<&Decline> = sent
            .iter()
            .filter_map(|k| match k {
                agent_message::Kind::Decline(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(declined.len(), 1, "{sent:?}");
        assert!(declined[0].reason.contains(named), "{}", declined[0].reason);
        assert!(reports(&sent).is_empty());
    }
}

/// The site's counts are coarsened as its policy says before they leave.
#[test]
fn evaluation_counts_are_coarsened_by_the_site_granularity() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let policy = format!("{FOUR}evaluation_granularity = 5\n");
    let mut site = cleveland(&pki, state.path(), &policy);
    let model = model::to_bytes(&[0.0, 0.0, 0.0]);
    let mut s = start(1, 0, Task::Evaluate, &model, &pki);
    s.secure = false;
    site.message(coordinator_message::Kind::RoundStart(s))
        .unwrap();
    site.message(model_chunk(&model)).unwrap();
    let report = site
        .sent
        .iter()
        .find_map(|k| match k {
            agent_message::Kind::Eval(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(report.confusion, vec![5, 0, 0, 0]);
}

/// The site's role and `require_secure` hold whatever the coordinator asks.
#[test]
fn an_evaluation_site_does_not_train_and_a_secure_only_site_sends_nothing_in_clear() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut evaluator = cleveland(&pki, state.path(), FOUR);
    let evaluator_cfg = AgentConfig {
        role: Role::Evaluate,
        ..evaluator.cfg.clone()
    };
    evaluator.cfg = Box::leak(Box::new(evaluator_cfg));
    evaluator.machine.cfg = evaluator.cfg;
    evaluator
        .message(coordinator_message::Kind::RoundStart(start(
            0,
            0,
            Task::Stats,
            &[],
            &pki,
        )))
        .unwrap();
    let d = evaluator.declines();
    assert!(d[0].reason.contains("only evaluates"), "{}", d[0].reason);

    let mut careful = Site::open(
        &pki,
        "hungary",
        1,
        &state.path().join("h"),
        &format!("{FOUR}require_secure = true\n"),
        stats_of(1),
    );
    let mut plain = start(0, 0, Task::Stats, &[], &pki);
    plain.secure = false;
    careful
        .message(coordinator_message::Kind::RoundStart(plain))
        .unwrap();
    let sent = std::mem::take(&mut careful.sent);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        matches!(&sent[0], agent_message::Kind::Decline(d) if d.reason.contains("policy.require_secure"))
    );
}

/// A model whose bytes do not hash to the announced model is refused, not trained.
#[test]
fn a_model_that_is_not_the_announced_one_is_refused() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut site = cleveland(&pki, state.path(), FOUR);
    let model = model::to_bytes(&[0.0, 0.0, 0.0]);
    site.message(coordinator_message::Kind::RoundStart(start(
        1,
        0,
        Task::Train,
        &model,
        &pki,
    )))
    .unwrap();
    site.message(model_chunk(&model::to_bytes(&[9.0, 0.0, 0.0])))
        .unwrap();
    let d = site.declines();
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(site.machine.round.is_none());
}

/// A revocation list the CA did not sign ends the session: the coordinator is lying or not
/// the project's.
#[test]
fn a_welcome_with_a_revocation_list_the_ca_did_not_sign_ends_the_session() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut site = cleveland(&pki, state.path(), FOUR);
    let e = site
        .message(coordinator_message::Kind::Welcome(Welcome {
            site_id: 0,
            protocol_version: cohort_proto::PROTOCOL_VERSION,
            coordinator_certificate: pki.der("coordinator/cert.pem"),
            crl: vec![0x30, 0x03, 0x02, 0x01, 0x00],
            manifest: Vec::new(),
        }))
        .unwrap_err();
    assert!(format!("{e:#}").contains("bad revocation list"), "{e:#}");
    assert!(e.downcast_ref::<Permanent>().is_some());
}

/// Time is the machine's input: a Welcome at a time past the coordinator certificate's end
/// is refused, one within it is not.
#[test]
fn a_coordinator_certificate_is_checked_at_the_time_the_machine_is_given() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut site = cleveland(&pki, state.path(), FOUR);
    let welcome = coordinator_message::Kind::Welcome(Welcome {
        site_id: 0,
        protocol_version: cohort_proto::PROTOCOL_VERSION,
        coordinator_certificate: pki.der("coordinator/cert.pem"),
        crl: Vec::new(),
        manifest: Vec::new(),
    });
    let later = now() + i64::from(DEFAULT_VALIDITY_DAYS + 1) * 86_400;
    let e = site
        .machine
        .handle(later, Input::Message(welcome.clone()))
        .unwrap_err();
    assert!(format!("{e:#}").contains("not valid at this time"), "{e:#}");
    site.machine.handle(now(), Input::Message(welcome)).unwrap();
}

/// Results of a job for a round the site no longer runs are dropped, and a set-up before
/// Welcome ends the session.
#[test]
fn a_stale_training_result_is_dropped_and_a_set_up_before_welcome_ends_the_session() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let mut site = cleveland(&pki, state.path(), FOUR);
    site.handle(Input::Trained {
        round: 7,
        attempt: 0,
        result: Ok(vec![1.0; 3]),
    })
    .unwrap();
    assert!(site.sent.is_empty());

    let mut fresh = Site::open(
        &pki,
        "hungary",
        1,
        &state.path().join("h"),
        FOUR,
        stats_of(1),
    );
    fresh.machine.site_id = None;
    let s = start(0, 0, Task::Stats, &[], &pki);
    let names: Vec<(ClientId, String)> = (0..4)
        .map(|i| (i, HOSPITALS[i as usize].to_string()))
        .collect();
    let mut setup = Setup::new(RoundId::new(0, 0), stats_params(4), [1; 32], &names);
    setup.round = setup.round.with_context(context(&pki, &s, &setup));
    fresh
        .message(coordinator_message::Kind::RoundStart(s))
        .unwrap();
    let e = fresh.secagg(&ServerMessage::Setup(setup)).unwrap_err();
    assert!(e.to_string().contains("before Welcome"), "{e}");
}

/// An injected truncation sends a masked input one element short; only in a build with the
/// `faults` feature.
#[cfg(feature = "faults")]
#[test]
fn a_truncate_fault_sends_a_masked_input_one_short() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let policy =
        format!("{FOUR}\n[[faults]]\nround = 0\nstage = \"masked_input\"\naction = \"truncate\"\n");
    let mut sites: Vec<Site> = HOSPITALS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = if i == 0 { policy.as_str() } else { FOUR };
            Site::open(
                &pki,
                name,
                i as ClientId,
                &state.path().join(name),
                p,
                stats_of(i as ClientId),
            )
        })
        .collect();
    let start = start(0, 0, Task::Stats, &[], &pki);
    let ran = run_round::<u64>(
        &pki,
        &mut sites,
        &[0, 1, 2, 3],
        stats_params(4),
        &start,
        &[],
    );
    let out = ran.result.unwrap();
    assert_eq!(out.dropped, vec![0]);
    assert_eq!(out.survivors, vec![1, 2, 3]);
}

/// A site training with DP-SGD tells the coordinator its spend before its update; a site
/// whose budget refuses the round declines with its accountant's figures, so the coordinator
/// stops asking it; a failure with budget left declines without them.
#[test]
fn a_private_site_reports_its_spend_and_declines_over_its_budget_with_the_figures() {
    let pki = Pki::new(&HOSPITALS);
    let state = tempfile::tempdir().unwrap();
    let policy = format!("{FOUR}require_secure = false\n");
    let model = model::to_bytes(&[0.0, 0.0, 0.0]);
    let mut plain = start(1, 0, Task::Train, &model, &pki);
    plain.secure = false;
    let spent = crate::PrivacyReport {
        epsilon: 1.5,
        delta: 1e-5,
        budget: 3.0,
        next_epsilon: Some(2.25),
        noise_multiplier: 2.0,
    };
    let run = |name: &str, fixed: Fixed| {
        let mut site = Site::open_with(&pki, name, 0, &state.path().join(name), &policy, fixed);
        site.message(coordinator_message::Kind::RoundStart(plain.clone()))
            .unwrap();
        site.message(model_chunk(&model)).unwrap();
        site.sent
    };

    let sent = run(
        "cleveland",
        Fixed {
            privacy: Some(spent),
            ..Fixed::new(stats_of(0))
        },
    );
    let told = sent
        .iter()
        .position(|k| matches!(k, agent_message::Kind::Privacy(_)))
        .expect("the spend is reported");
    let update = sent
        .iter()
        .position(|k| matches!(k, agent_message::Kind::PlainUpdate(_)))
        .expect("the update is sent");
    assert!(told < update);
    assert_eq!(
        sent[told],
        agent_message::Kind::Privacy(PrivacySpent {
            epsilon: 1.5,
            delta: 1e-5,
            budget: 3.0,
            next_epsilon: Some(2.25),
            noise_multiplier: 2.0,
        })
    );

    let over = crate::PrivacyReport {
        next_epsilon: Some(3.2),
        ..spent
    };
    let sent = run(
        "hungary",
        Fixed {
            privacy: Some(over),
            refuse: Some("privacy budget: this round would take ε from 1.5 to 3.2".into()),
            ..Fixed::new(stats_of(0))
        },
    );
    let [agent_message::Kind::Decline(d)] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    assert!(d.reason.contains("privacy budget"), "{}", d.reason);
    assert_eq!(d.privacy.as_ref().map(|p| p.next_epsilon), Some(Some(3.2)));

    let sent = run(
        "switzerland",
        Fixed {
            privacy: Some(spent),
            refuse: Some("out of memory".into()),
            ..Fixed::new(stats_of(0))
        },
    );
    let [agent_message::Kind::Decline(d)] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    assert_eq!(d.privacy, None);
}

/// A site whose training is not deterministic (DP-SGD) sends another update when a round is
/// redone. Its site-level noise must be a fresh draw then: were it the same draw, the
/// difference of the two inputs would be the two updates' difference with no noise left.
/// The same update, on the other hand, gets the same noise (a redo says nothing new).
#[test]
fn a_redo_with_another_update_gets_fresh_site_level_noise() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let model = [1u8; 64];
    let params = cohort_protocols::secagg::Params {
        noise: Some(cohort_protocols::secagg::Noise {
            sigma: 1000.0,
            min_survivors: 3,
        }),
        ..cohort_protocols::secagg::Params::with_defaults(3, 2000)
    };
    let first: Vec<f32> = (0..2000).map(|i| (i % 13) as f32 * 1e-3).collect();
    let second: Vec<f32> = first.iter().map(|v| v + 1e-4).collect();
    let input = |delta: &[f32]| {
        let mut rng = ChaCha20Rng::from_seed(rounding_seed(&key, 5, &model, delta));
        let (q, _) = quantise::<u64, _>(&params, delta, 1, &mut rng).unwrap();
        q.values()[2..]
            .iter()
            .map(|v| *v as i64)
            .collect::<Vec<i64>>()
    };
    assert_eq!(input(&first), input(&first));
    // (input₂ − input₁) minus the updates' own difference in steps: noise₂ − noise₁ (plus
    // rounding). Independent draws: variance 2σ²; one draw reused: variance below 1.
    let s = 65535.0 / 2.0;
    let (a, b) = (input(&first), input(&second));
    let residual: Vec<f64> = a
        .iter()
        .zip(&b)
        .zip(first.iter().zip(&second))
        .map(|((x, y), (d1, d2))| (y - x) as f64 - f64::from(d2 - d1) * s)
        .collect();
    let var = residual.iter().map(|r| r * r).sum::<f64>() / residual.len() as f64;
    assert!(
        (var / (2.0 * 1000.0 * 1000.0) - 1.0).abs() < 0.15,
        "variance {var}: the noise was not drawn afresh"
    );
}
