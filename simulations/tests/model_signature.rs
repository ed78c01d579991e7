//! An agent facing a coordinator whose model signature does not verify: it declines the
//! round with a clear reason instead of using the model. The "coordinator" here is a stub
//! gRPC service over mutual TLS with the project's real certificates.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cohort_coordinator::provision::{ProvisionOptions, provision};
use cohort_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use cohort_proto::v1::{
    AgentMessage, Chunk, CoordinatorMessage, RoundStart, SchemaReply, SchemaRequest, Task, Welcome,
    agent_message, coordinator_message,
};
use cohort_protocols::model;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

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

fn pem_der(path: &Path) -> Vec<u8> {
    cohort_coordinator::tls::load_certs(path).unwrap()[0]
        .as_ref()
        .to_vec()
}

const SCHEMA: &str = r#"
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

fn key(pki: &Path, which: &str) -> ed25519_dalek::SigningKey {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(pki.join(which)).unwrap();
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap()
}

/// The first answer after Join, for a stub that signs models with `signature` and the schema
/// with the coordinator's key; or how the agent ended, when it never joined.
fn answer_to(signature: impl Fn(&[u8; 64], &Path) -> Vec<u8>) -> agent_message::Kind {
    answer_with(signature, "coordinator/key.pem", None).expect("the agent answers")
}

fn answer_with(
    signature: impl Fn(&[u8; 64], &Path) -> Vec<u8>,
    schema_signer: &str,
    attack: Option<Vec<coordinator_message::Kind>>,
) -> Result<agent_message::Kind, String> {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    provision(&ProvisionOptions {
        out: pki.clone(),
        sites: vec!["cleveland".into()],
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .unwrap();
    let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
    let hash = model::sha3_512(&model::to_bytes(&[0.0f32; 14]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (answers, mut rx) = mpsc::unbounded_channel();
        let schema_toml = toml::to_string(
            &toml::from_str::<cohort_protocols::model::DataSchema>(SCHEMA).unwrap(),
        )
        .unwrap();
        let stub = Stub {
            certificate_der: pem_der(&pki.join("coordinator/cert.pem")),
            signature: signature(&hash, &pki),
            schema: SchemaReply {
                signature: model::sign_schema(&key(&pki, schema_signer), &schema_toml).to_vec(),
                schema_toml,
                coordinator_certificate: pem_der(&pki.join("coordinator/cert.pem")),
                inputs: 13,
            },
            attack,
            answers,
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read("coordinator/cert.pem"),
                read("coordinator/key.pem"),
            ))
            .client_ca_root(Certificate::from_pem(read("ca.pem")));
        tokio::spawn(
            Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(CoordinatorServer::new(stub))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/heart-disease/cleveland.csv");
        let data: toml::Table =
            toml::from_str(&format!("csv = {:?}", csv.display().to_string())).unwrap();
        let schema: toml::Table = toml::from_str(SCHEMA).unwrap();
        let site = pki.join("sites/cleveland");
        let cfg =
            cohort_sim::run::agent_config("cleveland", &site, port, data, &schema, vec![]).unwrap();
        let mut agent = tokio::spawn(cohort_agent::run(cfg));
        let answer = loop {
            tokio::select! {
                kind = rx.recv() => {
                    let kind = kind.expect("an answer");
                    if !matches!(kind, agent_message::Kind::Join(_)) {
                        break Ok(kind);
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
fn answer_to_attack(attack: Vec<coordinator_message::Kind>) -> String {
    match answer_with(|_, _| Vec::new(), "coordinator/key.pem", Some(attack)) {
        Ok(agent_message::Kind::Decline(d)) => d.reason,
        other => panic!("expected a Decline, got {other:?}"),
    }
}

fn stats_round(secure: bool) -> coordinator_message::Kind {
    coordinator_message::Kind::RoundStart(RoundStart {
        round: 0,
        task: Task::Stats as i32,
        secure,
        training_toml: "learning_rate = 0.01\nbatch_size = 4\nlocal_steps = 1\n".into(),
        ..Default::default()
    })
}

/// A SecAgg+ set-up for round 0 among sites 0..n, built with the real server.
fn setup(n: u32, consistency_check: bool) -> coordinator_message::Kind {
    use cohort_protocols::secagg::{Params, PinnedIdentities, RoundId, Server, ServerMessage};
    let params = Params {
        consistency_check,
        modulus: cohort_protocols::secagg::Modulus::Bits64,
        ..Params::with_defaults(n, 40)
    };
    let ids: Vec<u32> = (0..n).collect();
    let (_, setup) = Server::<u64>::new(
        params,
        RoundId::new(0, 0),
        &ids,
        [7u8; 32],
        std::sync::Arc::new(PinnedIdentities::new(std::iter::empty())),
        Default::default(),
        0,
    )
    .unwrap();
    coordinator_message::Kind::Secagg(Chunk {
        data: ServerMessage::Setup(setup).encode().into(),
        last: true,
    })
}

#[test]
fn a_coordinator_that_lowers_the_protection_is_refused_by_the_sites_policy() {
    // Downgrade to plain: the site would send its statistics in the clear.
    let reason = answer_to_attack(vec![stats_round(false)]);
    assert!(reason.contains("policy.require_secure"), "{reason}");
    // Secure, but without the consistency check.
    let reason = answer_to_attack(vec![stats_round(true), setup(4, false)]);
    assert!(
        reason.contains("policy.require_consistency_check"),
        "{reason}"
    );
}
