//! `cohort-sim run`: one coordinator and one agent per site in this process, over real gRPC
//! with mutual TLS 1.3 on 127.0.0.1 and freshly provisioned certificates.
//!
//! The scenario file holds the sites and the same tables a coordinator configuration has
//! (`[schema]`, `[model]`, `[training]`, `[strategy]`, `[secagg]`), so what runs here is what
//! would run across hospitals; only the network is local.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use cohort_agent::AgentConfig;
use cohort_ca::demo_keys::{ProvisionOptions, provision};
use cohort_coordinator::driver::{Evaluation, RoundRecord, SiteResult};
use cohort_coordinator::{CoordinatorConfig, RunSummary};
use cohort_protocols::model::DataSchema;
use cohort_protocols::model::metrics::Metrics;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario TOML (see examples/heart-disease.toml).
    #[arg(long)]
    scenario: PathBuf,
    /// Output directory for summary.json, rounds.csv and accuracy.png.
    #[arg(long)]
    out: PathBuf,
    /// Also train the same model on all sites' training data as one site (the centralised
    /// reference) and on each site's data alone, judge both on every site's test split, and
    /// report them beside the federated result (summary.json `pooled` and `alone`).
    #[arg(long)]
    pooled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    rounds: u64,
    /// Secure aggregation (default on). `[secagg] enabled` says the same; giving both with
    /// different values is an error rather than one silently winning.
    #[serde(default)]
    secure: Option<bool>,
    #[serde(default = "default_fraction")]
    test_fraction: f64,
    #[serde(default)]
    split_seed: u64,
    /// Per-stage timeout in seconds (sites that miss it are dropouts).
    #[serde(default = "default_stage")]
    stage_timeout_secs: u64,
    /// Local training timeout in seconds (the masked-input stage).
    #[serde(default = "default_train")]
    train_timeout_secs: u64,
    /// Sites a round waits for (default: all sites, at most 3).
    #[serde(default)]
    min_sites: Option<u32>,
    sites: Vec<SiteSpec>,
    schema: toml::Table,
    model: toml::Table,
    training: toml::Table,
    #[serde(default)]
    strategy: Option<toml::Table>,
    /// The coordinator's `[aggregation]`: a robust rule, for plain runs.
    #[serde(default)]
    aggregation: Option<toml::Table>,
    #[serde(default)]
    secagg: Option<toml::Table>,
    #[serde(default)]
    faults: Vec<FaultSpec>,
    /// `[privacy]` of every training site's agent.toml: DP-SGD and the site's budget
    /// (`epsilon`, `noise_multiplier`, optional `delta` and `max_grad_norm`).
    #[serde(default)]
    privacy: Option<toml::Table>,
    /// The coordinator's `[privacy.site_level]`: every site adds discrete Gaussian noise
    /// under secure aggregation (`noise_multiplier`, `clip`, `epsilon`, optional `delta`,
    /// `min_survivors`).
    #[serde(default)]
    site_level_privacy: Option<toml::Table>,
}

/// Sites that misbehave on purpose: `fraction` of the sites (the first ones in scenario
/// order, at least one) do `action` at `stage` of each of `rounds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    rounds: Vec<u64>,
    stage: String,
    fraction: f64,
    #[serde(default = "vanish")]
    action: String,
}

fn vanish() -> String {
    "vanish".into()
}

fn default_fraction() -> f64 {
    0.34
}
fn default_stage() -> u64 {
    30
}
fn default_train() -> u64 {
    120
}

impl Scenario {
    /// `secure`, or `[secagg] enabled`, or on; both given and different is an error.
    fn secure(&self) -> Result<bool> {
        let enabled = match self.secagg.as_ref().and_then(|t| t.get("enabled")) {
            None => None,
            Some(toml::Value::Boolean(b)) => Some(*b),
            Some(other) => bail!("[secagg] enabled = {other}: must be true or false"),
        };
        match (self.secure, enabled) {
            (Some(a), Some(b)) if a != b => bail!(
                "the scenario says secure = {a} but [secagg] enabled = {b}: they are the same setting, give one"
            ),
            (a, b) => Ok(a.or(b).unwrap_or(true)),
        }
    }
}

/// The scenario's text and path, for pointing at the user's own lines.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

