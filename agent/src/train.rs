//! Local training and evaluation with burn on its pure-Rust CPU backend (`flex`).
//!
//! The model is rebuilt from the flat global parameter vector every round (canonical order:
//! per layer the `[d_in, d_out]` weight row-major, then the bias, exactly burn's own layout),
//! trained for a fixed number of local steps, and flattened again. Rebuilding from the vector
//! instead of keeping a burn module across rounds means the agent holds no state the
//! coordinator did not send, and the round trip is bit-exact (tested).

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::{log_sigmoid, log_softmax, relu};
use cohort_protocols::model::metrics::{self, Metrics, Tally};
use cohort_protocols::model::{ModelSpec, RegressionLoss, Task, TrainingConfig};
use thiserror::Error;

use crate::data::Rows;
use crate::model::{Model, Network, TomlModel};

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("the model vector has {got} values, the model needs {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("no training rows")]
    NoData,
    #[error("training produced a non-finite parameter (learning rate too high?)")]
    Diverged,
    #[error("tensor data: {0}")]
    Data(String),
}

#[derive(Module, Debug)]
pub struct Net {
    layers: Vec<Linear>,
}

impl Net {
    /// Builds the network from a flat parameter vector.
    pub fn from_flat(
        spec: &ModelSpec,
        params: &[f32],
        device: &Device,
    ) -> Result<Self, TrainError> {
        if let Some(c) = &spec.custom {
            return Err(TrainError::Data(format!(
                "{} is a custom model: only its own code (its agent binary) can build it",
                c.name
            )));
        }
        if params.len() != spec.num_params() {
            return Err(TrainError::WrongLength {
                got: params.len(),
                expected: spec.num_params(),
            });
        }
        let mut offset = 0;
        let layers = spec
            .layers()
            .into_iter()
            .map(|(i, o)| {
                let w = params[offset..offset + i * o].to_vec();
                offset += i * o;
                let b = params[offset..offset + o].to_vec();
                offset += o;
                Linear {
                    weight: Param::from_data(TensorData::new(w, [i, o]), device),
                    bias: Some(Param::from_data(TensorData::new(b, [o]), device)),
                }
            })
            .collect();
        Ok(Net { layers })
    }
}

impl Network for Net {
    /// Outputs (logits, or the regression value before un-standardising), `[batch, outputs]`.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |h, (i, layer)| {
            let z = layer.forward(h);
            if i < last { relu(z) } else { z }
        })
    }
}

/// How the network's outputs are trained and read: the schema's task, with the label's
/// federated mean and standard deviation when the task standardises it.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// One logit; sigmoid and binary cross-entropy.
    Binary,
    /// One logit per class; softmax and cross-entropy, each example weighted by its class.
    Multiclass { weights: Vec<f32> },
    /// One output, trained on (y − mean) / std with squared error; predictions are
    /// output · std + mean, in the label's units.
    Squared { mean: f64, std: f64 },
    /// One output, the log of the rate; Poisson negative log-likelihood exp(z) − y·z.
    Poisson,
}

impl Objective {
    /// The objective for `task`; `label_stats` is the label's (mean, std) when the task
    /// standardises it.
    pub fn new(task: &Task, label_stats: Option<(f64, f64)>) -> Self {
        match task {
            Task::Binary { .. } => Objective::Binary,
            Task::Multiclass {
                classes,
                class_weights,
                ..
            } => Objective::Multiclass {
                weights: if class_weights.is_empty() {
                    vec![1.0; classes.len()]
                } else {
                    class_weights.iter().map(|w| *w as f32).collect()
                },
            },
            Task::Regression {
                loss: RegressionLoss::Poisson,
                ..
            } => Objective::Poisson,
            Task::Regression { standardise, .. } => {
                let (mean, std) = label_stats.filter(|_| *standardise).unwrap_or((0.0, 1.0));
                Objective::Squared { mean, std }
            }
        }
    }

    /// The objective for `task` with the statistics a round carries: the label's are the
    /// entry after the model inputs when the task standardises it.
    pub fn with_stats(task: &Task, inputs: usize, mean: &[f64], std: &[f64]) -> Self {
        let label = task
            .standardises_label()
            .then(|| Some((*mean.get(inputs)?, *std.get(inputs)?)))
            .flatten();
        Objective::new(task, label)
    }

