//! The coordinator's TOML configuration.
//!
//! Unknown keys are errors (serde's `deny_unknown_fields`): a misspelt `treshold` must not
//! silently fall back to a default. Values are validated after parsing and every error names
//! the key, the value and what is allowed, because the reader is editing the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cohort_protocols::model::{DataSchema, ModelKind, ModelSpec, TrainingConfig};
use cohort_protocols::secagg::{Modulus, Params};
use cohort_protocols::strategy::StrategyConfig;
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse {
        path: String,
        message: String,
        /// Where in the text the error is (bytes), so a tool that generated the text can
        /// point at the line of its own input it came from.
        span: Option<std::ops::Range<usize>>,
    },
    #[error("{key} = {value}: {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
    /// A rule checked elsewhere, whose message already names the key and the value (e.g.
    /// `training.learning_rate = -1: must be > 0`).
    #[error("{0}")]
    Rule(String),
}

fn invalid(key: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC listen address, e.g. "0.0.0.0:7700".
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub rounds: RoundsConfig,
    #[serde(default)]
    pub secagg: SecAggConfig,
    #[serde(default)]
    pub strategy: StrategyConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// The status API and `/metrics`; absent: not served.
    pub status: Option<StatusConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub schema: DataSchema,
    /// Local training settings, sent to the agents every round (see
    /// `cohort_protocols::model::TrainingConfig`).
    pub training: toml::Table,
    /// What the federation asks of its sites' differential privacy.
    #[serde(default)]
    pub privacy: PrivacyPolicy,
    /// How the round's updates are combined: the mean, or a robust rule (plain mode only).
    #[serde(default)]
    pub aggregation: cohort_protocols::strategy::Aggregation,
}

/// `[privacy]`: the federation's side of example-level DP. Each site runs DP-SGD and enforces
/// its own budget (`[privacy]` in agent.toml); the coordinator cannot add noise to a site's
/// training or lift its budget, so this only decides whom it asks and when it stops.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// Every training site must train with DP-SGD: a site that joins without `[privacy]` is
    /// refused, naming the setting.
    #[serde(default)]
    pub require: bool,
    /// The federation's target ε per patient (each patient's rows are at one site, so the
    /// guarantee is the largest site's ε). A site whose next round would pass it is not asked
    /// even if its own budget is larger; when fewer than `rounds.min_sites` sites can go on,
    /// training stops with a message.
    pub epsilon: Option<f64>,
    /// Site-level DP under secure aggregation: every site adds discrete Gaussian noise to its
    /// clipped update before masking, and the coordinator accounts for every sum it unmasks.
    #[serde(default)]
    pub site_level: Option<SiteLevelPrivacy>,
}

/// `[privacy.site_level]`: the distributed discrete Gaussian (Kairouz, Liu and Steinke, 2021).
/// The guarantee is per site: two federations that differ in one site's whole update (that
/// site sending a zero update instead) are hard to tell apart from everything the
/// coordinator unmasks, at (ε, δ). It holds against the coordinator itself, as long as the
/// `min_survivors` sites whose noise makes up the sum are honest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteLevelPrivacy {
    /// z: the standard deviation of the summed noise of `min_survivors` sites over one
    /// site's sensitivity (its update's L2 bound, in the same units). Each site adds
    /// σ = z · Δ₂ / √min_survivors; more survivors mean more noise, never less.
    pub noise_multiplier: f64,
    /// C: every site scales its update to at most this L2 norm; for training rounds it
    /// replaces `secagg.clip` (every value then lies in [−C, C]).
    pub clip: f32,
    /// The federation's site-level budget: training stops before a round would take ε past
    /// it.
    pub epsilon: f64,
    #[serde(default = "default_site_delta")]
    pub delta: f64,
    /// The fewest survivors a round's noise is sized for; an honest site refuses to help
    /// unmask a sum over fewer. Default `rounds.min_sites`. (Secure mode only: in plain mode
    /// the coordinator adds the whole noise itself.)
    pub min_survivors: Option<u32>,
    /// Plain mode only: move `clip` every round toward a quantile of the updates' norms.
    pub adaptive_clip: Option<AdaptiveClip>,
}

