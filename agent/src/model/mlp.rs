//! The TOML models' network (`logreg`, `mlp`): linear layers with ReLU between them.
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
use burn::tensor::activation::relu;
use cohort_protocols::model::ModelSpec;

use super::{Network, TrainError};

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
            outputs: 3,
            custom: None,
            cnn: None,
        };
        let params = spec.init(3);
        let net = Net::from_flat(&spec, &params, &Device::flex()).expect("build");
        assert_eq!(super::super::flatten(&net).expect("flat"), params);
        assert!(Net::from_flat(&spec, &params[1..], &Device::flex()).is_err());
    }
}
