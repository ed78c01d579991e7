//! An agent facing a coordinator whose model signature does not verify: it declines the
//! round with a clear reason instead of using the model. The "coordinator" here is a stub
//! gRPC service over mutual TLS with the project's real certificates.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cohort_proto::v1::coordinator_server::Coordinator;
use cohort_proto::v1::{
    AgentMessage, Chunk, CoordinatorMessage, RoundStart, SchemaReply, SchemaRequest, Task, Welcome,
    agent_message, coordinator_message,
};
use cohort_protocols::model;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use cohort_testkit::heart::SITES;
use cohort_testkit::pki::{self, cert_der as pem_der};
use cohort_testkit::stub;

/// Sends Welcome (with the real coordinator certificate) and an evaluation round whose model
/// hash is right but whose signature is `signature`; reports what the agent answers.
struct Stub {
    certificate_der: Vec<u8>,
    signature: Vec<u8>,
    schema: SchemaReply,
    /// Sent after Welcome instead of the evaluation round: a lying coordinator's script.
    attack: Option<Vec<coordinator_message::Kind>>,
    answers: mpsc::UnboundedSender<agent_message::Kind>,
}

#[tonic::async_trait]
impl Coordinator for Stub {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn schema(&self, _: Request<SchemaRequest>) -> Result<Response<SchemaReply>, Status> {
        Ok(Response::new(self.schema.clone()))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let params = vec![0.0f32; 14];
        let bytes = model::to_bytes(&params);
        let send = |kind| CoordinatorMessage { kind: Some(kind) };
        let mut messages = vec![
            send(coordinator_message::Kind::Welcome(Welcome {
                site_id: 0,
                protocol_version: cohort_proto::PROTOCOL_VERSION,
                coordinator_certificate: self.certificate_der.clone(),
                ..Default::default()
            })),
            send(coordinator_message::Kind::RoundStart(RoundStart {
                round: 1,
                task: Task::Evaluate as i32,
                secure: true,
                model_sha3_512: model::sha3_512(&bytes).to_vec(),
                model_bytes: bytes.len() as u64,
                model_signature: self.signature.clone(),
                training_toml: "learning_rate = 0.01\nbatch_size = 4\nlocal_steps = 1\n".into(),
                ..Default::default()
            })),
            send(coordinator_message::Kind::Model(Chunk {
                data: bytes.into(),
                last: true,
            })),
        ];
        if let Some(attack) = &self.attack {
            messages.truncate(1);
            messages.extend(attack.iter().cloned().map(send));
        }
        let answers = self.answers.clone();
        tokio::spawn(async move {
            for m in messages {
                let _ = tx.send(Ok(m)).await;
            }
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(kind) = msg.kind {
                    let _ = answers.send(kind);
                }
            }
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The key at `which` in the PKI.
fn key(pki: &Path, which: &str) -> ed25519_dalek::SigningKey {
    pki::signing_key(&pki.join(which))
}

/// The first answer after Join, for a stub that signs models with `signature` and the schema
/// with the coordinator's key; or how the agent ended, when it never joined.
fn answer_to(signature: impl Fn(&[u8; 64], &Path) -> Vec<u8>) -> agent_message::Kind {
    answer_with(signature, "coordinator/key.pem", None).expect("the agent answers")
}

/// A lying coordinator's script, written once the project's PKI exists (it may use the
/// coordinator's key or a colluding site's).
type Attack<'a> = &'a dyn Fn(&Path) -> Vec<coordinator_message::Kind>;

type PolicyEdit = Box<dyn Fn(&mut cohort_agent::config::Policy)>;

thread_local! {
    /// What the test changes in the agent's policy (nothing, unless a test says so).
    static POLICY: std::cell::RefCell<PolicyEdit> = std::cell::RefCell::new(Box::new(|_| {}));
    /// The round context of the test's federation: set when its PKI is provisioned, before the
    /// attack script (run on the same thread) builds its SecAgg+ set-up.
    static CONTEXT: std::cell::Cell<[u8; 32]> = const { std::cell::Cell::new([0; 32]) };
}

/// Runs `f` with the agent's policy edited by `edit`, then puts the default edit back.
fn under_policy<T>(
    edit: impl Fn(&mut cohort_agent::config::Policy) + 'static,
    f: impl FnOnce() -> T,
) -> T {
    POLICY.with(|p| *p.borrow_mut() = Box::new(edit));
    let out = f();
    POLICY.with(|p| *p.borrow_mut() = Box::new(|_| {}));
    out
}

fn answer_with(
    signature: impl Fn(&[u8; 64], &Path) -> Vec<u8>,
    schema_signer: &str,
    attack: Option<Attack<'_>>,
) -> Result<agent_message::Kind, String> {
    answers_with(signature, schema_signer, attack, 1).map(|mut a| a.remove(0))
}

/// The agent's first `n` answers (or how it ended before giving them).
fn answers_with(
    signature: impl Fn(&[u8; 64], &Path) -> Vec<u8>,
    schema_signer: &str,
    attack: Option<Attack<'_>>,
    n: usize,
) -> Result<Vec<agent_message::Kind>, String> {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::provision(dir.path());
    CONTEXT.with(|c| c.set(pki::manifest_digest(&pki)));
    let hash = model::sha3_512(&model::to_bytes(&[0.0f32; 14]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (answers, mut rx) = mpsc::unbounded_channel();
        let stub = Stub {
            certificate_der: pem_der(&pki.join("coordinator/cert.pem")),
            signature: signature(&hash, &pki),
            schema: stub::schema_reply(&pki, schema_signer),
            attack: attack.map(|script| script(&pki)),
            answers,
        };
        let port = stub::serve(&pki, stub).await;
        let mut cfg = stub::cleveland(&pki, port).build(cohort_agent::AgentConfig::parse);
        POLICY.with(|p| p.borrow()(&mut cfg.policy));
        let mut agent = tokio::spawn(cohort_agent::run(cfg));
        let mut answers = Vec::new();
        let answer = loop {
            tokio::select! {
                kind = rx.recv() => {
                    let kind = kind.expect("an answer");
                    // The agent's own SecAgg+ messages (its key advertisement) are not answers.
                    if !matches!(kind, agent_message::Kind::Join(_) | agent_message::Kind::Secagg(_)) {
                        answers.push(kind);
                        if answers.len() == n {
                            break Ok(std::mem::take(&mut answers));
                        }
                    }
                }
                ended = &mut agent => break Err(format!("{:#}", ended.unwrap().unwrap_err())),
                () = tokio::time::sleep(Duration::from_secs(60)) => panic!("no answer within 60 s"),
            }
        };
        agent.abort();
        answer
    })
}

#[test]
fn a_schema_not_signed_by_the_coordinator_is_refused_before_any_data_is_read() {
    // Signed with a site's key: the agent never joins and gives up (exit 3 in the binary).
    let ended = answer_with(|_, _| Vec::new(), "sites/cleveland/key.pem", None).unwrap_err();
    assert!(
        ended.contains("giving up") && ended.contains("schema from the coordinator is not signed"),
        "{ended}"
    );
}

#[test]
fn a_model_with_a_bad_signature_is_declined_and_a_good_one_is_evaluated() {
    // Signed by another key (a site's): refused.
    let forged = answer_to(|hash, pki| {
        model::sign_model(&key(pki, "sites/cleveland/key.pem"), hash).to_vec()
    });
    match forged {
        agent_message::Kind::Decline(d) => {
            assert_eq!(d.round, 1);
            assert!(
                d.reason
                    .contains("signature does not verify against the coordinator's certificate"),
                "{}",
                d.reason
            );
        }
        other => panic!("expected a Decline, got {other:?}"),
    }
    // No signature at all: refused too.
    let unsigned = answer_to(|_, _| Vec::new());
    assert!(
        matches!(unsigned, agent_message::Kind::Decline(_)),
        "{unsigned:?}"
    );
    // The coordinator's own signature: the model is used (evaluated and reported).
    let signed =
        answer_to(|hash, pki| model::sign_model(&key(pki, "coordinator/key.pem"), hash).to_vec());
    assert!(matches!(signed, agent_message::Kind::Eval(_)), "{signed:?}");
}

/// What the agent answers a coordinator that sends `attack` after Welcome.
fn answer_to_attack(attack: Attack<'_>) -> String {
    match answer_with(|_, _| Vec::new(), "coordinator/key.pem", Some(attack)) {
        Ok(agent_message::Kind::Decline(d)) => d.reason,
        other => panic!("expected a Decline, got {other:?}"),
    }
}

const STATS_TOML: &str = "learning_rate = 0.01\nbatch_size = 4\nlocal_steps = 1\n";

fn stats_round(secure: bool) -> coordinator_message::Kind {
    coordinator_message::Kind::RoundStart(RoundStart {
        round: 0,
        task: Task::Stats as i32,
        secure,
        training_toml: STATS_TOML.into(),
        ..Default::default()
    })
}

/// A SecAgg+ set-up for round 0 with this roster, built with the real server, as the stub
/// sends it and as the protocol type (for building forged peers).
fn setup_with(
    roster: &[(u32, String)],
    consistency_check: bool,
) -> (coordinator_message::Kind, cohort_protocols::secagg::Setup) {
    use cohort_protocols::secagg::{Params, PinnedIdentities, RoundId, Server, ServerMessage};
    let n = roster.len() as u32;
    let params = Params {
        consistency_check,
        modulus: cohort_protocols::secagg::Modulus::Bits64,
        // the statistics vector of the 13-input heart model: 1 + 3 × 13 = 40 = dim + 2
        ..Params::with_defaults(n, 38)
    };
    let (_, mut setup) = Server::<u64>::new(
        params,
        RoundId::new(0, 0),
        roster,
        [7u8; 32],
        std::sync::Arc::new(PinnedIdentities::new(std::iter::empty())),
        Default::default(),
        0,
    )
    .unwrap();
    seal(&mut setup);
    (secagg(ServerMessage::Setup(setup.clone())), setup)
}

/// Gives `setup` the context the real coordinator would: the one of the secure statistics
/// round `stats_round(true)` announces with this very set-up, for a site that pins the
/// federation's manifest. A lying coordinator that edits a set-up seals it again, so the lie
/// reaches the checks behind the context.
fn seal(setup: &mut cohort_protocols::secagg::Setup) {
    let announced = cohort_protocols::round_context::Announcement {
        round: 0,
        attempt: 0,
        task: Task::Stats as i32,
        secure: true,
        model_sha3_512: &[],
        training_toml: STATS_TOML,
        feature_mean: &[],
        feature_std: &[],
    }
    .digest(&CONTEXT.with(|c| c.get()));
    setup.round = setup
        .round
        .with_context(cohort_protocols::round_context::round_context(
            &announced, setup,
        ));
}

fn secagg(msg: cohort_protocols::secagg::ServerMessage) -> coordinator_message::Kind {
    coordinator_message::Kind::Secagg(Chunk {
        data: msg.encode().into(),
        last: true,
    })
}

/// The provisioned sites as a roster (cleveland is 0).
fn roster() -> Vec<(u32, String)> {
    SITES
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u32, s.to_string()))
        .collect()
}

fn setup(n: u32, consistency_check: bool) -> coordinator_message::Kind {
    let roster: Vec<(u32, String)> = (0..n).map(|i| (i, format!("site-{i}"))).collect();
    setup_with(&roster, consistency_check).0
}

/// The key advertisement for roster entry `id`, signed with the key and certificate at
/// `key_path`/`cert_path` in the PKI (the site's own, or the coordinator's or a colluding
/// site's for a forgery): a real protocol client does the signing.
fn advertisement(
    pki: &Path,
    setup: &cohort_protocols::secagg::Setup,
    id: u32,
    key_path: &str,
    cert_path: &str,
) -> cohort_protocols::secagg::AdvertiseKeys {
    use cohort_protocols::secagg::{
        Client, ClientMessage, PinnedIdentities, ServerMessage, SiteIdentity,
    };
    let name = setup.names[setup.participants.iter().position(|p| *p == id).unwrap()].clone();
    let identity = SiteIdentity {
        id,
        name,
        signing_key: key(pki, key_path),
        credential: pem_der(&pki.join(cert_path)),
    };
    let mut forger: Client<u64> = Client::new(
        identity,
        std::sync::Arc::new(PinnedIdentities::new(std::iter::empty())),
        setup.round,
        [id as u8; 32],
    );
    match forger.handle(&ServerMessage::Setup(setup.clone())) {
        Ok(Some(ClientMessage::AdvertiseKeys(a))) => a,
        other => panic!("the forger's set-up: {other:?}"),
    }
}

/// A round whose neighbour keys for cleveland include `forged` in place of one site's.
fn substitution(
    pki: &Path,
    forged_id: u32,
    key_path: &str,
    cert_path: &str,
) -> Vec<coordinator_message::Kind> {
    use cohort_protocols::secagg::{NeighbourKeys, ServerMessage};
    let (kind, setup) = setup_with(&roster(), true);
    let keys = (1..SITES.len() as u32)
        .map(|id| {
            let site = format!("sites/{}", SITES[id as usize]);
            let (own_key, own_cert) = (format!("{site}/key.pem"), format!("{site}/cert.pem"));
            let (key, cert) = if id == forged_id {
                (key_path, cert_path)
            } else {
                (own_key.as_str(), own_cert.as_str())
            };
            advertisement(pki, &setup, id, key, cert)
        })
        .collect();
    vec![
        stats_round(true),
        kind,
        secagg(ServerMessage::NeighbourKeys(NeighbourKeys {
            round: setup.round,
            keys,
            advertisers: Vec::new(),
        })),
    ]
}

#[test]
fn a_coordinator_that_lowers_the_protection_is_refused_by_the_sites_policy() {
    // Downgrade to plain: the site would send its statistics in the clear.
    let reason = answer_to_attack(&|_| vec![stats_round(false)]);
    assert!(reason.contains("policy.require_secure"), "{reason}");
    // Secure, but without the consistency check.
    let reason = answer_to_attack(&|_| vec![stats_round(true), setup(4, false)]);
    assert!(
        reason.contains("policy.require_consistency_check"),
        "{reason}"
    );
}

#[test]
fn a_coordinator_that_substitutes_keys_is_refused_by_the_production_verifier() {
    // The coordinator signs "hungary"'s keys with its own certificate.
    let reason = answer_to_attack(&|pki| {
        substitution(pki, 1, "coordinator/key.pem", "coordinator/cert.pem")
    });
    assert!(
        reason.contains("site 1's identity was not accepted")
            && reason.contains("belongs to the coordinator"),
        "{reason}"
    );
    // A colluding site (switzerland) signs keys for hungary's roster entry with its own
    // certificate.
    let reason = answer_to_attack(&|pki| {
        substitution(
            pki,
            1,
            "sites/switzerland/key.pem",
            "sites/switzerland/cert.pem",
        )
    });
    assert!(
        reason.contains("site 1's identity was not accepted")
            && reason.contains("lists this site as \"hungary\"")
            && reason.contains("\"switzerland\""),
        "{reason}"
    );
}

/// A set-up whose roster the lying coordinator edited after the real server built it.
fn edited_roster(edit: impl Fn(&mut Vec<String>)) -> Vec<coordinator_message::Kind> {
    let (_, mut setup) = setup_with(&roster(), true);
    edit(&mut setup.names);
    seal(&mut setup);
    vec![
        stats_round(true),
        secagg(cohort_protocols::secagg::ServerMessage::Setup(setup)),
    ]
}

#[test]
fn a_roster_that_doubles_a_site_or_lists_the_coordinator_is_refused() {
    // switzerland's certificate would stand for two ids.
    let reason = answer_to_attack(&|_| edited_roster(|n| n[1] = "switzerland".into()));
    assert!(
        reason.contains("roster") && reason.contains("\"switzerland\" is listed twice"),
        "{reason}"
    );
    let reason = answer_to_attack(&|_| edited_roster(|n| n[1] = "cohort-coordinator".into()));
    assert!(
        reason.contains("roster") && reason.contains("the coordinator, as a site"),
        "{reason}"
    );
    // This site listed under another name.
    let reason = answer_to_attack(&|_| edited_roster(|n| n[0] = "elsewhere".into()));
    assert!(
        reason.contains("lists this site (0) as \"elsewhere\"") && reason.contains("\"cleveland\""),
        "{reason}"
    );
}

#[test]
fn a_coordinator_that_chooses_the_neighbour_graph_is_refused() {
    use cohort_protocols::secagg::{NeighbourKeys, ServerMessage};
    // Ten sites: a sparse graph (neighbours 9), whose seed the sites' advertisements fix.
    // The stub cannot know cleveland's advertisement in advance, so whatever advertiser list
    // it picks to steer the graph leaves cleveland's digest out or gets it wrong.
    let ten: Vec<(u32, String)> = (0..10)
        .map(|i| {
            (
                i,
                SITES
                    .get(i as usize)
                    .map_or(format!("site-{i}"), |s| s.to_string()),
            )
        })
        .collect();
    for advertisers in [
        (1..10u32).map(|i| (i, [i as u8; 32])).collect::<Vec<_>>(),
        (0..10u32).map(|i| (i, [i as u8; 32])).collect(),
    ] {
        let reason = answer_to_attack(&|_| {
            let (kind, setup) = setup_with(&ten, true);
            vec![
                stats_round(true),
                kind,
                secagg(ServerMessage::NeighbourKeys(NeighbourKeys {
                    round: setup.round,
                    keys: Vec::new(),
                    advertisers: advertisers.clone(),
                })),
            ]
        });
        assert!(
            reason.contains("seed material is inconsistent")
                && reason.contains("this site's advertisement"),
            "{reason}"
        );
    }
}

/// An evaluation round announcing `announced` bytes with the coordinator's signature of
/// `params`, then `bytes` in chunks of `chunk` bytes.
fn model_round(
    pki: &Path,
    params: &[f32],
    announced: u64,
    bytes: &[u8],
    chunk: usize,
) -> Vec<coordinator_message::Kind> {
    let hash = model::sha3_512(&model::to_bytes(params));
    let mut script = vec![coordinator_message::Kind::RoundStart(RoundStart {
        round: 1,
        task: Task::Evaluate as i32,
        secure: true,
        model_sha3_512: hash.to_vec(),
        model_bytes: announced,
        model_signature: model::sign_model(&key(pki, "coordinator/key.pem"), &hash).to_vec(),
        training_toml: "learning_rate = 0.01\nbatch_size = 4\nlocal_steps = 1\n".into(),
        ..Default::default()
    })];
    let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
    for (i, piece) in pieces.iter().enumerate() {
        script.push(coordinator_message::Kind::Model(Chunk {
            data: piece.to_vec().into(),
            last: i + 1 == pieces.len(),
        }));
    }
    script
}

/// The model is hashed and decoded chunk by chunk as it arrives: chunks cut across values
/// still give the signed model, and a model that differs from what was announced is
/// declined with what was wrong, before it is used.
#[test]
fn a_model_that_differs_from_its_announcement_is_declined_and_odd_chunks_are_fine() {
    let params = [0.25f32; 14];
    let bytes = model::to_bytes(&params);
    let n = bytes.len() as u64;
    // Cut into 3-byte pieces (values straddle chunks): evaluated.
    let answer = answer_with(
        |_, _| Vec::new(),
        "coordinator/key.pem",
        Some(&|pki| model_round(pki, &params, n, &bytes, 3)),
    );
    assert!(
        matches!(answer, Ok(agent_message::Kind::Eval(_))),
        "{answer:?}"
    );
    // One byte changed after signing.
    let mut tampered = bytes.clone();
    tampered[9] ^= 0x40;
    let reason = answer_to_attack(&|pki| model_round(pki, &params, n, &tampered, 16));
    assert!(reason.contains("SHA3-512 does not match"), "{reason}");
    // More bytes than announced: refused at the chunk that overflows.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    let reason = answer_to_attack(&|pki| model_round(pki, &params, n, &longer, 16));
    assert!(
        reason.contains(&format!("larger than the {n} bytes")),
        "{reason}"
    );
    // Fewer: the last chunk ends it short.
    let reason = answer_to_attack(&|pki| model_round(pki, &params, n, &bytes[..52], 16));
    assert!(
        reason.contains(&format!("ended after 52 of the {n} bytes")),
        "{reason}"
    );
    // A size no site could hold: refused at the announcement, before any chunk.
    let reason = answer_to_attack(&|pki| model_round(pki, &params, u64::MAX - 3, &[], 1));
    assert!(reason.contains("cannot set aside memory"), "{reason}");
}

/// An evaluation of `params`, signed by the coordinator, announced as round `round`.
fn evaluation(pki: &Path, round: u64, params: &[f32]) -> Vec<coordinator_message::Kind> {
    let bytes = model::to_bytes(params);
    let mut script = model_round(pki, params, bytes.len() as u64, &bytes, 1 << 16);
    if let Some(coordinator_message::Kind::RoundStart(start)) = script.first_mut() {
        start.round = round;
    }
    script
}

/// What the agent answers two evaluations, `(round, params)` each.
fn two_evaluations(first: (u64, [f32; 14]), second: (u64, [f32; 14])) -> (String, String) {
    let answers = answers_with(
        |_, _| Vec::new(),
        "coordinator/key.pem",
        Some(&|pki| {
            let mut script = evaluation(pki, first.0, &first.1);
            script.extend(evaluation(pki, second.0, &second.1));
            script
        }),
        2,
    )
    .unwrap();
    let text = |k: &agent_message::Kind| match k {
        agent_message::Kind::Eval(e) => format!("evaluated round {}", e.round),
        agent_message::Kind::Decline(d) => format!("declined round {}: {}", d.round, d.reason),
        other => format!("{other:?}"),
    };
    (text(&answers[0]), text(&answers[1]))
}

/// Evaluation reports are counts over a hospital's test rows in clear: a coordinator that
/// could send any signed model any number of times would have a query oracle on them. (Round
/// integrity review: every evaluation was answered.) Each model is evaluated once, in round
/// order, one per round unless the site allows more.
#[test]
fn an_evaluation_of_the_same_model_again_out_of_order_or_beyond_the_limit_is_declined() {
    let a = [0.25f32; 14];
    let b = [0.5f32; 14];
    let (first, again) = two_evaluations((1, a), (2, a));
    assert_eq!(first, "evaluated round 1");
    assert!(
        again.starts_with("declined round 2") && again.contains("already evaluated this model"),
        "{again}"
    );
    let (_, older) = two_evaluations((5, a), (3, b));
    assert!(
        older.starts_with("declined round 3") && older.contains("after round 5"),
        "{older}"
    );
    let (_, second) = two_evaluations((4, a), (4, b));
    assert!(
        second.contains("policy.max_evaluations_per_round = 1"),
        "{second}"
    );
    let (_, allowed) = under_policy(
        |p| p.max_evaluations_per_round = 2,
        || two_evaluations((4, a), (4, b)),
    );
    assert_eq!(allowed, "evaluated round 4");
}

/// A training round announcing `training_toml`, with the model the stub signs.
fn training_round(training_toml: &str) -> Vec<coordinator_message::Kind> {
    vec![coordinator_message::Kind::RoundStart(RoundStart {
        round: 1,
        task: Task::Train as i32,
        secure: true,
        training_toml: training_toml.into(),
        ..Default::default()
    })]
}

/// The agent checks the training settings it is sent as the coordinator's own configuration
/// is checked, and against the learning-rate range its policy sets, before it trains. (Round
/// integrity review: a learning rate of 1e-30 passed, and settings that did not validate were
/// trained with, or ended the session.)
#[test]
fn training_settings_that_do_not_validate_or_leave_the_sites_range_are_declined() {
    let toml = |lr: &str| format!("learning_rate = {lr}\nbatch_size = 4\nlocal_steps = 1\n");
    let reason = answer_to_attack(&|_| training_round(&toml("-1.0")));
    assert!(
        reason.contains("training settings are invalid") && reason.contains("learning_rate = -1"),
        "{reason}"
    );
    let reason = answer_to_attack(&|_| training_round("learning_rate = \"fast\""));
    assert!(reason.contains("do not parse"), "{reason}");
    let reason = under_policy(
        |p| p.learning_rate = Some([1e-6, 1.0]),
        || answer_to_attack(&|_| training_round(&toml("1e-30"))),
    );
    assert!(
        reason.contains("policy.learning_rate") && reason.contains("is outside [0.000001, 1]"),
        "{reason}"
    );
}

/// The site's clipping range: a round with a bound outside it is declined at set-up.
#[test]
fn a_clipping_bound_outside_the_sites_range_is_declined() {
    let reason = under_policy(
        |p| p.clip = Some([0.5, 10.0]),
        || {
            answer_to_attack(&|_| {
                let (_, mut setup) = setup_with(&roster(), true);
                setup.params.clip = 1e6;
                seal(&mut setup);
                vec![
                    stats_round(true),
                    secagg(cohort_protocols::secagg::ServerMessage::Setup(setup)),
                ]
            })
        },
    );
    assert!(
        reason.contains("policy.clip") && reason.contains("1000000"),
        "{reason}"
    );
}

/// The third attack of the round-integrity review: the coordinator lists four sites in the
/// set-up, which passes any policy on the roster, then withholds an honest site's keys, so
/// the agent sees an ordinary dropout and its input is summed with fewer sites than it
/// asked for. The agent counts the neighbours whose keys it verified, and refuses at the key
/// exchange. (Before, the policy counted the roster only.)
#[test]
fn a_round_that_withholds_advertisements_is_refused_at_the_key_exchange() {
    use cohort_protocols::secagg::{NeighbourKeys, ServerMessage};
    let withheld = |pki: &Path| {
        let (kind, setup) = setup_with(&roster(), true);
        // hungary's and switzerland's real keys; va's are withheld.
        let keys = (1..3u32)
            .map(|id| {
                let site = format!("sites/{}", SITES[id as usize]);
                advertisement(
                    pki,
                    &setup,
                    id,
                    &format!("{site}/key.pem"),
                    &format!("{site}/cert.pem"),
                )
            })
            .collect();
        vec![
            stats_round(true),
            kind,
            secagg(ServerMessage::NeighbourKeys(NeighbourKeys {
                round: setup.round,
                keys,
                advertisers: Vec::new(),
            })),
        ]
    };
    // The site asks for all three others of a federation of four.
    let reason = under_policy(
        |p| p.min_live_neighbours = 3,
        || answer_to_attack(&withheld),
    );
    assert!(
        reason.contains("only 2 other live sites") && reason.contains("requires 3"),
        "{reason}"
    );
    // With the agent's default (5 live others; the stub's agent asks for 2), a round of four
    // is refused at its set-up already.
    let default = cohort_agent::config::Policy::default().min_live_neighbours;
    let reason = under_policy(
        move |p| p.min_live_neighbours = default,
        || answer_to_attack(&withheld),
    );
    assert!(
        reason.contains("neighbourhood has 3 other sites")
            && reason.contains("policy.min_live_neighbours"),
        "{reason}"
    );
}
