//! A model judged on rows: its loss, the task's tally (a confusion matrix or residual sums)
//! and ROC AUC, from the model's outputs alone, so every [`Model`] is judged by the same code.

use cohort_protocols::model::metrics::{self, Metrics, Tally};
use cohort_protocols::model::{ModelSpec, TrainingConfig};

use super::{Model, Objective, TomlModel, TrainError};

/// One round of local training of a TOML model (see [`Model::train`]).
pub fn train(
    spec: &ModelSpec,
    objective: &Objective,
    global: &[f32],
    x: &[f32],
    labels: &[f64],
    cfg: &TrainingConfig,
    seed: u64,
) -> Result<Vec<f32>, TrainError> {
    TomlModel::new(spec).train(global, x, labels, objective, cfg, seed)
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
    TomlModel::new(spec).outputs(params, x)
}

/// [`evaluate_model`] for a TOML model.
pub fn evaluate(
    spec: &ModelSpec,
    objective: &Objective,
    params: &[f32],
    x: &[f32],
    labels: &[f64],
) -> Result<Evaluation, TrainError> {
    evaluate_model(&TomlModel::new(spec), objective, params, x, labels)
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
    fn line(label: impl Fn(f32) -> f64) -> (Vec<f32>, Vec<f64>) {
        let mut labels = Vec::new();
        let mut x = Vec::new();
        for i in 0..60 {
            let a = (i as f32 / 30.0) - 1.0;
            x.extend([a, 0.3]);
            labels.push(label(a));
        }
        (x, labels)
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
        let (x, labels) = line(|a| if a > 0.0 { 1.0 } else { 0.0 });
        let o = Objective::Binary;
        let before = evaluate(&spec, &o, &spec.init(0), &x, &labels).expect("eval");
        let trained = train(&spec, &o, &spec.init(0), &x, &labels, &cfg(200), 1).expect("train");
        let after = evaluate(&spec, &o, &trained, &x, &labels).expect("eval");
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
        let held = train(&spec, &o, &spec.init(0), &x, &labels, &prox, 1).expect("train");
        assert!(held.iter().all(|v| v.abs() < 0.1), "{held:?}");
    }

    #[test]
    fn softmax_training_learns_three_ordered_classes() {
        let spec = logreg(3);
        let (x, labels) = line(|a| {
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
        let trained = train(&spec, &o, &spec.init(0), &x, &labels, &cfg(600), 1).expect("train");
        let e = evaluate(&spec, &o, &trained, &x, &labels).expect("eval");
        let m = e.metrics();
        assert_eq!(e.tally.confusion.len(), 9);
        assert!(m.accuracy.unwrap_or(0.0) >= 0.85, "{m:?}");
        assert_eq!(m.per_class_recall.len(), 3);
        assert_eq!(m.auc, None);
        // A weight on class 2 makes the model predict it more often.
        let heavy = Objective::Multiclass {
            weights: vec![1.0, 1.0, 20.0],
        };
        let tilted = train(&spec, &heavy, &spec.init(0), &x, &labels, &cfg(600), 1).expect("train");
        let t = evaluate(&spec, &o, &tilted, &x, &labels).expect("eval");
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
        let (x, labels) = line(|a| 150.0 + 20.0 * a as f64);
        let n = labels.len() as f64;
        let mean = labels.iter().sum::<f64>() / n;
        let std = (labels.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n).sqrt();
        let o = Objective::Squared { mean, std };
        let before = evaluate(&spec, &o, &spec.init(0), &x, &labels).expect("eval");
        // The zero model predicts the mean: its RMSE is the label's standard deviation.
        let b = before.metrics();
        assert!((b.rmse.unwrap_or(0.0) - std).abs() < 1e-3, "{b:?} vs {std}");
        let trained = train(&spec, &o, &spec.init(0), &x, &labels, &cfg(400), 1).expect("train");
        let m = evaluate(&spec, &o, &trained, &x, &labels)
            .expect("eval")
            .metrics();
        assert!(m.rmse.unwrap_or(f64::MAX) < 1.0, "{m:?}");
        assert!(m.r2.unwrap_or(0.0) > 0.99, "{m:?}");
        // Poisson: counts exp(1 + a); the model learns the log-rate.
        let (x, labels) = line(|a| (1.0 + a as f64).exp().round());
        let p = Objective::Poisson;
        let trained = train(&spec, &p, &spec.init(0), &x, &labels, &cfg(600), 1).expect("train");
        let m = evaluate(&spec, &p, &trained, &x, &labels)
            .expect("eval")
            .metrics();
        assert!(m.r2.unwrap_or(0.0) > 0.9, "{m:?}");
    }
}
