//! What a session needs from the site it runs for: its size, its feature statistics, local
//! training and evaluation.
//!
//! [`Site`] — the site's rows ([`SiteData`], which knows nothing of models) and, when the agent
//! was built with one, its own model — is the one a hospital runs. The trait exists so the
//! same session code — TLS, SecAgg+, chunking, faults — can be driven by a synthetic site in
//! benchmarks that measure the aggregation rather than the training.

use cohort_protocols::model::{ModelSpec, TrainingConfig};

use crate::data::SiteData;
use std::sync::Arc;

use crate::model::{self, Compute, Evaluation, Model, Objective, TomlModel};

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
    /// The site's differential-privacy spend when it trains with DP-SGD (`[privacy]`): told
    /// to the coordinator when the site joins and after every round it prices.
    fn privacy(&self) -> Option<crate::PrivacyReport> {
        None
    }
}

/// The site a hospital runs: its data, and its own model when the agent was built with one
/// (`Agent::model`): rounds of a coordinator announcing that custom model use it; otherwise
/// the TOML models are built from the coordinator's spec.
#[derive(Debug, Clone)]
pub struct Site {
    pub data: SiteData,
    pub model: Option<Arc<dyn Model>>,
    /// Where the TOML models train (the site's own model was shaped for its device).
    pub compute: Compute,
    /// `[privacy]`: DP-SGD and the budget every round it trains is charged to.
    pub privacy: Option<Arc<crate::privacy::Budget>>,
}

impl Site {
    /// The model that trains for a round announcing `spec`: the site's own model if it has
    /// one and the coordinator announces exactly it, a TOML model built from the spec when
    /// the coordinator announces one of those; anything else is a mismatch, named.
    pub fn model_for(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>, String> {
        match (&self.model, &spec.custom) {
            (None, None) => Ok(Arc::new(TomlModel {
                spec: spec.clone(),
                compute: self.compute,
            })),
            (Some(own), Some(_)) if own.spec() == *spec => Ok(own.clone()),
            (Some(own), _) => Err(format!(
                "the coordinator's model is {}, this site's is {}: do both run the same model version and schema?",
                spec.describe(),
                own.spec().describe()
            )),
            (None, Some(_)) => Err(format!(
                "the coordinator runs a custom model ({}): this agent has no such model; run the agent binary built with it",
                spec.describe()
            )),
        }
    }

    /// The model inputs' part of a round's statistics (the label's may follow).
    fn feature_stats<'a>(
        &self,
        mean: &'a [f64],
        std: &'a [f64],
    ) -> Result<(&'a [f64], &'a [f64]), String> {
        let inputs = self.data.inputs;
        match (mean.get(..inputs), std.get(..inputs)) {
            (Some(m), Some(s)) => Ok((m, s)),
            _ => Err(format!(
                "the round carries statistics for {} columns; this site's data has {} inputs",
                mean.len().min(std.len()),
                inputs
            )),
        }
    }
}

impl LocalSite for Site {
    fn inputs(&self) -> usize {
        self.data.inputs
    }

