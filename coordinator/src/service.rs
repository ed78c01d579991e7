//! The gRPC service: authenticates each session and wires it to the hub.

use std::sync::Arc;
use std::time::Duration;

use cohort_proto::v1::coordinator_server::Coordinator;
use cohort_proto::v1::{
    AgentMessage, Chunk, CoordinatorMessage, SchemaReply, SchemaRequest, Welcome, agent_message,
    coordinator_message,
};
use cohort_protocols::identity::CaVerifier;
use cohort_protocols::model::DataSchema;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::hub::{Hub, Inbound, InboxBudget, SitePrivacy};
use cohort_proto::CHUNK_BYTES;

pub use cohort_proto::PROTOCOL_VERSION;

#[derive(Debug)]
pub struct Service {
    pub hub: Arc<Hub>,
    pub ca_der: Vec<u8>,
    pub schema_hash: String,
    /// The coordinator's schema, to tell an agent with another one which keys differ.
    pub schema: DataSchema,
    /// The signed schema agents fetch before reading their data.
    pub schema_reply: SchemaReply,
    /// Sent in Welcome: agents verify model signatures against it.
    pub certificate_der: Vec<u8>,
    /// Resident-memory budget in bytes (`limits.memory_mib`): an upload that would start
    /// above it is refused with RESOURCE_EXHAUSTED.
    pub memory_budget: Option<u64>,
    /// `tls.registry`: only the current certificate of an enrolled site is admitted.
    pub registry: Option<Arc<crate::registry::LiveRegistry>>,
    /// `tls.crl` (DER), sent in Welcome so agents refuse revoked peers too; empty if none.
    pub crl_der: Vec<u8>,
    /// `tls.manifest`: sent in Welcome; with it, only its members are admitted.
    pub manifest: Option<Arc<crate::live_manifest::LiveManifest>>,
    /// `privacy.require`: a training site must join with DP-SGD on.
    pub require_privacy: bool,
}

