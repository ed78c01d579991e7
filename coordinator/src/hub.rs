//! Connected sites: who is there, how to reach them, and their per-site counters.
//!
//! Each agent session has a reader task that forwards the agent's messages into one inbox
//! consumed by the round driver, and an outbound channel the driver sends on. Updates are the
//! exception: the reader feeds them straight into the site's [`OpenUpload`], so uploads are
//! added in parallel by the readers instead of one by one by the driver. Per-site state
//! lives in a [`ShardedMap`] because reader tasks update it concurrently while the driver (and
//! later the status API) read it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use cohort_proto::v1::{Chunk, CoordinatorMessage, coordinator_message};
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tonic::Status;
use tracing::warn;

use crate::sharded::ShardedMap;
use crate::upload::OpenUpload;

pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// Messages queued to one site before a send waits for it to read: with chunks of at most
/// [`cohort_proto::CHUNK_BYTES`] this bounds the coordinator's memory per slow site to about
/// 2 MiB (plus what HTTP/2 flow control lets through), instead of a model's worth per site.
pub const SITE_OUTBOX_MESSAGES: usize = 32;

/// Bytes of one site's messages that may wait in the driver's inbox at once. A site that
/// sends faster than the driver reads is not read further (HTTP/2 flow control then stops it)
/// until the driver has taken its queued messages: one flooding site costs at most this much
/// memory and cannot crowd the others out of the inbox.
pub const SITE_INBOX_BYTES: usize = 8 << 20;

/// One session's share of the driver's inbox ([`SITE_INBOX_BYTES`]).
#[derive(Debug, Clone)]
pub struct InboxBudget(Arc<tokio::sync::Semaphore>);

impl Default for InboxBudget {
    fn default() -> Self {
        InboxBudget(Arc::new(tokio::sync::Semaphore::new(SITE_INBOX_BYTES)))
    }
}

impl InboxBudget {
    /// Waits until `msg` fits the session's budget and returns its share, held by the
    /// [`Inbound::Message`] until the driver drops it. A message larger than the whole budget
    /// waits for all of it.
    pub async fn admit(&self, msg: &cohort_proto::v1::AgentMessage) -> OwnedSemaphorePermit {
        let cost = prost::Message::encoded_len(msg).clamp(1, SITE_INBOX_BYTES);
        // The semaphore is never closed, so acquiring cannot fail; if it ever did, waiting
        // for nothing would be wrong, so the closed case waits forever instead of admitting.
        match self.0.clone().acquire_many_owned(cost as u32).await {
            Ok(permit) => permit,
            Err(_) => std::future::pending().await,
        }
    }
}

/// The coordinator's end of one site's session: where its messages go, and how to end it.
#[derive(Debug, Clone)]
struct Link {
    tx: Outbound,
    session: u64,
    /// Wakes the session's reader task, which then ends the session.
    close: Arc<Notify>,
}

/// Something to send to a site: one message, or bytes sent as chunks wrapped by the function.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Message(coordinator_message::Kind),
    Chunked(Bytes, fn(Chunk) -> coordinator_message::Kind),
}

/// What the coordinator knows about a site. Never data, never an update.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SiteState {
    pub id: u32,
    pub connected: bool,
    /// Increases with every new session, so a stale session's disconnect is ignored.
    pub session: u64,
    pub examples: u64,
    pub last_seen: Option<SystemTime>,
    pub rounds_joined: u64,
    pub dropouts: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_accuracy: Option<f64>,
    pub last_loss: Option<f64>,
    pub last_auc: Option<f64>,
    /// Regression tasks: the site's test RMSE in the label's units.
    #[serde(default)]
    pub last_rmse: Option<f64>,
    pub test_examples: u64,
    /// The site holds only a test set: it evaluates, never trains or sends statistics.
    #[serde(default)]
    pub evaluate_only: bool,
    /// The reason the site last gave for declining a round (its policy, a model it could not
    /// verify, failed training), with the round.
    #[serde(default)]
    pub last_decline: Option<(u64, String)>,
    /// How often the coordinator refused one of the site's SecAgg+ messages and excluded it
    /// from the rest of the attempt (a bad signature, an invalid key, a wrong revealed share),
    /// and the last such refusal with its round.
    #[serde(default)]
    pub rejections: u64,
    #[serde(default)]
    pub last_rejection: Option<(u64, String)>,
    /// What the site's own DP accountant last reported (at its join, after each round it
    /// priced, with a decline over its budget); None for a site without `[privacy]`.
    #[serde(default)]
    pub privacy: Option<SitePrivacy>,
    /// `privacy` came from the site in this process (its join or a later report), not from
    /// the store: only fresh figures can end a run, because a site may come back with a
    /// larger budget after a restart.
    #[serde(skip)]
    pub privacy_fresh: bool,
    /// The release the site's agent reported at its last join (None before it said).
    #[serde(default)]
    pub agent_version: Option<String>,
    /// When the client certificate of the site's last session expires (Unix seconds).
    #[serde(default)]
    pub certificate_expires_unix: Option<i64>,
}