/// A coordinator configuration error in the text generated from the scenario, told in terms
/// of the scenario: the table and key it came from and that key's line in the user's file.
/// The tables `[model]`, `[training]`, `[schema]`, `[secagg]` and `[strategy]` are copied
/// from the scenario, so their keys can be found there.
fn in_scenario(
    e: cohort_coordinator::config::ConfigError,
    generated: &str,
    source: &Source<'_>,
) -> anyhow::Error {
    use cohort_coordinator::config::ConfigError;
    let plain = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{}: the coordinator configuration made from it is invalid: {e}",
            source.path.display()
        )
    };
    let ConfigError::Parse {
        message,
        span: Some(span),
        ..
    } = &e
    else {
        return plain(&e);
    };
    let before = &generated[..span.start.min(generated.len())];
    let line = before.rsplit('\n').next().unwrap_or("");
    let line_end = generated[span.start.min(generated.len())..]
        .find('\n')
        .map_or(generated.len(), |n| span.start + n);
    let full_line = format!(
        "{line}{}",
        &generated[span.start.min(generated.len())..line_end]
    );
    let key = full_line.split('=').next().unwrap_or("").trim().to_string();
    let table = before
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().trim_matches(['[', ']']).to_string())
        .unwrap_or_default();
    let reason = message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('|'))
        .unwrap_or(message)
        .trim();
    match find_key(source.text, &table, &key) {
        Some(n) => anyhow::anyhow!(
            "{}, line {n}: [{table}] {key}: {reason}",
            source.path.display()
        ),
        None => plain(&e),
    }
}

/// The 1-based line of `key = …` inside `[table]` of a TOML text, if it is written there.
fn find_key(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(['[', ']']).trim().to_string();
            continue;
        }
        let k = t.split('=').next().unwrap_or("").trim();
        if current == table && !key.is_empty() && k == key {
            return Some(i + 1);
        }
    }
    None
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteSpec {
    name: String,
    /// The site's data: a CSV, or (with `[schema.images]`) an image folder or manifest.
    #[serde(default)]
    csv: Option<PathBuf>,
    #[serde(default)]
    images: Option<PathBuf>,
    #[serde(default)]
    manifest: Option<PathBuf>,
    test_csv: Option<PathBuf>,
    /// `train` (default) or `evaluate`: an evaluation-only site, whose `csv` is all test rows.
    #[serde(default)]
    role: cohort_agent::config::Role,
    /// Where the site's agent trains: `cpu` (default) or `gpu` (burn's wgpu backend, in a
    /// build with the agent's `wgpu` feature).
    #[serde(default)]
    device: cohort_agent::model::Compute,
    /// This site's own `[privacy]`, instead of the scenario's.
    #[serde(default)]
    privacy: Option<toml::Table>,
}

impl SiteSpec {
    fn evaluates_only(&self) -> bool {
        self.role == cohort_agent::config::Role::Evaluate
    }

    /// The agent's `[data]` table for this site, paths made absolute.
    fn data_table(&self, base: &Path, test_fraction: f64, split_seed: u64) -> toml::Table {
        let mut data = table(vec![
            ("test_fraction", toml::Value::Float(test_fraction)),
            ("split_seed", toml::Value::Integer(split_seed as i64)),
        ]);
        for (key, path) in [
            ("csv", &self.csv),
            ("images", &self.images),
            ("manifest", &self.manifest),
            ("test_csv", &self.test_csv),
        ] {
            if let Some(p) = path {
                data.insert(key.into(), path_value(&base.join(p)));
            }
        }
        data
    }
}

