//! The sharded maps' lock contention over time: what the dashboard draws as a heat map of
//! shard × time, so an operator without Grafana still sees whether one shard is hot.
//!
//! The shards only keep running totals (acquisitions, nanoseconds waited); a heat map needs
//! rates. A sampler task ([`run`]) takes the totals every [`SAMPLE_SECS`] and keeps the
//! differences of the last [`SAMPLES`] intervals. Memory is fixed: samples × shards numbers,
//! whatever the run's length (the long-run memory issue forbids anything that grows per round).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::hub::Hub;

/// Seconds between samples: short enough that a round's burst shows as its own column.
pub const SAMPLE_SECS: u64 = 2;
/// Samples kept: ten minutes at [`SAMPLE_SECS`].
pub const SAMPLES: usize = 300;

/// One interval: per shard (in the order of [`ContentionDoc::shards`]), the acquisitions and
/// the seconds spent waiting for the lock during it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    pub unix: u64,
    pub acquisitions: Vec<u64>,
    pub wait_seconds: Vec<f64>,
}

/// What `/api/v1/shards` serves.
#[derive(Debug, Clone, Serialize)]
pub struct ContentionDoc {
    pub interval_seconds: u64,
    /// "map/shard" for each row, e.g. "sites/3".
    pub shards: Vec<String>,
    /// Oldest first.
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct History {
    shards: Vec<String>,
    /// The totals at the last sample, to difference the next one against.
    last: Vec<(u64, u64)>,
    samples: VecDeque<Sample>,
}

/// The sampled history. One mutex: written every [`SAMPLE_SECS`], read per request.
#[derive(Debug, Default)]
pub struct Contention {
    history: Mutex<History>,
}

impl Contention {
    /// Adds one interval from the maps' current totals. The first call only sets the
    /// baseline; a shard list that changed (it never does in one process) starts over.
    pub fn sample(&self, unix: u64, maps: &[(&str, Vec<crate::sharded::ShardStats>)]) {
        let mut names = Vec::new();
        let mut totals = Vec::new();
        for (map, stats) in maps {
            for (i, s) in stats.iter().enumerate() {
                names.push(format!("{map}/{i}"));
                totals.push((s.acquisitions, s.wait_nanos));
            }
        }
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.shards != names {
            *h = History {
                shards: names,
                last: totals,
                samples: VecDeque::new(),
            };
            return;
        }
        let sample = Sample {
            unix,
            acquisitions: totals
                .iter()
                .zip(&h.last)
                .map(|(now, was)| now.0.saturating_sub(was.0))
                .collect(),
            wait_seconds: totals
                .iter()
                .zip(&h.last)
                .map(|(now, was)| now.1.saturating_sub(was.1) as f64 / 1e9)
                .collect(),
        };
        if h.samples.len() == SAMPLES {
            h.samples.pop_front();
        }
        h.samples.push_back(sample);
        h.last = totals;
    }

    pub fn doc(&self) -> ContentionDoc {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        ContentionDoc {
            interval_seconds: SAMPLE_SECS,
            shards: h.shards.clone(),
            samples: h.samples.iter().cloned().collect(),
        }
    }
}

/// Samples `hub`'s maps until the task is dropped.
pub async fn run(contention: Arc<Contention>, hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(SAMPLE_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        contention.sample(crate::unix_seconds(), &hub.shard_stats());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharded::ShardStats;

    fn stats(acq: &[u64], wait: &[u64]) -> Vec<ShardStats> {
        acq.iter()
            .zip(wait)
            .map(|(&acquisitions, &wait_nanos)| ShardStats {
                acquisitions,
                wait_nanos,
                len: 0,
            })
            .collect()
    }

    #[test]
    fn samples_are_the_differences_of_the_totals_and_the_window_is_bounded() {
        let c = Contention::default();
        c.sample(10, &[("sites", stats(&[5, 7], &[0, 1_000]))]);
        assert!(c.doc().samples.is_empty(), "the first call is the baseline");
        c.sample(12, &[("sites", stats(&[9, 7], &[500_000_000, 1_000]))]);
        let doc = c.doc();
        assert_eq!(doc.shards, ["sites/0", "sites/1"]);
        assert_eq!(
            doc.samples,
            [Sample {
                unix: 12,
                acquisitions: vec![4, 0],
                wait_seconds: vec![0.5, 0.0],
            }]
        );
        for t in 0..SAMPLES as u64 + 5 {
            c.sample(20 + t, &[("sites", stats(&[9 + t, 7], &[0, 0]))]);
        }
        let doc = c.doc();
        assert_eq!(doc.samples.len(), SAMPLES);
        assert_eq!(
            doc.samples.last().map(|s| s.unix),
            Some(20 + SAMPLES as u64 + 4)
        );
    }
}
