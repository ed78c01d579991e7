//! A site with a valid certificate that misbehaves at the transport: it sends a message no
//! agent sends, floods the coordinator, stops reading, or leaves connections half-open. The
//! coordinator ends (or throttles) that site alone, stays within bounded memory, and the four
//! honest hospitals finish every round.
//!
//! "mallory" is provisioned by the same CA as the hospitals and speaks the protocol through
//! the generated gRPC client, so every refusal here is the production server's.

// Mallory's set-up returns its running task on purpose: `async_yields_async`.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::async_yields_async
)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cohort_ca::demo_keys::{ProvisionOptions, provision};
use cohort_coordinator::CoordinatorConfig;
use cohort_coordinator::status::client::get;
use cohort_proto::v1::coordinator_client::CoordinatorClient;
use cohort_proto::v1::{
    AgentMessage, Chunk, CoordinatorMessage, Decline, Join, agent_message, coordinator_message,
};
use cohort_protocols::secagg::{ServerMessage, Setup};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use cohort_testkit::prelude::*;

const TOKEN: &str = "hostile-sites-status-token";

/// The four hospitals and mallory, one CA.
fn pki_with_mallory(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let mut sites: Vec<String> = SITES.iter().map(|s| s.to_string()).collect();
    sites.push("mallory".into());
    provision(&ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites,
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .unwrap();
    pki
}

fn config(dir: &Path, pki: &Path, rounds: u32, model: &str) -> CoordinatorConfig {
    config_with(dir, pki, rounds, model, "")
}

fn config_with(
    dir: &Path,
    pki: &Path,
    rounds: u32,
    model: &str,
    tls_extra: &str,
) -> CoordinatorConfig {
    config::coordinator(pki, &dir.join("data"))
        .merge(&format!("[tls]\n{tls_extra}\n[model]\n{model}"))
        .merge(&format!(
            r#"
[rounds]
count = {rounds}
wait_for_sites_secs = 60
stage_timeout_secs = 4
train_timeout_secs = 20
max_attempts = 3
[status]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[training]
local_steps = 10
"#
        ))
        .build(CoordinatorConfig::parse)
}

/// Mallory's channel to the coordinator; `window` shrinks its HTTP/2 receive windows.
async fn channel(pki: &Path, port: u16, window: Option<u32>) -> Channel {
    try_channel(&pki.join("sites/mallory"), port, window)
        .await
        .unwrap()
}

/// A channel with the certificate in `bundle`.
async fn try_channel(
    bundle: &Path,
    port: u16,
    window: Option<u32>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |f: &str| std::fs::read(bundle.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect()
        .await
}

/// Opens mallory's session with a valid Join; returns the sender for what follows and the
/// coordinator's stream, whose Welcome has been read.
async fn join(
    config: &CoordinatorConfig,
    channel: Channel,
) -> (
    mpsc::Sender<AgentMessage>,
    tonic::Streaming<CoordinatorMessage>,
) {
    try_join(config, channel, "mallory")
        .await
        .expect("mallory's certificate and Join are valid")
}

async fn try_join(
    config: &CoordinatorConfig,
    channel: Channel,
    site: &str,
) -> Result<
    (
        mpsc::Sender<AgentMessage>,
        tonic::Streaming<CoordinatorMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Join(Join {
            site: site.into(),
            examples: 100,
            schema_hash: config.schema.hash(),
            protocol_version: cohort_proto::PROTOCOL_VERSION,
            schema_toml: toml::to_string(&config.schema).unwrap(),
            evaluate_only: false,
            privacy: None,
            agent_version: "hostile".into(),
        })),
    })
    .await
    .unwrap();
    let mut client = CoordinatorClient::new(channel);
    let mut stream = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = stream.message().await?.expect("Welcome");
    assert!(matches!(
        welcome.kind,
        Some(cohort_proto::v1::coordinator_message::Kind::Welcome(_))
    ));
    Ok((tx, stream))
}

