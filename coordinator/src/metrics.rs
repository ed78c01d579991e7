//! Prometheus metrics (`/metrics` on the status port), through `prometheus-client`.
//!
//! The driver updates round metrics as rounds happen. Values that live elsewhere — connected
//! sites, bytes, and the sharded maps' per-shard lock statistics — are copied in when a scrape
//! arrives ([`Metrics::refresh`]), so the hot paths pay nothing for them. Per-shard lock
//! acquisitions and wait time carry `map` and `shard` labels, so contention shows as a heat map
//! over shards (deploy/grafana/cohort.json).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::hub::Hub;
use crate::records::Evaluation;
use crate::sharded::ShardStats;

type Labels = Vec<(String, String)>;

fn stage_histogram() -> Histogram {
    // 1 ms to ~4.4 min.
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rounds_completed: Counter,
    pub attempts_aborted: Counter,
    pub stage_seconds: Family<Labels, Histogram, fn() -> Histogram>,
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
    sites_connected: Gauge,
    bytes_received: Counter,
    bytes_sent: Counter,
    site_rejections: Counter,
    shard_acquisitions: Family<Labels, Counter>,
    shard_wait_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    /// Serialises refresh-and-encode, so two scrapes never interleave their counter deltas.
    scrape: Mutex<()>,
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
            attempts_aborted: Counter::default(),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            dropouts: Counter::default(),
            clipped_values: Counter::default(),
            current_round: Gauge::default(),
            model_parameters: Gauge::default(),
            round_accuracy: Gauge::default(),
            round_loss: Gauge::default(),
            round_metric: Family::default(),
            seconds_since_progress: Gauge::default(),
            sites_connected: Gauge::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            site_rejections: Counter::default(),
            shard_acquisitions: Family::default(),
            shard_wait_seconds: Family::default(),
            scrape: Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register(
            "rounds_completed",
            "Training rounds committed",
            m.rounds_completed.clone(),
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
            "sites_connected",
            "Sites with an open session",
            m.sites_connected.clone(),
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

    /// Copies the hub's current values in (counters advance by the difference).
    pub fn refresh(&self, hub: &Hub) {
        let sites = hub.sites.snapshot();
        self.sites_connected
            .set(sites.iter().filter(|(_, s)| s.connected).count() as i64);
        let advance = |c: &Counter, total: u64| {
            c.inc_by(total.saturating_sub(c.get()));
        };
        advance(
            &self.bytes_received,
            sites.iter().map(|(_, s)| s.bytes_in).sum(),
        );
        advance(
            &self.bytes_sent,
            sites.iter().map(|(_, s)| s.bytes_out).sum(),
        );
        advance(
            &self.site_rejections,
            sites.iter().map(|(_, s)| s.rejections).sum(),
        );
        for (map, stats) in hub.shard_stats() {
            self.shards(map, &stats);
        }
    }

    fn shards(&self, map: &str, stats: &[ShardStats]) {
        for (i, s) in stats.iter().enumerate() {
            let labels = vec![
                ("map".to_string(), map.to_string()),
                ("shard".to_string(), i.to_string()),
            ];
            let c = self.shard_acquisitions.get_or_create(&labels);
            c.inc_by(s.acquisitions.saturating_sub(c.get()));
            let w = self.shard_wait_seconds.get_or_create(&labels);
            let secs = s.wait_nanos as f64 / 1e9;
            if secs > w.get() {
                w.inc_by(secs - w.get());
            }
        }
    }

    /// Observes a stage's duration.
    pub fn stage(&self, stage: &str, seconds: f64) {
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

    /// Every metric in Prometheus' classic text format (version 0.0.4), refreshed from `hub`.
    pub fn render(&self, hub: &Hub) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(hub);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        classic_text(&out)
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