    /// Classes of a classification objective (2 for binary), 0 for regression.
    pub fn classes(&self) -> usize {
        match self {
            Objective::Binary => 2,
            Objective::Multiclass { weights } => weights.len(),
            _ => 0,
        }
    }

    /// The loss of one row's outputs against its target, in f64 (for evaluation; multiclass
    /// rows are weighted by their class, and the caller divides by the total weight).
    pub fn row_loss(&self, out: &[f32], y: f64) -> f64 {
        // log(1 + e^z), stable for large |z|.
        let softplus = |z: f64| z.max(0.0) + (-z.abs()).exp().ln_1p();
        match self {
            Objective::Binary => {
                let z = f64::from(out[0]);
                if y >= 0.5 { softplus(-z) } else { softplus(z) }
            }
            Objective::Multiclass { weights } => {
                let c = (y as usize).min(weights.len() - 1);
                let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max
                    + out
                        .iter()
                        .map(|v| (f64::from(*v) - max).exp())
                        .sum::<f64>()
                        .ln();
                f64::from(weights[c]) * (lse - f64::from(out[c]))
            }
            Objective::Squared { mean, std } => (f64::from(out[0]) - (y - mean) / std).powi(2),
            Objective::Poisson => {
                let z = f64::from(out[0]);
                z.exp() - y * z
            }
        }
    }

    /// Mean loss of `out` (`[batch, outputs]`) against the targets `y`, in the autodiff graph:
    /// what [`crate::model::fit`] minimises.
    pub fn loss(&self, out: Tensor<2>, y: &[f64], device: &Device) -> Tensor<1> {
        let b = y.len();
        let column = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, 1]), device);
        match self {
            Objective::Binary => {
                let y = column(y.iter().map(|v| *v as f32).collect());
                let pos = log_sigmoid(out.clone()) * y.clone();
                let neg = log_sigmoid(out.neg()) * (y.neg() + 1.0);
                (pos + neg).neg().mean()
            }
            Objective::Multiclass { weights } => {
                let k = weights.len();
                let mut target = vec![0f32; b * k];
                let mut total = 0f32;
                for (i, c) in y.iter().enumerate() {
                    let c = (*c as usize).min(k - 1);
                    target[i * k + c] = weights[c];
                    total += weights[c];
                }
                let t = Tensor::<2>::from_data(TensorData::new(target, [b, k]), device);
                (log_softmax(out, 1) * t).sum().neg() / total.max(f32::MIN_POSITIVE)
            }
            Objective::Squared { mean, std } => {
                let z = column(y.iter().map(|v| ((v - mean) / std) as f32).collect());
                (out - z).powi_scalar(2).mean()
            }
            Objective::Poisson => {
                let y = column(y.iter().map(|v| *v as f32).collect());
                (out.clone().exp() - out * y).mean()
            }
        }
    }

    /// What one row's outputs predict: the class index (classification) or the label's value
    /// in its units (regression), with the positive class's probability for a binary task.
    pub fn read(&self, out: &[f32]) -> (f64, Option<f32>) {
        match self {
            Objective::Binary => {
                let p = 1.0 / (1.0 + (-out[0]).exp());
                (if p >= 0.5 { 1.0 } else { 0.0 }, Some(p))
            }
            Objective::Multiclass { .. } => {
                let best = out
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                (best as f64, None)
            }
            Objective::Squared { mean, std } => (out[0] as f64 * std + mean, None),
            Objective::Poisson => ((out[0] as f64).exp(), None),
        }
    }

    /// Class probabilities of a multiclass row (softmax of its logits).
    pub fn probabilities(out: &[f32]) -> Vec<f32> {
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = out.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }
}

/// One round of local training of a TOML model (see [`Model::train`]).
pub fn train(
    spec: &ModelSpec,
    objective: &Objective,
    global: &[f32],
    x: &[f32],
    rows: &Rows,
    cfg: &TrainingConfig,
    seed: u64,
) -> Result<Vec<f32>, TrainError> {
    TomlModel { spec: spec.clone() }.train(global, x, &rows.labels, objective, cfg, seed)
}

/// What an agent reports about a model on its test split.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub examples: usize,
    /// The training objective's mean loss.
    pub loss: f64,
    /// Binary tasks whose split holds both classes.
    pub auc: Option<f64>,
    pub tally: Tally,
}

impl Evaluation {
    pub fn metrics(&self) -> Metrics {
        self.tally.metrics(self.auc)
    }
}

