//! What a site trains, behind one small trait, [`Model`]: the TOML models (`logreg`, `mlp`)
//! implement it, and so can a network a user writes in Rust with burn ([`Network`], wrapped
//! in [`BurnModel`]; see `examples/custom-model`).
//!
//! Whatever the model, the federation sees one flat f32 vector: the parameters in the order
//! burn's module visitor walks them (field order, which the derive macro fixes), so any burn
//! module flattens and loads back bit-exactly without knowing its layers. The coordinator
//! averages that vector, and both ends check the model's spec — for a TOML model its layer
//! sizes, for a custom one its name and parameter count — before a round uses it.

mod cnn;
mod compute;
mod evaluate;
mod fit;
mod mlp;
mod objective;
mod params;
mod private;

use std::fmt::Debug;
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;
use cohort_protocols::model::{CustomSpec, ModelKind, ModelSpec, TrainingConfig};
use thiserror::Error;

pub use cnn::CnnNet;
pub use compute::Compute;
pub use evaluate::{Evaluation, evaluate, evaluate_model, evaluate_outputs, outputs, train};
pub use fit::{fit, forward_rows};
pub use mlp::Net;
pub use objective::Objective;
pub use params::{flatten, load};
pub use private::{DpSgd, fit_private};

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

/// A model a site can train for the federation.
pub trait Model: Send + Sync + Debug + 'static {
    /// What the coordinator's `[model]` must announce for this model: a round announcing
    /// another spec (other layer sizes, another custom name or parameter count) is declined.
    fn spec(&self) -> ModelSpec;

    /// One round of local training from the global parameters `global` on standardised rows
    /// `x` (row-major, `spec().inputs` per row) with training targets `labels`; returns the
    /// new parameters (same length).
    fn train(
        &self,
        global: &[f32],
        x: &[f32],
        labels: &[f64],
        objective: &Objective,
        cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, TrainError>;

    /// The raw outputs (`[rows, spec().outputs]`, row-major) of `params` on standardised rows.
    fn outputs(&self, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError>;

    /// As [`Model::train`], with DP-SGD ([`fit_private`]): what a site with `[privacy]` in
    /// its agent.toml trains with. `noise_seed` seeds the noise and the row sampling, and must
    /// be secret (the agent draws it from the operating system). A model that cannot train
    /// privately says so, and the site declines the round.
    #[allow(clippy::too_many_arguments)]
    fn train_private(
        &self,
        global: &[f32],
        x: &[f32],
        labels: &[f64],
        objective: &Objective,
        cfg: &TrainingConfig,
        dp: &DpSgd,
        noise_seed: [u8; 32],
    ) -> Result<Vec<f32>, TrainError> {
        let _ = (global, x, labels, objective, cfg, dp, noise_seed);
        Err(TrainError::Data(format!(
            "{} does not implement DP-SGD (Model::train_private)",
            self.spec().describe()
        )))
    }
}

/// A burn network over standardised rows: `[batch, inputs]` in, `[batch, outputs]` out (logits
/// for classification, the value for regression; the task's [`Objective`] reads them). A
/// network over images reshapes its rows itself (`x.reshape([batch, c, h, w])`).
pub trait Network: Module + Sync + 'static {
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;
}

/// The TOML models (`logreg`, `mlp`, the declared CNN), built from the coordinator's spec, on
/// the site's `compute` device.
#[derive(Debug, Clone)]
pub struct TomlModel {
    pub spec: ModelSpec,
    pub compute: Compute,
}

impl TomlModel {
    /// The model of `spec` on the CPU.
    pub fn new(spec: &ModelSpec) -> Self {
        TomlModel {
            spec: spec.clone(),
            compute: Compute::Cpu,
        }
    }
}

impl Model for TomlModel {
    fn spec(&self) -> ModelSpec {
        self.spec.clone()
    }

