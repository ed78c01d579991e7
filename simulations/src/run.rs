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
use cohort_coordinator::driver::{RoundRecord, SiteResult};
use cohort_coordinator::provision::{ProvisionOptions, provision};
use cohort_coordinator::{CoordinatorConfig, RunSummary};
use cohort_protocols::model::DataSchema;
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
    #[serde(default)]
    secagg: Option<toml::Table>,
    #[serde(default)]
    faults: Vec<FaultSpec>,
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
    csv: PathBuf,
    test_csv: Option<PathBuf>,
}

/// `summary.json`. Its keys are read by other tools: keep them stable.
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub rounds_completed: usize,
    pub secure: bool,
    #[serde(rename = "final")]
    pub final_: Final,
    pub initial: Final,
    pub rounds: Vec<RoundRow>,
    pub per_site: BTreeMap<String, SiteRow>,
    pub wall_seconds: f64,
    /// Message kinds the coordinator received: in a secure run `plain_updates` is 0.
    pub coordinator_received: Received,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Received {
    pub secagg_chunks: u64,
    pub plain_updates: u64,
    pub evaluations: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Final {
    pub accuracy: f64,
    pub loss: f64,
    pub auc: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: u64,
    pub accuracy: f64,
    pub loss: f64,
    pub auc: f64,
    pub seconds: f64,
    pub sites: usize,
    pub dropped: usize,
    pub clipped: u64,
    /// Attempts the round needed (1 unless an attempt was aborted and retried).
    #[serde(default)]
    pub attempts: u32,
    /// Test accuracy weighted by each site's test examples (`accuracy` is the mean of the
    /// sites' accuracies, FLamby's convention).
    #[serde(default)]
    pub weighted_accuracy: f64,
    /// Each site's test accuracy after the round.
    #[serde(default)]
    pub site_accuracy: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SiteRow {
    pub examples: u64,
    pub test_examples: u64,
    pub accuracy: f64,
    pub auc: f64,
}

pub(crate) fn table(pairs: Vec<(&str, toml::Value)>) -> toml::Table {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub(crate) fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

pub fn main(args: &RunArgs) -> Result<std::process::ExitCode> {
    let summary = run_file(&args.scenario, &args.out)?;
    println!(
        "{} rounds, secure aggregation {}: final mean site accuracy {:.4}, loss {:.4}, AUC {:.4} ({:.1} s)",
        summary.rounds_completed,
        if summary.secure { "on" } else { "OFF" },
        summary.final_.accuracy,
        summary.final_.loss,
        summary.final_.auc,
        summary.wall_seconds
    );
    println!(
        "wrote {}/summary.json, rounds.csv, accuracy.png",
        args.out.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs a scenario file and writes its outputs; returns the summary.
pub fn run_file(scenario: &Path, out: &Path) -> Result<Summary> {
    let text = std::fs::read_to_string(scenario)
        .with_context(|| format!("reading {}", scenario.display()))?;
    let parsed: Scenario = toml::from_str(&text)
        .with_context(|| format!("{}: invalid scenario", scenario.display()))?;
    let base = scenario.parent().unwrap_or(Path::new(".")).to_path_buf();
    let source = Source {
        path: scenario,
        text: &text,
    };
    let summary = run_scenario(&parsed, &base, out, &source)?;
    write_outputs(&summary, out)?;
    Ok(summary)
}

fn run_scenario(s: &Scenario, base: &Path, out: &Path, source: &Source<'_>) -> Result<Summary> {
    for f in &s.faults {
        if !(f.fraction > 0.0 && f.fraction <= 1.0) {
            bail!("faults.fraction = {}: must be in (0, 1]", f.fraction);
        }
    }
    let secure = s.secure()?;
    if s.sites.len() < 3 && secure {
        bail!(
            "secure aggregation needs at least 3 sites; the scenario has {}",
            s.sites.len()
        );
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
        validity_days: cohort_coordinator::provision::DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: names,
        coordinator_names: vec!["localhost".into(), "127.0.0.1".into()],
        coordinator_url: "https://127.0.0.1:0".into(),
    })?;

    let schema: DataSchema = toml::Value::Table(s.schema.clone())
        .try_into()
        .context("[schema]")?;
    let first = s.sites.first().context("the scenario has no sites")?;
    let header = read_header(&base.join(&first.csv))?;
    let inputs = schema
        .input_dim(&header)
        .context("[schema] against the first site's CSV")?;
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
        None if s.sites.len() < 4 => 0,
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
            toml::Value::Table(table(vec![
                ("ca_cert", path_value(&pki.join("ca.pem"))),
                ("cert", path_value(&pki.join("coordinator/cert.pem"))),
                ("key", path_value(&pki.join("coordinator/key.pem"))),
            ])),
        ),
        (
            "rounds",
            toml::Value::Table(table(vec![
                ("count", toml::Value::Integer(s.rounds as i64)),
                (
                    "min_sites",
                    toml::Value::Integer(
                        s.min_sites
                            .map_or(s.sites.len().clamp(1, 4) as i64, i64::from),
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
    let generated = toml::to_string(&coord)?;
    let coord_cfg =
        CoordinatorConfig::parse(&generated).map_err(|e| in_scenario(e, &generated, source))?;
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
                bar.set_message(format!(
                    "accuracy {:.3} loss {:.3} dropped {}",
                    s.accuracy, s.loss, s.dropped
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
            let mut data = table(vec![
                ("csv", path_value(&base.join(&site.csv))),
                ("test_fraction", toml::Value::Float(s.test_fraction)),
                ("split_seed", toml::Value::Integer(s.split_seed as i64)),
            ]);
            if let Some(t) = &site.test_csv {
                data.insert("test_csv".into(), path_value(&base.join(t)));
            }
            let mut cfg = agent_config(&site.name, &dir, addr.port(), data, &s.schema, faults)?;
            // A plain comparison run is chosen by whoever runs the simulation, for every site.
            cfg.policy.require_secure = secure;
            cfg.policy.max_colluders = colluders;
            agents.push(tokio::spawn(cohort_agent::run(cfg)));
        }
        let summary = coordinator.await.context("coordinator task")??;
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
    Ok(summarise(run, &records, started.elapsed().as_secs_f64()))
}

/// The configuration of an agent for `site` whose provisioned bundle is in `dir`, dialling
/// the coordinator on 127.0.0.1:`port`.
pub fn agent_config(
    site: &str,
    dir: &Path,
    port: u16,
    data: toml::Table,
    schema: &toml::Table,
    faults: Vec<toml::Value>,
) -> Result<AgentConfig> {
    let agent = table(vec![
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
            toml::Value::Table(table(vec![
                ("ca_cert", path_value(&dir.join("ca.pem"))),
                ("cert", path_value(&dir.join("cert.pem"))),
                ("key", path_value(&dir.join("key.pem"))),
            ])),
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
    ]);
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

fn summarise(run: RunSummary, records: &[RoundRecord], wall_seconds: f64) -> Summary {
    let per_round: BTreeMap<u64, &RoundRecord> =
        records.iter().map(|r| (r.summary.round, r)).collect();
    let received = run.received;
    let last = run.rounds.last();
    Summary {
        rounds_completed: run.rounds.len(),
        secure: run.secure,
        final_: Final {
            accuracy: last.map_or(run.initial.accuracy, |r| r.accuracy),
            loss: last.map_or(run.initial.loss, |r| r.loss),
            auc: last.map_or(run.initial.auc, |r| r.auc),
        },
        initial: Final {
            accuracy: run.initial.accuracy,
            loss: run.initial.loss,
            auc: run.initial.auc,
        },
        rounds: run
            .rounds
            .iter()
            .map(|r| RoundRow {
                round: r.round,
                accuracy: r.accuracy,
                loss: r.loss,
                auc: r.auc,
                seconds: r.seconds,
                sites: r.sites,
                dropped: r.dropped,
                clipped: r.clipped,
                attempts: r.attempts,
                weighted_accuracy: per_round
                    .get(&r.round)
                    .map_or(r.accuracy, |rec| weighted_accuracy(&rec.per_site)),
                site_accuracy: per_round
                    .get(&r.round)
                    .map(|rec| {
                        rec.per_site
                            .iter()
                            .map(|(site, res)| (site.clone(), res.accuracy))
                            .collect()
                    })
                    .unwrap_or_default(),
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
    }
}

/// Test accuracy over all sites' test examples together (each site weighted by its test
/// examples); the plain mean when no site reported any.
pub fn weighted_accuracy(per_site: &BTreeMap<String, SiteResult>) -> f64 {
    let total: u64 = per_site.values().map(|s| s.test_examples).sum();
    if total == 0 {
        let n = per_site.len().max(1) as f64;
        return per_site.values().map(|s| s.accuracy).sum::<f64>() / n;
    }
    per_site
        .values()
        .map(|s| s.accuracy * s.test_examples as f64)
        .sum::<f64>()
        / total as f64
}

fn write_outputs(summary: &Summary, out: &Path) -> Result<()> {
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    let mut csv = String::from("round,accuracy,loss,auc,seconds,sites,dropped,clipped\n");
    for r in &summary.rounds {
        csv.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.3},{},{},{}\n",
            r.round, r.accuracy, r.loss, r.auc, r.seconds, r.sites, r.dropped, r.clipped
        ));
    }
    std::fs::write(out.join("rounds.csv"), csv)?;
    crate::plot::accuracy_png(summary, &out.join("accuracy.png"))
}
