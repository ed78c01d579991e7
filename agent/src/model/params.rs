//! A burn module as the flat vector the federation averages, and back: the parameters in
//! the order burn's module visitor walks them (field order, which the derive macro fixes), so
//! any module round-trips bit-exactly without knowing its layers.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::TrainError;

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
