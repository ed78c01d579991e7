//! `cohort-sim fl-bench`: the cost of a federated round at scale, secure against plain.
//!
//! N synthetic sites send random updates of a P-parameter model (no training, so the numbers
//! are the system's: TLS, gRPC, chunking, SecAgg+, aggregation, the strategy, the evaluation
//! broadcast). The coordinator runs in a process of its own so its peak RSS can be read from
//! the kernel (`VmHWM`) without the agents' memory in it; the agents share a second process.
//! Both are this binary, started with the hidden `fl-bench-role` subcommand.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cohort_agent::LocalSite;
use cohort_agent::model::Evaluation;
use cohort_ca::demo_keys::{ProvisionOptions, provision};
use cohort_coordinator::CoordinatorConfig;
use cohort_protocols::model::{ModelSpec, TrainingConfig, stats};
use serde::{Deserialize, Serialize};

use crate::run::{agent_config, path_value, table};

/// Model inputs of the synthetic MLP; the hidden layer is sized to reach `--params`.
pub(crate) const INPUTS: usize = 16;

#[derive(Debug, clap::Args)]
pub struct FlBenchArgs {
    #[arg(long, default_value_t = 100)]
    pub sites: usize,
    /// Model parameters (approximately: an MLP 16 → h → 1 with h chosen to match).
    #[arg(long, default_value_t = 1_000_000)]
    pub params: usize,
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Comma-separated: plain, secure.
    #[arg(long, default_value = "plain,secure")]
    pub modes: String,
    #[arg(long, default_value_t = 32)]
    pub modulus_bits: u32,
    #[arg(long, default_value_t = 16)]
    pub quant_bits: u32,
    /// SecAgg+ neighbours (default: the coordinator's choice for the number of sites).
    #[arg(long)]
    pub neighbours: Option<u32>,
    #[arg(long, default_value = "runs/fl-bench")]
    pub out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RoleArgs {
    /// coordinator, rollout (a coordinator stopped after its first roll-out) or agents
    pub role: String,
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub sites: Option<usize>,
}

/// What the coordinator process reports about its run.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModeReport {
    pub secure: bool,
    pub rounds: Vec<RoundTime>,
    pub mean_round_seconds: f64,
    pub peak_rss_mib: f64,
    pub start_rss_mib: f64,
    pub wall_seconds: f64,
    /// CPU time of the coordinator process and of the agents' process over the whole run.
    /// On this one machine both compete for the same cores; in a deployment each site masks
    /// on its own hardware, in parallel.
    pub coordinator_cpu_seconds: f64,
    #[serde(default)]
    pub agents_cpu_seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RoundTime {
    pub round: u64,
    pub seconds: f64,
    pub sites: usize,
    pub dropped: usize,
    pub attempts: u32,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub sites: usize,
    pub params: usize,
    pub model_mib: f64,
    pub rss_target_mib: f64,
    pub modes: Vec<ModeReport>,
    /// Secure seconds per round over plain (target ≤ 1.3).
    pub secure_over_plain: Option<f64>,
}

/// The hidden width h for which 16·h + h + h + 1 ≈ `params`.
pub(crate) fn hidden_for(params: usize) -> usize {
    (params.saturating_sub(1) / (INPUTS + 2)).max(1)
}

pub fn main(args: &FlBenchArgs) -> Result<ExitCode> {
    if args.sites < 3 {
        bail!(
            "--sites {}: at least 3 are needed for secure aggregation",
            args.sites
        );
    }
    let modes: Vec<bool> = args
        .modes
        .split(',')
        .map(|m| match m.trim() {
            "plain" => Ok(false),
            "secure" => Ok(true),
            other => bail!("--modes: {other:?} is not plain or secure"),
        })
        .collect::<Result<_>>()?;
    let hidden = hidden_for(args.params);
    let params = synthetic_spec(hidden).num_params();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let pki = args.out.join("pki");
    provision_synthetic(&pki, args.sites)?;
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut reports = Vec::new();
    for secure in modes {
        let mode = if secure { "secure" } else { "plain" };
        let config = args.out.join(format!("coordinator-{mode}.toml"));
        let data_dir = args.out.join(format!("coordinator-{mode}"));
        if data_dir.exists() {
            std::fs::remove_dir_all(&data_dir)
                .with_context(|| format!("clearing {}", data_dir.display()))?;
        }
        std::fs::write(
            &config,
            coordinator_toml(args, &pki, &data_dir, hidden, secure)?,
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let report = args.out.join(format!("report-{mode}.json"));
        eprintln!(
            "{mode}: {} sites, {params} parameters, {} rounds",
            args.sites, args.rounds
        );
        reports.push(run_mode(&exe, &config, &report, args.sites)?);
    }
    let model_mib = (params * 4) as f64 / (1024.0 * 1024.0);
    let per_round = |secure: bool| {
        reports
            .iter()
            .find(|r| r.secure == secure)
            .map(|r| r.mean_round_seconds)
    };
    let report = Report {
        sites: args.sites,
        params,
        model_mib,
        rss_target_mib: 3.0 * model_mib + 64.0,
        secure_over_plain: per_round(true).zip(per_round(false)).map(|(s, p)| s / p),
        modes: reports,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The synthetic sites' model: an MLP 16 → `hidden` → 1.
pub(crate) fn synthetic_spec(hidden: usize) -> ModelSpec {
    ModelSpec {
        kind: cohort_protocols::model::ModelKind::Mlp,
        inputs: INPUTS,
        hidden: vec![hidden],
        outputs: 1,
        custom: None,
        cnn: None,
    }
}

/// A fresh PKI in `pki` (any old one removed) for synthetic sites 0..`sites` and a
/// coordinator on 127.0.0.1.
pub(crate) fn provision_synthetic(pki: &Path, sites: usize) -> Result<()> {
    if pki.exists() {
        std::fs::remove_dir_all(pki).with_context(|| format!("clearing {}", pki.display()))?;
    }
    provision(&ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out: pki.to_path_buf(),
        sites: (0..sites).map(site_name).collect(),
        coordinator_names: vec!["localhost".into(), "127.0.0.1".into()],
        coordinator_url: "https://127.0.0.1:0".into(),
    })?;
    Ok(())
}

pub(crate) fn site_name(i: usize) -> String {
    format!("site-{i:03}")
}

pub(crate) fn coordinator_toml(
    args: &FlBenchArgs,
    pki: &Path,
    data_dir: &Path,
    hidden: usize,
    secure: bool,
) -> Result<String> {
    let mut secagg = table(vec![
        ("enabled", toml::Value::Boolean(secure)),
        (
            "modulus_bits",
            toml::Value::Integer(args.modulus_bits as i64),
        ),
        ("quant_bits", toml::Value::Integer(args.quant_bits as i64)),
        ("max_weight", toml::Value::Integer(1000)),
    ]);
    if let Some(k) = args.neighbours {
        secagg.insert("neighbours".into(), toml::Value::Integer(k as i64));
    }
    let coord = table(vec![
        ("listen", toml::Value::String("127.0.0.1:0".into())),
        ("data_dir", path_value(data_dir)),
        (
            "tls",
            toml::Value::Table(crate::run::with_manifest(
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
                ("count", toml::Value::Integer(args.rounds as i64)),
                ("min_sites", toml::Value::Integer(args.sites as i64)),
                ("wait_for_sites_secs", toml::Value::Integer(300)),
                ("stage_timeout_secs", toml::Value::Integer(300)),
                ("train_timeout_secs", toml::Value::Integer(300)),
            ])),
        ),
        ("secagg", toml::Value::Table(secagg)),
        (
            "model",
            toml::Value::Table(table(vec![
                ("kind", toml::Value::String("mlp".into())),
                ("inputs", toml::Value::Integer(INPUTS as i64)),
                (
                    "hidden",
                    toml::Value::Array(vec![toml::Value::Integer(hidden as i64)]),
                ),
            ])),
        ),
        ("schema", toml::Value::Table(schema())),
        (
            "training",
            toml::Value::Table(table(vec![
                ("learning_rate", toml::Value::Float(0.01)),
                ("batch_size", toml::Value::Integer(32)),
                ("local_steps", toml::Value::Integer(1)),
            ])),
        ),
    ]);
    let text = toml::to_string(&coord)?;
    CoordinatorConfig::parse(&text).context("the benchmark's coordinator configuration")?;
    Ok(text)
}

/// A schema both sides agree on; the synthetic sites never read a CSV.
pub(crate) fn schema() -> toml::Table {
    table(vec![
        (
            "label",
            toml::Value::Table(table(vec![
                ("column", toml::Value::String("y".into())),
                ("greater_than", toml::Value::Float(0.0)),
            ])),
        ),
        ("missing", toml::Value::String("drop_row".into())),
    ])
}

/// Kills a child process when dropped, so a failed benchmark leaves nothing running.
pub(crate) struct Reaped(pub(crate) Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_mode(exe: &Path, config: &Path, report: &Path, sites: usize) -> Result<ModeReport> {
    let mut coordinator = Reaped(
        Command::new(exe)
            .args(["fl-bench-role", "coordinator", "--config"])
            .arg(config)
            .arg("--report")
            .arg(report)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the coordinator process")?,
    );
    let port = listening_port(&mut coordinator.0)?;
    let agents_report = report.with_extension("agents");
    let mut agents = Reaped(
        Command::new(exe)
            .args(["fl-bench-role", "agents", "--config"])
            .arg(config)
            .args(["--port", &port.to_string(), "--sites", &sites.to_string()])
            .arg("--report")
            .arg(&agents_report)
            .spawn()
            .context("starting the agents process")?,
    );
    let status = coordinator
        .0
        .wait()
        .context("waiting for the coordinator")?;
    if !status.success() {
        bail!("the coordinator process failed ({status})");
    }
    // The agents exit once the coordinator has shut the federation down.
    let _ = agents.0.wait();
    let text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let mut out: ModeReport =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", report.display()))?;
    out.agents_cpu_seconds = std::fs::read_to_string(&agents_report)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(f64::NAN);
    Ok(out)
}

/// The port a coordinator role process announces on its first line of output.
pub(crate) fn listening_port(coordinator: &mut Child) -> Result<u16> {
    let stdout = coordinator
        .stdout
        .take()
        .context("the coordinator's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the coordinator's address")?;
    line.trim()
        .strip_prefix("listening ")
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("the coordinator did not report its address: {line:?}"))
}

fn print_table(r: &Report) {
    println!(
        "{} sites, {} parameters ({:.1} MiB of f32), coordinator RSS target {:.1} MiB",
        r.sites, r.params, r.model_mib, r.rss_target_mib
    );
    println!(
        "  mode     s/round   rounds (s)                 coordinator peak RSS        CPU s (coordinator, agents)"
    );
    for m in &r.modes {
        let rounds: Vec<String> = m
            .rounds
            .iter()
            .map(|x| format!("{:.2}", x.seconds))
            .collect();
        println!(
            "  {:<7} {:>8.3}   {:<26} {:>8.1} MiB (at start {:.1})   {:.1}, {:.1}",
            if m.secure { "secure" } else { "plain" },
            m.mean_round_seconds,
            rounds.join(" "),
            m.peak_rss_mib,
            m.start_rss_mib,
            m.coordinator_cpu_seconds,
            m.agents_cpu_seconds
        );
    }
    if let Some(x) = r.secure_over_plain {
        println!("  secure / plain: {x:.2} (target ≤ 1.3)");
    }
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU seconds (user + system) process `pid` ("self" for this one) has used, from
/// `/proc/<pid>/stat` (in clock ticks of 1/100 s, Linux's fixed USER_HZ); NaN if unreadable.
pub(crate) fn cpu_seconds_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// Resident memory of this process in MiB: the current (`VmRSS`) or the peak (`VmHWM`).
pub(crate) fn rss_mib(field: &str) -> f64 {
    rss_mib_of("self", field)
}

/// [`rss_mib`] of process `pid`.
pub(crate) fn rss_mib_of(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn role(args: &RoleArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = CoordinatorConfig::parse(&text)?;
    let rt = tokio::runtime::Runtime::new()?;
    match args.role.as_str() {
        "coordinator" => {
            let report = args.report.clone().context("--report is required")?;
            let start_rss_mib = rss_mib("VmRSS:");
            let secure = config.secagg.enabled;
            let started = Instant::now();
            let summary = rt.block_on(async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let run = tokio::spawn(cohort_coordinator::run_with_progress(
                    config,
                    Some(tx),
                    None,
                ));
                let addr = rx.await.context("the coordinator did not start")?.grpc;
                println!("listening {addr}");
                run.await.context("coordinator task")?
            })?;
            let rounds: Vec<RoundTime> = summary
                .rounds()
                .context("reading the rounds back from the data directory")?
                .iter()
                .map(|r| RoundTime {
                    round: r.round,
                    seconds: r.seconds,
                    sites: r.sites,
                    dropped: r.dropped,
                    attempts: r.attempts,
                })
                .collect();
            let mean = rounds.iter().map(|r| r.seconds).sum::<f64>() / rounds.len().max(1) as f64;
            let out = ModeReport {
                secure,
                mean_round_seconds: mean,
                rounds,
                peak_rss_mib: rss_mib("VmHWM:"),
                start_rss_mib,
                wall_seconds: started.elapsed().as_secs_f64(),
                coordinator_cpu_seconds: cpu_seconds(),
                agents_cpu_seconds: 0.0,
            };
            std::fs::write(&report, serde_json::to_string_pretty(&out)?)
                .with_context(|| format!("writing {}", report.display()))?;
        }
        "agents" => {
            let port = args.port.context("--port is required")?;
            let sites = args.sites.context("--sites is required")?;
            let pki = config
                .tls
                .ca_cert
                .parent()
                .context("the CA certificate's directory")?
                .to_path_buf();
            let schema = schema();
            rt.block_on(async {
                let mut agents = Vec::new();
                for i in 0..sites {
                    let name = site_name(i);
                    let data = table(vec![("csv", toml::Value::String("synthetic.csv".into()))]);
                    let mut cfg = agent_config(
                        &name,
                        &pki.join("sites").join(&name),
                        port,
                        data,
                        &schema,
                        vec![],
                    )?;
                    // The plain mode is the benchmark's baseline, chosen for every site.
                    cfg.policy.require_secure = config.secagg.enabled;
                    let site: Arc<dyn LocalSite> = Arc::new(SyntheticSite { seed: i as u64 });
                    agents.push(tokio::spawn(cohort_agent::run_site(cfg, site)));
                }
                for a in agents {
                    let _ = tokio::time::timeout(Duration::from_secs(60), a).await;
                }
                Ok::<_, anyhow::Error>(())
            })?;
            if let Some(report) = &args.report {
                std::fs::write(report, cpu_seconds().to_string())
                    .with_context(|| format!("writing {}", report.display()))?;
            }
        }
        "rollout" => {
            let report = args.report.clone().context("--report is required")?;
            crate::rollout::coordinator(&rt, config, &report)?;
        }
        other => bail!("unknown role {other:?}: coordinator, rollout or agents"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A site with 100 examples of unit-variance features whose "training" returns a random
/// update in [-0.01, 0.01] (well inside the clipping range: nothing is clipped).
#[derive(Debug)]
pub(crate) struct SyntheticSite {
    pub(crate) seed: u64,
}

impl LocalSite for SyntheticSite {
    fn inputs(&self) -> usize {
        INPUTS
    }

    fn train_examples(&self) -> u64 {
        100
    }

    fn stats_vector(&self) -> Result<Vec<u64>, String> {
        let mut v = vec![0u64; stats::vector_len(INPUTS)];
        v[0] = 100;
        for j in 0..INPUTS {
            v[1 + 3 * j] = 100;
            v[3 + 3 * j] = stats::to_fixed(100.0);
        }
        Ok(v)
    }

    fn train(
        &self,
        _spec: &ModelSpec,
        global: &[f32],
        _standardise: (&[f64], &[f64]),
        _cfg: &TrainingConfig,
        seed: u64,
    ) -> Result<Vec<f32>, String> {
        // SplitMix64: plenty for noise that only has to be different per site and round.
        let mut state = seed ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok((0..global.len())
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
            })
            .collect())
    }

    fn evaluate(
        &self,
        _spec: &ModelSpec,
        _params: &[f32],
        _standardise: (&[f64], &[f64]),
    ) -> Result<Evaluation, String> {
        Ok(Evaluation {
            examples: 50,
            loss: std::f64::consts::LN_2,
            auc: Some(0.5),
            // Half right, as a model at chance would be.
            tally: cohort_protocols::model::metrics::Tally {
                confusion: vec![13, 12, 13, 12],
                residuals: None,
            },
        })
    }
}
