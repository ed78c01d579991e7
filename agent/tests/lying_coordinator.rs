//! The real agent against a coordinator that lies late in a SecAgg+ round, after the keys are
//! exchanged and the masked input is in: it asks for both shares of a survivor (which would
//! unmask that site's input), or tells the agent a survivor set other than the one the agent
//! signed (equivocation). The "coordinator" is a stub gRPC service over mutual TLS with the
//! project's real certificates, driving the real `Server` state machine with three simulated
//! sites that hold the other hospitals' real identities; only the message to the agent is
//! altered. The agent must refuse with the typed error as its reason.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1::coordinator_server::Coordinator;
use cohort_proto::v1::{
    AgentMessage, Chunk, CoordinatorMessage, RoundStart, SchemaReply, SchemaRequest, Task, Welcome,
    agent_message, coordinator_message,
};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::round_context::{Announcement, round_context};
use cohort_protocols::secagg::{
    Client, ClientMessage, Modulus, Params, Poll, QuantisedInput, RoundId, Server, ServerMessage,
    Setup, SiteIdentity, StageTimeouts, share_digest, sign_share_list,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use cohort_testkit::heart::SITES;
use cohort_testkit::{pki, stub};

/// The lie told in the unmask request to the agent (site 0).
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// None: the harness itself runs an honest round to the end.
    Honest,
    /// Survivor 1 is also listed as dropped: its self-mask share and its mask-key share.
    BothShares,
    /// Survivor 1 is moved to the dropped list after every site signed it as a survivor.
    ChangedSurvivors,
    /// The coordinator flips a bit of site 1's share to the agent.
    TamperedShare,
    /// Site 1 (colluding with nobody: it is simply broken or malicious) sends the agent a
    /// share that does not decrypt, under its own signature.
    GarbageFromPeer,
    /// Site 1's certificate was revoked, and the CRL sent in Welcome says so, but the
    /// coordinator puts site 1 in the round anyway.
    RevokedPeer,
    /// The coordinator's operator holds the CA key and mints a certificate for a new name,
    /// "puppet", and runs it as site 1: a CA-valid certificate the manifest does not list.
    MintedPeer,
    /// As above, but the minted certificate reuses a member's name (hungary) with a new key.
    ReusedName,
    /// The agent alone is told another clipping bound than its peers (clip 1 against 1e6:
    /// the peers' quantised values then sit within a step of the midpoint and the sum minus a
    /// constant is the agent's input), its set-up sealed with the context of what it was told.
    ClipForAgent,
    /// In attempts after the first, site 3 never sends its masked input: the survivors are
    /// the other three.
    DropInRedo,
    /// The agent alone is announced other training settings than its peers.
    TrainingForAgent,
    /// The agent alone is sent other feature statistics than its peers.
    StatisticsForAgent,
    /// The agent alone is announced another model than its peers.
    ModelForAgent,
}

impl Lie {
    /// The round start the agent is sent: its peers', or (the lie) its own.
    fn start_for_agent(self, start: &RoundStart) -> RoundStart {
        let mut own = start.clone();
        match self {
            Lie::TrainingForAgent => {
                own.training_toml = "learning_rate = 0.5\nbatch_size = 4\nlocal_steps = 1\n".into()
            }
            Lie::StatisticsForAgent => {
                own.feature_mean = vec![0.0; 40];
                own.feature_std = vec![1e-3; 40];
            }
            Lie::ModelForAgent => own.model_sha3_512 = vec![9; 64],
            _ => {}
        }
        own
    }
}

/// A certificate the CA key signs outside provisioning (so outside the manifest), as whoever
/// holds `ca.key` can: the key and the DER certificate.
fn mint(pki: &Path, name: &str) -> (ed25519_dalek::SigningKey, Vec<u8>) {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
        KeyUsagePurpose, PKCS_ED25519,
    };
    let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&read("ca.pem"), KeyPair::from_pem(&read("ca.key")).unwrap())
            .unwrap();
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    (
        ed25519_dalek::SigningKey::from_pkcs8_pem(&key.serialize_pem()).unwrap(),
        cert.der().to_vec(),
    )
}

