//! Where a site's models train and run: burn's pure-Rust CPU backend (`flex`, always built),
//! or a GPU through burn's wgpu backend (Vulkan, Metal, DirectX 12) in a build with the `wgpu`
//! feature. The choice is the site's (`[compute] device` in agent.toml), not the
//! coordinator's: it changes how fast a site trains, not what it computes beyond
//! floating-point tolerance.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::TrainError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// burn's pure-Rust CPU backend: needs nothing from the machine.
    #[default]
    Cpu,
    /// burn's wgpu backend on the machine's default adapter (a GPU; lavapipe, a software
    /// Vulkan device, where there is none).
    Gpu,
}

impl Compute {
    /// Whether this build can run on it.
    pub fn built(self) -> bool {
        match self {
            Compute::Cpu => true,
            Compute::Gpu => cfg!(feature = "wgpu"),
        }
    }

    /// The device models run on (inference and evaluation).
    pub fn device(self) -> Result<Device, TrainError> {
        match self {
            Compute::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Compute::Gpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(not(feature = "wgpu"))]
            Compute::Gpu => Err(TrainError::Data(
                "device = \"gpu\": this agent was built without the `wgpu` feature".into(),
            )),
        }
    }

    /// The device models train on: [`Compute::device`] with autodiff.
    pub fn training_device(self) -> Result<Device, TrainError> {
        Ok(self.device()?.autodiff())
    }
}
