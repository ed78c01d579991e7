//! What a session needs from the site it runs for: its size, its feature statistics, local
//! training and evaluation.
//!
//! [`SiteData`] (a CSV, trained with burn) is the one a hospital runs. The trait exists so the
//! same session code — TLS, SecAgg+, chunking, faults — can be driven by a synthetic site in
//! benchmarks that measure the aggregation rather than the training.

use cohort_protocols::model::{ModelSpec, TrainingConfig};

use crate::data::SiteData;
use crate::train::{self, Evaluation, Objective};

pub trait LocalSite: Send + Sync + 'static {
    /// Number of model inputs after encoding.
    fn inputs(&self) -> usize;
    /// Width of the model's output layer (the task's: one per class of a multiclass task).
    fn outputs(&self) -> usize {
        1
    }
    /// Columns of the federated statistics: the inputs, then the label when the task
    /// standardises it. The `standardise` slices passed to `train` and `evaluate` have this
    /// length.
    fn stats_columns(&self) -> usize {
        self.inputs()
    }
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

impl SiteData {
    /// The model inputs' part of a round's statistics (the label's may follow).
    fn feature_stats<'a>(
        &self,
        mean: &'a [f64],
        std: &'a [f64],
    ) -> Result<(&'a [f64], &'a [f64]), String> {
        match (mean.get(..self.inputs), std.get(..self.inputs)) {
            (Some(m), Some(s)) => Ok((m, s)),
            _ => Err(format!(
                "the round carries statistics for {} columns; this site's data has {} inputs",
                mean.len().min(std.len()),
                self.inputs
            )),
        }
    }
}

impl LocalSite for SiteData {
    fn inputs(&self) -> usize {
        self.inputs
    }

    fn stats_columns(&self) -> usize {
        SiteData::stats_columns(self)
    }

    fn outputs(&self) -> usize {
        self.task.outputs()
    }

    fn train_examples(&self) -> u64 {
        self.train.len() as u64
    }

    fn stats_vector(&self) -> Result<Vec<u64>, String> {
        cohort_protocols::model::stats::check_site_headroom(
            self.stats_rows().iter().map(Vec::as_slice),
            SiteData::stats_columns(self),
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
        let (m, s) = self.feature_stats(mean, std)?;
        let x = self.train.standardised(m, s);
        let objective = Objective::with_stats(&self.task, self.inputs, mean, std);
        train::train(spec, &objective, global, &x, &self.train, cfg, seed)
            .map(|new| new.iter().zip(global).map(|(a, b)| a - b).collect())
            .map_err(|e| e.to_string())
    }

    fn evaluate(
        &self,
        spec: &ModelSpec,
        params: &[f32],
        (mean, std): (&[f64], &[f64]),
    ) -> Result<Evaluation, String> {
        let (m, s) = self.feature_stats(mean, std)?;
        let x = self.test.standardised(m, s);
        let objective = Objective::with_stats(&self.task, self.inputs, mean, std);
        train::evaluate(spec, &objective, params, &x, &self.test.labels).map_err(|e| e.to_string())
    }
}