    fn train(
        &self,
        global: &[f32],
        x: &[f32],
        labels: &[f64],
        objective: &Objective,
        cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, TrainError> {
        let device = self.compute.training_device()?;
        let inputs = self.spec.inputs;
        let trained = match &self.spec.cnn {
            Some(c) => flatten(&fit(
                load(self.cnn(c, &device)?, global)?,
                objective,
                x,
                labels,
                inputs,
                cfg,
                seed,
            )?)?,
            None => {
                let net = Net::from_flat(&self.spec, global, &device)?;
                flatten(&fit(net, objective, x, labels, inputs, cfg, seed)?)?
            }
        };
        checked(trained)
    }

    fn train_private(
        &self,
        global: &[f32],
        x: &[f32],
        labels: &[f64],
        objective: &Objective,
        cfg: &TrainingConfig,
        dp: &DpSgd,
        noise_seed: [u8; 32],
    ) -> Result<Vec<f32>, TrainError> {
        let device = self.compute.training_device()?;
        let inputs = self.spec.inputs;
        let trained = match &self.spec.cnn {
            Some(c) => flatten(&fit_private(
                load(self.cnn(c, &device)?, global)?,
                objective,
                x,
                labels,
                inputs,
                cfg,
                dp,
                noise_seed,
            )?)?,
            None => flatten(&fit_private(
                Net::from_flat(&self.spec, global, &device)?,
                objective,
                x,
                labels,
                inputs,
                cfg,
                dp,
                noise_seed,
            )?)?,
        };
        checked(trained)
    }

    fn outputs(&self, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError> {
        let device = self.compute.device()?;
        match &self.spec.cnn {
            Some(c) => forward_rows(&load(self.cnn(c, &device)?, params)?, x, self.spec.inputs),
            None => forward_rows(
                &Net::from_flat(&self.spec, params, &device)?,
                x,
                self.spec.inputs,
            ),
        }
    }
}

impl TomlModel {
    fn cnn(
        &self,
        c: &cohort_protocols::model::cnn::CnnSpec,
        device: &Device,
    ) -> Result<CnnNet, TrainError> {
        CnnNet::new(c, self.spec.outputs, device).map_err(TrainError::Data)
    }
}

fn checked(params: Vec<f32>) -> Result<Vec<f32>, TrainError> {
    if params.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    Ok(params)
}

/// A model's widths: the schema's encoded inputs and the task's outputs (one, or one per
/// class). Both are fixed by what the coordinator signs, so a user's model takes them from
/// there instead of repeating them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub inputs: usize,
    pub outputs: usize,
}

/// A model the agent shapes once it knows the federation's schema and task (after the
/// coordinator's signed schema arrived and the site's data were encoded with it).
pub trait Recipe: Send + Sync + 'static {
    fn shaped(&self, shape: Shape, compute: Compute) -> Arc<dyn Model>;
}

/// How a user's network is built for a shape, on a device.
type Build<N> = Arc<dyn Fn(Shape, &Device) -> N + Send + Sync>;

/// A user's burn network as a [`Recipe`]: `build` makes the network for a [`Shape`] on a
/// device (its initial values do not matter: every round loads the global parameters into
/// it). The agent shapes it from the schema; [`BurnModel::initial`] gives the first
/// parameters for the coordinator.
pub struct BurnModel<N: Network> {
    name: String,
    build: Build<N>,
}

impl<N: Network> Debug for BurnModel<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnModel")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<N: Network> BurnModel<N> {
    /// `name` identifies the architecture to the coordinator (its `model.name`): change it
    /// when the architecture changes.
    pub fn new(
        name: impl Into<String>,
        build: impl Fn(Shape, &Device) -> N + Send + Sync + 'static,
    ) -> Self {
        BurnModel {
            name: name.into(),
            build: Arc::new(build),
        }
    }

    /// The network's parameters as built for `shape` (burn's own initialisation): what
    /// `model.init_file` can hold for the coordinator's first round.
    pub fn initial(&self, shape: Shape) -> Result<Vec<f32>, TrainError> {
        flatten(&(self.build)(shape, &Device::flex()))
    }

    fn shaped_model(&self, shape: Shape, compute: Compute) -> ShapedBurnModel<N> {
        ShapedBurnModel {
            name: self.name.clone(),
            shape,
            compute,
            parameters: (self.build)(shape, &Device::flex()).num_params(),
            build: self.build.clone(),
        }
    }
}

impl<N: Network> Recipe for BurnModel<N> {
    fn shaped(&self, shape: Shape, compute: Compute) -> Arc<dyn Model> {
        Arc::new(self.shaped_model(shape, compute))
    }
}

/// A [`BurnModel`] for one shape: the [`Model`] a round trains.
struct ShapedBurnModel<N: Network> {
    name: String,
    shape: Shape,
    compute: Compute,
    /// Counted once: the spec is checked every round, and building the network to count
    /// would initialise all of it each time.
    parameters: usize,
    build: Build<N>,
}

