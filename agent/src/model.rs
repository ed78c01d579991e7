//! What a site trains, behind one small trait, [`Model`]: the TOML models (`logreg`, `mlp`)
//! implement it, and so can a network a user writes in Rust with burn ([`Network`], wrapped
//! in [`BurnModel`]; see `examples/custom-model`).
//!
//! Whatever the model, the federation sees one flat f32 vector: the parameters in the order
//! burn's module visitor walks them (field order, which the derive macro fixes), so any burn
//! module flattens and loads back bit-exactly without knowing its layers. The coordinator
//! averages that vector, and both ends check the model's spec — for a TOML model its layer
//! sizes, for a custom one its name and parameter count — before a round uses it.

use std::fmt::Debug;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use chacha20::ChaCha20Rng;
use cohort_protocols::model::{CustomSpec, ModelKind, ModelSpec, OptimizerKind, TrainingConfig};
use rand_core::{Rng, SeedableRng};

use crate::cnn::CnnNet;
use crate::train::{Net, Objective, TrainError};

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
}

/// A burn network over standardised rows: `[batch, inputs]` in, `[batch, outputs]` out (logits
/// for classification, the value for regression; the task's [`Objective`] reads them). A
/// network over images reshapes its rows itself (`x.reshape([batch, c, h, w])`).
pub trait Network: Module + Sync + 'static {
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;
}

/// The parameters of any burn module as one flat vector, in visitor order.
pub fn flatten<M: Module>(module: &M) -> Result<Vec<f32>, TrainError> {
    struct Flatten {
        out: Vec<f32>,
        error: Option<String>,
    }
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            match param.val().into_data().as_slice::<f32>() {
                Ok(v) => self.out.extend_from_slice(v),
                Err(e) => self.error = Some(format!("{e:?}")),
            }
        }
    }
    let mut f = Flatten {
        out: Vec::with_capacity(module.num_params()),
        error: None,
    };
    module.visit(&mut f);
    match f.error {
        Some(e) => Err(TrainError::Data(e)),
        None => Ok(f.out),
    }
}

/// `module` with its parameters replaced by `params` (visitor order, as [`flatten`] gives
/// them), each a fresh trainable parameter on its tensor's device.
pub fn load<M: Module>(module: M, params: &[f32]) -> Result<M, TrainError> {
    if params.len() != module.num_params() {
        return Err(TrainError::WrongLength {
            got: params.len(),
            expected: module.num_params(),
        });
    }
    struct Load<'a> {
        params: &'a [f32],
        at: usize,
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let value = param.val();
            let shape = value.shape();
            let n = shape.num_elements();
            let values = self.params[self.at..self.at + n].to_vec();
            self.at += n;
            Param::from_data(TensorData::new(values, shape), &value.device())
        }
    }
    Ok(module.map(&mut Load { params, at: 0 }))
}

/// `cfg.local_steps` batches of training of `net` (on an autodiff device) from its current
/// parameters, with the task's objective, the configured optimiser and FedProx's proximal
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
    let device = Device::flex().autodiff();
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

/// Outputs of `net` (on a plain device) for standardised rows `x`.
pub fn forward_rows<N: Network>(net: &N, x: &[f32], inputs: usize) -> Result<Vec<f32>, TrainError> {
    let n = x.len() / inputs.max(1);
    if n == 0 {
        return Err(TrainError::NoData);
    }
    let xt = Tensor::from_data(TensorData::new(x.to_vec(), [n, inputs]), &Device::flex());
    net.forward(xt)
        .into_data()
        .as_slice::<f32>()
        .map(|s| s.to_vec())
        .map_err(|e| TrainError::Data(format!("{e:?}")))
}

/// The TOML models (`logreg`, `mlp`), built from the coordinator's spec.
#[derive(Debug, Clone)]
pub struct TomlModel {
    pub spec: ModelSpec,
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
        let device = Device::flex().autodiff();
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

    fn outputs(&self, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError> {
        let device = Device::flex();
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

/// A user's burn network as a [`Model`]: `build` makes the network on a device (its initial
/// values do not matter: every round loads the global parameters into it).
pub struct BurnModel<N: Network> {
    name: String,
    inputs: usize,
    outputs: usize,
    /// Counted once: the spec is checked every round, and building the network to count
    /// would initialise all of it each time.
    parameters: usize,
    build: Box<dyn Fn(&Device) -> N + Send + Sync>,
}

impl<N: Network> Debug for BurnModel<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnModel")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl<N: Network> BurnModel<N> {
    /// `name` identifies the architecture to the coordinator (its `model.name`): change it
    /// when the architecture changes.
    pub fn new(
        name: impl Into<String>,
        inputs: usize,
        outputs: usize,
        build: impl Fn(&Device) -> N + Send + Sync + 'static,
    ) -> Self {
        let parameters = build(&Device::flex()).num_params();
        BurnModel {
            name: name.into(),
            inputs,
            outputs,
            parameters,
            build: Box::new(build),
        }
    }

    /// The network's parameters as built (burn's own initialisation): what `model.init_file`
    /// can hold for the coordinator's first round.
    pub fn initial(&self) -> Result<Vec<f32>, TrainError> {
        flatten(&(self.build)(&Device::flex()))
    }
}

impl<N: Network> Model for BurnModel<N> {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Custom,
            inputs: self.inputs,
            hidden: Vec::new(),
            outputs: self.outputs,
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
        let net = load((self.build)(&Device::flex().autodiff()), global)?;
        let trained = fit(net, objective, x, labels, self.inputs, cfg, seed)?;
        checked(flatten(&trained)?)
    }

    fn outputs(&self, params: &[f32], x: &[f32]) -> Result<Vec<f32>, TrainError> {
        let net = load((self.build)(&Device::flex()), params)?;
        forward_rows(&net, x, self.inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
