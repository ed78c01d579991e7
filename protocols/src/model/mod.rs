//! What the coordinator and the agents agree on about the model and the data.
//!
//! A model travels as one flat vector of f32 parameters in a canonical order (layer by layer:
//! the weight matrix `[d_in, d_out]` row-major, then the bias), so the coordinator can average,
//! hash and sign it without knowing anything about burn, and the agent can load it bit-exactly.

pub mod cnn;
pub mod csv;
mod incoming;
pub mod metrics;
mod schema;
pub mod stats;
mod task;

pub use incoming::{Incoming, IncomingError};
pub use schema::{
    DataSchema, ImageShape, LabelRule, MissingValues, SchemaError, image_input_names,
};
pub use task::{RegressionLoss, Task, TaskKind, TaskTable};

/// Local training settings, sent by the coordinator each round (its `[training]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    pub batch_size: usize,
    /// Local updates (batches) per round.
    pub local_steps: usize,
    /// FedProx proximal term μ (0 = FedAvg).
    #[serde(default)]
    pub fedprox_mu: f64,
    /// Hidden layer sizes of the MLP (empty: logistic regression). Mirrors the coordinator's
    /// `model.hidden`, which it copies here.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// The name of a custom model (`model.kind = "custom"`), which the coordinator copies
    /// here; absent for the TOML models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<String>,
    /// A CNN's declared layers (`model.kind = "cnn"`), which the coordinator copies here; the
    /// input shape is the schema's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnn: Option<Vec<cnn::Layer>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adam
}

impl TrainingConfig {
    /// Checks the values; errors name the key under `[training]`.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "training.learning_rate = {}: must be > 0",
                self.learning_rate
            ));
        }
        if self.batch_size == 0 {
            return Err("training.batch_size = 0: must be at least 1".into());
        }
        if self.local_steps == 0 {
            return Err("training.local_steps = 0: must be at least 1".into());
        }
        if !(self.fedprox_mu.is_finite() && self.fedprox_mu >= 0.0) {
            return Err(format!(
                "training.fedprox_mu = {}: must be >= 0",
                self.fedprox_mu
            ));
        }
        Ok(())
    }
}

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_512};
use thiserror::Error;

/// The model families Cohort trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Logistic regression: one linear layer and a sigmoid.
    Logreg,
    /// A multi-layer perceptron with ReLU between layers; its output layer follows the task.
    Mlp,
    /// A network written in Rust by the user (`cohort_agent::model::Network`), run by the
    /// user's own agent binary: the coordinator knows only its name and parameter count, and
    /// its initial parameters come from a file (`model.init_file`).
    Custom,
    /// A small convolutional network over images, declared layer by layer (`model.layers`).
    Cnn,
}

/// A named tensor: name, shape, values in row-major order.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A network over `inputs` features with `outputs` outputs (one per class of a multiclass
/// task, otherwise one: the task decides, see [`Task::outputs`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub inputs: usize,
    /// Hidden layer sizes (MLP only).
    pub hidden: Vec<usize>,
    /// Written by every version since tasks other than binary exist; a spec without it
    /// (an older export or data directory) is binary.
    #[serde(default = "one")]
    pub outputs: usize,
    /// A custom model's name and parameter count: what both ends check for it, since neither
    /// layer sizes nor the architecture itself are known to the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomSpec>,
    /// A CNN's input shape and declared layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnn: Option<cnn::CnnSpec>,
}

/// What identifies a user's own network: its name (chosen by its author, e.g. with a version:
/// "gated-mlp/1") and the length of its flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomSpec {
    pub name: String,
    pub parameters: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ModelError {
    #[error("the model has {expected} parameters, got {got}")]
    WrongLength { expected: usize, got: usize },
    #[error("model bytes are not a whole number of f32 values ({0} bytes)")]
    BadBytes(usize),
    #[error("parameter {index} is {value}, not a finite number")]
    NotFinite { index: usize, value: f32 },
    #[error("tensor {0}")]
    Tensor(String),
}

