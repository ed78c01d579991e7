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
}

impl Evaluation {
    /// The evaluation of a round from what each site reported.
    pub fn of(results: &BTreeMap<String, SiteResult>) -> Evaluation {
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
        }
    }
}

/// A committed round: its summary and what each site reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    pub summary: RoundSummary,
    pub per_site: BTreeMap<String, SiteResult>,
}

/// Round 0: the federated feature statistics and the initial model's evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub initial: Evaluation,
    pub initial_per_site: BTreeMap<String, SiteResult>,
}
