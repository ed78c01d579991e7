//! DP-SGD (Abadi et al., CCS 2016): training whose every step is differentially private for
//! each of the site's rows, whatever the coordinator and the other sites do with the result.
//!
//! Each step samples rows independently with probability q = batch size / rows (Poisson
//! sampling, which the accountant's analysis assumes), computes each sampled row's gradient
//! on its own (micro-batches of one: burn has no per-example gradients, and this works for
//! any network through the [`super::Network`] trait), scales it to an L2 norm of at most
//! `max_grad_norm` C, adds Gaussian noise of standard deviation σ·C to the sum, and divides by
//! the expected batch size q·n. One round of `local_steps` such steps is `local_steps`
//! releases of the Poisson-subsampled Gaussian mechanism, which is what [`DpSgd::mechanism`]
//! hands the accountant. FedProx's proximal term depends on no row, so its gradient is added
//! after the noise.
//!
//! The noise comes from a ChaCha20 stream the caller seeds from the operating system: nobody
//! outside the site can know it, and a redo of a round is a fresh release, counted again.
//! Floating-point Gaussian samplers leak through their low bits (Mironov, CCS 2012); the
//! distributed discrete mechanisms of the privacy issue avoid that, this one does not.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::{Gradients, TensorData};
use chacha20::ChaCha20Rng;
use cohort_protocols::model::{OptimizerKind, TrainingConfig};
use cohort_protocols::privacy::Mechanism;
use rand_core::{Rng, SeedableRng};

use super::fit::on_device;
use super::{Network, Objective, TrainError, flatten};

/// DP-SGD's two settings, the site's own (`[privacy]` in agent.toml).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgd {
    /// σ: the noise's standard deviation, in units of the clipping bound.
    pub noise_multiplier: f64,
    /// C: every row's gradient is scaled down to at most this L2 norm.
    pub max_grad_norm: f64,
}

impl DpSgd {
    /// The rate at which each row enters a step: the configured batch size is the expected
    /// batch.
    pub fn sampling_rate(cfg: &TrainingConfig, rows: usize) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        (cfg.batch_size as f64 / rows as f64).min(1.0)
    }

    /// What one round of training with `cfg` on `rows` rows releases: `local_steps` times the
    /// subsampled Gaussian.
    pub fn mechanism(&self, cfg: &TrainingConfig, rows: usize) -> (Mechanism, u64) {
        (
            Mechanism::SubsampledGaussian {
                sampling_rate: Self::sampling_rate(cfg, rows),
                noise_multiplier: self.noise_multiplier,
            },
            cfg.local_steps as u64,
        )
    }
}

/// `cfg.local_steps` steps of DP-SGD on `net` (built on an autodiff device), noise and
/// sampling drawn from ChaCha20 seeded with `noise_seed`.
#[allow(clippy::too_many_arguments)]
pub fn fit_private<N: Network>(
    mut net: N,
    objective: &Objective,
    x: &[f32],
    labels: &[f64],
    inputs: usize,
    cfg: &TrainingConfig,
    dp: &DpSgd,
    noise_seed: [u8; 32],
) -> Result<N, TrainError> {
    let n = labels.len();
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let device = on_device(&net)?;
    let mut rng = ChaCha20Rng::from_seed(noise_seed);
    let q = DpSgd::sampling_rate(cfg, n);
    let expected = q * n as f64;
    let clip = dp.max_grad_norm;
    let anchor = if cfg.fedprox_mu > 0.0 {
        flatten(&net)?
    } else {
        Vec::new()
    };
    let mut adam = AdamConfig::new().init();
    let mut sgd = SgdConfig::new().init();
    let row_loss = |net: &N, i: usize| {
        let xb = Tensor::from_data(
            TensorData::new(x[i * inputs..(i + 1) * inputs].to_vec(), [1, inputs]),
            &device,
        );
        objective.loss(net.forward(xb), &labels[i..=i], &device)
    };
    for _ in 0..cfg.local_steps {
        let mut sum = vec![0f64; net.num_params()];
        let mut template = None;
        for i in 0..n {
            if q < 1.0 && uniform(&mut rng) >= q {
                continue;
            }
            let grads = row_loss(&net, i).backward();
            let g = flat_grads(&net, &grads)?;
            let norm = g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let scale = if norm > clip { clip / norm } else { 1.0 };
            for (s, v) in sum.iter_mut().zip(&g) {
                *s += f64::from(*v) * scale;
            }
            template = Some(grads);
        }
        // An empty sample still releases the noise (the analysis counts every step); the
        // template only says where each parameter's gradient lives.
        let template = match template {
            Some(t) => t,
            None => row_loss(&net, 0).backward(),
        };
        for s in sum.iter_mut() {
            *s = (*s + dp.noise_multiplier * clip * gaussian(&mut rng)) / expected;
        }
        if cfg.fedprox_mu > 0.0 {
            for ((s, w), a) in sum.iter_mut().zip(flatten(&net)?).zip(&anchor) {
                *s += cfg.fedprox_mu * f64::from(w - a);
            }
        }
        let grads = to_gradients(&net, &template, &sum)?;
        net = match cfg.optimizer {
            OptimizerKind::Adam => adam.step(cfg.learning_rate, net, grads),
            OptimizerKind::Sgd => sgd.step(cfg.learning_rate, net, grads),
        };
    }
    Ok(net)
}