/// Runs the coordinator with the four hospitals, after `mallory` (given the gRPC port and
/// the status API's base URL) has joined; mallory's own task runs on beside the rounds.
/// Returns the run's summary and mallory's task.
async fn federation<T: Send + 'static>(
    config: CoordinatorConfig,
    pki: &Path,
    mallory: impl AsyncFnOnce(u16, String) -> tokio::task::JoinHandle<T>,
) -> (cohort_coordinator::RunSummary, tokio::task::JoinHandle<T>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let run = tokio::spawn(cohort_coordinator::run(config, Some(tx)));
    let endpoints = rx.await.unwrap();
    let status = format!("http://{}", endpoints.status.unwrap());
    let mallory = mallory(endpoints.grpc.port(), status).await;
    let agents: Vec<_> = SITES
        .iter()
        .map(|s| {
            tokio::spawn(cohort_agent::run(
                config::agent(pki, s, endpoints.grpc.port())
                    .merge(SCHEMA)
                    .build(cohort_agent::AgentConfig::parse),
            ))
        })
        .collect();
    let summary = run
        .await
        .expect("the coordinator does not panic")
        .expect("the honest sites finish the run");
    for a in agents {
        a.abort();
    }
    (summary, mallory)
}

/// Reads mallory's stream and hands every SecAgg+ set-up of round 1 to `answer`, sending what
/// it returns: `Continue` reads on, `Break` returns after sending. Ends with the stream.
async fn answer_round_1_setups(
    stream: &mut tonic::Streaming<CoordinatorMessage>,
    tx: &mpsc::Sender<AgentMessage>,
    mut answer: impl FnMut(Setup) -> ControlFlow<agent_message::Kind, agent_message::Kind>,
) {
    let mut in_round_1 = false;
    while let Ok(Some(m)) = stream.message().await {
        match m.kind {
            Some(coordinator_message::Kind::RoundStart(s)) => in_round_1 = s.round == 1,
            Some(coordinator_message::Kind::Secagg(c)) if in_round_1 => {
                let Ok(ServerMessage::Setup(setup)) = ServerMessage::decode(&c.data) else {
                    continue;
                };
                let (kind, done) = match answer(setup) {
                    ControlFlow::Continue(kind) => (kind, false),
                    ControlFlow::Break(kind) => (kind, true),
                };
                let _ = tx.send(AgentMessage { kind: Some(kind) }).await;
                if done {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// Mallory's state in the status API's site list; None once the coordinator is gone.
async fn mallory_state(status: &str) -> Option<serde_json::Value> {
    let (code, body) = get(&format!("{status}/api/v1/sites"), Some(TOKEN))
        .await
        .ok()?;
    assert_eq!(code, 200, "{body}");
    let sites: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mallory = sites["sites"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "mallory"))
        .cloned()
        .unwrap_or_else(|| panic!("mallory in {body}"));
    Some(mallory)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_oversize_message_ends_only_its_senders_session() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let config = config(dir.path(), &pki, 2, r#"kind = "logreg""#);
    let cfg = config.clone();
    let rt = runtime();
    let (summary, mallory) = rt.block_on(federation(config, &pki, async |port, api| {
        let (tx, mut stream) = join(&cfg, channel(&pki, port, None).await).await;
        // 1 MiB in one message: no agent sends a chunk above 64 KiB.
        let chunk = Chunk {
            data: vec![7u8; 1 << 20].into(),
            last: false,
        };
        let _ = tx
            .send(AgentMessage {
                kind: Some(agent_message::Kind::Secagg(chunk)),
            })
            .await;
        let status = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => break status,
            }
        };
        tokio::spawn(async move { (status, mallory_state(&api).await) })
    }));
    let (status, state) = rt.block_on(mallory).unwrap();
    assert_eq!(
        summary.rounds().unwrap().len(),
        2,
        "the hospitals finish every round"
    );
    assert!(
        status.message().contains("too large"),
        "mallory is told why: {status:?}"
    );
    let state = state.expect("asked while the coordinator ran");
    assert_eq!(state["connected"], false, "{state}");
}

#[test]
fn a_site_that_stops_reading_is_disconnected_and_the_rounds_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    // A model of about 1 MiB (16 chunks), sent twice a round (train, evaluate): mallory's
    // queue and HTTP/2 buffers are full within a few rounds.
    let config = config(dir.path(), &pki, 6, "kind = \"mlp\"\nhidden = [16384]");
    let cfg = config.clone();
    let bundles = pki.clone();
    let rt = runtime();
    let (summary, mallory) = rt.block_on(federation(config, &pki, async move |port, api| {
        let (tx, stream) = join(&cfg, channel(&bundles, port, Some(16 << 10)).await).await;
        // Mallory never reads `stream` again; it watches its own state instead.
        tokio::spawn(async move {
            let _hold = (tx, stream);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match mallory_state(&api).await {
                    None => return None,
                    Some(state) if state["connected"] == false => {
                        return Some(state["last_rejection"].to_string());
                    }
                    Some(_) => {}
                }
            }
        })
    }));
    let rejection = rt
        .block_on(mallory)
        .unwrap()
        .expect("mallory is disconnected while the run goes on");
    assert_eq!(
        summary.rounds().unwrap().len(),
        6,
        "the hospitals finish every round"
    );
    assert!(
        rejection.contains("did not read the coordinator's messages"),
        "{rejection}"
    );
}

#[test]
fn a_flooding_site_costs_bounded_memory_and_the_others_finish() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let config = config(dir.path(), &pki, 3, r#"kind = "logreg""#);
    let cfg = config.clone();
    let bundles = pki.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = stop.clone();
    let baseline = resident_bytes();
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(resident_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let rt = runtime();
    let (summary, mallory) = rt.block_on(federation(config, &pki, async move |port, _| {
        let (tx, stream) = join(&cfg, channel(&bundles, port, None).await).await;
        // Declines for a round that does not exist, 60 KiB each (within the size limit), as
        // fast as the coordinator takes them, for the whole run.
        tokio::spawn(async move {
            let _keep = stream;
            let reason = "x".repeat(60 << 10);
            while !stopper.load(Ordering::Relaxed) {
                let flood = AgentMessage {
                    kind: Some(agent_message::Kind::Decline(Decline {
                        round: 999_999,
                        reason: reason.clone(),
                        accused: None,
                        trusted_manifest: None,
                        contributed_round: None,
                        privacy: None,
                    })),
                };
                match tokio::time::timeout(Duration::from_millis(200), tx.send(flood)).await {
                    Err(_) => continue,
                    Ok(Err(_)) => return,
                    Ok(Ok(())) => counter.fetch_add(60 << 10, Ordering::Relaxed),
                };
            }
        })
    }));
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    rt.block_on(mallory).unwrap();
    let flooded = sent.load(Ordering::Relaxed);
    let grew = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "flood: {} MiB sent; resident memory grew by at most {} MiB",
        flooded >> 20,
        grew >> 20
    );
    assert_eq!(
        summary.rounds().unwrap().len(),
        3,
        "the hospitals finish every round"
    );
    assert!(flooded > 64 << 20, "the flood went on: {flooded} bytes");
    // Coordinator, four agents and mallory share this process; the flood's own share is
    // bounded by the per-site inbox budget (8 MiB), far below what was sent.
    assert!(
        grew < 160 << 20,
        "resident memory grew by {} MiB while mallory sent {} MiB",
        grew >> 20,
        flooded >> 20
    );
}

#[test]
fn half_open_connections_do_not_keep_sites_out() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let config = config(dir.path(), &pki, 2, r#"kind = "logreg""#);
    let rt = runtime();
    let (summary, open) = rt.block_on(federation(config, &pki, async |port, _| {
        // 300 TCP connections that never start TLS, held for the whole run: more than the
        // handshakes the coordinator runs at once.
        let mut open = Vec::new();
        for _ in 0..300 {
            open.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
        }
        tokio::spawn(async move { open })
    }));
    assert_eq!(
        summary.rounds().unwrap().len(),
        2,
        "the hospitals connect and finish every round"
    );
    drop(rt.block_on(open));
}

#[test]
fn revoked_and_superseded_certificates_are_refused_and_renewed_sites_take_part() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    // Mallory is revoked before the coordinator starts: the CRL stops it in the handshake.
    cohort_ca::revoke(&pki, "mallory").unwrap();
    let extra = format!(
        "crl = {:?}\nregistry = {:?}\n",
        pki.join("coordinator/crl.pem"),
        pki.join("coordinator/registry.toml")
    );
    let config = config_with(dir.path(), &pki, 1, r#"kind = "logreg""#, &extra);
    let cfg = config.clone();
    let old_va = dir.path().join("va-before-renewal");
    std::fs::create_dir_all(&old_va).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(pki.join("sites/va").join(f), old_va.join(f)).unwrap();
    }
    let rt = runtime();
    let bundles = pki.clone();
    let (summary, refusals) = rt.block_on(federation(config, &pki, async move |port, api| {
        // A revoked certificate fails the TLS handshake (the channel or the first call): the
        // client sees the CertificateRevoked alert, or only a broken pipe when it wrote
        // before the alert arrived, or hyper cancelling the call because the connection closed
        // before HTTP/2 was up ("connection was not ready", "connection closed": seen in
        // clean-clone runs under load); either way the site never gets as far as a session.
        let revoked = match try_channel(&bundles.join("sites/mallory"), port, None).await {
            Err(e) => format!("{e:?}"),
            Ok(ch) => format!("{:?}", try_join(&cfg, ch, "mallory").await.err()),
        };
        let (_, sites) = get(&format!("{api}/api/v1/sites"), Some(TOKEN))
            .await
            .unwrap();
        assert!(!sites.contains("mallory"), "mallory never joined: {sites}");
        // va is renewed while the coordinator runs: its old certificate still chains to the
        // CA and is not in the CRL loaded at start, but the re-read registry refuses it.
        cohort_ca::demo_keys::renew(&bundles, "va", 30).unwrap();
        let superseded = match try_channel(&old_va, port, None).await {
            Err(e) => panic!("the old certificate passes TLS: {e}"),
            Ok(ch) => try_join(&cfg, ch, "va").await.err(),
        };
        tokio::spawn(async move { (revoked, superseded) })
    }));
    let (revoked, superseded) = rt.block_on(refusals).unwrap();
    assert_eq!(
        summary.rounds().unwrap().len(),
        1,
        "the hospitals, va with its new bundle, finish the run"
    );
    assert!(
        revoked.contains("CertificateRevoked")
            || (revoked.contains("transport error") && revoked.contains("broken pipe"))
            || (revoked.contains("code: Cancelled") && revoked.contains("hyper::Error(Canceled")),
        "a revoked certificate is refused in the handshake: {revoked}"
    );
    let superseded = superseded.expect("the superseded certificate is refused");
    assert_eq!(
        superseded.code(),
        tonic::Code::PermissionDenied,
        "{superseded:?}"
    );
    assert!(
        superseded.message().contains("was superseded"),
        "{superseded:?}"
    );
}