impl ModelSpec {
    /// `(d_in, d_out)` of every linear layer, input first (none for a custom model, whose
    /// layout only its own code knows).
    pub fn layers(&self) -> Vec<(usize, usize)> {
        let hidden: &[usize] = match self.kind {
            ModelKind::Logreg => &[],
            ModelKind::Mlp => &self.hidden,
            ModelKind::Custom | ModelKind::Cnn => return Vec::new(),
        };
        let mut sizes = vec![self.inputs];
        sizes.extend_from_slice(hidden);
        sizes.push(self.outputs.max(1));
        sizes.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// A short description, e.g. "mlp 13-32-1" (the last number is the output width): what a data directory's checkpoints are of.
    pub fn describe(&self) -> String {
        if let Some(c) = &self.custom {
            return format!(
                "custom {} {}-{} ({} parameters)",
                c.name, self.inputs, self.outputs, c.parameters
            );
        }
        if let Some(c) = &self.cnn {
            return format!("cnn {}-dense{}", c.describe(), self.outputs);
        }
        let kind = match self.kind {
            ModelKind::Logreg => "logreg",
            ModelKind::Mlp => "mlp",
            ModelKind::Custom => "custom",
            ModelKind::Cnn => "cnn",
        };
        let mut sizes: Vec<String> = vec![self.inputs.to_string()];
        sizes.extend(self.layers().iter().map(|(_, o)| o.to_string()));
        format!("{kind} {}", sizes.join("-"))
    }

    pub fn num_params(&self) -> usize {
        if let Some(c) = &self.custom {
            return c.parameters;
        }
        if self.cnn.is_some() {
            return self
                .manifest()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
        }
        self.layers().iter().map(|(i, o)| i * o + o).sum()
    }

    /// Parameter names and shapes in canonical order, PyTorch-style names
    /// (`layers.0.weight` is `[d_in, d_out]` here: transpose it for `torch.nn.Linear`).
    pub fn manifest(&self) -> Vec<(String, Vec<usize>)> {
        if let Some(c) = &self.cnn {
            // A declaration that does not check has no layout (the configuration refuses it).
            return c.tensors(self.outputs).unwrap_or_default();
        }
        self.layers()
            .iter()
            .enumerate()
            .flat_map(|(l, &(i, o))| {
                [
                    (format!("layers.{l}.weight"), vec![i, o]),
                    (format!("layers.{l}.bias"), vec![o]),
                ]
            })
            .collect()
    }

    /// The parameters as PyTorch expects them for `nn.Sequential(Linear, ReLU, Linear, …)`:
    /// names `0.weight`, `0.bias`, `2.weight`, … and weights transposed to `[d_out, d_in]`
    /// (burn stores `[d_in, d_out]`). `params` must have this model's length.
    pub fn pytorch_tensors(&self, params: &[f32]) -> Result<Vec<NamedTensor>, ModelError> {
        if params.len() != self.num_params() {
            return Err(ModelError::WrongLength {
                expected: self.num_params(),
                got: params.len(),
            });
        }
        if self.cnn.is_some() {
            // Convolutions are stored as PyTorch stores them; dense weights are transposed.
            let mut out = Vec::new();
            let mut at = 0;
            for (name, shape) in self.manifest() {
                let n: usize = shape.iter().product();
                let v = &params[at..at + n];
                at += n;
                if let ([i, o], true) = (shape.as_slice(), name.starts_with("denses.")) {
                    let (i, o) = (*i, *o);
                    let t = (0..o)
                        .flat_map(|r| (0..i).map(move |c| v[c * o + r]))
                        .collect();
                    out.push((name, vec![o, i], t));
                } else {
                    out.push((name, shape, v.to_vec()));
                }
            }
            return Ok(out);
        }
        if self.custom.is_some() {
            // Only the network's own code knows how the vector splits into tensors.
            return Ok(vec![(
                "params".to_string(),
                vec![params.len()],
                params.to_vec(),
            )]);
        }
        let mut out = Vec::new();
        let mut at = 0;
        for (l, (i, o)) in self.layers().into_iter().enumerate() {
            let w = &params[at..at + i * o];
            let transposed = (0..o)
                .flat_map(|r| (0..i).map(move |c| w[c * o + r]))
                .collect();
            out.push((format!("{}.weight", 2 * l), vec![o, i], transposed));
            at += i * o;
            out.push((
                format!("{}.bias", 2 * l),
                vec![o],
                params[at..at + o].to_vec(),
            ));
            at += o;
        }
        Ok(out)
    }

    /// The inverse of [`ModelSpec::pytorch_tensors`]: Cohort's flat parameter vector from
    /// PyTorch-layout tensors, found by name with `tensor(name) -> (shape, values)`. Every
    /// tensor must be present with this model's shape.
    pub fn from_pytorch_tensors(
        &self,
        mut tensor: impl FnMut(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    ) -> Result<Vec<f32>, ModelError> {
        if self.custom.is_some() {
            return match tensor("params") {
                Some((s, v)) if s == [self.num_params()] && v.len() == self.num_params() => Ok(v),
                Some((s, _)) => Err(ModelError::Tensor(format!(
                    "params has shape {s:?}, the model needs [{}]",
                    self.num_params()
                ))),
                None => Err(ModelError::Tensor("params is missing".into())),
            };
        }
        if self.cnn.is_some() {
            let mut params = Vec::with_capacity(self.num_params());
            for (name, shape) in self.manifest() {
                let dense = name.starts_with("denses.") && shape.len() == 2;
                let want = if dense {
                    vec![shape[1], shape[0]]
                } else {
                    shape.clone()
                };
                match tensor(&name) {
                    Some((s, v)) if s == want && v.len() == want.iter().product::<usize>() => {
                        if dense {
                            let (i, o) = (shape[0], shape[1]);
                            params.extend(
                                (0..i)
                                    .flat_map(|c| (0..o).map(move |r| (r, c)))
                                    .map(|(r, c)| v[r * i + c]),
                            );
                        } else {
                            params.extend(v);
                        }
                    }
                    Some((s, _)) => {
                        return Err(ModelError::Tensor(format!(
                            "{name} has shape {s:?}, the model needs {want:?}"
                        )));
                    }
                    None => return Err(ModelError::Tensor(format!("{name} is missing"))),
                }
            }
            return Ok(params);
        }
        let mut params = Vec::with_capacity(self.num_params());
        for (l, (i, o)) in self.layers().into_iter().enumerate() {
            let get = |name: String, shape: Vec<usize>, t: Option<(Vec<usize>, Vec<f32>)>| match t {
                Some((s, v)) if s == shape && v.len() == shape.iter().product::<usize>() => Ok(v),
                Some((s, _)) => Err(ModelError::Tensor(format!(
                    "{name} has shape {s:?}, the model needs {shape:?}"
                ))),
                None => Err(ModelError::Tensor(format!("{name} is missing"))),
            };
            let wname = format!("{}.weight", 2 * l);
            let w = get(wname.clone(), vec![o, i], tensor(&wname))?;
            // PyTorch's [d_out, d_in] back to burn's [d_in, d_out].
            params.extend(
                (0..i)
                    .flat_map(|c| (0..o).map(move |r| (r, c)))
                    .map(|(r, c)| w[r * i + c]),
            );
            let bname = format!("{}.bias", 2 * l);
            params.extend(get(bname.clone(), vec![o], tensor(&bname))?);
        }
        Ok(params)
    }

    /// The initial global model (a custom model's comes from its own file instead: this gives
    /// zeros of its length). Logistic regression starts at zero (the convex problem needs
    /// no symmetry breaking); MLP weights are uniform in ±1/√d_in (PyTorch's default scale),
    /// drawn from `seed` so every run with the same seed starts from the same model.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        if self.custom.is_some() {
            return vec![0.0; self.num_params()];
        }
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        if self.cnn.is_some() {
            let shapes = self.manifest();
            let mut params = Vec::with_capacity(self.num_params());
            for (index, (_, shape)) in shapes.iter().enumerate() {
                let bound = 1.0 / (cnn::fan_in(&shapes, index) as f64).sqrt();
                for _ in 0..shape.iter().product::<usize>() {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    params.push(((2.0 * u - 1.0) * bound) as f32);
                }
            }
            return params;
        }
        let mut params = Vec::with_capacity(self.num_params());
        for (i, o) in self.layers() {
            let bound = 1.0 / (i as f64).sqrt();
            let zero = self.kind == ModelKind::Logreg;
            for _ in 0..(i * o + o) {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                params.push(if zero {
                    0.0
                } else {
                    ((2.0 * u - 1.0) * bound) as f32
                });
            }
        }
        params
    }

