//! The records of a run that the driver writes, the store keeps and the status API serves:
//! one module below all three, so none of them depends on another for its vocabulary.

use std::collections::BTreeMap;

use cohort_protocols::model::metrics::{Metrics, Tally};
use serde::{Deserialize, Serialize};

/// One finished round, as reported in `summary.json` and `rounds.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub attempts: u32,
    pub sites: usize,
    pub dropped: usize,
    pub clipped: u64,
    pub seconds: f64,
    /// The sites' evaluation of the round's model (flattened: `accuracy`, `loss`, `auc`,
    /// `site_mean`, `weighted`, `confusion` are keys of the summary itself).
    #[serde(flatten)]
    pub eval: Evaluation,
    pub total_weight: u64,
    pub model_sha3_512: String,
    /// Sites whose SecAgg+ messages the coordinator refused in this round (a bad signature,
    /// an invalid key, a wrong revealed share, an oversize or undecodable message), in any of
    /// its attempts: each was excluded from that attempt and from the round's later ones.
    #[serde(default)]
    pub rejected: Vec<String>,
    /// Set when the round was given up: why. The model is the one before the round, and
    /// `eval` is its evaluation (the same model is not evaluated again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Example-level DP: the largest ε a training site had reported spending when the
    /// round was committed (the federation's guarantee per patient); absent without DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Site-level DP (`[privacy.site_level]`): the federation's ε per site after this round,
    /// at `privacy.site_level.delta`, counting every noisy sum unmasked so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_epsilon: Option<f64>,
    /// Central DP in plain mode: the L2 clip this round's updates were scaled to (it moves
    /// with `adaptive_clip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_clip: Option<f64>,
    /// Each attempt of the round: how long its stages took and, for an aborted one, why.
    /// Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_log: Vec<AttemptLog>,
}

/// One attempt of a round, as the dashboard and `status` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptLog {
    pub attempt: u32,
    /// From the attempt's start (after the wait for sites) to its end.
    pub seconds: f64,
    /// The SecAgg+ stages in the order they ran, each with its duration (none in plain mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageTime>,
    /// Why the attempt was aborted; absent for the attempt that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
}

/// What one site reported about the model after a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteResult {
    pub examples: u64,
    pub test_examples: u64,
    /// Classification tasks.
    pub accuracy: Option<f64>,
    pub loss: f64,
    /// Binary tasks whose test split holds both classes.
    pub auc: Option<f64>,
    /// Every metric of the task, from `tally` (absent in records older than tasks).
    #[serde(default)]
    pub metrics: Metrics,
    /// The counts the site reported: a confusion matrix or residual sums.
    #[serde(default)]
    pub tally: Tally,
    /// An evaluation-only site (`role = "evaluate"`): an independent test set, reported in
    /// `held_out` and not in the training sites' metrics.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evaluate_only: bool,
}

/// The sites' evaluation of one model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean of the sites' test accuracies (classification tasks).
    pub accuracy: Option<f64>,
    /// Test-example-weighted mean loss.
    pub loss: f64,
    /// Mean AUC over the sites where it is defined (binary tasks).
    pub auc: Option<f64>,
    /// Each metric's unweighted mean over the sites that reported it.
    #[serde(default)]
    pub site_mean: Metrics,
    /// The metrics of all sites' test sets pooled, i.e. weighted by test examples (AUC: the
    /// test-example-weighted mean of the sites' AUCs, as AUC does not pool from counts).
    #[serde(default)]
    pub weighted: Metrics,
    /// Classification: the confusion matrix summed over sites (row = true class).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<u64>,
    /// The same evaluation by the evaluation-only sites (independent test sets), when any
    /// took part; the fields above cover the training sites only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<Box<Evaluation>>,
}