/// Without a registry, the manifest alone decides who is admitted: a site the CA removes from
/// it (a revocation publishes a new version) loses its open session within seconds and is
/// refused when it comes back, and the hospitals go on.
#[test]
fn a_site_removed_from_the_manifest_is_disconnected_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let config = config(dir.path(), &pki, 1, r#"kind = "logreg""#);
    let cfg = config.clone();
    let bundles = pki.clone();
    let rt = runtime();
    let (summary, outcome) = rt.block_on(federation(config, &pki, async move |port, api| {
        let (_tx, mut stream) = join(&cfg, channel(&bundles, port, None).await).await;
        cohort_ca::revoke(&bundles, "mallory").unwrap();
        // The open session ends: the stream closes (or errors) without the site doing anything.
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(_)) = stream.message().await {}
        })
        .await;
        assert!(
            ended.is_ok(),
            "mallory's session is still open 20 s after its removal"
        );
        let record = mallory_state(&api).await.unwrap();
        let again = try_join(&cfg, channel(&bundles, port, None).await, "mallory")
            .await
            .err();
        tokio::spawn(async move { (record, again) })
    }));
    let (record, again) = rt.block_on(outcome).unwrap();
    assert_eq!(
        summary.rounds().unwrap().len(),
        1,
        "the hospitals finish the run"
    );
    assert_eq!(record["connected"], false, "{record}");
    assert!(
        record
            .to_string()
            .contains("no longer a member of the federation"),
        "{record}"
    );
    let again = again.expect("the removed site is refused");
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    assert!(
        again
            .message()
            .contains("\"mallory\" is not a member of the federation"),
        "{again:?}"
    );
}

