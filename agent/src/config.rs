//! The agent's TOML configuration. Unknown keys are errors; paths are relative to the file.

use std::path::{Path, PathBuf};

use cohort_protocols::model::DataSchema;
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key} = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Must equal the common name of this site's certificate.
    pub site: String,
    /// `train` (the default), or `evaluate`: the site holds only a test set (`data.csv` is
    /// all test rows), takes part in every evaluation and never in statistics or training —
    /// a consortium's independent test set.
    #[serde(default)]
    pub role: Role,
    pub coordinator: CoordinatorAddress,
    pub tls: TlsFiles,
    pub data: DataConfig,
    /// Optional: the agent fetches the federation's schema from the coordinator (signed).
    /// When present it pins what this site expects, and the agent refuses a coordinator
    /// whose schema differs, naming the keys.
    #[serde(default)]
    pub schema: Option<DataSchema>,
    #[serde(default)]
    pub reconnect: Reconnect,
    /// What this site requires of a round before it contributes anything derived from its
    /// data. Safe by default.
    #[serde(default)]
    pub policy: Policy,
    /// Where the agent keeps what it must remember across restarts: the contribution ledger
    /// (`ledger.toml`: what the site already contributed). Must be writable and survive restarts (a
    /// persistent volume, systemd's StateDirectory). Default: the directory of `tls.key`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Where this site's models train: `[compute] device = "cpu"` (the default) or `"gpu"`.
    #[serde(default)]
    pub compute: ComputeConfig,
    /// Example-level differential privacy for this site's rows: DP-SGD in every round it
    /// trains, and a budget it will not exceed (`privacy.toml` in the state directory keeps
    /// what it spent). Off when absent.
    #[serde(default)]
    pub privacy: Option<crate::privacy::PrivacyConfig>,
    /// Injected faults, for simulations and tests only: the agent misbehaves on purpose.
    /// Refused unless the agent is built with the `faults` feature (cohort-sim and the
    /// tests are; a release `cohort-agent -p` build is not).
    #[serde(default)]
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Train,
    Evaluate,
}

/// `[compute]`: the site's own choice of hardware; the coordinator neither knows nor asks.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeConfig {
    /// `"cpu"`: burn's pure-Rust backend. `"gpu"`: burn's wgpu backend on the machine's
    /// default adapter (Vulkan, Metal, DirectX 12), in an agent built with the `wgpu` feature.
    #[serde(default)]
    pub device: crate::model::Compute,
}

/// A deliberate failure at one stage of one round.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub round: u64,
    pub stage: FaultStage,
    #[serde(default)]
    pub action: FaultAction,
}

/// The SecAgg+ message the fault replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultStage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    ConsistencyCheck,
    Unmask,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Drop the connection instead of sending (and reconnect later): a site that died.
    #[default]
    Vanish,
    /// Send a masked input one element short: a broken or malicious site.
    Truncate,
    /// Send the first half of the message, then drop the connection: a site that died
    /// mid-upload.
    Interrupt,
    /// Send a well-formed masked input whose clipped-value count no honest input can have:
    /// the unmasked sum is out of range, and nothing but the sum shows it.
    OutOfRange,
    /// Send the trained update multiplied by −10: a model-poisoning site (sign-flipped and
    /// amplified), well-formed in every other way.
    Poison,
    /// Send the trained update with its sign flipped (−1 ×): poisoning without amplification.
    SignFlip,
    /// Send noise instead of an update (every value from N(0, 1)).
    Random,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorAddress {
    /// e.g. `"https://coordinator.example.org:7700"`
    pub url: String,
    /// Name in the coordinator's certificate (default: the URL's host).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The federation manifest the CA signed: only the sites it lists, with the keys it
    /// lists, are accepted as SecAgg+ peers. Newer versions (from the coordinator) replace
    /// this file; older ones are refused. Without it any certificate of the CA is accepted,
    /// so whoever holds the CA key could run this site's rounds with puppets.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The site's rows (CSV data). Exactly one of `csv`, `images` and `manifest` is given.
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// Image data (`[schema.images]`): a folder of class folders, `root/CLASS/*.png|jpg`.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Image data as a CSV of `path,label` (paths relative to the manifest).
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// A separate test set; without it, `test_fraction` of `csv` is held out (stratified).
    /// For image data, a folder or a manifest like the training source.
    pub test_csv: Option<PathBuf>,
    #[serde(default = "default_fraction")]
    pub test_fraction: f64,
    #[serde(default)]
    pub split_seed: u64,
    /// Column renames, this site's CSV header name → the schema's name (for a site whose
    /// export names a column differently).
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
}