    fn privacy(&self) -> Option<crate::PrivacyReport> {
        let budget = self.privacy.as_ref()?;
        match budget.report() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "privacy: the accountant cannot say what was spent");
                None
            }
        }
    }

    fn stats_columns(&self) -> usize {
        self.data.stats_columns()
    }

    fn outputs(&self) -> usize {
        self.data.task.outputs()
    }

    fn train_examples(&self) -> u64 {
        self.data.train.len() as u64
    }

    fn stats_vector(&self) -> Result<Vec<u64>, String> {
        let rows = self.data.stats_rows();
        cohort_protocols::model::stats::check_site_headroom(
            rows.iter().map(Vec::as_slice),
            self.data.stats_columns(),
        )
        .map_err(|e| e.to_string())?;
        Ok(self.data.stats_vector_of(&rows))
    }

    fn train(
        &self,
        spec: &ModelSpec,
        global: &[f32],
        (mean, std): (&[f64], &[f64]),
        cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, String> {
        let d = &self.data;
        let (m, s) = self.feature_stats(mean, std)?;
        let x = d.train.standardised(m, s);
        let objective = Objective::with_stats(&d.task, d.inputs, mean, std);
        let model = self.model_for(spec)?;
        let trained = match &self.privacy {
            None => model.train(global, &x, &d.train.labels, &objective, cfg, seed),
            Some(budget) => {
                // Charged (and written down) before any row is touched; a round over the
                // budget is declined with the reason.
                let spent = budget.spend(cfg, d.train.len())?;
                tracing::info!(
                    epsilon = spent.epsilon,
                    delta = spent.delta,
                    budget = budget.settings.epsilon,
                    "privacy: training with DP-SGD"
                );
                // The noise is secret to this site: from the operating system, never from
                // the round's seed, which the coordinator could reproduce.
                model.train_private(
                    global,
                    &x,
                    &d.train.labels,
                    &objective,
                    cfg,
                    &budget.dp(),
                    rand::random(),
                )
            }
        };
        trained
            .map(|new| new.iter().zip(global).map(|(a, b)| a - b).collect())
            .map_err(|e| e.to_string())
    }

    fn evaluate(
        &self,
        spec: &ModelSpec,
        params: &[f32],
        (mean, std): (&[f64], &[f64]),
    ) -> Result<Evaluation, String> {
        let d = &self.data;
        let (m, s) = self.feature_stats(mean, std)?;
        let x = d.test.standardised(m, s);
        let objective = Objective::with_stats(&d.task, d.inputs, mean, std);
        let model = self.model_for(spec)?;
        model::evaluate_model(model.as_ref(), &objective, params, &x, &d.test.labels)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BurnModel, Recipe, Shape};
    use cohort_protocols::model::{CustomSpec, DataSchema, ModelKind};

    fn site() -> Site {
        let schema: DataSchema =
            toml::from_str("label = { column = \"num\", greater_than = 0 }\ndrop = [\"slope\", \"ca\", \"thal\"]\ncategorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }")
                .expect("schema");
        let csv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/heart-disease/cleveland.csv");
        Site {
            data: SiteData::load(&schema, &csv, None, 0.34, 1).expect("data"),
            model: None,
            compute: Compute::Cpu,
            privacy: None,
        }
    }

    /// A user's network: one linear layer, as a burn module of its own.
    #[derive(burn::module::Module, Debug)]
    struct Lin {
        layer: burn::nn::Linear,
    }

    impl crate::model::Network for Lin {
        fn forward(&self, x: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
            self.layer.forward(x)
        }
    }

    fn custom(name: &str, parameters: usize) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Custom,
            inputs: 13,
            hidden: Vec::new(),
            outputs: 1,
            custom: Some(CustomSpec {
                name: name.into(),
                parameters,
            }),
            cnn: None,
        }
    }

    #[test]
    fn a_round_trains_the_model_it_announces_or_is_refused_naming_both() {
        let mut data = site();
        let err = data.model_for(&custom("gated/1", 100)).unwrap_err();
        assert!(err.contains("no such model"), "{err}");
        // A site with its own model: the TOML spec is refused, the matching custom one used.
        let own = BurnModel::new(
            "linear/1",
            |shape: Shape, device: &burn::prelude::Device| Lin {
                layer: burn::nn::LinearConfig::new(shape.inputs, shape.outputs).init(device),
            },
        );
        data.model = Some(own.shaped(
            Shape {
                inputs: 13,
                outputs: 1,
            },
            Compute::Cpu,
        ));
        let toml_spec = ModelSpec {
            kind: ModelKind::Logreg,
            inputs: 13,
            hidden: Vec::new(),
            outputs: 1,
            custom: None,
            cnn: None,
        };
        assert!(data.model_for(&toml_spec).is_err());
        assert!(
            data.model_for(&custom("linear/2", 14))
                .unwrap_err()
                .contains("linear/1")
        );
        assert!(
            data.model_for(&custom("linear/1", 13))
                .unwrap_err()
                .contains("13 parameters")
        );
        let model = data
            .model_for(&custom("linear/1", 14))
            .expect("the site's own model");
        // It trains through the same objective and metrics as the TOML models.
        let spec = custom("linear/1", 14);
        let (mean, std) = cohort_protocols::model::stats::from_sum(&data.data.stats_vector(), 13);
        let cfg: TrainingConfig =
            toml::from_str("learning_rate = 0.01\nbatch_size = 8\nlocal_steps = 200").expect("cfg");
        let start = vec![0.0; 14];
        let delta = LocalSite::train(&data, &spec, &start, (&mean, &std), &cfg, 3).expect("train");
        let params: Vec<f32> = delta.iter().zip(&start).map(|(d, s)| d + s).collect();
        let e = LocalSite::evaluate(&data, &spec, &params, (&mean, &std)).expect("eval");
        assert!(e.metrics().accuracy.unwrap_or(0.0) > 0.7, "{e:?}");
        assert_eq!(model.spec(), spec);
    }

    /// A site with `[privacy]` trains with DP-SGD — the model still learns cleveland's
    /// rows —, charges each round to its budget on disk, and declines the round that would
    /// exceed it, naming the budget, without training.
    #[test]
    fn a_private_site_learns_with_dp_sgd_and_declines_the_round_over_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = site();
        let settings = crate::privacy::PrivacyConfig {
            epsilon: 3.0,
            delta: 1e-5,
            noise_multiplier: 2.0,
            max_grad_norm: 1.0,
        };
        data.privacy = Some(Arc::new(
            crate::privacy::Budget::open(dir.path(), settings).expect("budget"),
        ));
        let spec = ModelSpec {
            kind: ModelKind::Logreg,
            inputs: 13,
            hidden: Vec::new(),
            outputs: 1,
            custom: None,
            cnn: None,
        };
        let (mean, std) = cohort_protocols::model::stats::from_sum(&data.data.stats_vector(), 13);
        let cfg: TrainingConfig = toml::from_str(
            "optimizer = \"sgd\"\nlearning_rate = 0.5\nbatch_size = 16\nlocal_steps = 30",
        )
        .expect("cfg");
        let mut params = vec![0.0; 14];
        let mut rounds = 0;
        let refusal = loop {
            match LocalSite::train(&data, &spec, &params, (&mean, &std), &cfg, 3) {
                Ok(delta) => {
                    params = delta.iter().zip(&params).map(|(d, s)| d + s).collect();
                    rounds += 1;
                }
                Err(e) => break e,
            }
            assert!(rounds < 50, "the budget never ran out");
        };
        assert!(rounds >= 1, "{refusal}");
        assert!(refusal.starts_with("privacy budget"), "{refusal}");
        let e = LocalSite::evaluate(&data, &spec, &params, (&mean, &std)).expect("eval");
        assert!(
            e.metrics().accuracy.unwrap_or(0.0) > 0.7,
            "{rounds} private rounds: {e:?}"
        );
        let spent = data.privacy.as_ref().unwrap().spent().unwrap();
        eprintln!(
            "{rounds} private rounds, accuracy {:?}, ε {:.3}",
            e.metrics().accuracy,
            spent.epsilon
        );
        assert!(spent.epsilon <= 3.0 && spent.epsilon > 0.0, "{spent:?}");
        assert!(dir.path().join(crate::privacy::FILE).exists());
    }
}