#[test]
fn a_site_that_sends_garbage_in_a_round_is_named_in_the_round_summary() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let config = config(dir.path(), &pki, 2, r#"kind = "logreg""#);
    let cfg = config.clone();
    let rt = runtime();
    let (summary, mallory) = rt.block_on(federation(config, &pki, async |port, _| {
        let (tx, mut stream) = join(&cfg, channel(&pki, port, None).await).await;
        tokio::spawn(async move {
            // Silent through round 0 (a dropout there); in round 1, answers the SecAgg+
            // set-up with bytes that are no SecAgg+ message.
            answer_round_1_setups(&mut stream, &tx, |_| {
                ControlFlow::Continue(agent_message::Kind::Secagg(Chunk {
                    data: b"not a SecAgg+ message".to_vec().into(),
                    last: true,
                }))
            })
            .await;
        })
    }));
    rt.block_on(mallory).unwrap();
    assert_eq!(
        summary.rounds().unwrap().len(),
        2,
        "the hospitals finish every round"
    );
    assert_eq!(
        summary.rounds().unwrap()[0].rejected,
        vec!["mallory".to_string()]
    );
    assert!(
        summary.rounds().unwrap()[1].rejected.is_empty(),
        "{:?}",
        summary.rounds().unwrap()[1]
    );
}