/// `[privacy.site_level.adaptive_clip]`: adaptive clipping (Andrew, Thakkar, McMahan and
/// Ramaswamy, NeurIPS 2021). A fixed clip is either too small (updates lose their signal) or
/// too large (the noise, proportional to it, drowns them) and the right value shrinks as
/// training converges; this follows the norms, from a noisy count of unclipped updates that is
/// priced with the round.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClip {
    /// γ: the fraction of updates the clip should leave whole.
    #[serde(default = "half")]
    pub target_quantile: f64,
    /// η: the clip is multiplied by exp(−η (fraction unclipped − γ)) each round.
    #[serde(default = "fifth")]
    pub learning_rate: f64,
    /// σ_b: the standard deviation of the discrete Gaussian on the count (Andrew et al.
    /// suggest the expected number of sites / 20). Smaller costs privacy: the round is priced
    /// at 1/√(1/z² + 1/σ_b²).
    pub count_noise: f64,
}

fn half() -> f64 {
    0.5
}

fn fifth() -> f64 {
    0.2
}

fn default_site_delta() -> f64 {
    1e-5
}

/// Resource limits.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Resident memory (MiB) above which new uploads are refused with RESOURCE_EXHAUSTED
    /// (the agent retries later) instead of the process meeting the OOM killer.
    pub memory_mib: Option<u64>,
}

/// The read-only status API on its own port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// e.g. "127.0.0.1:7701".
    pub listen: SocketAddr,
    /// Bearer token (at least 16 characters). Prefer `token_env` to keep it out of files.
    pub token: Option<String>,
    /// Environment variable holding the token, read at start-up.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Serve the API and the dashboard over HTTPS (TLS 1.3) with this certificate, so they
    /// can be reached beyond a private network. Absent: plain HTTP, for a loopback address
    /// or a network the operator trusts (the bearer token then travels in the clear).
    #[serde(default)]
    pub tls: Option<StatusTls>,
}

/// `[status.tls]`: the status server's own certificate, usually from the hospital's or a
/// public web CA (browsers do not trust the project CA, which only vouches for sites).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusTls {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

fn default_token_env() -> String {
    "COHORT_STATUS_TOKEN".into()
}

impl StatusConfig {
    /// The token from the configuration, else from `token_env`.
    pub fn token(&self) -> Result<String, ConfigError> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => std::env::var(&self.token_env).map_err(|_| {
                invalid(
                    "status.token",
                    "(unset)",
                    format!(
                        "set status.token or the environment variable {} to a token of at least 16 characters",
                        self.token_env
                    ),
                )
            })?,
        };
        if token.chars().count() < 16 {
            return Err(invalid(
                "status.token",
                "(hidden)",
                "at least 16 characters",
            ));
        }
        Ok(token)
    }
}

/// The data directory's database (in `data_dir`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Model checkpoints kept: the newest N rounds' (the latest is never pruned).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: u64,
    /// Rounds whose per-site results are kept, in the database and the journal: the newest
    /// N. Older rounds keep their summary (pooled evaluation, model hash and signature,
    /// refused sites), so the disk used per round stays small over a run of months.
    #[serde(default = "default_keep_detail")]
    pub keep_round_detail: u64,
}

fn default_keep() -> u64 {
    5
}

fn default_keep_detail() -> u64 {
    1000
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            keep_checkpoints: default_keep(),
            keep_round_detail: default_keep_detail(),
        }
    }
}