/// `summary.json`. Its keys are read by other tools: keep them stable (keys are added; a
/// metric a task does not have is null, e.g. `accuracy` of a regression run).
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub rounds_completed: usize,
    pub secure: bool,
    /// The task: binary, multiclass or regression.
    #[serde(default)]
    pub task: String,
    /// The metric the run is judged by first: accuracy, or rmse for regression.
    #[serde(default)]
    pub metric: String,
    #[serde(rename = "final")]
    pub final_: Final,
    pub initial: Final,
    pub rounds: Vec<RoundRow>,
    pub per_site: BTreeMap<String, SiteRow>,
    pub wall_seconds: f64,
    /// Message kinds the coordinator received: in a secure run `plain_updates` is 0.
    pub coordinator_received: Received,
    /// `--pooled`: the same model trained on all sites' training data as one site, judged on
    /// each site's test split (the centralised reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<Reference>,
    /// `--pooled`: each site's model trained on its own data alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alone: Option<Reference>,
    /// Why training stopped before the scenario's rounds (the sites' privacy budgets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Example-level DP: the federation's ε (the largest site's: each patient's rows are at
    /// one site) and each DP site's spend; absent when no site runs DP-SGD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
    /// Site-level DP (`[site_level_privacy]`): the federation's ε per site over every noisy
    /// sum, its δ and budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_level_privacy: Option<cohort_coordinator::driver::SiteLevelSpent>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PrivacySummary {
    pub epsilon: f64,
    pub delta: f64,
    pub per_site: BTreeMap<String, cohort_coordinator::hub::SitePrivacy>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Received {
    pub secagg_chunks: u64,
    pub plain_updates: u64,
    pub evaluations: u64,
}

/// The evaluation of one model by all sites: the coordinator's own record of it, so
/// `summary.json`'s `final` and `initial` have exactly the keys of a round summary's
/// evaluation (`accuracy`, `loss`, `auc`, `site_mean`, `weighted`, `confusion`, `held_out`).
pub type Final = Evaluation;

#[derive(Debug, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: u64,
    pub accuracy: Option<f64>,
    pub loss: f64,
    pub auc: Option<f64>,
    pub seconds: f64,
    pub sites: usize,
    pub dropped: usize,
    pub clipped: u64,
    /// Attempts the round needed (1 unless an attempt was aborted and retried).
    #[serde(default)]
    pub attempts: u32,
    /// Why the round was given up (the model unchanged, the run went on); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The federation's ε after the round (example-level DP); absent without DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The federation's site-level ε after the round (`[site_level_privacy]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_epsilon: Option<f64>,
    /// Central DP (plain mode): the L2 clip the round used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_clip: Option<f64>,
    /// Test accuracy weighted by each site's test examples (`accuracy` is the mean of the
    /// sites' accuracies, FLamby's convention).
    #[serde(default)]
    pub weighted_accuracy: Option<f64>,
    /// Each site's test accuracy after the round.
    #[serde(default)]
    pub site_accuracy: BTreeMap<String, f64>,
    /// Each site's value of the run's `metric` after the round.
    #[serde(default)]
    pub site_metric: BTreeMap<String, f64>,
    #[serde(default)]
    pub site_mean: Metrics,
    #[serde(default)]
    pub weighted: Metrics,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SiteRow {
    pub examples: u64,
    pub test_examples: u64,
    pub accuracy: Option<f64>,
    pub auc: Option<f64>,
    #[serde(default)]
    pub metrics: Metrics,
    /// An evaluation-only site (its metrics are in `held_out`, not the training sites').
    #[serde(default)]
    pub evaluate_only: bool,
}

/// A model trained outside the federation, judged like the federated one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    /// Over the training sites.
    pub site_mean: Metrics,
    pub weighted: Metrics,
    /// The evaluation-only sites' test sets pooled, when the scenario has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<Metrics>,
    pub per_site: BTreeMap<String, Metrics>,
}

