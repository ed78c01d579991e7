//! Local training and evaluation with burn on its pure-Rust CPU backend (`flex`).
//!
//! The model is rebuilt from the flat global parameter vector every round (canonical order:
//! per layer the `[d_in, d_out]` weight row-major, then the bias, exactly burn's own layout),
//! trained for a fixed number of local steps, and flattened again. Rebuilding from the vector
//! instead of keeping a burn module across rounds means the agent holds no state the
//! coordinator did not send, and the round trip is bit-exact (tested).

use burn::module::Param;
use burn::nn::Linear;
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use chacha20::ChaCha20Rng;
use cohort_protocols::model::{ModelSpec, OptimizerKind, TrainingConfig};
use rand_core::{Rng, SeedableRng};
use thiserror::Error;

use crate::data::Rows;

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

    /// The parameters as one flat vector in canonical order.
    pub fn to_flat(&self) -> Result<Vec<f32>, TrainError> {
        let mut out = Vec::new();
        for l in &self.layers {
            out.extend(values(l.weight.val().into_data())?);
            if let Some(b) = &l.bias {
                out.extend(values(b.val().into_data())?);
            }
        }
        Ok(out)
    }

    /// Logits, shape `[batch, 1]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        self.layers.iter().enumerate().fold(x, |h, (i, layer)| {
            let z = layer.forward(h);
            if i < last { relu(z) } else { z }
        })
    }
}

fn values(data: TensorData) -> Result<Vec<f32>, TrainError> {
    data.as_slice::<f32>()
        .map(|s| s.to_vec())
        .map_err(|e| TrainError::Data(format!("{e:?}")))
}

/// Mean binary cross-entropy on logits, in the numerically stable form
/// −[y·log σ(z) + (1 − y)·log σ(−z)].
fn bce_with_logits(logits: Tensor<2>, y: Tensor<2>) -> Tensor<1> {
    let pos = log_sigmoid(logits.clone()) * y.clone();
    let neg = log_sigmoid(logits.neg()) * (y.neg() + 1.0);
    (pos + neg).neg().mean()
}

fn batch(
    x: &[f32],
    y: &[f32],
    idx: &[usize],
    inputs: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let mut xb = Vec::with_capacity(idx.len() * inputs);
    let mut yb = Vec::with_capacity(idx.len());
    for &i in idx {
        xb.extend_from_slice(&x[i * inputs..(i + 1) * inputs]);
        yb.push(y[i]);
    }
    (
        Tensor::from_data(TensorData::new(xb, [idx.len(), inputs]), device),
        Tensor::from_data(TensorData::new(yb, [idx.len(), 1]), device),
    )
}

/// Trains from `global` for `cfg.local_steps` batches and returns the new flat parameters.
/// `x` is the standardised training matrix (row-major), `seed` orders the batches.
pub fn train(
    spec: &ModelSpec,
    global: &[f32],
    x: &[f32],
    rows: &Rows,
    cfg: &TrainingConfig,
    seed: u64,
) -> Result<Vec<f32>, TrainError> {
    let n = rows.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let device = Device::flex().autodiff();
    let mut model = Net::from_flat(spec, global, &device)?;
    let anchor: Vec<Tensor<1>> = global_tensors(spec, global, &device);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut cursor = n;
    let batch_size = cfg.batch_size.clamp(1, n);
    let mut adam = AdamConfig::new().init();
    let mut sgd = SgdConfig::new().init();
    for _ in 0..cfg.local_steps {
        if cursor + batch_size > n {
            for i in (1..n).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            cursor = 0;
        }
        let idx = &order[cursor..cursor + batch_size];
        cursor += batch_size;
        let (xb, yb) = batch(x, &rows.labels, idx, spec.inputs, &device);
        let mut loss = bce_with_logits(model.forward(xb), yb);
        if cfg.fedprox_mu > 0.0 {
            loss = loss + proximal(&model, &anchor) * (cfg.fedprox_mu / 2.0);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = match cfg.optimizer {
            OptimizerKind::Adam => adam.step(cfg.learning_rate, model, grads),
            OptimizerKind::Sgd => sgd.step(cfg.learning_rate, model, grads),
        };
    }
    let out = model.to_flat()?;
    if out.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    Ok(out)
}

/// The global model's parameters as 1-D tensors, in canonical order, for the FedProx term.
fn global_tensors(spec: &ModelSpec, global: &[f32], device: &Device) -> Vec<Tensor<1>> {
    let mut offset = 0;
    let mut out = Vec::new();
    for (i, o) in spec.layers() {
        for len in [i * o, o] {
            out.push(Tensor::from_data(
                TensorData::new(global[offset..offset + len].to_vec(), [len]),
                device,
            ));
            offset += len;
        }
    }
    out
}

/// ||w − w_global||².
fn proximal(model: &Net, anchor: &[Tensor<1>]) -> Tensor<1> {
    let mut terms = Vec::new();
    for (k, l) in model.layers.iter().enumerate() {
        let w: Tensor<1> = l.weight.val().flatten(0, 1);
        terms.push((w - anchor[2 * k].clone()).powi_scalar(2).sum());
        if let Some(b) = &l.bias {
            terms.push((b.val() - anchor[2 * k + 1].clone()).powi_scalar(2).sum());
        }
    }
    Tensor::cat(terms, 0).sum()
}

/// What an agent reports about a model on its test split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub examples: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub auc: f64,
}

