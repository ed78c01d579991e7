//! Prometheus metrics (`/metrics` on the status port), through `prometheus-client`.
//!
//! The driver updates round metrics as rounds happen. Values that live elsewhere — connected
//! sites, bytes, and the sharded maps' per-shard lock statistics — are copied in when a scrape
//! arrives (`Metrics::refresh`), so the hot paths pay nothing for them. Per-shard lock
//! acquisitions and wait time carry `map` and `shard` labels, so contention shows as a heat map
//! over shards (deploy/grafana/cohort.json).
//!
//! Counters never go down, restarts included: Prometheus reads a lower value as a reset and
//! `rate()` then invents traffic. Every counter (histograms too) is restorable
//! ([`Counters`]): the status API saves them in the store before it answers a scrape with
//! values above the saved ones, and a starting coordinator restores them before its status
//! API answers. Values copied from the hub advance by the hub's growth since the last
//! scrape, not to its total, since the hub's totals start again with the process.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::hub::Hub;
use crate::records::Evaluation;
use crate::sharded::ShardStats;

type Labels = Vec<(String, String)>;

/// Upper bounds of the stage-duration buckets: 1 ms to ~4.4 min, ×4 each.
fn stage_bounds() -> Vec<f64> {
    (0..10).map(|i| 0.001 * 4f64.powi(i)).collect()
}

/// A histogram's counts: what [`StageHistogram`] holds and [`Counters`] saves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramState {
    pub sum: f64,
    pub count: u64,
    /// Observations per bucket (not cumulative), the last being +Inf.
    pub buckets: Vec<u64>,
}

/// The stage-duration histogram: prometheus-client's own cannot be restored, this one can.
#[derive(Debug, Clone)]
pub struct StageHistogram {
    bounds: std::sync::Arc<Vec<f64>>,
    state: std::sync::Arc<Mutex<HistogramState>>,
}

impl Default for StageHistogram {
    fn default() -> Self {
        let bounds = stage_bounds();
        let state = HistogramState {
            buckets: vec![0; bounds.len() + 1],
            ..HistogramState::default()
        };
        StageHistogram {
            bounds: std::sync::Arc::new(bounds),
            state: std::sync::Arc::new(Mutex::new(state)),
        }
    }
}

impl StageHistogram {
    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        let mut s = lock(&self.state);
        s.sum += v;
        s.count += 1;
        if let Some(b) = s.buckets.get_mut(i) {
            *b += 1;
        }
    }

    pub fn state(&self) -> HistogramState {
        lock(&self.state).clone()
    }

    /// Takes up a saved state when it is ahead of this one (as after a restart).
    fn restore(&self, saved: &HistogramState) {
        let mut s = lock(&self.state);
        if saved.count >= s.count && saved.buckets.len() == s.buckets.len() {
            *s = saved.clone();
        }
    }
}

impl TypedMetric for StageHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for StageHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = self.state();
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(s.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum, s.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Every counter's value, as saved in the store between restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub rounds_completed: u64,
    /// Rounds given up (recorded, the model unchanged): absent in counters saved before.
    #[serde(default)]
    pub rounds_failed: u64,
    pub attempts_aborted: u64,
    pub dropouts: u64,
    pub clipped_values: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    pub site_rejections: u64,
    /// By stage.
    pub stages: BTreeMap<String, HistogramState>,
    /// By "map/shard": lock acquisitions and seconds waited.
    pub shards: BTreeMap<String, (u64, f64)>,
}

impl Counters {
    /// Whether any value here is above `saved`'s (what a scrape must not serve unsaved).
    pub fn ahead_of(&self, saved: &Counters) -> bool {
        let simple = [
            (self.rounds_completed, saved.rounds_completed),
            (self.rounds_failed, saved.rounds_failed),
            (self.attempts_aborted, saved.attempts_aborted),
            (self.dropouts, saved.dropouts),
            (self.clipped_values, saved.clipped_values),
            (self.received_bytes, saved.received_bytes),
            (self.sent_bytes, saved.sent_bytes),
            (self.site_rejections, saved.site_rejections),
        ];
        simple.iter().any(|(a, b)| a > b)
            || self
                .stages
                .iter()
                .any(|(k, h)| saved.stages.get(k).is_none_or(|s| h.count > s.count))
            || self
                .shards
                .iter()
                .any(|(k, v)| saved.shards.get(k).is_none_or(|s| v.0 > s.0 || v.1 > s.1))
    }
}