impl StorageConfig {
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            checkpoints: self.keep_checkpoints,
            round_detail: self.keep_round_detail,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA's certificate revocation list (`cohort-ca` writes `coordinator/crl.pem`): a
    /// revoked site fails the TLS handshake. Read at start.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// The CA's registry of enrolled sites (`coordinator/registry.toml`): only a site's
    /// current certificate is admitted. Re-read when it changes.
    #[serde(default)]
    pub registry: Option<PathBuf>,
    /// The federation manifest the CA signed (`manifest.toml`). Handed to every agent, whose
    /// SecAgg+ peers must be its members; its digest is each round's context. Read at start
    /// and checked against `ca_cert`.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundsConfig {
    pub count: u64,
    /// Sites that must be connected before a round starts (and survive it).
    pub min_sites: u32,
    /// Sites selected per round (default: all connected).
    #[serde(default)]
    pub sites_per_round: Option<u32>,
    /// How long to wait for `min_sites` to connect before each round.
    #[serde(default = "default_wait")]
    pub wait_for_sites_secs: u64,
    /// Per-stage timeout of the secure-aggregation protocol.
    #[serde(default = "default_stage")]
    pub stage_timeout_secs: u64,
    /// Timeout for local training (the masked-input stage).
    #[serde(default = "default_train")]
    pub train_timeout_secs: u64,
    /// Attempts per round before the round is given up (recorded as failed, the model
    /// unchanged; the run goes on with the next round).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Rounds given up in a row after which the run stops with an error: one failed round is
    /// the run's business, several in a row need the operator.
    #[serde(default = "default_failed_rounds")]
    pub max_failed_rounds: u32,
}

fn default_failed_rounds() -> u32 {
    3
}

fn default_wait() -> u64 {
    300
}
fn default_stage() -> u64 {
    60
}
fn default_train() -> u64 {
    600
}
fn default_attempts() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub neighbours: Option<u32>,
    pub threshold: Option<u32>,
    #[serde(default = "default_clip")]
    pub clip: f32,
    /// B: honest sites scale their whole update to at most this L2 norm before masking, and
    /// an unmasked sum beyond what such inputs can reach is refused (see
    /// `cohort_protocols::secagg::Params::norm_bound`). None: the per-value clip only.
    pub norm_bound: Option<f32>,
    #[serde(default = "default_q")]
    pub quant_bits: u32,
    #[serde(default = "default_modulus")]
    pub modulus_bits: u32,
    #[serde(default = "default_weight")]
    pub max_weight: u64,
    /// Sites sign the survivor set before unmasking, so a coordinator cannot tell different
    /// neighbours different survivor sets. On by default; agents refuse rounds without it
    /// unless their policy allows.
    #[serde(default = "yes")]
    pub consistency_check: bool,
    /// The number of sites assumed able to collude with a dishonest coordinator (c). The
    /// default threshold is raised to t > (k + c) / 2, which keeps every site's input private
    /// against such a coalition (see `Params::threshold_for`); agents refuse rounds that
    /// resist fewer colluders than their own `policy.max_colluders`.
    #[serde(default = "default_colluders")]
    pub max_colluders: u32,
}

fn default_colluders() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_clip() -> f32 {
    1.0
}
fn default_q() -> u32 {
    20
}
fn default_modulus() -> u32 {
    64
}
fn default_weight() -> u64 {
    100_000
}