/// Loss, accuracy (threshold 0.5) and ROC AUC of `params` on standardised `x`.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    x: &[f32],
    labels: &[f32],
) -> Result<Evaluation, TrainError> {
    let n = labels.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let device = Device::flex();
    let model = Net::from_flat(spec, params, &device)?;
    let xt = Tensor::from_data(TensorData::new(x.to_vec(), [n, spec.inputs]), &device);
    let yt = Tensor::from_data(TensorData::new(labels.to_vec(), [n, 1]), &device);
    let logits = model.forward(xt);
    let loss = values(bce_with_logits(logits.clone(), yt).into_data())?[0] as f64;
    let probs = values(sigmoid(logits).into_data())?;
    let correct = probs
        .iter()
        .zip(labels)
        .filter(|(p, y)| (**p >= 0.5) == (**y >= 0.5))
        .count();
    Ok(Evaluation {
        examples: n,
        loss,
        accuracy: correct as f64 / n as f64,
        auc: auc(&probs, labels),
    })
}

/// The model's probability of the positive class for each row of standardised `x`.
pub fn probabilities(spec: &ModelSpec, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError> {
    let n = x.len() / spec.inputs.max(1);
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let device = Device::flex();
    let model = Net::from_flat(spec, params, &device)?;
    let xt = Tensor::from_data(TensorData::new(x.to_vec(), [n, spec.inputs]), &device);
    values(sigmoid(model.forward(xt)).into_data())
}

/// ROC AUC as the Mann–Whitney statistic (ties count one half). 0.5 when one class is absent.
pub fn auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] >= 0.5 {
                rank_sum += avg_rank;
                pos += 1.0;
            }
        }
        i = j + 1;
    }
    let neg = scores.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_protocols::model::ModelKind;

    #[test]
    fn flat_round_trip_is_bit_exact() {
        let spec = ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 5,
            hidden: vec![4, 3],
        };
        let params = spec.init(3);
        let net = Net::from_flat(&spec, &params, &Device::flex()).expect("build");
        assert_eq!(net.to_flat().expect("flat"), params);
        assert!(Net::from_flat(&spec, &params[1..], &Device::flex()).is_err());
    }

    #[test]
    fn auc_matches_hand_computed_values() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert_eq!(auc(&[0.1, 0.2], &[1.0, 1.0]), 0.5);
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), 0.5);
    }

    #[test]
    fn training_separates_a_linearly_separable_set() {
        let spec = ModelSpec {
            kind: ModelKind::Logreg,
            inputs: 2,
            hidden: vec![],
        };
        let mut rows = Rows::default();
        let mut x = Vec::new();
        for i in 0..40 {
            let a = (i as f32 / 20.0) - 1.0;
            x.extend([a, 0.3]);
            rows.features.push(vec![Some(a as f64), Some(0.3)]);
            rows.labels.push(if a > 0.0 { 1.0 } else { 0.0 });
        }
        let cfg = TrainingConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: 0.05,
            batch_size: 8,
            local_steps: 200,
            fedprox_mu: 0.0,
            hidden: vec![],
        };
        let before = evaluate(&spec, &spec.init(0), &x, &rows.labels).expect("eval");
        let trained = train(&spec, &spec.init(0), &x, &rows, &cfg, 1).expect("train");
        let after = evaluate(&spec, &trained, &x, &rows.labels).expect("eval");
        assert!(after.loss < before.loss * 0.5, "{before:?} -> {after:?}");
        assert!(after.accuracy >= 0.95, "{after:?}");
        // FedProx with a huge μ keeps the model near the global one
        let prox = TrainingConfig {
            fedprox_mu: 1000.0,
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.0001,
            ..cfg
        };
        let held = train(&spec, &spec.init(0), &x, &rows, &prox, 1).expect("train");
        assert!(held.iter().all(|v| v.abs() < 0.1), "{held:?}");
    }
}