/// A row's gradient as one flat vector in the parameters' visitor order (zeros for a
/// parameter the loss did not reach).
fn flat_grads<M: Module>(net: &M, grads: &Gradients) -> Result<Vec<f32>, TrainError> {
    struct Visit<'a> {
        grads: &'a Gradients,
        out: Vec<f32>,
        error: Option<String>,
    }
    impl ModuleVisitor for Visit<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            match value.grad(self.grads) {
                Some(g) => match g.into_data().as_slice::<f32>() {
                    Ok(v) => self.out.extend_from_slice(v),
                    Err(e) => self.error = Some(format!("{e:?}")),
                },
                None => self
                    .out
                    .extend(std::iter::repeat_n(0.0, value.shape().num_elements())),
            }
        }
    }
    let mut v = Visit {
        grads,
        out: Vec::with_capacity(net.num_params()),
        error: None,
    };
    net.visit(&mut v);
    match v.error {
        Some(e) => Err(TrainError::Data(e)),
        None => Ok(v.out),
    }
}

/// The flat noisy gradient as the optimiser's per-parameter gradients, each on the device
/// (and in the shape) of the gradient `template` holds for that parameter.
fn to_gradients<M: Module>(
    net: &M,
    template: &Gradients,
    flat: &[f64],
) -> Result<GradientsParams, TrainError> {
    struct Visit<'a> {
        template: &'a Gradients,
        flat: &'a [f64],
        at: usize,
        out: GradientsParams,
        error: Option<String>,
    }
    impl ModuleVisitor for Visit<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let shape = value.shape();
            let n = shape.num_elements();
            let values: Vec<f32> = self.flat[self.at..self.at + n]
                .iter()
                .map(|v| *v as f32)
                .collect();
            self.at += n;
            match value.grad(self.template) {
                Some(g) => self.out.register(
                    param.id,
                    Tensor::<D>::from_data(TensorData::new(values, shape), &g.device()),
                ),
                None => {
                    self.error = Some(
                        "a parameter takes no part in the loss: DP-SGD must noise every parameter"
                            .into(),
                    )
                }
            }
        }
    }
    let mut v = Visit {
        template,
        flat,
        at: 0,
        out: GradientsParams::new(),
        error: None,
    };
    net.visit(&mut v);
    match v.error {
        Some(e) => Err(TrainError::Data(e)),
        None => Ok(v.out),
    }
}