impl Default for SecAggConfig {
    fn default() -> Self {
        SecAggConfig {
            enabled: true,
            neighbours: None,
            threshold: None,
            clip: default_clip(),
            norm_bound: None,
            quant_bits: default_q(),
            modulus_bits: default_modulus(),
            max_weight: default_weight(),
            consistency_check: true,
            max_colluders: default_colluders(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: ModelKind,
    #[serde(default)]
    pub hidden: Vec<usize>,
    #[serde(default)]
    pub seed: u64,
    /// Number of model inputs after encoding. Leave it out when `schema.features` lists the
    /// feature columns: it is then derived from them (one per numeric column, one per level
    /// but the first of a categorical one), and a value that disagrees is an error.
    #[serde(default)]
    pub inputs: usize,
    /// The output layer's width: not a key, the schema's task decides it (set when the
    /// configuration is loaded).
    #[serde(skip)]
    pub outputs: usize,
    /// A custom model (`kind = "custom"`): its name, as its agent binary reports it (e.g.
    /// "gated-mlp/1"), its parameter count and a file of its initial parameters
    /// (little-endian f32, as the model's crate writes it). Agents without that model decline.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub parameters: Option<usize>,
    #[serde(default)]
    pub init_file: Option<PathBuf>,
    /// A CNN's layers (`kind = "cnn"`), input first; the output layer is added for the task.
    #[serde(default)]
    pub layers: Vec<cohort_protocols::model::cnn::Layer>,
    /// The schema's image shape, copied when the configuration is loaded (not a key).
    #[serde(skip)]
    pub image: Option<cohort_protocols::model::ImageShape>,
}

impl ModelConfig {
    /// The initial global model: drawn from `seed` for the TOML models, read from `init_file`
    /// (and checked) for a custom one.
    pub fn initial(&self) -> Result<Vec<f32>, String> {
        let spec = self.spec();
        let Some(path) = self
            .init_file
            .as_ref()
            .filter(|_| self.kind == ModelKind::Custom)
        else {
            return Ok(spec.init(self.seed));
        };
        let bytes =
            std::fs::read(path).map_err(|e| format!("model.init_file {}: {e}", path.display()))?;
        let params = cohort_protocols::model::from_bytes(&bytes)
            .map_err(|e| format!("model.init_file {}: {e}", path.display()))?;
        spec.check(&params).map_err(|e| {
            format!(
                "model.init_file {}: {e} (model.parameters = {})",
                path.display(),
                spec.num_params()
            )
        })?;
        Ok(params)
    }

    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            kind: self.kind,
            inputs: self.inputs,
            hidden: self.hidden.clone(),
            outputs: self.outputs.max(1),
            custom: match (self.kind, &self.name) {
                (ModelKind::Custom, Some(name)) => Some(cohort_protocols::model::CustomSpec {
                    name: name.clone(),
                    parameters: self.parameters.unwrap_or(0),
                }),
                _ => None,
            },
            cnn: match (self.kind, self.image) {
                (ModelKind::Cnn, Some(input)) => Some(cohort_protocols::model::cnn::CnnSpec {
                    input,
                    layers: self.layers.clone(),
                }),
                _ => None,
            },
        }
    }
}

impl SecAggConfig {
    /// SecAgg+ parameters for a round with `sites` participants and a `dim`-value update.
    pub fn params(&self, sites: u32, dim: u32) -> Params {
        let neighbours = self
            .neighbours
            .unwrap_or_else(|| Params::default_neighbours(sites))
            .min(sites);
        Params {
            sites,
            neighbours,
            threshold: self
                .threshold
                .unwrap_or_else(|| Params::threshold_for(neighbours, self.max_colluders)),
            dim,
            clip: self.clip,
            quant_bits: self.quant_bits,
            modulus: Modulus::from_bits(self.modulus_bits).unwrap_or(Modulus::Bits64),
            max_weight: self.max_weight,
            consistency_check: self.consistency_check,
            noise: None,
            norm_bound: self.norm_bound,
        }
    }
}

impl CoordinatorConfig {
    /// SecAgg+ parameters of a training round: `secagg`'s, plus, with
    /// `[privacy.site_level]`, the L2 clip and the noise each site adds (σ = z Δ₂ / √m).
    pub fn training_params(&self, sites: u32, dim: u32) -> Params {
        let mut p = self.secagg.params(sites, dim);
        if let Some(dp) = &self.privacy.site_level
            && self.secagg.enabled
        {
            p.clip = dp.clip;
            // The noise's clip is the L2 bound.
            p.norm_bound = None;
            let m = self.min_survivors();
            p.noise = Some(cohort_protocols::secagg::Noise {
                sigma: dp.noise_multiplier * p.l2_sensitivity() / f64::from(m).sqrt(),
                min_survivors: m,
            });
        }
        p
    }

