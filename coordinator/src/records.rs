//! The records of a run that the driver writes, the store keeps and the status API serves:
//! one module below all three, so none of them depends on another for its vocabulary.

use std::collections::BTreeMap;

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
    /// Mean of the sites' local test accuracies after the round.
    pub accuracy: f64,
    /// Example-weighted mean test loss.
    pub loss: f64,
    pub auc: f64,
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
    pub accuracy: f64,
    pub loss: f64,
    pub auc: f64,
}

/// Mean site metrics of one evaluation.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub auc: f64,
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