#[tonic::async_trait]
impl Coordinator for Service {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn schema(
        &self,
        request: Request<SchemaRequest>,
    ) -> Result<Response<SchemaReply>, Status> {
        let (site, peer, _, _) = self.authenticate(&request)?;
        debug!(%site, %peer, "schema sent");
        Ok(Response::new(self.schema_reply.clone()))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (site, peer, serial, not_after) = self.authenticate(&request)?;

        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Join within 30 s"))??;
        let Some(AgentMessage {
            kind: Some(agent_message::Kind::Join(join)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be Join"));
        };
        if join.site != site {
            warn!(%site, claimed = %join.site, "join refused: site name differs from certificate");
            return Err(Status::permission_denied(format!(
                "the certificate is for {site:?}, the agent claims {:?}",
                join.site
            )));
        }
        if join.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported (coordinator speaks {PROTOCOL_VERSION})",
                join.protocol_version
            )));
        }
        if join.schema_hash != self.schema_hash {
            let differences = toml::from_str::<DataSchema>(&join.schema_toml)
                .map(|theirs| self.schema.differences(&theirs).join("; "))
                .unwrap_or_else(|_| "the agent did not send a readable schema".into());
            warn!(%site, %peer, %differences, "join refused: data schema differs from the coordinator's");
            return Err(Status::failed_precondition(format!(
                "the agent's [schema] differs from the coordinator's ({}): copy the coordinator's [schema] exactly",
                differences
                    .replace(" here, ", " at the coordinator, ")
                    .replace(" there", " at this site")
            )));
        }

        let privacy = match join.privacy.as_ref().map(SitePrivacy::from_wire) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                warn!(%site, error = %e, "join refused: unreadable privacy report");
                return Err(Status::invalid_argument(e));
            }
        };
        if self.require_privacy && privacy.is_none() && !join.evaluate_only {
            warn!(%site, "join refused: this federation requires DP-SGD at every training site");
            return Err(Status::failed_precondition(
                "this federation requires differential privacy at every training site (privacy.require at the coordinator): add a [privacy] table with epsilon and noise_multiplier to agent.toml",
            ));
        }
        self.hub
            .received
            .joins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.hub.finished.load(std::sync::atomic::Ordering::Relaxed) {
            info!(%site, %peer, "site joined after training finished: told to shut down");
            let (tx, rx) = mpsc::channel(2);
            for kind in [
                coordinator_message::Kind::Welcome(Welcome {
                    site_id: 0,
                    protocol_version: PROTOCOL_VERSION,
                    coordinator_certificate: self.certificate_der.clone(),
                    crl: Vec::new(),
                    manifest: Vec::new(),
                }),
                coordinator_message::Kind::Shutdown(cohort_proto::v1::Shutdown {
                    reason: "training finished".into(),
                }),
            ] {
                let _ = tx.send(Ok(CoordinatorMessage { kind: Some(kind) })).await;
            }
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let (tx, rx) = mpsc::channel(crate::hub::SITE_OUTBOX_MESSAGES);
        let close = Arc::new(tokio::sync::Notify::new());
        let (id, session) = match self.hub.connect(
            &site,
            join.examples,
            join.evaluate_only,
            tx.clone(),
            close.clone(),
        ) {
            Ok(joined) => joined,
            Err(existing) => {
                warn!(%site, peer = %peer, existing_session = existing, "join refused: this site is already connected (a second agent with the same bundle?)");
                return Err(Status::already_exists(format!(
                    "site {site:?} is already connected (session {existing}): is a second agent running with this site's bundle? If the first one died, this agent is admitted once the coordinator notices (within about a minute)"
                )));
            }
        };
        // The agent's version is what it says of itself: shown, never trusted for anything.
        let agent_version = join
            .agent_version
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(40)
            .collect::<String>();
        self.hub.record(&site, |s| {
            s.privacy = privacy;
            s.privacy_fresh = true;
            s.agent_version = (!agent_version.is_empty()).then_some(agent_version);
            s.certificate_expires_unix = Some(not_after);
        });
        info!(%site, id, examples = join.examples, evaluate_only = join.evaluate_only, epsilon = ?privacy.map(|p| p.epsilon), %peer, "site joined");
        let welcome = CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(Welcome {
                site_id: id,
                protocol_version: PROTOCOL_VERSION,
                coordinator_certificate: self.certificate_der.clone(),
                crl: self.crl_der.clone(),
                manifest: self
                    .manifest
                    .as_ref()
                    .map(|m| m.get().bytes.clone())
                    .unwrap_or_default(),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::unavailable("session closed"))?;

        let hub = self.hub.clone();
        let registry = self.registry.clone();
        let budget = self.memory_budget;
        let out = tx.clone();
        let inbox_budget = InboxBudget::default();
        tokio::spawn(async move {
            let mut uploading = false;
            // The rest of a refused upload keeps arriving; it is dropped without a log line
            // per chunk (a 100M-parameter upload is 1 500 chunks).
            let mut refused = false;
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    () = close.notified() => {
                        tell_closed(&hub, &site, &out, registry.as_deref(), &serial);
                        break;
                    }
                };
                match next {
                    Ok(Some(msg)) => {
                        hub.touch(&site, prost::Message::encoded_len(&msg) as u64);
                        hub.received.count(&msg);
                        if let Some(
                            agent_message::Kind::MaskedInput(chunk)
                            | agent_message::Kind::PlainUpdate(chunk),
                        ) = &msg.kind
                        {
                            // A new upload must fit the memory budget; refusing it before its
                            // first value costs the site this attempt, never the coordinator.
                            if !uploading && let Some(err) = over_budget(budget, CHUNK_BYTES as u64)
                            {
                                let open = hub.uploads.get(&site);
                                if let Some(u) = &open {
                                    u.sink.arrived_unfed();
                                }
                                let round = open.map(|u| u.round);
                                warn!(%site, ?round, %err, "upload refused: memory budget");
                                let _ = out.send(Err(Status::resource_exhausted(err))).await;
                                break;
                            }
                            if !uploading {
                                refused = false;
                            }
                            uploading = !chunk.last;
                            if refused {
                                continue;
                            }
                            match upload(&hub, &site, chunk).await {
                                Err(()) => break,
                                Ok(r) => refused = r,
                            }
                            continue;
                        }
                        // A privacy report is the site's own news, for no round: it goes
                        // to the site's record, not to the driver. One with a privacy
                        // report inside a decline goes to both.
                        let report = match &msg.kind {
                            Some(agent_message::Kind::Privacy(p)) => Some(p),
                            Some(agent_message::Kind::Decline(d)) => d.privacy.as_ref(),
                            _ => None,
                        };
                        if let Some(p) = report {
                            match SitePrivacy::from_wire(p) {
                                Ok(p) => {
                                    debug!(%site, epsilon = p.epsilon, next = ?p.next_epsilon, budget = p.budget, "privacy report");
                                    hub.record(&site, |s| {
                                        s.privacy = Some(p);
                                        s.privacy_fresh = true;
                                    });
                                }
                                Err(e) => warn!(%site, error = %e, "privacy report ignored"),
                            }
                        }
                        if let Some(agent_message::Kind::Privacy(_)) = &msg.kind {
                            continue;
                        }
                        // Waits while this site's earlier messages fill its share of the
                        // inbox; the session can still be closed meanwhile.
                        let permit = tokio::select! {
                            p = inbox_budget.admit(&msg) => Some(p),
                            () = close.notified() => {
                                tell_closed(&hub, &site, &out, registry.as_deref(), &serial);
                                break;
                            }
                        };
                        let message = Inbound::Message {
                            site: site.clone(),
                            msg,
                            permit,
                        };
                        if hub.inbox.send(message).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    // After the last round agents hang up as they please; that is the end
                    // of the run, not a fault.
                    Err(e) if hub.finished.load(std::sync::atomic::Ordering::Relaxed) => {
                        debug!(%site, error = %e, "session ended after training finished");
                        break;
                    }
                    // An agent that stopped, crashed or lost its network ends its stream
                    // without a goodbye: that is a site going away, which the rounds handle,
                    // not a fault of the coordinator's to warn about.
                    Err(e) if connection_lost(&e) => {
                        info!(%site, reason = %e.message(), "site's connection ended");
                        break;
                    }
                    Err(e) => {
                        warn!(%site, error = %e, "session error");
                        // Tells the agent why, if it still listens (an oversize message is
                        // refused by the decoder and ends up here).
                        let _ = out.try_send(Err(e));
                        break;
                    }
                }
            }
            info!(%site, "site disconnected");
            hub.disconnect(&site, session);
            let _ = hub
                .inbox
                .send(Inbound::Disconnected { site, session })
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Service {
    /// The site a request comes from (its certificate's name) and the peer's address.
    /// rustls has already checked the chain; this extracts the identity it vouches for.
    fn authenticate<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(String, String, String, i64), Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let verifier = CaVerifier::new(self.ca_der.clone(), crate::unix_seconds() as i64)
            .map_err(|e| Status::internal(format!("CA certificate: {e}")))?;
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let cert = verifier
            .verify(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        // The registry first: it can say "revoked" or "superseded", where the manifest only
        // knows that the certificate is not the listed one.
        if let Some(registry) = &self.registry
            && let Some(why) = registry.get().refusal(&cert.common_name, &cert.serial)
        {
            warn!(site = %cert.common_name, %peer, reason = %why, "session refused by the site registry");
            return Err(Status::permission_denied(why));
        }
        if let Some(m) = &self.manifest {
            // The agents would refuse such a site as a peer anyway; refusing its session says
            // so at once, to the site, instead of as failed rounds.
            verifier
                .with_manifest(&m.get().signed)
                .verify_member(leaf.as_ref())
                .map_err(|e| {
                    warn!(site = %cert.common_name, %peer, reason = %e, "session refused by the federation manifest");
                    Status::permission_denied(format!("client certificate: {e}"))
                })?;
        }
        Ok((cert.common_name, peer, cert.serial, cert.not_after_unix))
    }
}

/// Whether a session's error is only its connection ending: the peer went away (end of file,
/// reset, broken pipe) or cancelled its stream. Anything else — a message too large, one that
/// does not decode — is the agent's fault and worth a warning.
fn connection_lost(e: &Status) -> bool {
    use std::io::ErrorKind;
    if e.code() == tonic::Code::Cancelled {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            )
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Tells the agent, if its queue has room, why the coordinator ended its session (it has
/// been recorded in the site's state by [`Hub::close`]). A certificate the registry no
/// longer admits is PERMISSION_DENIED, as at a new session: the agent knows at once that
/// retrying cannot help, instead of learning it one reconnection later.
fn tell_closed(
    hub: &Hub,
    site: &str,
    out: &crate::hub::Outbound,
    registry: Option<&crate::registry::LiveRegistry>,
    serial: &str,
) {
    if let Some(why) = registry.and_then(|r| r.get().refusal(site, serial)) {
        let _ = out.try_send(Err(Status::permission_denied(why)));
        return;
    }
    let reason = hub
        .sites
        .get(&site.to_string())
        .and_then(|s| s.last_rejection)
        .map_or_else(|| "session closed".to_string(), |(_, r)| r);
    let _ = out.try_send(Err(Status::aborted(format!(
        "the coordinator ended this session: {reason}"
    ))));
}

/// Why accepting `extra` more bytes would exceed `budget`, or None if it fits (or no budget is
/// set, or resident memory cannot be read).
pub fn over_budget(budget: Option<u64>, extra: u64) -> Option<String> {
    let budget = budget?;
    let resident = resident_bytes()?;
    (resident + extra > budget).then(|| {
        format!(
            "the coordinator's memory budget of {} MiB is reached ({} MiB resident): retry later",
            budget >> 20,
            resident >> 20
        )
    })
}

/// Resident set size of this process, from `/proc/self/statm` (Linux; 4 KiB pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Feeds an update chunk into the site's slot of the open aggregation, here on the site's own
/// connection task so uploads from different sites are added in parallel. The driver is told
/// when the update is complete or refused. Ok(true): refused (logged once, here); Err: the
/// driver is gone.
async fn upload(hub: &Hub, site: &str, chunk: &Chunk) -> Result<bool, ()> {
    let Some(open) = hub.uploads.get(&site.to_string()) else {
        debug!(%site, "update chunk outside an open aggregation: ignored");
        return Ok(false);
    };
    let (done, refused) = match open.sink.feed(&chunk.data, chunk.last) {
        Ok(done) => (done, false),
        Err(reason) => {
            warn!(%site, round = open.round, %reason, "update refused");
            (true, true)
        }
    };
    if done {
        let site = site.to_string();
        hub.inbox
            .send(Inbound::Uploaded { site })
            .await
            .map_err(|_| ())?;
    }
    Ok(refused)
}