    /// The survivors site-level noise is sized for (`privacy.site_level.min_survivors`,
    /// default `rounds.min_sites`).
    pub fn min_survivors(&self) -> u32 {
        self.privacy
            .site_level
            .as_ref()
            .and_then(|d| d.min_survivors)
            .unwrap_or(self.rounds.min_sites)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, span, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
                span,
            },
            other => other,
        })?;
        Ok(config.relative_to(path.parent().unwrap_or(Path::new("."))))
    }

    /// Parses and validates a configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config: CoordinatorConfig =
            toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
                path: "<config>".into(),
                message: e.to_string(),
                span: e.span(),
            })?;
        config.derive_inputs()?;
        config.validate()?;
        Ok(config)
    }

    /// Sets `model.inputs` from the schema's listed features, or checks it against them.
    fn derive_inputs(&mut self) -> Result<(), ConfigError> {
        self.model.outputs = self.schema.task.outputs();
        self.model.image = self.schema.images;
        match self.schema.declared_inputs() {
            Some(Ok(names)) => {
                if self.model.inputs == 0 {
                    self.model.inputs = names.len();
                } else if self.model.inputs != names.len() {
                    return Err(invalid(
                        "model.inputs",
                        self.model.inputs,
                        format!(
                            "schema.features give {} inputs ({}): leave model.inputs out and it is derived",
                            names.len(),
                            names.join(", ")
                        ),
                    ));
                }
                Ok(())
            }
            Some(Err(e)) => Err(invalid("schema", "", e.to_string())),
            None if self.model.inputs == 0 => Err(invalid(
                "model.inputs",
                "(unset)",
                "list the feature columns in schema.features (in order) so the coordinator derives it, or set model.inputs",
            )),
            None => Ok(()),
        }
    }

    /// Relative paths in the file are relative to the file.
    fn relative_to(mut self, base: &Path) -> Self {
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca_cert,
            &mut self.tls.cert,
            &mut self.tls.key,
        ]
        .into_iter()
        .chain(self.tls.crl.as_mut())
        .chain(self.tls.registry.as_mut())
        .chain(self.tls.manifest.as_mut())
        .chain(self.model.init_file.as_mut())
        .chain(
            self.status
                .as_mut()
                .and_then(|s| s.tls.as_mut())
                .into_iter()
                .flat_map(|t| [&mut t.cert, &mut t.key]),
        ) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        self
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.rounds;
        if r.count == 0 {
            return Err(invalid("rounds.count", r.count, "must be at least 1"));
        }
        if r.min_sites < 3 && self.secagg.enabled {
            return Err(invalid(
                "rounds.min_sites",
                r.min_sites,
                "secure aggregation needs at least 3 sites per round",
            ));
        }
        if r.min_sites == 0 {
            return Err(invalid("rounds.min_sites", 0, "must be at least 1"));
        }
        if let Some(n) = r.sites_per_round
            && n < r.min_sites
        {
            return Err(invalid(
                "rounds.sites_per_round",
                n,
                format!("must be at least rounds.min_sites = {}", r.min_sites),
            ));
        }
        for (key, v) in [
            ("rounds.stage_timeout_secs", r.stage_timeout_secs),
            ("rounds.train_timeout_secs", r.train_timeout_secs),
        ] {
            if v == 0 {
                return Err(invalid(key, v, "must be at least 1 second"));
            }
        }
        if self.limits.memory_mib == Some(0) {
            return Err(invalid(
                "limits.memory_mib",
                0,
                "a budget in MiB, e.g. 4096 (leave it out for no budget)",
            ));
        }
        if self.storage.keep_checkpoints == 0 {
            return Err(invalid(
                "storage.keep_checkpoints",
                0,
                "must be at least 1 (the latest checkpoint is always kept)",
            ));
        }
        if self.storage.keep_round_detail == 0 {
            return Err(invalid(
                "storage.keep_round_detail",
                0,
                "must be at least 1 (the newest rounds whose per-site results are kept)",
            ));
        }
        if r.max_attempts == 0 {
            return Err(invalid("rounds.max_attempts", 0, "must be at least 1"));
        }
        if r.max_failed_rounds == 0 {
            return Err(invalid("rounds.max_failed_rounds", 0, "must be at least 1"));
        }
        let s = &self.secagg;
        if Modulus::from_bits(s.modulus_bits).is_none() {
            return Err(invalid("secagg.modulus_bits", s.modulus_bits, "32 or 64"));
        }
        if self.model.inputs == 0 {
            return Err(invalid("model.inputs", 0, "must be at least 1"));
        }
        let m = &self.model;
        if m.kind == ModelKind::Custom {
            match (&m.name, m.parameters, &m.init_file) {
                (Some(name), Some(p), Some(_)) if !name.trim().is_empty() && p > 0 => {}
                _ => {
                    return Err(invalid(
                        "model",
                        "kind = \"custom\"",
                        "a custom model needs name (as its agent binary reports it), parameters (> 0) and init_file (its initial parameters)",
                    ));
                }
            }
            if !m.hidden.is_empty() {
                return Err(invalid(
                    "model.hidden",
                    format!("{:?}", m.hidden),
                    "a custom model's layers are its own code's: remove hidden",
                ));
            }
        } else if let Some((key, _)) = [
            ("model.name", m.name.is_some()),
            ("model.parameters", m.parameters.is_some()),
            ("model.init_file", m.init_file.is_some()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        {
            return Err(invalid(key, "given", "only for kind = \"custom\""));
        }
        match (m.kind, &self.schema.images) {
            (ModelKind::Cnn, None) => {
                return Err(invalid(
                    "model.kind",
                    "cnn",
                    "a CNN needs image data: add [schema.images] (channels, height, width)",
                ));
            }
            (ModelKind::Cnn, Some(_)) => {
                if let Some(c) = &m.spec().cnn {
                    c.tensors(m.outputs)
                        .map_err(|e| invalid("model.layers", "", e))?;
                }
            }
            (_, _) if !m.layers.is_empty() => {
                return Err(invalid(
                    "model.layers",
                    "given",
                    "only for kind = \"cnn\" (an mlp's layers are model.hidden)",
                ));
            }
            _ => {}
        }
        if self.model.kind == ModelKind::Mlp && self.model.hidden.is_empty() {
            return Err(invalid(
                "model.hidden",
                "[]",
                "an mlp needs at least one hidden layer, e.g. hidden = [32]",
            ));
        }
        if self.model.hidden.contains(&0) {
            return Err(invalid(
                "model.hidden",
                format!("{:?}", self.model.hidden),
                "layer sizes must be at least 1",
            ));
        }
        let training: TrainingConfig = toml::Value::Table(self.training.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                ConfigError::Rule(format!("[training]: {}", e.message().trim()))
            })?;
        training.validate().map_err(ConfigError::Rule)?;
        if !training.hidden.is_empty() {
            return Err(invalid(
                "training.hidden",
                format!("{:?}", training.hidden),
                "set hidden layers in [model], not in [training]",
            ));
        }
        if training.cnn.is_some() {
            return Err(invalid(
                "training.cnn",
                "given",
                "declare a CNN's layers in [model] (kind = \"cnn\", layers), not in [training]",
            ));
        }
        if training.custom.is_some() {
            return Err(invalid(
                "training.custom",
                "given",
                "name a custom model in [model] (kind = \"custom\", name), not in [training]",
            ));
        }
        self.strategy
            .validate()
            .map_err(|e| invalid("strategy", e.to_string(), "see docs/configuration.md"))?;
        self.aggregation
            .validate()
            .map_err(|e| invalid("aggregation", e.to_string(), "see docs/configuration.md"))?;
        if s.enabled && self.aggregation.needs_updates() {
            return Err(invalid(
                "aggregation.rule",
                self.aggregation.name(),
                "a robust rule needs each site's update, which secure aggregation hides from the coordinator: use it only with [secagg] enabled = false, or keep rule = \"mean\"",
            ));
        }
        if let Some(e) = self.privacy.epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(invalid("privacy.epsilon", e, "must be a number above 0"));
        }
        if let Some(dp) = &self.privacy.site_level {
            if s.enabled && dp.adaptive_clip.is_some() {
                return Err(invalid(
                    "privacy.site_level.adaptive_clip",
                    "given",
                    "adaptive clipping needs the count of clipped updates, which secure aggregation hides: use it only with [secagg] enabled = false (central DP)",
                ));
            }
            if self.aggregation.needs_updates() {
                return Err(invalid(
                    "aggregation.rule",
                    self.aggregation.name(),
                    "[privacy.site_level] prices the mean of clipped updates; a robust rule is outside that analysis: keep rule = \"mean\"",
                ));
            }
            if let Some(a) = &dp.adaptive_clip {
                if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                    return Err(invalid(
                        "privacy.site_level.adaptive_clip.target_quantile",
                        a.target_quantile,
                        "strictly between 0 and 1",
                    ));
                }
                if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
                    return Err(invalid(
                        "privacy.site_level.adaptive_clip.learning_rate",
                        a.learning_rate,
                        "must be a number above 0",
                    ));
                }
                if !(a.count_noise.is_finite() && a.count_noise > 0.0) {
                    return Err(invalid(
                        "privacy.site_level.adaptive_clip.count_noise",
                        a.count_noise,
                        "must be a number above 0 (a noiseless count is not private)",
                    ));
                }
            }
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
                return Err(invalid(
                    "privacy.site_level.noise_multiplier",
                    dp.noise_multiplier,
                    "must be a number above 0",
                ));
            }
            if !(dp.clip.is_finite() && dp.clip > 0.0) {
                return Err(invalid(
                    "privacy.site_level.clip",
                    dp.clip,
                    "must be a number above 0 (the L2 bound of each site's update)",
                ));
            }
            if !(dp.epsilon.is_finite() && dp.epsilon > 0.0) {
                return Err(invalid(
                    "privacy.site_level.epsilon",
                    dp.epsilon,
                    "must be a number above 0",
                ));
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return Err(invalid(
                    "privacy.site_level.delta",
                    dp.delta,
                    "must be strictly between 0 and 1",
                ));
            }
            // A budget that cannot pay for one round is a configuration error, not a run
            // that stops before it starts.
            let count_noise = dp.adaptive_clip.as_ref().map(|a| a.count_noise);
            let one = cohort_protocols::privacy::central_gaussian(dp.noise_multiplier, count_noise)
                .and_then(|m| {
                    cohort_protocols::privacy::Accountant::new().epsilon_after(m, 1, dp.delta)
                })
                .map_or(f64::INFINITY, |s| s.epsilon);
            if one > dp.epsilon {
                return Err(invalid(
                    "privacy.site_level.epsilon",
                    dp.epsilon,
                    format!(
                        "one round alone spends ε = {one:.3} at this noise (δ = {}): raise privacy.site_level.noise_multiplier{}, or the budget",
                        dp.delta,
                        if count_noise.is_some() {
                            " or adaptive_clip.count_noise"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            let m = self.min_survivors();
            if m == 0 || m > r.min_sites {
                return Err(invalid(
                    "privacy.site_level.min_survivors",
                    m,
                    format!(
                        "between 1 and rounds.min_sites = {} (every round must be able to reach it)",
                        r.min_sites
                    ),
                ));
            }
        }
        if s.enabled {
            let dim = self.model.spec().num_params() as u32;
            // Check the parameters for the smallest round and the largest one this
            // configuration sets (rounds take every connected site unless sites_per_round caps
            // them; the overflow checks grow with the number of sites).
            let largest = r.sites_per_round.unwrap_or(r.min_sites).max(r.min_sites);
            let c = self.secagg.max_colluders;
            for sites in [r.min_sites, largest] {
                let p = self.training_params(sites, dim);
                if self.secagg.threshold.is_none() && p.threshold >= p.neighbours {
                    return Err(invalid(
                        "secagg.max_colluders",
                        c,
                        format!(
                            "a round of {sites} sites cannot both resist {c} colluding sites (threshold > {}) and survive a dropout (threshold < {}): use rounds.min_sites >= {}, or max_colluders = {} if no site could collude with the coordinator",
                            Params::min_threshold_against(p.neighbours, c) - 1,
                            p.neighbours,
                            c + 3,
                            sites.saturating_sub(3)
                        ),
                    ));
                }
                p.validate()
                    .map_err(|e| invalid("secagg", e.to_string(), "fix the [secagg] table"))?;
                if p.tolerated_colluders() < c {
                    return Err(invalid(
                        "secagg.threshold",
                        p.threshold,
                        format!(
                            "a round of {sites} sites (neighbours = {}) with this threshold resists only {} colluding sites, secagg.max_colluders = {c}: use a threshold of at least {}",
                            p.neighbours,
                            p.tolerated_colluders(),
                            Params::min_threshold_against(p.neighbours, c)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