struct Stub {
    pki: std::path::PathBuf,
    schema: SchemaReply,
    lie: Lie,
    /// Sent in Welcome (DER; empty for none).
    crl: Vec<u8>,
    /// The federation manifest, sent in Welcome and the round start; its digest is the
    /// round context.
    manifest: Vec<u8>,
    context: [u8; 32],
    /// The attempts of round 0 each session runs, in order, one plan per session (the
    /// agent reconnects, or is restarted, for the next); [0] once they are used up.
    plans: std::sync::Mutex<std::collections::VecDeque<Vec<u32>>>,
    answers: mpsc::UnboundedSender<Answer>,
}

/// How the agent answered one attempt (or how the honest round ended).
#[derive(Debug, Clone)]
struct Answer {
    text: String,
    accused: Option<u32>,
    /// `Decline.contributed_round`: the ledger's refusal.
    contributed: Option<u64>,
}

impl Answer {
    fn text(text: String) -> Self {
        Answer {
            text,
            accused: None,
            contributed: None,
        }
    }
}

fn secagg(msg: &ServerMessage) -> CoordinatorMessage {
    CoordinatorMessage {
        kind: Some(coordinator_message::Kind::Secagg(Chunk {
            data: msg.encode().into(),
            last: true,
        })),
    }
}

/// The round as the stub's honest half runs it: the real server and three real clients.
struct Round {
    attempt: u32,
    server: Server<u64>,
    peers: BTreeMap<u32, Client<u64>>,
    /// Site 1's identity key, for the share it "sends" in `Lie::GarbageFromPeer`.
    hungary_key: ed25519_dalek::SigningKey,
    lie: Lie,
    /// The statistics vector's length (1 + 3 × 13 inputs).
    len: usize,
}

