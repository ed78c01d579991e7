//! Server-side strategies: how the aggregated mean update becomes the next global model.
//!
//! FedAvg adds the weighted mean delta. The adaptive optimisers of Reddi et al. 2021
//! ("Adaptive Federated Optimization") treat the negated mean delta as a pseudo-gradient and
//! keep first and second moments on the server, which helps with non-IID sites such as the
//! four hospitals of the heart-disease data. All operate on the flat parameter vector; only
//! the (securely aggregated) mean is ever seen, never a site's update.

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod robust;
pub use robust::{Aggregation, AggregationError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase", deny_unknown_fields)]
pub enum StrategyConfig {
    /// x ← x + η·Δ̄ (η = 1 is plain FedAvg).
    Fedavg {
        #[serde(default = "one")]
        server_lr: f32,
    },
    Fedadam {
        #[serde(default = "default_lr")]
        server_lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_tau")]
        tau: f32,
    },
    Fedyogi {
        #[serde(default = "default_lr")]
        server_lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_tau")]
        tau: f32,
    },
    Fedadagrad {
        #[serde(default = "default_lr")]
        server_lr: f32,
        #[serde(default = "default_tau")]
        tau: f32,
    },
}

fn one() -> f32 {
    1.0
}
fn default_lr() -> f32 {
    0.1
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.99
}
fn default_tau() -> f32 {
    1e-3
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::Fedavg { server_lr: 1.0 }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum StrategyError {
    #[error("strategy.{key} = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: f32,
        allowed: &'static str,
    },
    #[error("the update has {got} values, the model {expected}")]
    WrongLength { got: usize, expected: usize },
}

impl StrategyConfig {
    pub fn validate(&self) -> Result<(), StrategyError> {
        let check = |key, value: f32, ok: bool, allowed| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(StrategyError::Invalid {
                    key,
                    value,
                    allowed,
                })
            }
        };
        match *self {
            StrategyConfig::Fedavg { server_lr } => {
                check("server_lr", server_lr, server_lr > 0.0, "must be > 0")
            }
            StrategyConfig::Fedadam {
                server_lr,
                beta1,
                beta2,
                tau,
            }
            | StrategyConfig::Fedyogi {
                server_lr,
                beta1,
                beta2,
                tau,
            } => {
                check("server_lr", server_lr, server_lr > 0.0, "must be > 0")?;
                check(
                    "beta1",
                    beta1,
                    (0.0..1.0).contains(&beta1),
                    "must be in [0, 1)",
                )?;
                check(
                    "beta2",
                    beta2,
                    (0.0..1.0).contains(&beta2),
                    "must be in [0, 1)",
                )?;
                check("tau", tau, tau > 0.0, "must be > 0")
            }
            StrategyConfig::Fedadagrad { server_lr, tau } => {
                check("server_lr", server_lr, server_lr > 0.0, "must be > 0")?;
                check("tau", tau, tau > 0.0, "must be > 0")
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::Fedavg { .. } => "fedavg",
            StrategyConfig::Fedadam { .. } => "fedadam",
            StrategyConfig::Fedyogi { .. } => "fedyogi",
            StrategyConfig::Fedadagrad { .. } => "fedadagrad",
        }
    }
}

/// A strategy with its server-side optimiser state.
#[derive(Debug, Clone)]
pub struct Strategy {
    config: StrategyConfig,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Strategy {
    /// The optimiser state to checkpoint: first and second moments (empty for FedAvg, which
    /// keeps none).
    pub fn state(&self) -> (&[f32], &[f32]) {
        match self.config {
            StrategyConfig::Fedavg { .. } => (&[], &[]),
            _ => (&self.m, &self.v),
        }
    }

    /// Restores a checkpointed state; `m` and `v` must have the model's length (or be empty
    /// for FedAvg).
    pub fn restore(&mut self, m: &[f32], v: &[f32]) -> Result<(), StrategyError> {
        if matches!(self.config, StrategyConfig::Fedavg { .. }) && m.is_empty() && v.is_empty() {
            return Ok(());
        }
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(StrategyError::WrongLength {
                got: m.len(),
                expected: self.m.len(),
            });
        }
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
        Ok(())
    }

    pub fn new(config: StrategyConfig, dim: usize) -> Self {
        let v0 = match config {
            StrategyConfig::Fedavg { .. } => 0.0,
            StrategyConfig::Fedadam { tau, .. }
            | StrategyConfig::Fedyogi { tau, .. }
            | StrategyConfig::Fedadagrad { tau, .. } => tau * tau,
        };
        Strategy {
            config,
            m: vec![0.0; dim],
            v: vec![v0; dim],
        }
    }

    /// Applies the weighted mean delta of the round to `model`.
    pub fn apply(&mut self, model: &mut [f32], mean_delta: &[f32]) -> Result<(), StrategyError> {
        if mean_delta.len() != model.len() {
            return Err(StrategyError::WrongLength {
                got: mean_delta.len(),
                expected: model.len(),
            });
        }
        self.apply_range(model, 0, mean_delta)
    }

