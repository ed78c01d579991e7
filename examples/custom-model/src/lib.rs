//! A network Cohort does not ship, trained by a federation all the same.
//!
//! `GatedNet` is an ordinary burn module — a gated hidden layer (tanh features times a
//! sigmoid gate, as in a GLU) and a linear output — that knows nothing of Cohort. Wrapping
//! it in [`cohort_agent::model::BurnModel`] makes it a model the agent trains: the agent
//! gives it its widths from the federation's signed schema and task, flattens its
//! parameters in burn's visitor order, trains it with the task's objective and the
//! coordinator's optimiser settings, and sends only masked updates. The coordinator knows it
//! by name and parameter count (`[model] kind = "custom"`), and starts from the parameters
//! [`initial`] writes.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, tanh};
use cohort_agent::model::{BurnModel, Network, Shape};

/// The name the coordinator's `model.name` must give: change it with the architecture.
pub const NAME: &str = "gated-mlp/1";

#[derive(Module, Debug)]
pub struct GatedNet {
    features: Linear,
    gate: Linear,
    out: Linear,
}

impl GatedNet {
    pub fn new(inputs: usize, hidden: usize, outputs: usize, device: &Device) -> Self {
        GatedNet {
            features: LinearConfig::new(inputs, hidden).init(device),
            gate: LinearConfig::new(inputs, hidden).init(device),
            out: LinearConfig::new(hidden, outputs).init(device),
        }
    }
}

impl Network for GatedNet {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = tanh(self.features.forward(x.clone())) * sigmoid(self.gate.forward(x));
        self.out.forward(h)
    }
}

/// The model, with 16 gated hidden units; its inputs and outputs are the schema's.
pub fn model() -> BurnModel<GatedNet> {
    BurnModel::new(NAME, |shape: Shape, device: &Device| {
        GatedNet::new(shape.inputs, 16, shape.outputs, device)
    })
}

/// The initial parameters for `shape` as the coordinator's `model.init_file` holds them
/// (little-endian f32), and their count (`model.parameters`).
pub fn initial(shape: Shape) -> anyhow::Result<(Vec<u8>, usize)> {
    let params = model().initial(shape).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((cohort_protocols::model::to_bytes(&params), params.len()))
}
