//! The one training loop every model goes through (the TOML models, the CNN and a user's
//! burn network alike), and the forward pass over standardised rows.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use chacha20::ChaCha20Rng;
use cohort_protocols::model::{OptimizerKind, TrainingConfig};
use rand_core::{Rng, SeedableRng};

use super::{Network, Objective, TrainError};

/// `cfg.local_steps` batches of training of `net` (built on an autodiff device: the batches
/// go to the device its parameters are on) from its current parameters, with the task's objective, the configured optimiser and FedProx's proximal
/// term towards the starting point. Batches are drawn by a shuffle seeded with `seed`.
pub fn fit<N: Network>(
    mut net: N,
    objective: &Objective,
    x: &[f32],
    labels: &[f64],
    inputs: usize,
    cfg: &TrainingConfig,
    seed: u64,
) -> Result<N, TrainError> {
    let n = labels.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let device = on_device(&net)?;
    let anchor = if cfg.fedprox_mu > 0.0 {
        params_1d(&net).into_iter().map(|t| t.detach()).collect()
    } else {
        Vec::new()
    };
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
        let mut xb = Vec::with_capacity(idx.len() * inputs);
        let mut yb = Vec::with_capacity(idx.len());
        for &i in idx {
            xb.extend_from_slice(&x[i * inputs..(i + 1) * inputs]);
            yb.push(labels[i]);
        }
        let xb = Tensor::from_data(TensorData::new(xb, [idx.len(), inputs]), &device);
        let mut loss = objective.loss(net.forward(xb), &yb, &device);
        if cfg.fedprox_mu > 0.0 {
            let terms: Vec<Tensor<1>> = params_1d(&net)
                .into_iter()
                .zip(&anchor)
                .map(|(w, a)| (w - a.clone()).powi_scalar(2).sum())
                .collect();
            loss = loss + Tensor::cat(terms, 0).sum() * (cfg.fedprox_mu / 2.0);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = match cfg.optimizer {
            OptimizerKind::Adam => adam.step(cfg.learning_rate, net, grads),
            OptimizerKind::Sgd => sgd.step(cfg.learning_rate, net, grads),
        };
    }
    Ok(net)
}

/// Every parameter of a module as a 1-D tensor (still in the autodiff graph).
fn params_1d<M: Module>(module: &M) -> Vec<Tensor<1>> {
    struct Collect(Vec<Tensor<1>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            let n = t.shape().num_elements();
            self.0.push(t.reshape([n]));
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}

/// The device a network's parameters are on, where its inputs must go.
pub(super) fn on_device<N: Network>(net: &N) -> Result<Device, TrainError> {
    net.devices()
        .into_iter()
        .next()
        .ok_or_else(|| TrainError::Data("the network has no parameters".into()))
}

/// Outputs of `net` (on a plain device) for standardised rows `x`.
pub fn forward_rows<N: Network>(net: &N, x: &[f32], inputs: usize) -> Result<Vec<f32>, TrainError> {
    let n = x.len() / inputs.max(1);
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let xt = Tensor::from_data(TensorData::new(x.to_vec(), [n, inputs]), &on_device(net)?);
    net.forward(xt)
        .into_data()
        .as_slice::<f32>()
        .map(|s| s.to_vec())
        .map_err(|e| TrainError::Data(format!("{e:?}")))
}