    /// Applies `mean_delta`, the mean delta of parameters `offset..offset + len`, to those
    /// parameters of `model`. Applying consecutive ranges equals applying the whole delta
    /// (every strategy here is element-wise), so a large mean never has to exist whole.
    pub fn apply_range(
        &mut self,
        model: &mut [f32],
        offset: usize,
        mean_delta: &[f32],
    ) -> Result<(), StrategyError> {
        let end = offset.saturating_add(mean_delta.len());
        if end > model.len() || self.m.len() != model.len() {
            return Err(StrategyError::WrongLength {
                got: end,
                expected: model.len(),
            });
        }
        let model = &mut model[offset..end];
        let (m, v) = (&mut self.m[offset..end], &mut self.v[offset..end]);
        match self.config {
            StrategyConfig::Fedavg { server_lr } => {
                for (x, d) in model.iter_mut().zip(mean_delta) {
                    *x += server_lr * d;
                }
            }
            StrategyConfig::Fedadam {
                server_lr,
                beta1,
                beta2,
                tau,
            }
            | StrategyConfig::Fedyogi {
                server_lr,
                beta1,
                beta2,
                tau,
            } => {
                let yogi = matches!(self.config, StrategyConfig::Fedyogi { .. });
                for i in 0..model.len() {
                    let d = mean_delta[i];
                    m[i] = beta1 * m[i] + (1.0 - beta1) * d;
                    let d2 = d * d;
                    v[i] = if yogi {
                        v[i] - (1.0 - beta2) * d2 * (v[i] - d2).signum()
                    } else {
                        beta2 * v[i] + (1.0 - beta2) * d2
                    };
                    model[i] += server_lr * m[i] / (v[i].sqrt() + tau);
                }
            }
            StrategyConfig::Fedadagrad { server_lr, tau } => {
                for i in 0..model.len() {
                    let d = mean_delta[i];
                    m[i] = d;
                    v[i] += d * d;
                    model[i] += server_lr * m[i] / (v[i].sqrt() + tau);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applying_in_ranges_equals_applying_the_whole_delta() {
        for cfg in [
            "name = \"fedavg\"",
            "name = \"fedadam\"",
            "name = \"fedyogi\"",
            "name = \"fedadagrad\"",
        ] {
            let cfg: StrategyConfig = toml::from_str(cfg).unwrap();
            let delta: Vec<f32> = (0..10).map(|i| i as f32 * 0.1 - 0.4).collect();
            let (mut whole, mut pieces) = (vec![1.0f32; 10], vec![1.0f32; 10]);
            let (mut a, mut b) = (Strategy::new(cfg.clone(), 10), Strategy::new(cfg, 10));
            for _ in 0..3 {
                a.apply(&mut whole, &delta).unwrap();
                b.apply_range(&mut pieces, 0, &delta[..3]).unwrap();
                b.apply_range(&mut pieces, 3, &delta[3..]).unwrap();
            }
            assert_eq!(whole, pieces);
        }
        let mut s = Strategy::new(StrategyConfig::default(), 3);
        assert!(s.apply_range(&mut [0.0; 3], 2, &[1.0, 1.0]).is_err());
    }

    #[test]
    fn fedavg_adds_the_mean_delta() {
        let mut s = Strategy::new(StrategyConfig::default(), 3);
        let mut x = vec![1.0, 2.0, 3.0];
        s.apply(&mut x, &[0.5, -1.0, 0.0]).unwrap();
        assert_eq!(x, vec![1.5, 1.0, 3.0]);
        assert!(s.apply(&mut x, &[0.0]).is_err());
    }

    #[test]
    fn adaptive_strategies_move_along_the_delta() {
        for cfg in [
            "name = \"fedadam\"",
            "name = \"fedyogi\"\nserver_lr = 0.05",
            "name = \"fedadagrad\"",
        ] {
            let cfg: StrategyConfig = toml::from_str(cfg).unwrap();
            cfg.validate().unwrap();
            let mut s = Strategy::new(cfg.clone(), 2);
            let mut x = vec![0.0, 0.0];
            for _ in 0..3 {
                s.apply(&mut x, &[1.0, -1.0]).unwrap();
            }
            assert!(x[0] > 0.0 && x[1] < 0.0, "{cfg:?}: {x:?}");
            assert!((x[0] + x[1]).abs() < 1e-6);
        }
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let c: StrategyConfig = toml::from_str("name = \"fedadam\"\nbeta1 = 1.5").unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "strategy.beta1 = 1.5: must be in [0, 1)"
        );
        assert!(toml::from_str::<StrategyConfig>("name = \"fedsgd\"").is_err());
        assert!(toml::from_str::<StrategyConfig>("name = \"fedavg\"\nbeta1 = 0.1").is_err());
    }
}