pub(crate) fn table(pairs: Vec<(&str, toml::Value)>) -> toml::Table {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub(crate) fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

pub fn main(args: &RunArgs) -> Result<std::process::ExitCode> {
    let summary = run_file_with(&args.scenario, &args.out, args.pooled)?;
    let value = |m: &Metrics| {
        m.headline()
            .map_or("n/a".to_string(), |(_, v)| format!("{v:.4}"))
    };
    println!(
        "{} rounds, secure aggregation {}, {} task: final {} {} (mean of sites), {} (pooled test sets); loss {:.4}{} ({:.1} s)",
        summary.rounds_completed,
        if summary.secure { "on" } else { "OFF" },
        summary.task,
        summary.metric,
        value(&summary.final_.site_mean),
        value(&summary.final_.weighted),
        summary.final_.loss,
        summary
            .final_
            .auc
            .map_or(String::new(), |a| format!(", AUC {a:.4}")),
        summary.wall_seconds
    );
    if let Some(h) = &summary.final_.held_out {
        println!(
            "evaluation-only sites (held out): {} {} (mean of sites), {} (pooled)",
            summary.metric,
            value(&h.site_mean),
            value(&h.weighted)
        );
    }
    if let (Some(pooled), Some(alone)) = (&summary.pooled, &summary.alone) {
        println!(
            "{:<14} {:>12} {:>12}   ({}, test split of each site)",
            "", "mean of sites", "pooled", summary.metric
        );
        for (name, m, w) in [
            (
                "federated",
                &summary.final_.site_mean,
                &summary.final_.weighted,
            ),
            ("centralised", &pooled.site_mean, &pooled.weighted),
            ("each alone", &alone.site_mean, &alone.weighted),
        ] {
            println!("{name:<14} {:>12} {:>12}", value(m), value(w));
        }
    }
    println!(
        "wrote {}/summary.json, rounds.csv, accuracy.png",
        args.out.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs a scenario file and writes its outputs; returns the summary.
pub fn run_file(scenario: &Path, out: &Path) -> Result<Summary> {
    run_file_with(scenario, out, false)
}

/// [`run_file`], with the centralised and site-alone references when `pooled`.
pub fn run_file_with(scenario: &Path, out: &Path, pooled: bool) -> Result<Summary> {
    let text = std::fs::read_to_string(scenario)
        .with_context(|| format!("reading {}", scenario.display()))?;
    let parsed: Scenario = toml::from_str(&text)
        .with_context(|| format!("{}: invalid scenario", scenario.display()))?;
    let base = scenario.parent().unwrap_or(Path::new(".")).to_path_buf();
    let source = Source {
        path: scenario,
        text: &text,
    };
    let summary = run_scenario(&parsed, &base, out, &source, pooled)?;
    write_outputs(&summary, out)?;
    Ok(summary)
}

fn run_scenario(
    s: &Scenario,
    base: &Path,
    out: &Path,
    source: &Source<'_>,
    pooled: bool,
) -> Result<Summary> {
    for f in &s.faults {
        if !(f.fraction > 0.0 && f.fraction <= 1.0) {
            bail!("faults.fraction = {}: must be in (0, 1]", f.fraction);
        }
    }
    let secure = s.secure()?;
    let training = s.sites.iter().filter(|x| !x.evaluates_only()).count();
    if training < 3 && secure {
        bail!("secure aggregation needs at least 3 training sites; the scenario has {training}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Absolute, so the coordinator.toml written below works from anywhere.
    let out = &out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    // Every simulation starts afresh: new certificates, and no coordinator state to resume.
    for dir in [out.join("pki"), out.join("coordinator")] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    let pki = out.join("pki");
    let names: Vec<String> = s.sites.iter().map(|x| x.name.clone()).collect();
    provision(&ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: names,
        coordinator_names: vec!["localhost".into(), "127.0.0.1".into()],
        coordinator_url: "https://127.0.0.1:0".into(),
    })?;

    let schema: DataSchema = match toml::Value::Table(s.schema.clone()).try_into() {
        Ok(schema) => schema,
        Err(e) => {
            // Parsed again from the user's text, so the error points at their file and line.
            #[derive(Deserialize)]
            struct SchemaOnly {
                #[allow(dead_code)]
                schema: DataSchema,
            }
            match toml::from_str::<SchemaOnly>(source.text) {
                Err(located) => bail!("{}: {located}", source.path.display()),
                Ok(_) => bail!("{}: [schema]: {e}", source.path.display()),
            }
        }
    };
    let first = s.sites.first().context("the scenario has no sites")?;
    let inputs = match (&schema.images, &first.csv) {
        (Some(shape), _) => shape.inputs(),
        (None, Some(csv)) => schema
            .input_dim(&read_header(&base.join(csv))?)
            .context("[schema] against the first site's CSV")?,
        (None, None) => bail!(
            "site {}: no csv (a schema without [schema.images] describes CSV data)",
            first.name
        ),
    };
    let mut model = s.model.clone();
    model.insert("inputs".into(), toml::Value::Integer(inputs as i64));

    let mut secagg = s.secagg.clone().unwrap_or_default();
    secagg.insert("enabled".into(), toml::Value::Boolean(secure));
    // The colluding sites the coordinator's parameters and the simulated agents' policy
    // assume: the scenario's `secagg.max_colluders`, else 1 (the default of both), or 0 where
    // the scenario has 3 sites (k = 3 cannot resist a colluder and survive a dropout).
    let colluders = match secagg.get("max_colluders") {
        Some(v) => v
            .as_integer()
            .and_then(|c| u32::try_from(c).ok())
            .context("secagg.max_colluders must be a non-negative integer")?,
        None if training < 4 => 0,
        None => 1,
    };
    secagg.insert(
        "max_colluders".into(),
        toml::Value::Integer(i64::from(colluders)),
    );
    let mut coord = table(vec![
        ("listen", toml::Value::String("127.0.0.1:0".into())),
        ("data_dir", path_value(&out.join("coordinator"))),
        (
            "tls",
            toml::Value::Table(with_manifest(
                table(vec![
                    ("ca_cert", path_value(&pki.join("ca.pem"))),
                    ("cert", path_value(&pki.join("coordinator/cert.pem"))),
                    ("key", path_value(&pki.join("coordinator/key.pem"))),
                ]),
                &pki.join("coordinator/manifest.toml"),
            )),
        ),
        (
            "rounds",
            toml::Value::Table(table(vec![
                ("count", toml::Value::Integer(s.rounds as i64)),
                (
                    "min_sites",
                    toml::Value::Integer(
                        s.min_sites.map_or(training.clamp(1, 4) as i64, i64::from),
                    ),
                ),
                ("wait_for_sites_secs", toml::Value::Integer(60)),
                (
                    "stage_timeout_secs",
                    toml::Value::Integer(s.stage_timeout_secs as i64),
                ),
                (
                    "train_timeout_secs",
                    toml::Value::Integer(s.train_timeout_secs as i64),
                ),
            ])),
        ),
        ("secagg", toml::Value::Table(secagg)),
        ("model", toml::Value::Table(model)),
        ("schema", toml::Value::Table(s.schema.clone())),
        ("training", toml::Value::Table(s.training.clone())),
    ]);
    if let Some(st) = &s.strategy {
        coord.insert("strategy".into(), toml::Value::Table(st.clone()));
    }
    if let Some(a) = &s.aggregation {
        coord.insert("aggregation".into(), toml::Value::Table(a.clone()));
    }
    if let Some(p) = &s.site_level_privacy {
        coord.insert(
            "privacy".into(),
            toml::Value::Table(toml::Table::from_iter([(
                "site_level".to_string(),
                toml::Value::Table(p.clone()),
            )])),
        );
    }
    let generated = toml::to_string(&coord)?;
    let coord_cfg =
        CoordinatorConfig::parse(&generated).map_err(|e| in_scenario(e, &generated, source))?;
    let reference_model = (coord_cfg.model.spec(), coord_cfg.model.seed, {
        let mut t = coord_cfg.training.clone();
        t.insert(
            "hidden".into(),
            toml::Value::Array(
                coord_cfg
                    .model
                    .hidden
                    .iter()
                    .map(|h| toml::Value::Integer(*h as i64))
                    .collect(),
            ),
        );
        toml::Value::Table(t)
            .try_into::<cohort_protocols::model::TrainingConfig>()
            .context("[training]")?
    });
    // The configuration the run used, beside its data directory and certificates: the
    // coordinator's own commands (export-model, repair) work on the simulation's output.
    let written = out.join("coordinator.toml");
    std::fs::write(
        &written,
        format!(
            "# The coordinator configuration `cohort-sim run` generated from {} and ran with.\n\
             # Export a round's model with:\n\
             #   cohort-coordinator export-model --config {} --out model.safetensors\n{generated}",
            source.path.display(),
            written.display()
        ),
    )
    .with_context(|| format!("writing {}", written.display()))?;

    let rt = tokio::runtime::Runtime::new()?;
    let started = Instant::now();
    let result: Result<(RunSummary, Vec<RoundRecord>)> = rt.block_on(async {
        let (tx, rx) = oneshot::channel();
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
        let coordinator = tokio::spawn(cohort_coordinator::run_with_progress(
            coord_cfg,
            Some(tx),
            Some(progress_tx),
        ));
        let bar = indicatif::ProgressBar::new(s.rounds);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} round {pos}/{len} {msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let progress = tokio::spawn(async move {
            let mut records = Vec::new();
            while let Some(r) = progress_rx.recv().await {
                let s = &r.summary;
                bar.set_position(s.round);
                let (name, value) = s.eval.site_mean.headline().unwrap_or(("loss", s.eval.loss));
                bar.set_message(format!(
                    "{name} {value:.3} loss {:.3} dropped {}",
                    s.eval.loss, s.dropped
                ));
                records.push(r);
            }
            bar.finish();
            records
        });
        let addr = rx.await.context("the coordinator did not start")?.grpc;
        let mut agents = Vec::new();
        for (index, site) in s.sites.iter().enumerate() {
            let dir = pki.join("sites").join(&site.name);
            let faults: Vec<toml::Value> = s
                .faults
                .iter()
                .filter(|f| index < ((f.fraction * s.sites.len() as f64).round() as usize).max(1))
                .flat_map(|f| {
                    f.rounds.iter().map(|r| {
                        toml::Value::Table(table(vec![
                            ("round", toml::Value::Integer(*r as i64)),
                            ("stage", toml::Value::String(f.stage.clone())),
                            ("action", toml::Value::String(f.action.clone())),
                        ]))
                    })
                })
                .collect();
            let data = site.data_table(base, s.test_fraction, s.split_seed);
            // Evaluation-only sites release only evaluations, which DP-SGD does not cover.
            let privacy = site
                .privacy
                .as_ref()
                .or(s.privacy.as_ref())
                .filter(|_| !site.evaluates_only());
            let mut cfg = private_agent_config(
                &site.name,
                &dir,
                addr.port(),
                data,
                &s.schema,
                faults,
                privacy,
            )?;
            // The agent's default (5 live others) asks for a federation of seven or more; a
            // simulated one of n sites asks for all others but one (one may drop out).
            cfg.policy.min_live_neighbours = (training as u32).saturating_sub(2).clamp(1, 5);
            cfg.role = site.role;
            cfg.compute.device = site.device;
            // A plain comparison run is chosen by whoever runs the simulation, for every site.
            cfg.policy.require_secure = secure;
            cfg.policy.max_colluders = colluders;
            agents.push(tokio::spawn(cohort_agent::run(cfg)));
        }
        // The coordinator waits for its sites as long as it takes, as a service must; the
        // simulation owns every site, so once too few of its training agents are left for a
        // round it stops the run and says which agents stopped and why.
        let mut coordinator = coordinator;
        let needed = s.min_sites.map_or(training.clamp(1, 4), |m| m as usize);
        let summary = loop {
            let stopped: Vec<String> = s
                .sites
                .iter()
                .zip(&agents)
                .filter(|(site, a)| !site.evaluates_only() && a.is_finished())
                .map(|(site, _)| site.name.clone())
                .collect();
            if training - stopped.len() < needed && !coordinator.is_finished() {
                // Agents also stop when the run is over, a moment before the coordinator
                // finishes committing: wait for that moment, no longer.
                if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), &mut coordinator).await
                {
                    break r.context("coordinator task")??;
                }
                coordinator.abort();
                let mut why = Vec::new();
                for (site, a) in s.sites.iter().zip(agents) {
                    if a.is_finished() {
                        match a.await {
                            Ok(Err(err)) => why.push(format!("{}: {err:#}", site.name)),
                            Ok(Ok(())) => why.push(format!("{}: ended", site.name)),
                            Err(e) => why.push(format!("{}: {e}", site.name)),
                        }
                    }
                }
                anyhow::bail!(
                    "too few sites are left for a round (rounds.min_sites = {needed}); agents that stopped: {}",
                    why.join("; ")
                );
            }
            tokio::select! {
                r = &mut coordinator => break r.context("coordinator task")??,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        };
        let records = progress.await.unwrap_or_default();
        for a in agents {
            match tokio::time::timeout(Duration::from_secs(10), a).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %format!("{e:#}"), "agent ended with an error")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "agent task failed"),
                Err(_) => tracing::warn!("an agent did not stop within 10 s"),
            }
        }
        Ok((summary, records))
    });
    let (run, records) = result?;
    let mut summary = summarise(run, &records, started.elapsed().as_secs_f64(), &schema.task);
    if pooled {
        let (p, a) = references(s, base, &schema, &reference_model)?;
        summary.pooled = Some(p);
        summary.alone = Some(a);
    }
    Ok(summary)
}