/// An accusation needs evidence: a site can only accuse a neighbour whose share it was sent in
/// this attempt. Mallory accuses va as soon as round 1's set-up arrives, before any share was
/// sent: the accusation is refused and counted against mallory (a verified refusal, in the
/// round's `rejected`), va's record stays clean, and the rounds complete. Before, the report
/// was recorded against va and both were left out of the round's later attempts.
#[test]
fn an_accusation_without_evidence_is_counted_against_the_accuser() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let config = config(dir.path(), &pki, 2, r#"kind = "logreg""#);
    let cfg = config.clone();
    let rt = runtime();
    let (summary, mallory) = rt.block_on(federation(config, &pki, async |port, api| {
        let (tx, mut stream) = join(&cfg, channel(&pki, port, None).await).await;
        tokio::spawn(async move {
            answer_round_1_setups(&mut stream, &tx, |setup| {
                let at = setup.names.iter().position(|n| n == "va").unwrap();
                ControlFlow::Break(agent_message::Kind::Decline(Decline {
                    round: 1,
                    reason: "shares do not decrypt".into(),
                    accused: Some(setup.participants[at]),
                    trusted_manifest: None,
                    contributed_round: None,
                    privacy: None,
                }))
            })
            .await;
            // The refusal is on mallory's record while the run goes on.
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok((_, body)) = get(&format!("{api}/api/v1/sites"), Some(TOKEN)).await else {
                    return None;
                };
                let sites: serde_json::Value = serde_json::from_str(&body).unwrap();
                let site = |name: &str| {
                    sites["sites"]
                        .as_array()
                        .and_then(|a| a.iter().find(|s| s["name"] == name))
                        .cloned()
                        .unwrap()
                };
                if site("mallory")["rejections"] == 1 {
                    return Some((
                        site("mallory")["last_rejection"]["reason"].to_string(),
                        site("va")["rejections"].clone(),
                    ));
                }
            }
        })
    }));
    let (report, va_rejections) = rt
        .block_on(mallory)
        .unwrap()
        .expect("mallory's record shows the refusal");
    assert!(
        report.contains("accused va") && report.contains("without evidence"),
        "{report}"
    );
    assert_eq!(va_rejections, 0, "the accused is left alone");
    let rounds = summary.rounds().unwrap();
    assert_eq!(rounds.len(), 2, "the rounds complete");
    assert!(
        rounds
            .iter()
            .any(|r| r.rejected.iter().any(|s| s == "mallory")),
        "a verified refusal: {rounds:?}"
    );
}