/// The hub's totals as of the last scrape: counters copied from the hub advance by the
/// difference, so a restored counter keeps its restored value as its base.
#[derive(Debug, Default)]
struct HubSeen {
    received: u64,
    sent: u64,
    rejections: u64,
    shards: BTreeMap<String, (u64, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rounds_completed: Counter,
    /// Rounds the run gave up and went on from (a refused sum, too few sites left to retry
    /// with): repeated failures are the operator's signal.
    pub rounds_failed: Counter,
    pub attempts_aborted: Counter,
    pub stage_seconds: Family<Labels, StageHistogram>,
    pub dropouts: Counter,
    pub clipped_values: Counter,
    pub current_round: Gauge,
    pub model_parameters: Gauge,
    pub round_accuracy: Gauge<f64, AtomicU64>,
    pub round_loss: Gauge<f64, AtomicU64>,
    /// Every metric of the task after the last round, labelled `metric` (accuracy,
    /// balanced_accuracy, f1, macro_f1, auc, rmse, mae, r2) and `over` (`sites`: the mean of
    /// sites; `pooled`: all test sets pooled, i.e. example-weighted).
    round_metric: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Seconds since the run last moved (a stage opened or closed, a round started or was
    /// committed); 0 once it has finished. The stall alert watches it.
    pub seconds_since_progress: Gauge<f64, AtomicU64>,
    /// How long the coordinator has been waiting for `rounds.min_sites` (0 when not waiting).
    pub waiting_for_sites_seconds: Gauge<f64, AtomicU64>,
    /// `rounds.min_sites`, so alerts compare the connected sites against the configuration
    /// instead of a number written into the alert.
    pub min_sites: Gauge,
    sites_connected: Gauge,
    /// The largest ε a training site reports (example-level DP); absent with no DP site.
    privacy_epsilon: Gauge<f64, AtomicU64>,
    privacy_sites_exhausted: Gauge,
    /// Site-level DP: the federation's ε per site over every noisy sum it unmasked.
    pub site_epsilon: Gauge<f64, AtomicU64>,
    /// The coordinator's `privacy.epsilon`, set once at start.
    pub privacy_target: std::sync::OnceLock<f64>,
    bytes_received: Counter,
    bytes_sent: Counter,
    site_rejections: Counter,
    shard_acquisitions: Family<Labels, Counter>,
    shard_wait_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    /// Serialises refresh-and-encode, so two scrapes never interleave their counter deltas;
    /// holds the hub's totals as of the last scrape.
    scrape: Mutex<HubSeen>,
    /// The stage labels observed (the histogram family does not list its members).
    stages: Mutex<std::collections::BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("cohort"),
            rounds_completed: Counter::default(),
            rounds_failed: Counter::default(),
            attempts_aborted: Counter::default(),
            stage_seconds: Family::default(),
            dropouts: Counter::default(),
            clipped_values: Counter::default(),
            current_round: Gauge::default(),
            model_parameters: Gauge::default(),
            round_accuracy: Gauge::default(),
            round_loss: Gauge::default(),
            round_metric: Family::default(),
            seconds_since_progress: Gauge::default(),
            waiting_for_sites_seconds: Gauge::default(),
            min_sites: Gauge::default(),
            sites_connected: Gauge::default(),
            privacy_epsilon: Gauge::default(),
            site_epsilon: Gauge::default(),
            privacy_sites_exhausted: Gauge::default(),
            privacy_target: std::sync::OnceLock::new(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            site_rejections: Counter::default(),
            shard_acquisitions: Family::default(),
            shard_wait_seconds: Family::default(),
            scrape: Mutex::new(HubSeen::default()),
            stages: Mutex::new(std::collections::BTreeSet::new()),
        };
        let r = &mut m.registry;
        r.register(
            "rounds_completed",
            "Training rounds committed",
            m.rounds_completed.clone(),
        );
        r.register(
            "rounds_failed",
            "Rounds given up with the model unchanged (a refused sum, no sites left to retry with); the run goes on",
            m.rounds_failed.clone(),
        );
        r.register(
            "round_attempts_aborted",
            "Round attempts aborted and retried (lost quorum, partial upload, timeout)",
            m.attempts_aborted.clone(),
        );
        r.register(
            "stage_duration_seconds",
            "Duration of each SecAgg+ stage and of evaluations, by stage",
            m.stage_seconds.clone(),
        );
        r.register(
            "dropouts",
            "Sites that dropped out of a round",
            m.dropouts.clone(),
        );
        r.register(
            "clipped_values",
            "Update values clipped to the clipping range (sum over sites)",
            m.clipped_values.clone(),
        );
        r.register(
            "current_round",
            "Round in progress (or last committed)",
            m.current_round.clone(),
        );
        r.register(
            "model_parameters",
            "Parameters of the global model",
            m.model_parameters.clone(),
        );
        r.register(
            "round_accuracy",
            "Mean site test accuracy after the last round",
            m.round_accuracy.clone(),
        );
        r.register(
            "round_loss",
            "Example-weighted test loss after the last round",
            m.round_loss.clone(),
        );
        r.register(
            "round_metric",
            "Test metrics after the last round, by metric and over (sites: mean of sites; pooled: example-weighted)",
            m.round_metric.clone(),
        );
        r.register(
            "seconds_since_progress",
            "Seconds since the run last changed stage or round (0 when finished); a stall signal",
            m.seconds_since_progress.clone(),
        );
        r.register(
            "waiting_for_sites_seconds",
            "Seconds the coordinator has waited for rounds.min_sites connected sites (0 when not waiting)",
            m.waiting_for_sites_seconds.clone(),
        );
        r.register(
            "min_sites",
            "rounds.min_sites: training sites a round needs",
            m.min_sites.clone(),
        );
        r.register(
            "sites_connected",
            "Sites with an open session",
            m.sites_connected.clone(),
        );
        r.register(
            "privacy_epsilon",
            "The largest differential-privacy epsilon a training site reports spending (its DP-SGD accountant, at its delta); 0 with no DP site",
            m.privacy_epsilon.clone(),
        );
        r.register(
            "privacy_site_epsilon",
            "Site-level differential privacy (privacy.site_level): the federation's epsilon per site over every noisy secure sum the coordinator unmasked; 0 without it",
            m.site_epsilon.clone(),
        );
        r.register(
            "privacy_sites_exhausted",
            "Training sites whose privacy budget cannot pay for another round (they are not asked to train)",
            m.privacy_sites_exhausted.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes received from agents",
            m.bytes_received.clone(),
        );
        r.register("sent_bytes", "Bytes sent to agents", m.bytes_sent.clone());
        r.register(
            "site_rejections",
            "Sites' SecAgg+ messages refused, and sessions the coordinator closed, for misbehaviour (per site in /api/v1/sites)",
            m.site_rejections.clone(),
        );
        r.register(
            "shard_lock_acquisitions",
            "Lock acquisitions per shard of the sharded round-state maps",
            m.shard_acquisitions.clone(),
        );
        r.register(
            "shard_lock_wait_seconds",
            "Time spent waiting for each shard's lock",
            m.shard_wait_seconds.clone(),
        );
        m
    }

    /// Copies the hub's current values in: counters advance by the hub's growth since the
    /// last scrape (`seen`).
    fn refresh(&self, hub: &Hub, seen: &mut HubSeen) {
        let sites = hub.sites.snapshot();
        self.sites_connected
            .set(sites.iter().filter(|(_, s)| s.connected).count() as i64);
        let privacy = hub.training_privacy();
        self.privacy_epsilon
            .set(privacy.iter().map(|p| p.epsilon).fold(0.0, f64::max));
        let cap = self.privacy_target.get().copied();
        self.privacy_sites_exhausted
            .set(privacy.iter().filter(|p| p.exhausted(cap)).count() as i64);
        let advance = |c: &Counter, seen: &mut u64, total: u64| {
            c.inc_by(total.saturating_sub(*seen));
            *seen = total;
        };
        advance(
            &self.bytes_received,
            &mut seen.received,
            sites.iter().map(|(_, s)| s.bytes_in).sum(),
        );
        advance(
            &self.bytes_sent,
            &mut seen.sent,
            sites.iter().map(|(_, s)| s.bytes_out).sum(),
        );
        advance(
            &self.site_rejections,
            &mut seen.rejections,
            sites.iter().map(|(_, s)| s.rejections).sum(),
        );
        for (map, stats) in hub.shard_stats() {
            self.shards(map, &stats, seen);
        }
    }

    fn shards(&self, map: &str, stats: &[ShardStats], seen: &mut HubSeen) {
        for (i, s) in stats.iter().enumerate() {
            let labels = vec![
                ("map".to_string(), map.to_string()),
                ("shard".to_string(), i.to_string()),
            ];
            let was = seen.shards.entry(format!("{map}/{i}")).or_default();
            self.shard_acquisitions
                .get_or_create(&labels)
                .inc_by(s.acquisitions.saturating_sub(was.0));
            // Created even at zero, so every shard has a series from the first scrape (a
            // heat map with holes reads as missing data, not as a quiet shard).
            let waited = s.wait_nanos.saturating_sub(was.1);
            let wait = self.shard_wait_seconds.get_or_create(&labels);
            if waited > 0 {
                wait.inc_by(waited as f64 / 1e9);
            }
            *was = (s.acquisitions, s.wait_nanos);
        }
    }

    /// Every counter's current value.
    pub fn counters(&self) -> Counters {
        let seen = lock(&self.scrape);
        self.counters_seen(&seen)
    }

    fn counters_seen(&self, seen: &HubSeen) -> Counters {
        let mut shards = BTreeMap::new();
        for key in seen.shards.keys() {
            let Some((map, shard)) = key.split_once('/') else {
                continue;
            };
            let labels = vec![
                ("map".to_string(), map.to_string()),
                ("shard".to_string(), shard.to_string()),
            ];
            let a = self.shard_acquisitions.get(&labels).map_or(0, |c| c.get());
            let w = self
                .shard_wait_seconds
                .get(&labels)
                .map_or(0.0, |c| c.get());
            shards.insert(key.clone(), (a, w));
        }
        let stages = lock(&self.stages)
            .iter()
            .filter_map(|st| {
                self.stage_seconds
                    .get(&vec![("stage".to_string(), st.clone())])
                    .map(|h| (st.clone(), h.state()))
            })
            .collect();
        Counters {
            rounds_completed: self.rounds_completed.get(),
            rounds_failed: self.rounds_failed.get(),
            attempts_aborted: self.attempts_aborted.get(),
            dropouts: self.dropouts.get(),
            clipped_values: self.clipped_values.get(),
            received_bytes: self.bytes_received.get(),
            sent_bytes: self.bytes_sent.get(),
            site_rejections: self.site_rejections.get(),
            stages,
            shards,
        }
    }

    /// Takes up saved counters (a restart): each counter continues from the larger of its
    /// saved value and its current one, and the hub's present totals (the sites' restored
    /// counters) become the base its later growth is added to.
    pub fn restore(&self, saved: &Counters, hub: &Hub) {
        let up = |c: &Counter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        up(&self.rounds_completed, saved.rounds_completed);
        up(&self.rounds_failed, saved.rounds_failed);
        up(&self.attempts_aborted, saved.attempts_aborted);
        up(&self.dropouts, saved.dropouts);
        up(&self.clipped_values, saved.clipped_values);
        for (stage, h) in &saved.stages {
            lock(&self.stages).insert(stage.clone());
            self.stage_seconds
                .get_or_create(&vec![("stage".to_string(), stage.clone())])
                .restore(h);
        }
        for (key, (acq, wait)) in &saved.shards {
            let Some((map, shard)) = key.split_once('/') else {
                continue;
            };
            let labels = vec![
                ("map".to_string(), map.to_string()),
                ("shard".to_string(), shard.to_string()),
            ];
            up(&self.shard_acquisitions.get_or_create(&labels), *acq);
            let w = self.shard_wait_seconds.get_or_create(&labels);
            if *wait > w.get() {
                w.inc_by(wait - w.get());
            }
        }
        let mut guard = lock(&self.scrape);
        let seen = &mut *guard;
        let sites = hub.sites.snapshot();
        let totals = [
            (
                &self.bytes_received,
                &mut seen.received,
                saved.received_bytes,
                sites.iter().map(|(_, s)| s.bytes_in).sum::<u64>(),
            ),
            (
                &self.bytes_sent,
                &mut seen.sent,
                saved.sent_bytes,
                sites.iter().map(|(_, s)| s.bytes_out).sum(),
            ),
            (
                &self.site_rejections,
                &mut seen.rejections,
                saved.site_rejections,
                sites.iter().map(|(_, s)| s.rejections).sum(),
            ),
        ];
        for (counter, seen, saved, now) in totals {
            up(counter, saved.max(now));
            *seen = now;
        }
        for (map, stats) in hub.shard_stats() {
            for (i, s) in stats.iter().enumerate() {
                seen.shards
                    .insert(format!("{map}/{i}"), (s.acquisitions, s.wait_nanos));
            }
        }
    }

    /// Observes a stage's duration.
    pub fn stage(&self, stage: &str, seconds: f64) {
        lock(&self.stages).insert(stage.to_string());
        self.stage_seconds
            .get_or_create(&vec![("stage".to_string(), stage.to_string())])
            .observe(seconds);
    }

    /// Takes up a resumed run's committed state, so counters and gauges continue from it
    /// instead of restarting at 0 with every coordinator restart.
    pub fn resumed(&self, rounds_committed: u64, last: Option<(u64, &Evaluation)>) {
        self.rounds_completed
            .inc_by(rounds_committed.saturating_sub(self.rounds_completed.get()));
        if let Some((round, eval)) = last {
            self.current_round.set(round as i64);
            self.evaluated(eval);
        }
    }

    /// The gauges of a round's evaluation.
    pub fn evaluated(&self, eval: &Evaluation) {
        if let Some(a) = eval.accuracy {
            self.round_accuracy.set(a);
        }
        self.round_loss.set(eval.loss);
        for (over, m) in [("sites", &eval.site_mean), ("pooled", &eval.weighted)] {
            for (name, value) in [
                ("accuracy", m.accuracy),
                ("balanced_accuracy", m.balanced_accuracy),
                ("f1", m.f1),
                ("macro_f1", m.macro_f1),
                ("auc", m.auc),
                ("rmse", m.rmse),
                ("mae", m.mae),
                ("r2", m.r2),
            ] {
                if let Some(v) = value {
                    self.round_metric
                        .get_or_create(&vec![
                            ("metric".to_string(), name.to_string()),
                            ("over".to_string(), over.to_string()),
                        ])
                        .set(v);
                }
            }
        }
    }

    /// Every metric in Prometheus' classic text format (version 0.0.4), refreshed from `hub`,
    /// with the counters it shows (to be saved before it is served).
    pub fn render(&self, hub: &Hub) -> (String, Counters) {
        let mut seen = lock(&self.scrape);
        self.refresh(hub, &mut seen);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        (classic_text(&out), self.counters_seen(&seen))
    }
}

/// Rewrites prometheus-client's OpenMetrics output as the classic text format that
/// `promtool check metrics` and every Prometheus version read: a counter's family is named
/// with its `_total` suffix (as its samples are), and the OpenMetrics-only `# UNIT` and
/// `# EOF` lines go. In OpenMetrics the family `x` owns samples `x_total`; in the classic
/// format `x_total` would be a family without help or type.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of every counter sample (counters and histogram series) of a scrape.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.contains("_total")
                    || l.contains("_bucket")
                    || l.contains("_sum")
                    || l.contains("_count")
            })
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Connects site "va" to `hub`; the receiver keeps its session's queue open.
    fn connect_va(hub: &Hub) -> impl Sized {
        let (out, keep) = tokio::sync::mpsc::channel(1);
        hub.connect(
            "va",
            10,
            false,
            out,
            std::sync::Arc::new(tokio::sync::Notify::new()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        keep
    }

    #[test]
    fn saved_counters_restore_exactly_and_never_below_what_was_served() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let hub = Hub::new(tx);
        let _keep = connect_va(&hub);
        hub.touch("va", 12_345);
        let first = Metrics::new();
        for s in [0.0004, 0.003, 0.1, 7.0, 1e6] {
            first.stage("MaskedInput", s);
        }
        first.stage("evaluate", 0.1 + 0.2);
        first.rounds_completed.inc_by(41);
        first.dropouts.inc_by(3);
        let (served, counters) = first.render(&hub);
        assert!(served.contains(r#"le="+Inf""#), "{served}");
        assert!(!counters.ahead_of(&counters));
        assert!(counters.ahead_of(&Counters::default()));
        // Saved as JSON in the store, read back bit for bit (sums of floats included).
        let json = serde_json::to_vec(&counters).unwrap_or_default();
        let saved: Counters = serde_json::from_slice(&json).unwrap_or_default();
        assert_eq!(saved, counters);

        // A new process: its hub starts again from zero, its counters from the saved ones.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let hub = Hub::new(tx);
        let second = Metrics::new();
        second.restore(&saved, &hub);
        let (text, _) = second.render(&hub);
        let before = samples(&served);
        let after = samples(&text);
        for (k, v) in &before {
            assert!(
                after.get(k).is_some_and(|a| a >= v),
                "{k}: {v} then {after:?}"
            );
        }
        assert_eq!(after["cohort_received_bytes_total"], 12_345.0);
        // And they go on from there: new traffic adds to the restored value.
        let _keep = connect_va(&hub);
        hub.touch("va", 5);
        second.stage("MaskedInput", 0.5);
        let (text, _) = second.render(&hub);
        let later = samples(&text);
        assert_eq!(later["cohort_received_bytes_total"], 12_350.0);
        assert_eq!(
            later[r#"cohort_stage_duration_seconds_count{stage="MaskedInput"}"#],
            6.0
        );
    }
}