/// A site's differential-privacy spend as it reports it. The coordinator can neither check
/// nor change it: the site's accountant enforces the budget. What the coordinator does with
/// it is say it (status API, metrics, the run summary) and not ask a site that would decline.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SitePrivacy {
    /// ε spent so far, at `delta`.
    pub epsilon: f64,
    pub delta: f64,
    /// The site's `privacy.epsilon`.
    pub budget: f64,
    /// ε after one more round like the last one the site priced.
    pub next_epsilon: Option<f64>,
    pub noise_multiplier: f64,
}

impl SitePrivacy {
    /// The site's figures, or which of them makes no sense (the report is then ignored: a
    /// garbled report must not make a site look exhausted, or fresh).
    pub fn from_wire(p: &cohort_proto::v1::PrivacySpent) -> Result<Self, String> {
        let check = |name: &str, v: f64, ok: bool| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(format!("privacy report: {name} = {v} is not a valid value"))
            }
        };
        check("epsilon", p.epsilon, p.epsilon >= 0.0)?;
        check("delta", p.delta, p.delta > 0.0 && p.delta < 1.0)?;
        check("budget", p.budget, p.budget > 0.0)?;
        check(
            "noise_multiplier",
            p.noise_multiplier,
            p.noise_multiplier > 0.0,
        )?;
        if let Some(n) = p.next_epsilon {
            check("next_epsilon", n, n >= p.epsilon)?;
        }
        Ok(SitePrivacy {
            epsilon: p.epsilon,
            delta: p.delta,
            budget: p.budget,
            next_epsilon: p.next_epsilon,
            noise_multiplier: p.noise_multiplier,
        })
    }

    /// Another round like the last would take the site past its budget, or past the
    /// federation's `privacy.epsilon` when the coordinator sets one: it is not asked.
    pub fn exhausted(&self, federation_cap: Option<f64>) -> bool {
        let cap = federation_cap.map_or(self.budget, |c| c.min(self.budget));
        self.next_epsilon.is_some_and(|n| n > cap)
    }
}

impl SiteState {
    fn new(id: u32) -> Self {
        SiteState {
            id,
            connected: false,
            session: 0,
            examples: 0,
            last_seen: None,
            rounds_joined: 0,
            dropouts: 0,
            bytes_in: 0,
            bytes_out: 0,
            last_accuracy: None,
            last_loss: None,
            last_auc: None,
            last_rmse: None,
            test_examples: 0,
            evaluate_only: false,
            last_decline: None,
            rejections: 0,
            last_rejection: None,
            privacy: None,
            privacy_fresh: false,
            agent_version: None,
            certificate_expires_unix: None,
        }
    }
}

/// A message from an agent, or the end of its session.
#[derive(Debug)]
pub enum Inbound {
    Message {
        site: String,
        msg: cohort_proto::v1::AgentMessage,
        /// The message's share of the site's [`SITE_INBOX_BYTES`], returned when the driver
        /// drops the message.
        permit: Option<OwnedSemaphorePermit>,
    },
    Disconnected {
        site: String,
        session: u64,
    },
    /// The site's update is complete or was refused: the driver may close the stage early.
    Uploaded {
        site: String,
    },
}