/// Uniform in [0, 1), 53 bits.
fn uniform(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut ChaCha20Rng) -> f64 {
    let u1 = 1.0 - uniform(rng);
    let u2 = uniform(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Net;
    use cohort_protocols::model::{ModelKind, ModelSpec};

    fn spec(inputs: usize, hidden: Vec<usize>) -> ModelSpec {
        ModelSpec {
            kind: if hidden.is_empty() {
                ModelKind::Logreg
            } else {
                ModelKind::Mlp
            },
            inputs,
            hidden,
            outputs: 1,
            custom: None,
            cnn: None,
        }
    }

    fn sgd(batch_size: usize, lr: f64) -> TrainingConfig {
        TrainingConfig {
            optimizer: OptimizerKind::Sgd,
            learning_rate: lr,
            batch_size,
            local_steps: 1,
            fedprox_mu: 0.0,
            hidden: Vec::new(),
            custom: None,
            cnn: None,
        }
    }

    fn device() -> Device {
        Device::flex().autodiff()
    }

    /// One step with every row sampled and no noise is plain SGD on the mean of the clipped
    /// per-row gradients; for logistic regression those are (σ(w·x + b) − y)·(x, 1), computed
    /// here in f64 independently of burn. A bound below some rows' norms clips exactly those.
    #[test]
    fn per_row_clipping_matches_gradients_computed_independently() {
        let rows: [([f64; 3], f64); 4] = [
            ([0.5, -1.0, 2.0], 1.0),
            ([3.0, 0.2, -0.7], 0.0),
            ([-0.4, 0.9, 0.1], 1.0),
            ([1.5, 1.5, 1.5], 0.0),
        ];
        let params: Vec<f32> = vec![0.3, -0.2, 0.1, 0.05];
        let x: Vec<f32> = rows.iter().flat_map(|(r, _)| r.map(|v| v as f32)).collect();
        let labels: Vec<f64> = rows.iter().map(|(_, y)| *y).collect();
        let (lr, clip) = (0.5, 1.0);
        let mut want = vec![0f64; 4];
        let mut clipped = 0;
        for (r, y) in &rows {
            let w: Vec<f64> = params.iter().map(|v| f64::from(*v)).collect();
            let z = w[0] * r[0] + w[1] * r[1] + w[2] * r[2] + w[3];
            let e = 1.0 / (1.0 + (-z).exp()) - y;
            let g = [e * r[0], e * r[1], e * r[2], e];
            let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            let scale = if norm > clip {
                clipped += 1;
                clip / norm
            } else {
                1.0
            };
            for (acc, v) in want.iter_mut().zip(g) {
                *acc += v * scale;
            }
        }
        assert!((1..4).contains(&clipped), "some rows are clipped, not all");
        let want: Vec<f64> = params
            .iter()
            .zip(&want)
            .map(|(p, g)| f64::from(*p) - lr * g / 4.0)
            .collect();
        let net = Net::from_flat(&spec(3, vec![]), &params, &device()).unwrap();
        let dp = DpSgd {
            noise_multiplier: 0.0,
            max_grad_norm: clip,
        };
        let trained = fit_private(
            net,
            &Objective::Binary,
            &x,
            &labels,
            3,
            &sgd(4, lr),
            &dp,
            [1; 32],
        )
        .unwrap();
        let got = flatten(&trained).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// With every row sampled the sampling draws nothing, so the same seed gives the same
    /// noise with and without data-dependent differences: the difference of two runs that
    /// differ only in σ is the noise itself, −lr·σ·C·N(0, 1)/n per parameter. Over an MLP's
    /// 1 153 parameters its sample variance must be σ²C² within the chi-square band a
    /// false alarm rate of about 1e-6 allows (±15% here), and its mean near 0.
    #[test]
    fn the_noise_has_the_configured_standard_deviation() {
        let s = spec(16, vec![64]);
        let params = s.init(3);
        let rows = 8;
        let x: Vec<f32> = (0..rows * 16)
            .map(|i| ((i * 29 % 53) as f32 / 26.0) - 1.0)
            .collect();
        let labels: Vec<f64> = (0..rows).map(|r| (r % 2) as f64).collect();
        let (lr, clip, sigma) = (1.0, 0.5, 2.0);
        let run = |noise_multiplier| {
            let net = Net::from_flat(&s, &params, &device()).unwrap();
            let dp = DpSgd {
                noise_multiplier,
                max_grad_norm: clip,
            };
            let trained = fit_private(
                net,
                &Objective::Binary,
                &x,
                &labels,
                16,
                &sgd(rows, lr),
                &dp,
                [9; 32],
            )
            .unwrap();
            flatten(&trained).unwrap()
        };
        let (quiet, noisy) = (run(0.0), run(sigma));
        let noise: Vec<f64> = quiet
            .iter()
            .zip(&noisy)
            .map(|(a, b)| f64::from(a - b) * rows as f64 / lr)
            .collect();
        let n = noise.len() as f64;
        assert_eq!(n as usize, s.num_params());
        let mean = noise.iter().sum::<f64>() / n;
        let var = noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let want = (sigma * clip).powi(2);
        assert!(mean.abs() < 5.0 * sigma * clip / n.sqrt(), "mean {mean}");
        assert!(
            (var / want - 1.0).abs() < 0.15,
            "variance {var}, want {want}"
        );
    }

    /// Poisson sampling: at a rate of 1/4 a step sees about a quarter of the rows, and a
    /// round is `local_steps` releases at that rate for the accountant.
    #[test]
    fn the_round_is_priced_as_its_sampling_rate_and_steps() {
        let mut cfg = sgd(25, 0.1);
        cfg.local_steps = 40;
        let dp = DpSgd {
            noise_multiplier: 1.1,
            max_grad_norm: 1.0,
        };
        assert_eq!(
            dp.mechanism(&cfg, 100),
            (
                Mechanism::SubsampledGaussian {
                    sampling_rate: 0.25,
                    noise_multiplier: 1.1
                },
                40
            )
        );
        assert_eq!(DpSgd::sampling_rate(&cfg, 10), 1.0);
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let hits = (0..40_000).filter(|_| uniform(&mut rng) < 0.25).count();
        assert!((9_700..10_300).contains(&hits), "{hits}");
    }
}