impl Evaluation {
    /// The evaluation of a round from what each site reported: the training sites' metrics,
    /// and apart from them (`held_out`) the evaluation-only sites'.
    pub fn of(results: &BTreeMap<String, SiteResult>) -> Evaluation {
        let (held_out, training): (BTreeMap<_, _>, BTreeMap<_, _>) = results
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(_, r)| r.evaluate_only);
        let mut eval = Self::of_sites(&training);
        if !held_out.is_empty() {
            eval.held_out = Some(Box::new(Self::of_sites(&held_out)));
        }
        eval
    }

    fn of_sites(results: &BTreeMap<String, SiteResult>) -> Evaluation {
        if results.is_empty() {
            return Evaluation::default();
        }
        let total: f64 = results.values().map(|r| r.test_examples as f64).sum();
        let site_mean = Metrics::mean(results.values().map(|r| &r.metrics).collect::<Vec<_>>());
        let mut pooled: Option<Tally> = None;
        for r in results.values() {
            match &mut pooled {
                None => pooled = Some(r.tally.clone()),
                // Sites that reported another task's tally were refused on receipt; a
                // mismatch here leaves the pooled metrics of the sites that agree.
                Some(p) => {
                    let _ = p.add(&r.tally);
                }
            }
        }
        let pooled = pooled.unwrap_or_default();
        let (auc_sum, auc_n) = results
            .values()
            .filter_map(|r| {
                r.auc
                    .map(|a| (a * r.test_examples as f64, r.test_examples as f64))
            })
            .fold((0.0, 0.0), |(s, n), (a, w)| (s + a, n + w));
        let weighted = pooled.metrics((auc_n > 0.0).then(|| auc_sum / auc_n));
        Evaluation {
            accuracy: site_mean.accuracy,
            loss: results
                .values()
                .map(|r| r.loss * r.test_examples as f64)
                .sum::<f64>()
                / total.max(1.0),
            auc: site_mean.auc,
            site_mean,
            weighted,
            confusion: pooled.confusion,
            held_out: None,
        }
    }
}

/// A committed round: its summary and what each site reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    pub summary: RoundSummary,
    pub per_site: BTreeMap<String, SiteResult>,
    /// The per-site results were removed because the round is older than the newest
    /// `storage.keep_round_detail` rounds; the summary (pooled evaluation, model hash,
    /// refused sites) is kept for every round.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_site_pruned: bool,
    /// Site-level DP: the federation accountant's RDP curve (at the accountant's default
    /// orders) after this round, committed with it, so a restarted coordinator — or one
    /// whose store was rebuilt from the journal — resumes the account instead of forgetting
    /// what was spent. Dropped from rounds older than `storage.keep_round_detail`: only the
    /// last is ever read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_level_rdp: Option<Vec<f64>>,
    /// Central DP with adaptive clipping: the clip the next round starts from, committed
    /// with the round so a restart goes on from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_level_clip: Option<f64>,
}

impl RoundRecord {
    /// Drops the per-site results, keeping the summary: what an old round keeps.
    pub fn prune_detail(&mut self) {
        self.per_site.clear();
        self.per_site_pruned = true;
        self.site_level_rdp = None;
        self.site_level_clip = None;
    }
}

/// Round 0: the federated feature statistics and the initial model's evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub initial: Evaluation,
    pub initial_per_site: BTreeMap<String, SiteResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_before_tasks_still_read() {
        let old = r#"{"summary":{"round":3,"attempts":1,"sites":4,"dropped":0,"clipped":0,
            "seconds":0.1,"accuracy":0.8,"loss":0.45,"auc":0.81,"total_weight":480,
            "model_sha3_512":"ab"},
            "per_site":{"va":{"examples":86,"test_examples":44,"accuracy":0.75,"loss":0.5,"auc":0.7}}}"#;
        let r: RoundRecord = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.summary.eval.accuracy, Some(0.8));
        assert_eq!(r.summary.eval.auc, Some(0.81));
        assert_eq!(r.per_site["va"].auc, Some(0.7));
        assert!(r.per_site["va"].tally.confusion.is_empty());
        // And the summary's keys are where the status API always served them.
        let json = serde_json::to_value(&r.summary).unwrap_or_default();
        assert_eq!(json["accuracy"], 0.8);
        assert_eq!(json["loss"], 0.45);
    }

    #[test]
    fn a_rounds_evaluation_pools_the_sites_tallies() {
        let site = |tp: u64, fn_: u64, tn: u64, fp: u64, auc: Option<f64>| {
            let tally = Tally {
                confusion: vec![tn, fp, fn_, tp],
                residuals: None,
            };
            let metrics = tally.metrics(auc);
            SiteResult {
                examples: 100,
                test_examples: tally.examples(),
                accuracy: metrics.accuracy,
                loss: 0.5,
                auc,
                metrics,
                tally,
                evaluate_only: false,
            }
        };
        let results = BTreeMap::from([
            ("a".to_string(), site(8, 2, 8, 2, Some(0.9))),
            // One class only in its test split: no AUC, and it does not count in the mean.
            ("b".to_string(), site(0, 0, 25, 5, None)),
        ]);
        let e = Evaluation::of(&results);
        assert_eq!(e.accuracy, Some((0.8 + 25.0 / 30.0) / 2.0));
        assert_eq!(e.weighted.accuracy, Some(41.0 / 50.0));
        assert_eq!(e.auc, Some(0.9));
        assert_eq!(e.weighted.auc, Some(0.9));
        assert_eq!(e.confusion, vec![33, 7, 2, 8]);
        assert_eq!(e.loss, 0.5);
    }
}