#[test]
fn a_site_refused_in_an_aborted_attempt_is_left_out_of_the_retry() {
    use cohort_agent::config::{Fault, FaultAction, FaultStage};
    use cohort_protocols::secagg::{Client, ClientMessage, PinnedIdentities, SiteIdentity};
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with_mallory(dir.path());
    let mut config = config(dir.path(), &pki, 1, r#"kind = "logreg""#);
    // The retry may start before va is back: let a round of 3 be valid, for the coordinator
    // and for the sites' policies.
    config.secagg.max_colluders = 0;
    let cfg = config.clone();
    let bundles = pki.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let setups = Arc::new(AtomicU64::new(0));
    let seen = setups.clone();
    let rt = runtime();
    let summary = rt.block_on(async move {
        let run = tokio::spawn(cohort_coordinator::run(config, Some(tx)));
        let port = rx.await.unwrap().grpc.port();
        let (out, mut stream) = join(&cfg, channel(&bundles, port, None).await).await;
        // Mallory answers every round-1 set-up with its real key advertisement, signature
        // broken: a refused message, while its session stays open.
        let signing_key = {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            let pem = std::fs::read_to_string(bundles.join("sites/mallory/key.pem")).unwrap();
            ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap()
        };
        let cert = cohort_coordinator::tls::first_cert_der(&bundles.join("sites/mallory/cert.pem"))
            .unwrap();
        let mallory = tokio::spawn(async move {
            answer_round_1_setups(&mut stream, &out, |setup| {
                seen.fetch_add(1, Ordering::Relaxed);
                let at = setup.names.iter().position(|n| n == "mallory").unwrap();
                let identity = SiteIdentity {
                    id: setup.participants[at],
                    name: "mallory".into(),
                    signing_key: signing_key.clone(),
                    credential: cert.clone(),
                };
                let verifier = Arc::new(PinnedIdentities::new(std::iter::empty()));
                let mut client: Client<u64> =
                    Client::new(identity, verifier, setup.round, [9u8; 32]);
                let Ok(Some(ClientMessage::AdvertiseKeys(mut a))) =
                    client.handle(&ServerMessage::Setup(setup))
                else {
                    panic!("mallory's advertisement")
                };
                a.signature[0] ^= 1;
                ControlFlow::Continue(agent_message::Kind::Secagg(Chunk {
                    data: ClientMessage::<u64>::AdvertiseKeys(a).encode().into(),
                    last: true,
                }))
            })
            .await;
        });
        // va dies in round 1's share-keys stage (and comes back): with mallory excluded that
        // leaves 3 of 5, below the threshold of 4, so the attempt aborts.
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| {
                let mut a = config::agent(&bundles, s, port)
                    .merge(SCHEMA)
                    .build(cohort_agent::AgentConfig::parse);
                a.policy.max_colluders = 0;
                if *s == "va" {
                    a.faults.push(Fault {
                        round: 1,
                        stage: FaultStage::ShareKeys,
                        action: FaultAction::Vanish,
                    });
                }
                tokio::spawn(cohort_agent::run(a))
            })
            .collect();
        let summary = run.await.unwrap().expect("the round completes on a retry");
        for a in agents {
            a.abort();
        }
        mallory.abort();
        summary
    });
    let round = &summary.rounds().unwrap()[0];
    assert!(round.attempts >= 2, "{round:?}");
    assert_eq!(round.rejected, vec!["mallory".to_string()], "{round:?}");
    assert_eq!(
        setups.load(Ordering::Relaxed),
        1,
        "mallory was in round 1's first attempt only: {round:?}"
    );
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4096
}
