//! Connected sites: who is there, how to reach them, and their per-site counters.
//!
//! Each agent session has a reader task that forwards the agent's messages into one inbox
//! consumed by the round driver, and an outbound channel the driver sends on. Updates are the
//! exception: the reader feeds them straight into the site's [`OpenUpload`], so uploads are
//! added in parallel by the readers instead of one by one by the driver. Per-site state
//! lives in a [`ShardedMap`] because reader tasks update it concurrently while the driver (and
//! later the status API) read it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use cohort_proto::v1::{Chunk, CoordinatorMessage, coordinator_message};
use tokio::sync::mpsc;
use tonic::Status;

use crate::sharded::ShardedMap;
use crate::upload::OpenUpload;

pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

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
    pub test_examples: u64,
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
            test_examples: 0,
            last_decline: None,
            rejections: 0,
            last_rejection: None,
        }
    }
}

/// A message from an agent, or the end of its session.
#[derive(Debug)]
pub enum Inbound {
    Message {
        site: String,
        msg: cohort_proto::v1::AgentMessage,
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
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceivedCounts {
    pub joins: u64,
    pub secagg_chunks: u64,
    pub plain_updates: u64,
    pub evaluations: u64,
    pub declines: u64,
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
        }
    }
}

#[derive(Debug)]
pub struct Hub {
    pub sites: ShardedMap<String, SiteState>,
    pub received: Received,
    outbound: ShardedMap<String, Outbound>,
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
    pub fn connect(&self, site: &str, examples: u64, tx: Outbound) -> Result<(u32, u64), u64> {
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
                s.last_seen = Some(SystemTime::now());
                Ok(s.session)
            },
        )?;
        self.outbound
            .update(&site.to_string(), || tx.clone(), |t| *t = tx.clone());
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

    /// Sends one message; false if the site is gone or does not read within 30 s.
    pub async fn send(&self, site: &str, msg: coordinator_message::Kind) -> bool {
        let Some(tx) = self.outbound.get(&site.to_string()) else {
            return false;
        };
        let message = CoordinatorMessage { kind: Some(msg) };
        let bytes = prost::Message::encoded_len(&message) as u64;
        let ok = tokio::time::timeout(Duration::from_secs(30), tx.send(Ok(message)))
            .await
            .is_ok_and(|r| r.is_ok());
        if ok {
            self.sites
                .update(&site.to_string(), unreachable_state, |s| {
                    s.bytes_out += bytes
                });
        }
        ok
    }

    /// Sends `bytes` as chunks of [`cohort_proto::CHUNK_BYTES`], wrapped by `wrap`. The chunks
    /// share `bytes` (a model sent to every site is in memory once).
    pub async fn send_chunked(
        &self,
        site: &str,
        bytes: &Bytes,
        wrap: fn(Chunk) -> coordinator_message::Kind,
    ) -> bool {
        for chunk in cohort_proto::chunks(bytes.clone()) {
            if !self.send(site, wrap(chunk)).await {
                return false;
            }
        }
        true
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

    #[test]
    fn a_second_session_of_a_connected_site_is_refused_until_the_first_ends() {
        let (inbox, _rx) = mpsc::channel(1);
        let hub = Hub::new(inbox);
        let (out, _o) = mpsc::channel(1);
        let (id, first) = hub.connect("cleveland", 10, out.clone()).unwrap();
        assert_eq!(hub.connect("cleveland", 10, out.clone()), Err(first));
        // The refused newcomer changed nothing: the first session is still the site's.
        let state = hub.sites.get(&"cleveland".to_string()).unwrap();
        assert!(state.connected);
        assert_eq!(state.session, first);
        assert!(hub.outbound.get(&"cleveland".to_string()).is_some());
        // A stale disconnect (an older session) does not end the current one.
        hub.disconnect("cleveland", first - 1);
        assert!(hub.connect("cleveland", 10, out.clone()).is_err());
        hub.disconnect("cleveland", first);
        let (again, second) = hub.connect("cleveland", 12, out).unwrap();
        assert_eq!((again, second), (id, first + 1));
    }
}