    /// Checks a parameter vector received from outside.
    pub fn check(&self, params: &[f32]) -> Result<(), ModelError> {
        if params.len() != self.num_params() {
            return Err(ModelError::WrongLength {
                expected: self.num_params(),
                got: params.len(),
            });
        }
        if let Some((index, &value)) = params.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ModelError::NotFinite { index, value });
        }
        Ok(())
    }
}

/// Little-endian f32 bytes: the wire and storage form of a model.
pub fn to_bytes(params: &[f32]) -> Vec<u8> {
    params.iter().flat_map(|p| p.to_le_bytes()).collect()
}

pub fn from_bytes(bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(ModelError::BadBytes(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// SHA3-512 of a model's bytes: what the agent checks before training on it.
pub fn sha3_512(bytes: &[u8]) -> [u8; 64] {
    Sha3_512::digest(bytes).into()
}

/// What the coordinator signs for a model: a domain tag and the model's SHA3-512. The tag keeps
/// the signature from meaning anything in another context (the same key signs TLS handshakes).
pub fn model_signing_payload(sha3_512: &[u8; 64]) -> Vec<u8> {
    let mut p = b"cohort model v1\0".to_vec();
    p.extend_from_slice(sha3_512);
    p
}

fn schema_signing_payload(schema_toml: &str) -> Vec<u8> {
    let mut p = b"cohort schema v1\0".to_vec();
    p.extend_from_slice(&sha3_512(schema_toml.as_bytes()));
    p
}

/// The coordinator's signature of the federation's schema (as the TOML it sends). Distinct
/// from a model signature by its domain tag, so one can never pass for the other.
pub fn sign_schema(key: &ed25519_dalek::SigningKey, schema_toml: &str) -> [u8; 64] {
    use ed25519_dalek::Signer;
    key.sign(&schema_signing_payload(schema_toml)).to_bytes()
}

/// Whether `signature` is the holder of `key`'s signature of `schema_toml`.
pub fn verify_schema(
    key: &ed25519_dalek::VerifyingKey,
    schema_toml: &str,
    signature: &[u8],
) -> bool {
    ed25519_dalek::Signature::from_slice(signature).is_ok_and(|sig| {
        key.verify_strict(&schema_signing_payload(schema_toml), &sig)
            .is_ok()
    })
}

/// The coordinator's signature of a model with SHA3-512 `sha3_512`.
pub fn sign_model(key: &ed25519_dalek::SigningKey, sha3_512: &[u8; 64]) -> [u8; 64] {
    use ed25519_dalek::Signer;
    key.sign(&model_signing_payload(sha3_512)).to_bytes()
}

/// Whether `signature` is the holder of `key`'s signature of the model with `sha3_512`.
pub fn verify_model(key: &ed25519_dalek::VerifyingKey, sha3_512: &[u8], signature: &[u8]) -> bool {
    let (Ok(hash), Ok(sig)) = (
        <[u8; 64]>::try_from(sha3_512),
        ed25519_dalek::Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify_strict(&model_signing_payload(&hash), &sig)
        .is_ok()
}

/// `sha3_512(&to_bytes(params))` without the copy of the model that `to_bytes` makes.
pub fn params_sha3_512(params: &[f32]) -> [u8; 64] {
    let mut h = Sha3_512::new();
    for block in params.chunks(4096) {
        let bytes: Vec<u8> = block.iter().flat_map(|p| p.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_signatures_verify_only_for_their_text_and_never_as_a_model() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]);
        let text = "missing = \"drop_row\"\n";
        let sig = sign_schema(&key, text);
        assert!(verify_schema(&key.verifying_key(), text, &sig));
        assert!(!verify_schema(
            &key.verifying_key(),
            "missing = \"impute_mean\"\n",
            &sig
        ));
        assert!(!verify_schema(&other.verifying_key(), text, &sig));
        assert!(!verify_schema(&key.verifying_key(), text, &sig[1..]));
        let hash = sha3_512(text.as_bytes());
        assert!(!verify_model(&key.verifying_key(), &hash, &sig));
    }

    #[test]
    fn model_signatures_verify_only_for_their_model_and_key() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let hash = params_sha3_512(&[1.0, 2.0]);
        let sig = sign_model(&key, &hash);
        assert!(verify_model(&key.verifying_key(), &hash, &sig));
        assert!(!verify_model(&other.verifying_key(), &hash, &sig));
        let mut changed = hash;
        changed[0] ^= 1;
        assert!(!verify_model(&key.verifying_key(), &changed, &sig));
        assert!(!verify_model(&key.verifying_key(), &hash, &sig[..63]));
        assert!(!verify_model(&key.verifying_key(), &hash[..10], &sig));
    }

    #[test]
    fn pytorch_tensors_are_transposed_and_named_for_sequential() {
        let spec = ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 2,
            hidden: vec![3],
            outputs: 1,
            custom: None,
            cnn: None,
        };
        // layer 0: w [2, 3] = 0..6 row-major (w[c][r] = 3c + r), b = 6..9; layer 1: w [3, 1], b.
        let params: Vec<f32> = (0..spec.num_params()).map(|x| x as f32).collect();
        let t = spec.pytorch_tensors(&params).unwrap();
        let names: Vec<&str> = t.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
        assert_eq!(t[0].1, vec![3, 2]);
        assert_eq!(t[0].2, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(t[1].2, vec![6.0, 7.0, 8.0]);
        assert_eq!(t[2].1, vec![1, 3]);
        assert_eq!(t[2].2, vec![9.0, 10.0, 11.0]);
        assert_eq!(t[3].2, vec![12.0]);
        assert!(spec.pytorch_tensors(&params[1..]).is_err());
        // And back, exactly; a missing or misshapen tensor is named.
        let find = |name: &str| {
            t.iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, s, v)| (s.clone(), v.clone()))
        };
        assert_eq!(spec.from_pytorch_tensors(find).unwrap(), params);
        let missing = spec
            .from_pytorch_tensors(|n| if n == "2.bias" { None } else { find(n) })
            .unwrap_err();
        assert!(
            missing.to_string().contains("2.bias is missing"),
            "{missing}"
        );
        let wrong = spec
            .from_pytorch_tensors(|n| {
                find(n).map(|(s, v)| {
                    if n == "0.weight" {
                        (vec![2, 3], v)
                    } else {
                        (s, v)
                    }
                })
            })
            .unwrap_err();
        assert!(
            wrong.to_string().contains("0.weight has shape [2, 3]"),
            "{wrong}"
        );
    }

    #[test]
    fn streaming_hash_equals_the_hash_of_the_bytes() {
        let params: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.37 - 5.0).collect();
        assert_eq!(params_sha3_512(&params), sha3_512(&to_bytes(&params)));
        assert_ne!(params_sha3_512(&params[1..]), sha3_512(&to_bytes(&params)));
    }

    #[test]
    fn layout_and_init() {
        let logreg = ModelSpec {
            kind: ModelKind::Logreg,
            inputs: 13,
            hidden: vec![32],
            outputs: 1,
            custom: None,
            cnn: None,
        };
        assert_eq!(logreg.layers(), vec![(13, 1)]);
        assert_eq!(logreg.num_params(), 14);
        assert!(logreg.init(1).iter().all(|&p| p == 0.0));
        let mlp = ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 13,
            hidden: vec![16, 8],
            outputs: 1,
            custom: None,
            cnn: None,
        };
        assert_eq!(mlp.layers(), vec![(13, 16), (16, 8), (8, 1)]);
        assert_eq!(mlp.num_params(), 13 * 16 + 16 + 16 * 8 + 8 + 8 + 1);
        let names: Vec<String> = mlp.manifest().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "layers.0.weight");
        assert_eq!(names[5], "layers.2.bias");
        let a = mlp.init(7);
        assert_eq!(a, mlp.init(7));
        assert_ne!(a, mlp.init(8));
        // each layer within ±1/√d_in; the widest bound here is the last layer's (d_in = 8)
        assert!(a.iter().all(|p| p.abs() <= 1.0 / 8f32.sqrt()));
        assert!(a[..13 * 16].iter().all(|p| p.abs() <= 1.0 / 13f32.sqrt()));
        assert_eq!(from_bytes(&to_bytes(&a)).unwrap(), a);
        assert_eq!(mlp.check(&a), Ok(()));
        assert!(matches!(
            mlp.check(&a[1..]),
            Err(ModelError::WrongLength { .. })
        ));
        assert_eq!(from_bytes(&[0; 5]), Err(ModelError::BadBytes(5)));
        assert_ne!(sha3_512(&to_bytes(&a)), sha3_512(&to_bytes(&mlp.init(8))));
    }
}
