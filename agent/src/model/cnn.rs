//! The TOML-declared CNN (`[model] kind = "cnn"`) as a burn module.
//!
//! Convolutions and dense layers are burn's own (`Conv2d`, stride 1, no padding; `Linear`),
//! kept in two lists so that burn's visitor walks every convolution, then every dense layer —
//! the flat layout `cohort_protocols::model::cnn` defines and the coordinator initialises,
//! averages and exports. The declaration itself (which step comes when) is not a parameter.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use cohort_protocols::model::cnn::{CnnSpec, Layer};

use super::Network;

#[derive(Module, Debug)]
pub struct CnnNet {
    convs: Vec<Conv2d>,
    denses: Vec<Linear>,
    #[module(skip)]
    plan: Vec<Layer>,
    #[module(skip)]
    input: [usize; 3],
}

impl CnnNet {
    /// The network `spec` declares with an output layer of `outputs` (values to be loaded).
    pub fn new(spec: &CnnSpec, outputs: usize, device: &Device) -> Result<Self, String> {
        let tensors = spec.tensors(outputs)?;
        let mut convs = Vec::new();
        let mut denses = Vec::new();
        for (name, shape) in tensors.iter().filter(|(n, _)| n.ends_with(".weight")) {
            match shape.as_slice() {
                [out, inp, k, _] => {
                    convs.push(Conv2dConfig::new([*inp, *out], [*k, *k]).init(device));
                }
                [inp, out] => denses.push(LinearConfig::new(*inp, *out).init(device)),
                _ => return Err(format!("{name}: unexpected shape {shape:?}")),
            }
        }
        let i = spec.input;
        Ok(CnnNet {
            convs,
            denses,
            plan: spec.layers.clone(),
            input: [i.channels, i.height, i.width],
        })
    }
}

impl Network for CnnNet {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, _] = x.dims();
        let device = x.device();
        let [c, h, w] = self.input;
        let mut image: Option<Tensor<4>> = Some(x.reshape([batch, c, h, w]));
        let mut flat: Option<Tensor<2>> = None;
        let (mut conv, mut dense) = (0, 0);
        let flatten = |t: Tensor<4>| {
            let [b, c, h, w] = t.dims();
            t.reshape([b, c * h * w])
        };
        for layer in &self.plan {
            match layer {
                Layer::Conv2d { .. } => {
                    image = image.map(|t| self.convs[conv].forward(t));
                    conv += 1;
                }
                Layer::MaxPool { size } => {
                    let pool = MaxPool2dConfig::new([*size, *size])
                        .with_strides([*size, *size])
                        .init();
                    image = image.map(|t| pool.forward(t));
                }
                Layer::Relu => {
                    image = image.map(relu);
                    flat = flat.map(relu);
                }
                Layer::Dropout { rate } => {
                    let d = DropoutConfig::new(*rate).init();
                    image = image.map(|t| d.forward(t));
                    flat = flat.map(|t| d.forward(t));
                }
                Layer::Flatten => {
                    if let Some(t) = image.take() {
                        flat = Some(flatten(t));
                    }
                }
                Layer::Dense { .. } => {
                    flat = flat.map(|t| self.denses[dense].forward(t));
                    dense += 1;
                }
            }
        }
        let flat = match (flat, image) {
            (Some(f), _) => f,
            (None, Some(t)) => flatten(t),
            // The declaration was checked: one of the two always holds the values.
            (None, None) => Tensor::zeros([batch, 1], &device),
        };
        self.denses[dense].forward(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{flatten, load};
    use cohort_protocols::model::{ImageShape, ModelKind, ModelSpec};

    #[test]
    fn the_burn_module_walks_the_declared_flat_layout() {
        let cnn = CnnSpec {
            input: ImageShape {
                channels: 1,
                height: 12,
                width: 12,
            },
            layers: vec![
                Layer::Conv2d {
                    channels: 4,
                    kernel: 3,
                },
                Layer::Relu,
                Layer::MaxPool { size: 2 },
                Layer::Flatten,
                Layer::Dense { units: 8 },
                Layer::Relu,
            ],
        };
        let spec = ModelSpec {
            kind: ModelKind::Cnn,
            inputs: 144,
            hidden: Vec::new(),
            outputs: 3,
            custom: None,
            cnn: Some(cnn.clone()),
        };
        let net = CnnNet::new(&cnn, 3, &Device::flex()).expect("net");
        assert_eq!(net.num_params(), spec.num_params());
        // The coordinator's initial vector loads into the module and comes back unchanged.
        let params = spec.init(1);
        let net = load(net, &params).expect("load");
        assert_eq!(flatten(&net).expect("flat"), params);
        let x = Tensor::<2>::zeros([5, 144], &Device::flex());
        assert_eq!(net.forward(x).dims(), [5, 3]);
    }
}