/// A TOML model's raw outputs for each row of standardised `x`, row-major `[n, outputs]`.
pub fn outputs(spec: &ModelSpec, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError> {
    TomlModel { spec: spec.clone() }.outputs(params, x)
}

/// [`evaluate_model`] for a TOML model.
pub fn evaluate(
    spec: &ModelSpec,
    objective: &Objective,
    params: &[f32],
    x: &[f32],
    labels: &[f64],
) -> Result<Evaluation, TrainError> {
    evaluate_model(
        &TomlModel { spec: spec.clone() },
        objective,
        params,
        x,
        labels,
    )
}

/// Loss, the metrics' tally and (binary) ROC AUC of `params` on standardised `x`; `labels`
/// are the rows' training targets. Works from the model's outputs alone, so every [`Model`]
/// is judged by the same code.
pub fn evaluate_model(
    model: &dyn Model,
    objective: &Objective,
    params: &[f32],
    x: &[f32],
    labels: &[f64],
) -> Result<Evaluation, TrainError> {
    let n = labels.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let out = model.outputs(params, x)?;
    evaluate_outputs(objective, model.spec().outputs.max(1), &out, labels)
}

/// [`evaluate_model`] from outputs already computed (`width` per row), so a caller that
/// also needs the predictions runs the model once.
pub fn evaluate_outputs(
    objective: &Objective,
    width: usize,
    out: &[f32],
    labels: &[f64],
) -> Result<Evaluation, TrainError> {
    let n = labels.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    if out.len() != n * width {
        return Err(TrainError::Data(format!(
            "the model gave {} outputs for {n} rows of {width}",
            out.len()
        )));
    }
    let classes = objective.classes();
    let mut tally = if classes > 0 {
        Tally::classification(classes)
    } else {
        Tally::regression()
    };
    let mut scores = Vec::new();
    let mut loss = 0.0;
    for (row, y) in out.chunks(width).zip(labels) {
        let (predicted, score) = objective.read(row);
        if classes > 0 {
            tally.count(*y as usize, predicted as usize);
        } else {
            tally.residual(*y, predicted);
        }
        scores.extend(score);
        loss += objective.row_loss(row, *y);
    }
    let loss = match objective {
        // The weighted mean, as training computes it.
        Objective::Multiclass { weights } => {
            loss / labels
                .iter()
                .map(|y| f64::from(weights[(*y as usize).min(weights.len() - 1)]))
                .sum::<f64>()
        }
        _ => loss / n as f64,
    };
    let auc = (scores.len() == n)
        .then(|| {
            let positive: Vec<bool> = labels.iter().map(|y| *y >= 0.5).collect();
            metrics::auc(&scores, &positive)
        })
        .flatten();
    Ok(Evaluation {
        examples: n,
        loss,
        auc,
        tally,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocols::model::{ModelKind, OptimizerKind};

    #[test]
    fn flat_round_trip_is_bit_exact() {
        let spec = ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 5,
            hidden: vec![4, 3],
            outputs: 3,
            custom: None,
            cnn: None,
        };
        let params = spec.init(3);
        let net = Net::from_flat(&spec, &params, &Device::flex()).expect("build");
        assert_eq!(crate::model::flatten(&net).expect("flat"), params);
        assert!(Net::from_flat(&spec, &params[1..], &Device::flex()).is_err());
    }

    fn cfg(steps: usize) -> TrainingConfig {
        TrainingConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: 0.05,
            batch_size: 8,
            local_steps: steps,
            fedprox_mu: 0.0,
            hidden: vec![],
            custom: None,
            cnn: None,
        }
    }

    /// 60 points on a line in 2-D, labelled by `label(a)`.
    fn line(label: impl Fn(f32) -> f64) -> (Vec<f32>, Rows) {
        let mut rows = Rows::default();
        let mut x = Vec::new();
        for i in 0..60 {
            let a = (i as f32 / 30.0) - 1.0;
            x.extend([a, 0.3]);
            rows.features.push(vec![Some(a as f64), Some(0.3)]);
            rows.labels.push(label(a));
        }
        (x, rows)
    }

    fn logreg(outputs: usize) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Logreg,
            inputs: 2,
            hidden: vec![],
            outputs,
            custom: None,
            cnn: None,
        }
    }

    #[test]
    fn training_separates_a_linearly_separable_set() {
        let spec = logreg(1);
        let (x, rows) = line(|a| if a > 0.0 { 1.0 } else { 0.0 });
        let o = Objective::Binary;
        let before = evaluate(&spec, &o, &spec.init(0), &x, &rows.labels).expect("eval");
        let trained = train(&spec, &o, &spec.init(0), &x, &rows, &cfg(200), 1).expect("train");
        let after = evaluate(&spec, &o, &trained, &x, &rows.labels).expect("eval");
        assert!(after.loss < before.loss * 0.5, "{before:?} -> {after:?}");
        let m = after.metrics();
        assert!(m.accuracy.unwrap_or(0.0) >= 0.95, "{m:?}");
        assert!(m.auc.unwrap_or(0.0) >= 0.99, "{m:?}");
        assert!(m.f1.unwrap_or(0.0) >= 0.95, "{m:?}");
        // FedProx with a huge μ keeps the model near the global one
        let prox = TrainingConfig {
            fedprox_mu: 1000.0,
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.0001,
            ..cfg(200)
        };
        let held = train(&spec, &o, &spec.init(0), &x, &rows, &prox, 1).expect("train");
        assert!(held.iter().all(|v| v.abs() < 0.1), "{held:?}");
    }

    #[test]
    fn softmax_training_learns_three_ordered_classes() {
        let spec = logreg(3);
        let (x, rows) = line(|a| {
            if a < -0.35 {
                0.0
            } else if a < 0.35 {
                1.0
            } else {
                2.0
            }
        });
        let o = Objective::Multiclass {
            weights: vec![1.0; 3],
        };
        let trained = train(&spec, &o, &spec.init(0), &x, &rows, &cfg(600), 1).expect("train");
        let e = evaluate(&spec, &o, &trained, &x, &rows.labels).expect("eval");
        let m = e.metrics();
        assert_eq!(e.tally.confusion.len(), 9);
        assert!(m.accuracy.unwrap_or(0.0) >= 0.85, "{m:?}");
        assert_eq!(m.per_class_recall.len(), 3);
        assert_eq!(m.auc, None);
        // A weight on class 2 makes the model predict it more often.
        let heavy = Objective::Multiclass {
            weights: vec![1.0, 1.0, 20.0],
        };
        let tilted = train(&spec, &heavy, &spec.init(0), &x, &rows, &cfg(600), 1).expect("train");
        let t = evaluate(&spec, &o, &tilted, &x, &rows.labels).expect("eval");
        let predicted_2 =
            |e: &Evaluation| (0..3).map(|r| e.tally.confusion[r * 3 + 2]).sum::<u64>();
        assert!(
            predicted_2(&t) > predicted_2(&e),
            "{:?} vs {:?}",
            t.tally,
            e.tally
        );
    }

    #[test]
    fn regression_reports_errors_in_the_label_units() {
        let spec = logreg(1);
        // y = 150 + 20 a: the model sees it standardised, the metrics in the original units.
        let (x, rows) = line(|a| 150.0 + 20.0 * a as f64);
        let n = rows.len() as f64;
        let mean = rows.labels.iter().sum::<f64>() / n;
        let std = (rows.labels.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n).sqrt();
        let o = Objective::Squared { mean, std };
        let before = evaluate(&spec, &o, &spec.init(0), &x, &rows.labels).expect("eval");
        // The zero model predicts the mean: its RMSE is the label's standard deviation.
        let b = before.metrics();
        assert!((b.rmse.unwrap_or(0.0) - std).abs() < 1e-3, "{b:?} vs {std}");
        let trained = train(&spec, &o, &spec.init(0), &x, &rows, &cfg(400), 1).expect("train");
        let m = evaluate(&spec, &o, &trained, &x, &rows.labels)
            .expect("eval")
            .metrics();
        assert!(m.rmse.unwrap_or(f64::MAX) < 1.0, "{m:?}");
        assert!(m.r2.unwrap_or(0.0) > 0.99, "{m:?}");
        // Poisson: counts exp(1 + a); the model learns the log-rate.
        let (x, rows) = line(|a| (1.0 + a as f64).exp().round());
        let p = Objective::Poisson;
        let trained = train(&spec, &p, &spec.init(0), &x, &rows, &cfg(600), 1).expect("train");
        let m = evaluate(&spec, &p, &trained, &x, &rows.labels)
            .expect("eval")
            .metrics();
        assert!(m.r2.unwrap_or(0.0) > 0.9, "{m:?}");
    }
}
