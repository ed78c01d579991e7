//! What a session needs from the site it runs for: its size, its feature statistics, local
//! training and evaluation.
//!
//! [`SiteData`] (a CSV, trained with burn) is the one a hospital runs. The trait exists so the
//! same session code — TLS, SecAgg+, chunking, faults — can be driven by a synthetic site in
//! benchmarks that measure the aggregation rather than the training.

use cohort_protocols::model::{ModelSpec, TrainingConfig};

use crate::data::SiteData;
use crate::train::{self, Evaluation};

pub trait LocalSite: Send + Sync + 'static {
    /// Number of model inputs after encoding.
    fn inputs(&self) -> usize;
    /// Training examples: the site's weight in the average.
    fn train_examples(&self) -> u64;
    /// The statistics vector for the federated standardisation round (layout in
    /// `cohort_protocols::model::stats`), or why this site's values would overflow the sum.
    fn stats_vector(&self) -> Result<Vec<u64>, String>;
    /// Trains from `global` and returns the update (new parameters minus `global`).
    fn train(
        &self,
        spec: &ModelSpec,
        global: &[f32],
        standardise: (&[f64], &[f64]),
        cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, String>;
    /// Evaluates `params` on the local test split.
    fn evaluate(
        &self,
        spec: &ModelSpec,
        params: &[f32],
        standardise: (&[f64], &[f64]),
    ) -> Result<Evaluation, String>;
}

impl LocalSite for SiteData {
    fn inputs(&self) -> usize {
        self.inputs
    }

    fn train_examples(&self) -> u64 {
        self.train.len() as u64
    }

    fn stats_vector(&self) -> Result<Vec<u64>, String> {
        cohort_protocols::model::stats::check_site_headroom(
            self.train.features.iter().map(Vec::as_slice),
            self.inputs,
        )
        .map_err(|e| e.to_string())?;
        Ok(SiteData::stats_vector(self))
    }

    fn train(
        &self,
        spec: &ModelSpec,
        global: &[f32],
        (mean, std): (&[f64], &[f64]),
        cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, String> {
        let x = self.train.standardised(mean, std);
        train::train(spec, global, &x, &self.train, cfg, seed)
            .map(|new| new.iter().zip(global).map(|(a, b)| a - b).collect())
            .map_err(|e| e.to_string())
    }

    fn evaluate(
        &self,
        spec: &ModelSpec,
        params: &[f32],
        (mean, std): (&[f64], &[f64]),
    ) -> Result<Evaluation, String> {
        let x = self.test.standardised(mean, std);
        train::evaluate(spec, params, &x, &self.test.labels).map_err(|e| e.to_string())
    }
}