impl Round {
    /// The round as the real coordinator sets it up: its context is the announcement's digest
    /// (`announced`) completed by the set-up. Returns the set-up the agent is sent.
    /// `announced` is the digest of the peers' round start, `agent_announced` of the agent's.
    fn new(
        pki: &Path,
        lie: Lie,
        (announced, agent_announced): ([u8; 32], [u8; 32]),
        attempt: u32,
    ) -> (Self, ServerMessage) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let verifier = Arc::new(CaVerifier::new(pki::cert_der(&pki.join("ca.pem")), now).unwrap());
        let name = |i: usize| match (lie, i) {
            (Lie::MintedPeer, 1) => "puppet".to_string(),
            _ => SITES[i].to_string(),
        };
        let roster: Vec<(u32, String)> = (0..SITES.len()).map(|i| (i as u32, name(i))).collect();
        let params = Params {
            consistency_check: true,
            modulus: Modulus::Bits64,
            clip: if matches!(lie, Lie::ClipForAgent) {
                1e6
            } else {
                Params::with_defaults(4, 38).clip
            },
            ..Params::with_defaults(4, 38)
        };
        let probe = Setup::new(RoundId::new(0, attempt), params.clone(), [7u8; 32], &roster);
        let round = RoundId::new(0, attempt).with_context(round_context(&announced, &probe));
        let (server, setup) = Server::<u64>::new(
            params.clone(),
            round,
            &roster,
            [7u8; 32],
            verifier.clone(),
            StageTimeouts::default(),
            0,
        )
        .unwrap();
        let peers = (1..4u32)
            .map(|id| {
                let site = pki.join("sites").join(SITES[id as usize]);
                let (signing_key, credential) = match (lie, id) {
                    (Lie::MintedPeer | Lie::ReusedName, 1) => mint(pki, &name(1)),
                    _ => (
                        pki::signing_key(&site.join("key.pem")),
                        pki::cert_der(&site.join("cert.pem")),
                    ),
                };
                let identity = SiteIdentity {
                    id,
                    name: name(id as usize),
                    signing_key,
                    credential,
                };
                (
                    id,
                    Client::new(identity, verifier.clone(), round, [id as u8 + 40; 32]),
                )
            })
            .collect();
        // What the agent is told: the same set-up, or (the lie) its own clip, sealed with the
        // context of its own view as a coordinator that knows the protocol would.
        let to_agent = match lie {
            Lie::ClipForAgent => {
                let mut own = setup.clone();
                own.params.clip = 1.0;
                own.round = RoundId::new(0, attempt).with_context(round_context(&announced, &own));
                ServerMessage::Setup(own)
            }
            _ if agent_announced != announced => {
                let mut own = setup.clone();
                own.round =
                    RoundId::new(0, attempt).with_context(round_context(&agent_announced, &own));
                ServerMessage::Setup(own)
            }
            _ => ServerMessage::Setup(setup.clone()),
        };
        let setup = ServerMessage::Setup(setup);
        let mut r = Round {
            attempt,
            server,
            peers,
            hungary_key: pki::signing_key(&pki.join("sites/hungary/key.pem")),
            lie,
            len: params.vector_len(),
        };
        r.deliver_to_peers(vec![(1, setup.clone()), (2, setup.clone()), (3, setup)]);
        (r, to_agent)
    }

    /// Hands messages to the simulated sites and their answers to the server.
    fn deliver_to_peers(&mut self, messages: Vec<(u32, ServerMessage)>) {
        for (id, m) in messages {
            let peer = self.peers.get_mut(&id).unwrap();
            let mut reply = peer.handle(&m).unwrap();
            if reply.is_none() && matches!(m, ServerMessage::ForwardedShares(_)) {
                let zeros = QuantisedInput::from_values(vec![0u64; self.len]);
                reply = peer.set_input(zeros).unwrap();
            }
            match reply {
                Some(ClientMessage::MaskedInput(_))
                    if id == 3 && self.attempt > 0 && matches!(self.lie, Lie::DropInRedo) =>
                {
                    self.server.disconnected(3);
                }
                Some(ClientMessage::MaskedInput(x)) => {
                    self.upload(id, &ClientMessage::MaskedInput(x).encode())
                }
                Some(other) => self.server.receive(id, other, 0).unwrap(),
                None => {}
            }
        }
    }

    fn upload(&mut self, id: u32, bytes: &[u8]) {
        let (_, slot) = self
            .server
            .input_slots()
            .into_iter()
            .find(|(s, _)| *s == id)
            .expect("a slot for every site");
        assert_eq!(slot.feed(bytes, true), Ok(true), "site {id}'s masked input");
    }

    /// Polls the server until it waits; returns what goes to the agent (lied about where the
    /// lie applies), and how the round ended if it did: (survivors, the summed row count).
    fn advance(&mut self) -> (Vec<ServerMessage>, Option<String>) {
        let mut to_agent = Vec::new();
        loop {
            match self.server.poll(0).expect("the honest half does not abort") {
                Poll::Send(messages) => {
                    let (agent, peers): (Vec<_>, Vec<_>) =
                        messages.into_iter().partition(|(id, _)| *id == 0);
                    to_agent.extend(agent.into_iter().map(|(_, m)| self.lie_to_agent(m)));
                    self.deliver_to_peers(peers);
                }
                Poll::Pending { .. } => return (to_agent, None),
                Poll::Done(out) => {
                    // The simulated sites sent zeros: the sum is the agent's statistics.
                    let rows = out.sum.to_vec()[0];
                    let done = format!("completed: survivors {:?}, rows {rows}", out.survivors);
                    return (to_agent, Some(done));
                }
            }
        }
    }

    fn lie_to_agent(&self, m: ServerMessage) -> ServerMessage {
        if let ServerMessage::ForwardedShares(mut f) = m {
            let share = f
                .shares
                .iter_mut()
                .find(|s| s.peer == 1)
                .expect("site 1's share");
            match self.lie {
                Lie::TamperedShare => share.ciphertext[3] ^= 1,
                Lie::GarbageFromPeer => {
                    // What a broken or malicious hungary would have sent: garbage, listed
                    // and signed by hungary (the coordinator checked that signature).
                    share.ciphertext = vec![0x42; share.ciphertext.len()];
                    let digest = share_digest(&share.ciphertext);
                    let list = f.lists.iter_mut().find(|l| l.sender == 1).expect("list");
                    for (to, d) in &mut list.digests {
                        if *to == 0 {
                            *d = digest;
                        }
                    }
                    list.signature = sign_share_list(&self.hungary_key, f.round, 1, &list.digests);
                }
                _ => {}
            }
            return ServerMessage::ForwardedShares(f);
        }
        let ServerMessage::UnmaskRequest(mut req) = m else {
            return m;
        };
        assert!(
            req.survivors.contains(&1) && req.dropped.is_empty(),
            "{req:?}"
        );
        match self.lie {
            Lie::Honest
            | Lie::DropInRedo
            | Lie::TrainingForAgent
            | Lie::StatisticsForAgent
            | Lie::ModelForAgent
            | Lie::TamperedShare
            | Lie::GarbageFromPeer
            | Lie::RevokedPeer
            | Lie::MintedPeer
            | Lie::ReusedName
            | Lie::ClipForAgent => {}
            Lie::BothShares => req.dropped = vec![1],
            Lie::ChangedSurvivors => {
                req.survivors.retain(|&s| s != 1);
                req.dropped = vec![1];
            }
        }
        ServerMessage::UnmaskRequest(req)
    }
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
        let (tx, rx) = mpsc::channel(64);
        let plan = self
            .plans
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| vec![0]);
        let answers = self.answers.clone();
        let crl = self.crl.clone();
        let manifest = self.manifest.clone();
        let (pki, lie, context) = (self.pki.clone(), self.lie, self.context);
        let certificate = pki::cert_der(&self.pki.join("coordinator/cert.pem"));
        tokio::spawn(async move {
            let send = |kind| CoordinatorMessage { kind: Some(kind) };
            let welcome = send(coordinator_message::Kind::Welcome(Welcome {
                site_id: 0,
                protocol_version: cohort_proto::PROTOCOL_VERSION,
                coordinator_certificate: certificate,
                crl: crl.clone(),
                manifest: manifest.clone(),
            }));
            let _ = tx.send(Ok(welcome)).await;
            for attempt in plan {
                let start = stats_start(manifest.clone(), attempt);
                let digest = |start: &RoundStart| {
                    Announcement {
                        round: start.round,
                        attempt: start.attempt,
                        task: start.task,
                        secure: start.secure,
                        model_sha3_512: &start.model_sha3_512,
                        training_toml: &start.training_toml,
                        feature_mean: &start.feature_mean,
                        feature_std: &start.feature_std,
                    }
                    .digest(&context)
                };
                let agent_start = lie.start_for_agent(&start);
                let announced = (digest(&start), digest(&agent_start));
                let (mut round, setup) = Round::new(&pki, lie, announced, attempt);
                for m in [
                    send(coordinator_message::Kind::RoundStart(agent_start)),
                    secagg(&setup),
                ] {
                    let _ = tx.send(Ok(m)).await;
                }
                let (mut control, mut masked) = (Vec::new(), Vec::new());
                // Until the agent has answered this attempt.
                while let Ok(Some(msg)) = inbound.message().await {
                    match msg.kind {
                        Some(agent_message::Kind::Secagg(c)) => {
                            control.extend_from_slice(&c.data);
                            if !c.last {
                                continue;
                            }
                            let m = ClientMessage::<u64>::decode(&std::mem::take(&mut control))
                                .unwrap();
                            // The real server checks the agent's messages as it checks any
                            // site's: a refusal there is an answer too.
                            if let Err(e) = round.server.receive(0, m, 0) {
                                let text = format!("the server refused the agent: {e}");
                                let _ = answers.send(Answer::text(text));
                                break;
                            }
                        }
                        Some(agent_message::Kind::MaskedInput(c)) => {
                            masked.extend_from_slice(&c.data);
                            if !c.last {
                                continue;
                            }
                            round.upload(0, &std::mem::take(&mut masked));
                        }
                        Some(agent_message::Kind::Decline(d)) => {
                            let _ = answers.send(Answer {
                                text: d.reason,
                                accused: d.accused,
                                contributed: d.contributed_round,
                            });
                            break;
                        }
                        _ => continue,
                    }
                    let (to_agent, done) = round.advance();
                    for m in to_agent {
                        let _ = tx.send(Ok(secagg(&m))).await;
                    }
                    if let Some(done) = done {
                        let _ = answers.send(Answer::text(done));
                        break;
                    }
                }
            }
            // Held open until the agent goes.
            while let Ok(Some(_)) = inbound.message().await {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Attempt `attempt` of the statistics round the stub announces, relaying `manifest`.
fn stats_start(manifest: Vec<u8>, attempt: u32) -> RoundStart {
    RoundStart {
        manifest,
        round: 0,
        attempt,
        task: Task::Stats as i32,
        secure: true,
        training_toml: "learning_rate = 0.01\nbatch_size = 4\nlocal_steps = 1\n".into(),
        ..Default::default()
    }
}

/// The reason the real agent gives for refusing the round with `lie` and the site it accuses
/// (or how the honest round ended).
fn refusal(lie: Lie) -> (String, Option<u32>) {
    let answer = answers(lie, vec![vec![0]]).remove(0);
    (answer.text, answer.accused)
}

/// The agent's answers to `plans`: each plan is one agent process's life (the agent is
/// stopped after it and a new one started with the same site directory for the next), and
/// lists the attempts of round 0 its session runs.
fn answers(lie: Lie, plans: Vec<Vec<u32>>) -> Vec<Answer> {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::provision(dir.path());
    let manifest = std::fs::read(pki.join("manifest.toml")).unwrap();
    let crl = if matches!(lie, Lie::RevokedPeer) {
        cohort_ca::revoke(&pki, "hungary").unwrap();
        // Only the CRL is under test here: cleveland keeps the manifest that still lists
        // hungary (the revocation's new manifest is the other, stricter path).
        std::fs::write(pki.join("sites/cleveland/manifest.toml"), &manifest).unwrap();
        pki::crl_der(&pki)
    } else {
        Vec::new()
    };
    let ca = cohort_protocols::manifest::ca_key(&pki::cert_der(&pki.join("ca.pem"))).unwrap();
    let context = cohort_protocols::manifest::SignedManifest::verify(&manifest, &ca)
        .unwrap()
        .digest();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (answers, mut rx) = mpsc::unbounded_channel();
        let lives: Vec<usize> = plans.iter().map(Vec::len).collect();
        let stub = Stub {
            pki: pki.clone(),
            schema: stub::schema_reply(&pki, "coordinator/key.pem"),
            lie,
            crl,
            manifest,
            context,
            plans: std::sync::Mutex::new(plans.into()),
            answers,
        };
        let port = stub::serve(&pki, stub).await;
        let mut all = Vec::new();
        for expected in lives {
            let agent = tokio::spawn(cohort_agent::run(
                stub::cleveland(&pki, port).build(cohort_agent::AgentConfig::parse),
            ));
            for _ in 0..expected {
                let answer = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .expect("the agent answers within 60 s")
                    .expect("an answer");
                all.push(answer);
            }
            agent.abort();
            let _ = agent.await;
        }
        all
    })
}

#[test]
fn without_a_lie_the_harness_completes_the_round_with_the_agent() {
    let (done, _) = refusal(Lie::Honest);
    let rows: u64 = done
        .rsplit("rows ")
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{done}"));
    assert!(
        done.starts_with("completed: survivors [0, 1, 2, 3]"),
        "{done}"
    );
    // cleveland's training split: two thirds of its 303 rows.
    assert!((150..=303).contains(&rows), "{done}");
}

#[test]
fn a_request_for_both_shares_of_a_survivor_is_refused_by_the_real_agent() {
    let (reason, accused) = refusal(Lie::BothShares);
    assert_eq!(accused, None);
    assert_eq!(
        reason, "the server asked for both shares of site 1: refused",
        "{reason}"
    );
}

#[test]
fn a_survivor_set_other_than_the_signed_one_is_refused_by_the_real_agent() {
    let (reason, accused) = refusal(Lie::ChangedSurvivors);
    assert_eq!(accused, None);
    assert_eq!(
        reason, "the survivor set differs from the one this site signed",
        "{reason}"
    );
}

#[test]
fn a_share_the_coordinator_altered_is_refused_without_blaming_its_sender() {
    let (reason, accused) = refusal(Lie::TamperedShare);
    assert_eq!(accused, None, "{reason}");
    assert!(
        reason.contains("is not the one site 1 signed") && reason.contains("coordinator"),
        "{reason}"
    );
}

#[test]
fn a_site_that_signs_garbage_shares_is_named_by_the_real_agent() {
    let (reason, accused) = refusal(Lie::GarbageFromPeer);
    assert_eq!(accused, Some(1), "{reason}");
    assert!(reason.contains("site 1 is at fault"), "{reason}");
}

#[test]
fn a_peer_revoked_by_the_crl_in_welcome_is_refused_by_the_real_agent() {
    let (reason, accused) = refusal(Lie::RevokedPeer);
    assert_eq!(accused, None, "{reason}");
    assert!(
        reason.contains("site 1's identity was not accepted") && reason.contains("revoked"),
        "{reason}"
    );
}

#[test]
fn a_peer_minted_with_the_ca_key_under_a_new_name_is_refused_by_the_real_agent() {
    let (reason, accused) = refusal(Lie::MintedPeer);
    assert_eq!(accused, None, "{reason}");
    assert!(
        reason.contains("site 1's identity was not accepted")
            && reason.contains("\"puppet\" is not a member of the federation"),
        "{reason}"
    );
}

#[test]
fn a_member_name_with_a_key_the_ca_minted_is_refused_by_the_real_agent() {
    let (reason, accused) = refusal(Lie::ReusedName);
    assert_eq!(accused, None, "{reason}");
    assert!(
        reason.contains("site 1's identity was not accepted")
            && reason.contains("is not the one manifest v1 lists for it"),
        "{reason}"
    );
}

/// The first attack of the round-integrity review: one site told a clipping bound of 1 while
/// its peers are told 1e6 (what makes their quantised inputs a known constant). The agent's
/// key advertisement is for the context of what it was told, so the real server refuses it
/// (as an honest peer would refuse its signature), and the round never gets its masked
/// input. Before the context covered the set-up, the round completed with the agent's
/// statistics in the sum.
#[test]
fn a_site_told_its_own_clipping_bound_cannot_join_its_peers_round() {
    let (reason, _) = refusal(Lie::ClipForAgent);
    assert!(
        reason.contains("the server refused the agent")
            && reason.contains("AdvertiseKeys")
            && reason.contains("context"),
        "{reason}"
    );
}

/// The second attack of the round-integrity review: honest, complete attempts of one round,
/// each leaving another site out, difference out a site's input (S_j = T - x_j). After
/// attempt 0 completed with all four, attempt 1 leaves site 3 out: the agent refuses it
/// before it signs the survivors — in the same session, and after a restart of the agent
/// (the ledger is on the site's disk). Before the ledger, the agent answered every attempt
/// with the same statistics.
#[test]
fn a_second_attempt_of_a_round_over_other_survivors_is_refused_even_after_a_restart() {
    for plans in [vec![vec![0, 1]], vec![vec![0], vec![1]]] {
        let answers = answers(Lie::DropInRedo, plans.clone());
        assert!(
            answers[0]
                .text
                .starts_with("completed: survivors [0, 1, 2, 3]"),
            "{plans:?}: {answers:?}"
        );
        let refused = &answers[1];
        assert_eq!(refused.contributed, Some(0), "{plans:?}: {refused:?}");
        assert!(
            refused
                .text
                .contains("a redo is answered only over the same survivors")
                && refused
                    .text
                    .contains("not [cleveland, hungary, switzerland]"),
            "{plans:?}: {refused:?}"
        );
    }
}

/// A coordinator that crashed after a round's sum runs the round again, and the agent
/// answers the redo: the input is the same and so are the survivors, so the sum is the one
/// the coordinator already had. (The crash-resume test kills the real coordinator.)
#[test]
fn a_redo_of_a_round_over_the_same_survivors_is_answered() {
    let redo = answers(Lie::Honest, vec![vec![0], vec![1]]);
    assert!(redo[0].text.starts_with("completed"), "{redo:?}");
    assert!(
        redo[1]
            .text
            .starts_with("completed: survivors [0, 1, 2, 3]"),
        "{redo:?}"
    );
    assert_eq!(redo[0].text, redo[1].text, "the same sum");
}

/// The rest of the first attack: the agent alone is announced other training settings,
/// feature statistics or another model than its peers (Pasquini et al., CCS 2022: a model per
/// site eludes secure aggregation). Its set-up is sealed with the context of what it was told,
/// as a coordinator that knows the protocol would; its key advertisement is then for another
/// context than its peers', and the real server refuses it, so its input never joins their
/// sum.
#[test]
fn a_site_told_its_own_training_settings_statistics_or_model_cannot_join_its_peers_round() {
    for lie in [
        Lie::TrainingForAgent,
        Lie::StatisticsForAgent,
        Lie::ModelForAgent,
    ] {
        let (reason, _) = refusal(lie);
        assert!(
            reason.contains("the server refused the agent")
                && reason.contains("AdvertiseKeys")
                && reason.contains("context"),
            "{lie:?}: {reason}"
        );
    }
}
