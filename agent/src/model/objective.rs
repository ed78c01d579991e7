//! The task's training objective: how a network's outputs are trained (the loss in the
//! autodiff graph), scored (the loss of a row in f64) and read (a class or a value).

use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::{log_sigmoid, log_softmax};
use cohort_protocols::model::{RegressionLoss, Task};

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