fn default_fraction() -> f64 {
    0.34
}

/// A site's own limits on the rounds it takes part in. The coordinator chooses a round's
/// mode and parameters; these let a site refuse a coordinator that lies or is misconfigured
/// instead of trusting it. A refusal is a Decline with the reason, logged at both ends and
/// shown in the status API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Refuse to send statistics or updates outside secure aggregation. Off only for
    /// comparison runs: a plain round shows the coordinator this site's update.
    #[serde(default = "yes")]
    pub require_secure: bool,
    /// Refuse rounds with fewer participants, and rounds with fewer survivors (counted when
    /// the survivors are announced, before any share is revealed): a sum over two sites tells
    /// each the other's update.
    #[serde(default = "three")]
    pub min_sites: u32,
    /// Refuse rounds whose SecAgg+ neighbourhood (k, this site included) is smaller: each
    /// site's update is masked only against its neighbours (0: no bound of the site's own).
    #[serde(default)]
    pub min_neighbours: u32,
    /// Refuse a round, at whichever stage it becomes true, when fewer than this many other
    /// sites of this site's SecAgg+ neighbourhood are live: keys advertised and verified
    /// against the manifest, then shares exchanged, then surviving to the sum. The roster a
    /// coordinator announces counts for nothing here: it can list honest sites and withhold
    /// their keys, which looks like ordinary dropouts, until this site's update is summed
    /// with few others (or only the coordinator's own sites). 5 by default; a federation of
    /// fewer sites must lower it (four hospitals have three others: 2 leaves room for one
    /// dropout).
    #[serde(default = "five")]
    pub min_live_neighbours: u32,
    /// Refuse rounds whose SecAgg+ threshold is below this (0: the protocol's own check, a
    /// strict majority of the neighbourhood).
    #[serde(default)]
    pub min_threshold: u32,
    /// Refuse rounds without the consistency check (signatures over the survivor set).
    #[serde(default = "yes")]
    pub require_consistency_check: bool,
    /// Refuse rounds whose threshold resists fewer colluding sites than this: the number of
    /// other sites this site assumes could conspire with a dishonest coordinator. A round's
    /// parameters resist c colluders when 2 × threshold > neighbours + c.
    #[serde(default = "one")]
    pub max_colluders: u32,
    /// Adopt a manifest that adds a training site (or gives one a new key) only when this
    /// many sites of the manifest this site already trusts countersigned it (`cohort-agent
    /// countersign`). 0 (the default) trusts the CA alone: whoever holds the CA key can then
    /// make a puppet a peer. Removals never need countersignatures.
    #[serde(default)]
    pub manifest_quorum: u32,
    /// Train only with a learning rate in this range, e.g. `[1e-5, 0.1]` (the training
    /// settings are checked as the coordinator's own configuration is in any case: a rate
    /// above 0, at least one step). None: any valid rate.
    #[serde(default)]
    pub learning_rate: Option<[f64; 2]>,
    /// Take part only in rounds whose clipping bound (`secagg.clip`) is in this range. None:
    /// any valid bound.
    #[serde(default)]
    pub clip: Option<[f32; 2]>,
    /// Train in a round only when every site, this one included, adds site-level noise to its
    /// update before masking (the coordinator's `[privacy.site_level]`) of at least this
    /// noise multiplier: σ√m / Δ₂, the noise of the m fewest survivors the round accepts over
    /// one site's sensitivity. The figure is in the round's set-up, which every site signs
    /// under, so no site can be told less than its peers. None (the default): no
    /// requirement.
    #[serde(default)]
    pub min_noise_multiplier: Option<f64>,
    /// This site's own site-level budget: the ε its noisy updates may spend, counted in its
    /// contribution ledger (each round priced at the fewest survivors it accepts, the most it
    /// can cost) whatever the coordinator's account says. A training round that would pass
    /// it, or that adds no site-level noise, is declined with the figures. None: no budget.
    #[serde(default)]
    pub site_level_epsilon: Option<f64>,
    /// δ of `site_level_epsilon`.
    #[serde(default = "site_delta")]
    pub site_level_delta: f64,
    /// Send at most this many training updates computed from one model (the contribution
    /// ledger counts them). None (the default): no limit. 1 closes the last way to difference
    /// two sums of this site without differential privacy — the same model sent in two rounds
    /// to different sets of sites — but then a round that fails after the inputs went out (a
    /// coordinator crash, a refused sum) leaves its model unusable by this site for good.
    #[serde(default)]
    pub updates_per_model: Option<u32>,
    /// Answer at most this many evaluations per round (each of a model not evaluated before,
    /// in round order). An evaluation report is counts over the site's test rows in clear.
    #[serde(default = "one")]
    pub max_evaluations_per_round: u32,
    /// Report the confusion matrix's counts rounded to a multiple of this (1: exact). Coarser
    /// counts answer fewer questions about single test rows.
    #[serde(default = "one_u64")]
    pub evaluation_granularity: u64,
}