impl<N: Network> Debug for ShapedBurnModel<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnModel")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("parameters", &self.parameters)
            .finish()
    }
}

impl<N: Network> Model for ShapedBurnModel<N> {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Custom,
            inputs: self.shape.inputs,
            hidden: Vec::new(),
            outputs: self.shape.outputs,
            custom: Some(CustomSpec {
                name: self.name.clone(),
                parameters: self.parameters,
            }),
            cnn: None,
        }
    }

    fn train(
        &self,
        global: &[f32],
        x: &[f32],
        labels: &[f64],
        objective: &Objective,
        cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, TrainError> {
        let device = self.compute.training_device()?;
        let net = load((self.build)(self.shape, &device), global)?;
        let trained = fit(net, objective, x, labels, self.shape.inputs, cfg, seed)?;
        checked(flatten(&trained)?)
    }

    fn train_private(
        &self,
        global: &[f32],
        x: &[f32],
        labels: &[f64],
        objective: &Objective,
        cfg: &TrainingConfig,
        dp: &DpSgd,
        noise_seed: [u8; 32],
    ) -> Result<Vec<f32>, TrainError> {
        let device = self.compute.training_device()?;
        let net = load((self.build)(self.shape, &device), global)?;
        let trained = fit_private(
            net,
            objective,
            x,
            labels,
            self.shape.inputs,
            cfg,
            dp,
            noise_seed,
        )?;
        checked(flatten(&trained)?)
    }

    fn outputs(&self, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError> {
        let net = load((self.build)(self.shape, &self.compute.device()?), params)?;
        forward_rows(&net, x, self.shape.inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same training on burn's wgpu backend (lavapipe in CI) and on its CPU backend ends
    /// within floating-point tolerance: a site's choice of hardware does not change what it
    /// contributes. Built where the agent has its `wgpu` feature (the workspace's tests).
    #[cfg(feature = "wgpu")]
    #[test]
    fn training_on_wgpu_gives_the_cpu_result_within_tolerance() {
        use cohort_protocols::model::OptimizerKind;
        if !cohort_testkit::gpu::wgpu_device() {
            return;
        }
        let spec = ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 4,
            hidden: vec![8],
            outputs: 1,
            custom: None,
            cnn: None,
        };
        let rows = 48;
        let x: Vec<f32> = (0..rows * 4)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let labels: Vec<f64> = (0..rows)
            .map(|r| f64::from(u8::from(x[r * 4] + x[r * 4 + 1] > 0.0)))
            .collect();
        let cfg = TrainingConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: 0.01,
            batch_size: 8,
            local_steps: 30,
            fedprox_mu: 0.1,
            hidden: vec![8],
            custom: None,
            cnn: None,
        };
        let global = spec.init(1);
        let on = |compute| {
            let m = TomlModel {
                spec: spec.clone(),
                compute,
            };
            let trained = m
                .train(&global, &x, &labels, &Objective::Binary, &cfg, 7)
                .expect("trains");
            let out = m.outputs(&trained, &x).expect("runs");
            (trained, out)
        };
        let (cpu, cpu_out) = on(Compute::Cpu);
        let (gpu, gpu_out) = on(Compute::Gpu);
        let moved = cpu
            .iter()
            .zip(&global)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            moved > 0.01,
            "training moved the parameters by {moved} only"
        );
        let apart = cpu
            .iter()
            .zip(&gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(apart < 1e-4, "CPU and wgpu parameters differ by {apart}");
        let out = cpu_out
            .iter()
            .zip(&gpu_out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(out < 1e-4, "CPU and wgpu outputs differ by {out}");
    }

    #[test]
    fn any_module_flattens_and_loads_back_bit_exactly_in_the_canonical_order() {
        let spec = ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 4,
            hidden: vec![3],
            outputs: 2,
            custom: None,
            cnn: None,
        };
        let params = spec.init(5);
        let net = Net::from_flat(&spec, &params, &Device::flex()).expect("net");
        // The generic visitor walks the layers as the canonical layout does.
        assert_eq!(flatten(&net).expect("flat"), params);
        let other = Net::from_flat(&spec, &spec.init(6), &Device::flex()).expect("net");
        let loaded = load(other, &params).expect("load");
        assert_eq!(flatten(&loaded).expect("flat"), params);
        assert!(matches!(
            load(loaded, &params[1..]),
            Err(TrainError::WrongLength { .. })
        ));
    }
}