/// The `--pooled` references: every site's data loaded as its agent loads it.
fn references(
    s: &Scenario,
    base: &Path,
    schema: &DataSchema,
    (spec, seed, training): &(
        cohort_protocols::model::ModelSpec,
        u64,
        cohort_protocols::model::TrainingConfig,
    ),
) -> Result<(Reference, Reference)> {
    let sites = s
        .sites
        .iter()
        .map(|site| {
            // The site's agent configuration, so its data load exactly as the agent loads them.
            let mut cfg = agent_config(
                &site.name,
                Path::new("."),
                1,
                site.data_table(base, s.test_fraction, s.split_seed),
                &s.schema,
                Vec::new(),
            )?;
            cfg.role = site.role;
            let data = cohort_agent::load_site_data(schema, &cfg)
                .with_context(|| format!("site {}", site.name))?;
            Ok(crate::reference::Site {
                name: site.name.clone(),
                data,
                evaluate_only: site.evaluates_only(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::reference::references(&sites, spec, training, *seed, s.rounds)
}

/// A `[tls]` table with `manifest` set when provisioning wrote one at `path`.
pub(crate) fn with_manifest(mut tls: toml::Table, path: &Path) -> toml::Table {
    if path.exists() {
        tls.insert("manifest".into(), path_value(path));
    }
    tls
}

/// The configuration of an agent for `site` whose provisioned bundle is in `dir`, dialling
/// the coordinator on 127.0.0.1:`port`. Its policy asks for 2 live others (a federation of
/// four, one of which may drop out), where the agent's own default asks for 5.
pub fn agent_config(
    site: &str,
    dir: &Path,
    port: u16,
    data: toml::Table,
    schema: &toml::Table,
    faults: Vec<toml::Value>,
) -> Result<AgentConfig> {
    private_agent_config(site, dir, port, data, schema, faults, None)
}

/// As [`agent_config`], with the site's `[privacy]` table (DP-SGD and its budget), checked
/// as the agent checks its own file.
fn private_agent_config(
    site: &str,
    dir: &Path,
    port: u16,
    data: toml::Table,
    schema: &toml::Table,
    faults: Vec<toml::Value>,
    privacy: Option<&toml::Table>,
) -> Result<AgentConfig> {
    let mut agent = table(vec![
        ("site", toml::Value::String(site.to_string())),
        (
            "coordinator",
            toml::Value::Table(table(vec![
                (
                    "url",
                    toml::Value::String(format!("https://127.0.0.1:{port}")),
                ),
                ("server_name", toml::Value::String("localhost".into())),
            ])),
        ),
        (
            "tls",
            toml::Value::Table(with_manifest(
                table(vec![
                    ("ca_cert", path_value(&dir.join("ca.pem"))),
                    ("cert", path_value(&dir.join("cert.pem"))),
                    ("key", path_value(&dir.join("key.pem"))),
                ]),
                &dir.join("manifest.toml"),
            )),
        ),
        ("data", toml::Value::Table(data)),
        ("schema", toml::Value::Table(schema.clone())),
        (
            "reconnect",
            toml::Value::Table(table(vec![
                ("initial_ms", toml::Value::Integer(100)),
                ("max_ms", toml::Value::Integer(2000)),
            ])),
        ),
        ("faults", toml::Value::Array(faults)),
        (
            "policy",
            toml::Value::Table(table(vec![(
                "min_live_neighbours",
                toml::Value::Integer(2),
            )])),
        ),
    ]);
    if let Some(p) = privacy {
        agent.insert("privacy".into(), toml::Value::Table(p.clone()));
    }
    AgentConfig::parse(&toml::to_string(&agent)?)
        .with_context(|| format!("agent configuration for {site}"))
}

fn read_header(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .next()
        .with_context(|| format!("{} is empty", path.display()))?;
    Ok(line.split(',').map(|c| c.trim().to_string()).collect())
}

fn summarise(
    run: RunSummary,
    records: &[RoundRecord],
    wall_seconds: f64,
    task: &cohort_protocols::model::Task,
) -> Summary {
    let per_round: BTreeMap<u64, &RoundRecord> =
        records.iter().map(|r| (r.summary.round, r)).collect();
    let received = run.received;
    // The rounds as this run reported them one by one (a simulation always starts afresh).
    let rounds: Vec<&cohort_coordinator::driver::RoundSummary> =
        records.iter().map(|r| &r.summary).collect();
    let last = run.last.as_ref();
    let metric = if task.classes() > 0 {
        "accuracy"
    } else {
        "rmse"
    };
    let headline = |m: &Metrics| m.headline().map(|h| h.1);
    Summary {
        rounds_completed: run.rounds_completed as usize,
        secure: run.secure,
        task: format!("{:?}", task.kind()).to_lowercase(),
        metric: metric.into(),
        final_: last.map_or(&run.initial, |r| &r.eval).clone(),
        initial: run.initial.clone(),
        rounds: rounds
            .iter()
            .map(|r| {
                let per_site = per_round.get(&r.round).map(|rec| &rec.per_site);
                let each = |f: &dyn Fn(&SiteResult) -> Option<f64>| -> BTreeMap<String, f64> {
                    per_site
                        .into_iter()
                        .flatten()
                        .filter_map(|(site, res)| f(res).map(|v| (site.clone(), v)))
                        .collect()
                };
                RoundRow {
                    round: r.round,
                    accuracy: r.eval.accuracy,
                    loss: r.eval.loss,
                    auc: r.eval.auc,
                    seconds: r.seconds,
                    sites: r.sites,
                    dropped: r.dropped,
                    clipped: r.clipped,
                    attempts: r.attempts,
                    failed: r.failed.clone(),
                    epsilon: r.epsilon,
                    site_epsilon: r.site_epsilon,
                    site_clip: r.site_clip,
                    weighted_accuracy: r.eval.weighted.accuracy,
                    site_accuracy: each(&|res| res.accuracy),
                    site_metric: each(&|res| headline(&res.metrics)),
                    site_mean: r.eval.site_mean.clone(),
                    weighted: r.eval.weighted.clone(),
                }
            })
            .collect(),
        per_site: run
            .per_site
            .into_iter()
            .map(|(name, s)| {
                (
                    name,
                    SiteRow {
                        examples: s.examples,
                        test_examples: s.test_examples,
                        accuracy: s.accuracy,
                        auc: s.auc,
                        metrics: s.metrics,
                        evaluate_only: s.evaluate_only,
                    },
                )
            })
            .collect(),
        wall_seconds,
        coordinator_received: Received {
            secagg_chunks: received.secagg_chunks,
            plain_updates: received.plain_updates,
            evaluations: received.evaluations,
        },
        pooled: None,
        alone: None,
        stopped: run.stopped,
        site_level_privacy: run.site_level,
        privacy: (!run.privacy.is_empty()).then(|| PrivacySummary {
            epsilon: run.privacy.values().map(|p| p.epsilon).fold(0.0, f64::max),
            delta: run.privacy.values().map(|p| p.delta).fold(0.0, f64::max),
            per_site: run.privacy,
        }),
    }
}

fn write_outputs(summary: &Summary, out: &Path) -> Result<()> {
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    // Site means; a metric the task does not have is an empty cell.
    let mut csv = String::from(
        "round,accuracy,loss,auc,seconds,sites,dropped,clipped,balanced_accuracy,f1,macro_f1,rmse,mae,r2,epsilon,site_epsilon\n",
    );
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for r in &summary.rounds {
        let m = &r.site_mean;
        csv.push_str(&format!(
            "{},{},{:.6},{},{:.3},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.round,
            cell(r.accuracy),
            r.loss,
            cell(r.auc),
            r.seconds,
            r.sites,
            r.dropped,
            r.clipped,
            cell(m.balanced_accuracy),
            cell(m.f1),
            cell(m.macro_f1),
            cell(m.rmse),
            cell(m.mae),
            cell(m.r2),
            cell(r.epsilon),
            cell(r.site_epsilon),
        ));
    }
    std::fs::write(out.join("rounds.csv"), csv)?;
    crate::plot::accuracy_png(summary, &out.join("accuracy.png"))
}