/// What kinds of message the coordinator has received, in total. In a secure run the count of
/// plain updates stays 0: an agent's update only ever arrives masked, inside SecAgg+ chunks.
#[derive(Debug, Default)]
pub struct Received {
    pub joins: AtomicU64,
    pub secagg_chunks: AtomicU64,
    pub plain_updates: AtomicU64,
    pub evaluations: AtomicU64,
    pub declines: AtomicU64,
    pub privacy_reports: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceivedCounts {
    pub joins: u64,
    pub secagg_chunks: u64,
    pub plain_updates: u64,
    pub evaluations: u64,
    pub declines: u64,
    pub privacy_reports: u64,
}

impl Received {
    pub fn count(&self, msg: &cohort_proto::v1::AgentMessage) {
        use cohort_proto::v1::agent_message::Kind;
        let counter = match &msg.kind {
            Some(Kind::Join(_)) => &self.joins,
            Some(Kind::Secagg(_) | Kind::MaskedInput(_)) => &self.secagg_chunks,
            Some(Kind::PlainUpdate(_)) => &self.plain_updates,
            Some(Kind::Eval(_)) => &self.evaluations,
            Some(Kind::Decline(_)) => &self.declines,
            Some(Kind::Privacy(_)) => &self.privacy_reports,
            None => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ReceivedCounts {
        ReceivedCounts {
            joins: self.joins.load(Ordering::Relaxed),
            secagg_chunks: self.secagg_chunks.load(Ordering::Relaxed),
            plain_updates: self.plain_updates.load(Ordering::Relaxed),
            evaluations: self.evaluations.load(Ordering::Relaxed),
            declines: self.declines.load(Ordering::Relaxed),
            privacy_reports: self.privacy_reports.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
pub struct Hub {
    pub sites: ShardedMap<String, SiteState>,
    pub received: Received,
    outbound: ShardedMap<String, Link>,
    /// The open aggregation's slot per site; empty between aggregations.
    pub uploads: ShardedMap<String, OpenUpload>,
    ids: Mutex<BTreeMap<String, u32>>,
    pub inbox: mpsc::Sender<Inbound>,
    /// Set when the last round is committed: a site that joins afterwards is told so.
    pub finished: std::sync::atomic::AtomicBool,
}

impl Hub {
    pub fn new(inbox: mpsc::Sender<Inbound>) -> Self {
        Hub {
            sites: ShardedMap::new(4),
            outbound: ShardedMap::new(4),
            uploads: ShardedMap::new(4),
            ids: Mutex::new(BTreeMap::new()),
            received: Received::default(),
            inbox,
            finished: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Registers a new session of `site` and returns (site id, session number), or the
    /// session already connected for it.
    ///
    /// A site has at most one session. A second one with the same certificate is refused
    /// rather than replacing the first: replacing would let two agents with one bundle
    /// evict each other forever, and the evicted one could be left connected but idle. A
    /// session whose agent died is noticed by HTTP/2 keepalive (or its reset), after which
    /// the site can connect again. The check and the claim happen under the shard's lock, so
    /// two joins racing each other cannot both win.
    ///
    /// `close` is notified when the coordinator ends the session ([`Hub::close`]).
    pub fn connect(
        &self,
        site: &str,
        examples: u64,
        evaluate_only: bool,
        tx: Outbound,
        close: Arc<Notify>,
    ) -> Result<(u32, u64), u64> {
        let id = {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            let next = ids.len() as u32;
            *ids.entry(site.to_string()).or_insert(next)
        };
        let session = self.sites.update(
            &site.to_string(),
            || SiteState::new(id),
            |s| {
                if s.connected {
                    return Err(s.session);
                }
                s.connected = true;
                s.session += 1;
                s.examples = examples;
                s.evaluate_only = evaluate_only;
                s.last_seen = Some(SystemTime::now());
                Ok(s.session)
            },
        )?;
        let link = Link { tx, session, close };
        self.outbound
            .update(&site.to_string(), || link.clone(), |l| *l = link.clone());
        Ok((id, session))
    }

    pub fn disconnect(&self, site: &str, session: u64) {
        let current = self
            .sites
            .update(&site.to_string(), unreachable_state, |s| {
                if s.session == session {
                    s.connected = false;
                    true
                } else {
                    false
                }
            });
        if current {
            self.outbound.remove(&site.to_string());
        }
    }

    pub fn touch(&self, site: &str, bytes: u64) {
        self.sites
            .update(&site.to_string(), unreachable_state, |s| {
                s.last_seen = Some(SystemTime::now());
                s.bytes_in += bytes;
            });
    }

    /// Connected sites as (name, state), ordered by site id.
    pub fn connected(&self) -> Vec<(String, SiteState)> {
        let mut v: Vec<_> = self
            .sites
            .snapshot()
            .into_iter()
            .filter(|(_, s)| s.connected)
            .collect();
        v.sort_by_key(|(_, s)| s.id);
        v
    }

    /// Ends `site`'s current session from this side (it did not read its messages in time,
    /// or sent what no agent sends), recording why in the site's state. The site is
    /// disconnected at once, so no later send waits for it; its agent may connect again.
    pub fn close(&self, site: &str, round: u64, reason: &str) {
        let Some(link) = self.outbound.get(&site.to_string()) else {
            return;
        };
        warn!(%site, round, %reason, "session closed by the coordinator");
        self.record(site, |s| {
            s.rejections += 1;
            s.last_rejection = Some((round, format!("session closed: {reason}")));
        });
        self.disconnect(site, link.session);
        link.close.notify_one();
    }

    /// Sends one message; false if the site is gone or does not take it within 30 s.
    pub async fn send(&self, site: &str, msg: coordinator_message::Kind) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        tokio::time::timeout_at(deadline, self.send_all(site, &[Outgoing::Message(msg)]))
            .await
            .unwrap_or(false)
    }

    /// Sends `items` to `site` in order; false if its session is gone. Waits while the site's
    /// queue is full: callers bound the wait.
    async fn send_all(&self, site: &str, items: &[Outgoing]) -> bool {
        let Some(link) = self.outbound.get(&site.to_string()) else {
            return false;
        };
        for item in items {
            let chunks: Box<dyn Iterator<Item = coordinator_message::Kind> + Send> = match item {
                Outgoing::Message(kind) => Box::new(std::iter::once(kind.clone())),
                Outgoing::Chunked(bytes, wrap) => {
                    Box::new(cohort_proto::chunks(bytes.clone()).map(*wrap))
                }
            };
            for kind in chunks {
                let message = CoordinatorMessage { kind: Some(kind) };
                let bytes = prost::Message::encoded_len(&message) as u64;
                if link.tx.send(Ok(message)).await.is_err() {
                    return false;
                }
                self.sites
                    .update(&site.to_string(), unreachable_state, |s| {
                        s.bytes_out += bytes
                    });
            }
        }
        true
    }

    /// Sends every site its messages, all sites at once, under one deadline: a site that does
    /// not read cannot hold up the others, nor the round for longer than `deadline`. A site
    /// still connected that has not taken all its messages by then is disconnected
    /// ([`Hub::close`]). Returns the sites that did not get all their messages.
    pub async fn deliver(
        self: &Arc<Self>,
        round: u64,
        batches: Vec<(String, Vec<Outgoing>)>,
        deadline: Instant,
    ) -> Vec<String> {
        let mut tasks = tokio::task::JoinSet::new();
        for (site, items) in batches {
            let hub = self.clone();
            tasks.spawn(async move {
                let sent = tokio::time::timeout_at(deadline, hub.send_all(&site, &items)).await;
                match sent {
                    Ok(true) => None,
                    Ok(false) => Some(site),
                    Err(_) => {
                        hub.close(
                            &site,
                            round,
                            "did not read the coordinator's messages before the stage deadline",
                        );
                        Some(site)
                    }
                }
            });
        }
        let mut failed = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(Some(site)) = done {
                failed.push(site);
            }
        }
        failed.sort();
        failed
    }

    /// Lock statistics of every sharded map, by map name.
    pub fn shard_stats(&self) -> Vec<(&'static str, Vec<crate::sharded::ShardStats>)> {
        vec![
            ("sites", self.sites.stats()),
            ("outbound", self.outbound.stats()),
            ("uploads", self.uploads.stats()),
        ]
    }

    /// Takes up the registry of a resumed run: ids and counters, every site disconnected
    /// until it connects again.
    pub fn restore(&self, sites: std::collections::BTreeMap<String, SiteState>) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        for (name, mut state) in sites {
            state.connected = false;
            ids.insert(name.clone(), state.id);
            self.sites.insert(name, state);
        }
    }

    /// The privacy figures of every training site that reports them (evaluation-only sites
    /// release no training, so they are no part of the federation's ε).
    pub fn training_privacy(&self) -> Vec<SitePrivacy> {
        self.sites
            .snapshot()
            .into_iter()
            .filter(|(_, s)| !s.evaluate_only)
            .filter_map(|(_, s)| s.privacy)
            .collect()
    }

    pub fn record(&self, site: &str, f: impl FnOnce(&mut SiteState)) {
        self.sites.update(&site.to_string(), unreachable_state, f);
    }
}

/// Sites are inserted by `connect` before anything else touches them; an update for an
/// unknown site (a race with nothing to lose) records into a throwaway state.
fn unreachable_state() -> SiteState {
    SiteState::new(u32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A site's privacy figures are taken as reported only when they make sense: a garbled
    /// report must neither make a site look fresh nor exhausted.
    #[test]
    fn privacy_reports_that_make_no_sense_are_refused_and_exhaustion_honours_the_cap() {
        let good = cohort_proto::v1::PrivacySpent {
            epsilon: 1.0,
            delta: 1e-5,
            budget: 3.0,
            next_epsilon: Some(2.0),
            noise_multiplier: 1.5,
        };
        let p = SitePrivacy::from_wire(&good).unwrap();
        assert!(!p.exhausted(None));
        assert!(p.exhausted(Some(1.5)), "the federation's cap is lower");
        assert!(
            !p.exhausted(Some(10.0)),
            "the site's own budget still binds"
        );
        let fresh = SitePrivacy::from_wire(&cohort_proto::v1::PrivacySpent {
            next_epsilon: None,
            ..good
        })
        .unwrap();
        assert!(!fresh.exhausted(Some(0.1)));
        let bad = [
            (
                "epsilon",
                cohort_proto::v1::PrivacySpent {
                    epsilon: f64::NAN,
                    ..good
                },
            ),
            (
                "epsilon",
                cohort_proto::v1::PrivacySpent {
                    epsilon: -1.0,
                    ..good
                },
            ),
            (
                "delta",
                cohort_proto::v1::PrivacySpent { delta: 1.0, ..good },
            ),
            (
                "budget",
                cohort_proto::v1::PrivacySpent {
                    budget: f64::INFINITY,
                    ..good
                },
            ),
            (
                "noise_multiplier",
                cohort_proto::v1::PrivacySpent {
                    noise_multiplier: 0.0,
                    ..good
                },
            ),
            (
                "next_epsilon",
                cohort_proto::v1::PrivacySpent {
                    next_epsilon: Some(0.5),
                    ..good
                },
            ),
        ];
        for (field, report) in bad {
            let e = SitePrivacy::from_wire(&report).unwrap_err();
            assert!(e.contains(&format!("{field} = ")), "{field}: {e}");
        }
    }

    #[test]
    fn a_second_session_of_a_connected_site_is_refused_until_the_first_ends() {
        let (inbox, _rx) = mpsc::channel(1);
        let hub = Hub::new(inbox);
        let (out, _o) = mpsc::channel(1);
        let close = Arc::new(Notify::new());
        let (id, first) = hub
            .connect("cleveland", 10, false, out.clone(), close.clone())
            .unwrap();
        assert_eq!(
            hub.connect("cleveland", 10, false, out.clone(), close.clone()),
            Err(first)
        );
        // The refused newcomer changed nothing: the first session is still the site's.
        let state = hub.sites.get(&"cleveland".to_string()).unwrap();
        assert!(state.connected);
        assert_eq!(state.session, first);
        assert!(hub.outbound.get(&"cleveland".to_string()).is_some());
        // A stale disconnect (an older session) does not end the current one.
        hub.disconnect("cleveland", first - 1);
        assert!(
            hub.connect("cleveland", 10, false, out.clone(), close.clone())
                .is_err()
        );
        hub.disconnect("cleveland", first);
        let (again, second) = hub.connect("cleveland", 12, false, out, close).unwrap();
        assert_eq!((again, second), (id, first + 1));
    }

    #[tokio::test]
    async fn a_site_that_does_not_read_is_closed_at_the_deadline_and_the_others_get_everything() {
        let (inbox, _rx) = mpsc::channel(1);
        let hub = Arc::new(Hub::new(inbox));
        let (fast_tx, mut fast_rx) = mpsc::channel(SITE_OUTBOX_MESSAGES);
        let (slow_tx, _slow_rx) = mpsc::channel(SITE_OUTBOX_MESSAGES);
        let slow_close = Arc::new(Notify::new());
        hub.connect("cleveland", 1, false, fast_tx, Arc::new(Notify::new()))
            .unwrap();
        hub.connect("va", 1, false, slow_tx, slow_close.clone())
            .unwrap();
        // A model of 3 x SITE_OUTBOX_MESSAGES chunks: more than a queue holds.
        let model = Bytes::from(vec![
            1u8;
            3 * SITE_OUTBOX_MESSAGES * cohort_proto::CHUNK_BYTES
        ]);
        let chunks = 3 * SITE_OUTBOX_MESSAGES;
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while let Some(Ok(_)) = fast_rx.recv().await {
                n += 1;
            }
            n
        });
        let batch = vec![Outgoing::Chunked(model, coordinator_message::Kind::Model)];
        let deadline = Instant::now() + Duration::from_millis(300);
        let failed = hub
            .deliver(
                7,
                vec![("cleveland".into(), batch.clone()), ("va".into(), batch)],
                deadline,
            )
            .await;
        assert_eq!(failed, vec!["va".to_string()]);
        let va = hub.sites.get(&"va".to_string()).unwrap();
        assert!(!va.connected, "closed");
        assert_eq!(va.rejections, 1);
        let (round, reason) = va.last_rejection.unwrap();
        assert_eq!(round, 7);
        assert!(reason.contains("did not read"), "{reason}");
        // The session's reader task is told to end the session.
        tokio::time::timeout(Duration::from_secs(1), slow_close.notified())
            .await
            .expect("close notified");
        // Later sends to the closed site fail at once instead of waiting.
        assert!(
            !hub.send("va", coordinator_message::Kind::Model(Chunk::default()))
                .await
        );
        hub.disconnect("cleveland", 1);
        assert_eq!(reader.await.unwrap(), chunks);
    }

    #[tokio::test]
    async fn a_site_cannot_queue_more_than_its_inbox_budget() {
        use cohort_proto::v1::{AgentMessage, agent_message};
        let budget = InboxBudget::default();
        let chunk = |n: usize| AgentMessage {
            kind: Some(agent_message::Kind::Secagg(Chunk {
                data: vec![0u8; n].into(),
                last: false,
            })),
        };
        // Messages the driver has not taken yet hold their shares.
        let mut queued = Vec::new();
        let per = prost::Message::encoded_len(&chunk(60 << 10));
        for _ in 0..SITE_INBOX_BYTES / per {
            queued.push(budget.admit(&chunk(60 << 10)).await);
        }
        let one = chunk(60 << 10);
        let next = tokio::time::timeout(Duration::from_millis(200), budget.admit(&one));
        assert!(
            next.await.is_err(),
            "the reader waits once the budget is used"
        );
        // The driver drops one message: the next is admitted.
        queued.pop();
        let admitted = tokio::time::timeout(Duration::from_secs(5), budget.admit(&one));
        assert!(admitted.await.is_ok());
        // A message larger than the whole budget waits for all of it, rather than forever.
        queued.clear();
        let too_big = chunk(SITE_INBOX_BYTES * 2);
        let huge = tokio::time::timeout(Duration::from_secs(5), budget.admit(&too_big));
        assert!(huge.await.is_ok());
    }
}