fn site_delta() -> f64 {
    1e-5
}

fn one_u64() -> u64 {
    1
}

fn one() -> u32 {
    1
}

fn five() -> u32 {
    5
}

fn yes() -> bool {
    true
}

fn three() -> u32 {
    3
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            require_secure: true,
            min_sites: three(),
            min_neighbours: 0,
            min_live_neighbours: five(),
            min_threshold: 0,
            require_consistency_check: true,
            max_colluders: one(),
            manifest_quorum: 0,
            learning_rate: None,
            clip: None,
            min_noise_multiplier: None,
            site_level_epsilon: None,
            site_level_delta: site_delta(),
            updates_per_model: None,
            max_evaluations_per_round: one(),
            evaluation_granularity: one_u64(),
        }
    }
}

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconnect {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// Permanent failures in a row (a foreign CA, a refused certificate, a schema mismatch)
    /// after which the agent exits with code 3 instead of retrying forever.
    #[serde(default = "default_refusals")]
    pub max_refusals: u32,
}

fn default_refusals() -> u32 {
    5
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial_ms: 500,
            max_ms: 30_000,
            max_refusals: default_refusals(),
        }
    }
}

impl AgentConfig {
    /// The directory of the contribution ledger: `state_dir`, or the directory of `tls.key`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| match self.tls.key.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.tls.ca_cert, &mut cfg.tls.cert, &mut cfg.tls.key]
            .into_iter()
            .chain(cfg.tls.manifest.as_mut())
            .chain(cfg.state_dir.as_mut())
            .chain(cfg.data.csv.as_mut())
            .chain(cfg.data.images.as_mut())
            .chain(cfg.data.manifest.as_mut())
            .chain(cfg.data.test_csv.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.to_string(),
        })?;
        if !(cfg.data.test_fraction > 0.0 && cfg.data.test_fraction < 1.0) {
            return Err(ConfigError::Invalid {
                key: "data.test_fraction",
                value: cfg.data.test_fraction.to_string(),
                allowed: "a fraction strictly between 0 and 1",
            });
        }
        if let Some([low, high]) = cfg.policy.learning_rate
            && !(low.is_finite() && high.is_finite() && 0.0 < low && low <= high)
        {
            return Err(ConfigError::Invalid {
                key: "policy.learning_rate",
                value: format!("[{low}, {high}]"),
                allowed: "[low, high] with 0 < low <= high",
            });
        }
        if let Some([low, high]) = cfg.policy.clip
            && !(low.is_finite() && high.is_finite() && 0.0 < low && low <= high)
        {
            return Err(ConfigError::Invalid {
                key: "policy.clip",
                value: format!("[{low}, {high}]"),
                allowed: "[low, high] with 0 < low <= high",
            });
        }
        if let Some(e) = cfg.policy.site_level_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(ConfigError::Invalid {
                key: "policy.site_level_epsilon",
                value: e.to_string(),
                allowed: "a number above 0",
            });
        }
        if !(cfg.policy.site_level_delta > 0.0 && cfg.policy.site_level_delta < 1.0) {
            return Err(ConfigError::Invalid {
                key: "policy.site_level_delta",
                value: cfg.policy.site_level_delta.to_string(),
                allowed: "strictly between 0 and 1",
            });
        }
        if let Some(z) = cfg.policy.min_noise_multiplier
            && !(z.is_finite() && z > 0.0)
        {
            return Err(ConfigError::Invalid {
                key: "policy.min_noise_multiplier",
                value: z.to_string(),
                allowed: "a number above 0 (leave it out to require no site-level noise)",
            });
        }
        if cfg.policy.updates_per_model == Some(0)
            || cfg.policy.max_evaluations_per_round == 0
            || cfg.policy.evaluation_granularity == 0
        {
            return Err(ConfigError::Invalid {
                key: "policy",
                value: format!(
                    "updates_per_model = {:?}, max_evaluations_per_round = {}, evaluation_granularity = {}",
                    cfg.policy.updates_per_model,
                    cfg.policy.max_evaluations_per_round,
                    cfg.policy.evaluation_granularity
                ),
                allowed: "updates_per_model, max_evaluations_per_round and evaluation_granularity of at least 1 (leave updates_per_model out for no limit)",
            });
        }
        let sources = [&cfg.data.csv, &cfg.data.images, &cfg.data.manifest]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if sources != 1 {
            return Err(ConfigError::Invalid {
                key: "data",
                value: format!("{sources} sources"),
                allowed: "exactly one of data.csv (rows), data.images (a folder of class folders) and data.manifest (a CSV of path,label)",
            });
        }
        if cfg.role == Role::Evaluate && cfg.data.test_csv.is_some() {
            return Err(ConfigError::Invalid {
                key: "data.test_csv",
                value: "set".into(),
                allowed: "not with role = \"evaluate\": an evaluation-only site's data.csv is its test set",
            });
        }
        if !cfg.compute.device.built() {
            return Err(ConfigError::Invalid {
                key: "compute.device",
                value: "gpu".into(),
                allowed: "\"cpu\": this agent was built without the `wgpu` feature (cargo build --features wgpu)",
            });
        }
        if let Some(p) = &cfg.privacy {
            let ok = p.epsilon.is_finite()
                && p.epsilon > 0.0
                && p.delta > 0.0
                && p.delta < 1.0
                && p.noise_multiplier.is_finite()
                && p.noise_multiplier > 0.0
                && p.max_grad_norm.is_finite()
                && p.max_grad_norm > 0.0;
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "privacy",
                    value: format!(
                        "epsilon = {}, delta = {}, noise_multiplier = {}, max_grad_norm = {}",
                        p.epsilon, p.delta, p.noise_multiplier, p.max_grad_norm
                    ),
                    allowed: "epsilon > 0, 0 < delta < 1, noise_multiplier > 0 and max_grad_norm > 0 (no noise is no privacy)",
                });
            }
        }
        if !cfg.faults.is_empty() && !cfg!(feature = "faults") {
            return Err(ConfigError::Invalid {
                key: "faults",
                value: format!("{} fault(s)", cfg.faults.len()),
                allowed: "none: fault injection is for simulations and tests, and this agent was built without the `faults` feature",
            });
        }
        if !cfg.coordinator.url.starts_with("https://") {
            return Err(ConfigError::Invalid {
                key: "coordinator.url",
                value: cfg.coordinator.url.clone(),
                allowed: "an https:// URL (the agent only speaks TLS)",
            });
        }
        if cfg.reconnect.initial_ms == 0
            || cfg.reconnect.max_ms < cfg.reconnect.initial_ms
            || cfg.reconnect.max_refusals == 0
        {
            return Err(ConfigError::Invalid {
                key: "reconnect",
                value: format!("{:?}", cfg.reconnect),
                allowed: "initial_ms >= 1, max_ms >= initial_ms and max_refusals >= 1",
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_policy(policy: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(&format!(
            "site = \"a\"\n[coordinator]\nurl = \"https://localhost:7700\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[data]\ncsv = \"data.csv\"\n[policy]\n{policy}\n"
        ))
    }

    /// `[privacy]` without noise, with a δ of 1 or a budget of 0 is refused naming the table;
    /// a sound one parses with the defaults filled in.
    #[test]
    fn privacy_settings_without_noise_or_budget_are_refused() {
        for bad in [
            "epsilon = 1.0\nnoise_multiplier = 0.0",
            "epsilon = 0.0\nnoise_multiplier = 1.0",
            "epsilon = 1.0\nnoise_multiplier = 1.0\ndelta = 1.0",
            "epsilon = 1.0\nnoise_multiplier = 1.0\nmax_grad_norm = -1.0",
        ] {
            let e = with_policy(&format!("[privacy]\n{bad}"))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("privacy = "), "{bad}: {e}");
        }
        let cfg = with_policy("[privacy]\nepsilon = 3.0\nnoise_multiplier = 1.1").unwrap();
        assert_eq!(
            cfg.privacy,
            Some(crate::privacy::PrivacyConfig {
                epsilon: 3.0,
                delta: 1e-5,
                noise_multiplier: 1.1,
                max_grad_norm: 1.0
            })
        );
    }

    /// A production agent (built without the `faults` feature) cannot be made to misbehave by
    /// its configuration; cohort-sim and the tests build it with the feature.
    #[test]
    fn faults_are_accepted_only_in_a_build_with_the_faults_feature() {
        let parsed = with_policy("[[faults]]\nround = 1\nstage = \"unmask\"\n");
        if cfg!(feature = "faults") {
            assert_eq!(parsed.map(|c| c.faults.len()).ok(), Some(1));
        } else {
            let e = parsed.map(|_| ()).unwrap_err().to_string();
            assert!(e.starts_with("faults = 1 fault(s)"), "{e}");
        }
    }

    /// `device = "gpu"` needs the wgpu backend built in; without it the agent says how to
    /// get it instead of training on the CPU behind the site's back. A device not named is
    /// refused by the parser.
    #[test]
    fn a_gpu_device_is_accepted_only_in_a_build_with_the_wgpu_feature() {
        let parsed = with_policy("\n[compute]\ndevice = \"gpu\"\n");
        if cfg!(feature = "wgpu") {
            assert_eq!(
                parsed.map(|c| c.compute.device).ok(),
                Some(crate::model::Compute::Gpu)
            );
        } else {
            let e = parsed.map(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains("compute.device") && e.contains("--features wgpu"),
                "{e}"
            );
        }
        let cpu = with_policy("\n[compute]\ndevice = \"cpu\"\n").unwrap();
        assert_eq!(cpu.compute.device, crate::model::Compute::Cpu);
        let e = with_policy("\n[compute]\ndevice = \"tpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tpu"), "{e}");
    }

    #[test]
    fn policy_ranges_must_be_ordered_and_positive() {
        let cfg = with_policy("learning_rate = [1e-5, 0.1]\nclip = [0.5, 10.0]").unwrap();
        assert_eq!(cfg.policy.learning_rate, Some([1e-5, 0.1]));
        assert_eq!(cfg.policy.clip, Some([0.5, 10.0]));
        for (bad, key) in [
            ("learning_rate = [0.1, 1e-5]", "policy.learning_rate"),
            ("learning_rate = [0.0, 1.0]", "policy.learning_rate"),
            ("clip = [-1.0, 1.0]", "policy.clip"),
            ("clip = [2.0, 1.0]", "policy.clip"),
            ("min_noise_multiplier = 0.0", "policy.min_noise_multiplier"),
            ("min_noise_multiplier = nan", "policy.min_noise_multiplier"),
        ] {
            let e = with_policy(bad).map(|_| ()).unwrap_err().to_string();
            assert!(e.starts_with(key), "{bad}: {e}");
        }
    }
}
