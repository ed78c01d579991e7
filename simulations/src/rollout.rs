//! `cohort-sim rollout`: how long a new model takes to reach every site of a federation.
//!
//! N synthetic sites (the agent's own session code over mTLS gRPC, as in `fl-bench`) connect
//! to a coordinator in a process of its own; after the statistics round the coordinator sends
//! its initial model to all of them for evaluation, which is exactly a roll-out: every site
//! receives the signed model, checks its SHA3-512 and signature, and acknowledges it with an
//! evaluation report. The coordinator measures that broadcast itself
//! ([`cohort_coordinator::status::Rollout`], also served by the status API); this process
//! stops it once the roll-out is done, so no training round (and no site's update) is
//! involved, and reads the coordinator's resident memory and both processes' CPU time while
//! the model is going out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cohort_coordinator::CoordinatorConfig;
use cohort_coordinator::status::{Progress, Rollout, RunState};
use cohort_protocols::model::{self, Incoming};
use serde::{Deserialize, Serialize};

use crate::fl_bench::{
    FlBenchArgs, Reaped, coordinator_toml, cpu_seconds_of, hidden_for, listening_port,
    provision_synthetic, rss_mib, rss_mib_of, synthetic_spec,
};

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[arg(long, default_value_t = 237)]
    pub sites: usize,
    /// Model parameters (f32; approximately, an MLP 16 → h → 1): 10 000 000 is a 40 MB model.
    #[arg(long, default_value_t = 10_000_000)]
    pub params: usize,
    #[arg(long, default_value = "runs/rollout")]
    pub out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What the coordinator process measured while its model went out.
#[derive(Debug, Serialize, Deserialize)]
pub struct CoordinatorSide {
    pub sites: usize,
    pub acknowledged: usize,
    pub model_bytes: u64,
    pub sent_seconds: f64,
    pub seconds: f64,
    /// Resident memory just before the evaluation stage began.
    pub rss_before_mib: f64,
    /// The highest resident memory seen (sampled every millisecond) during the stage.
    pub peak_rss_mib: f64,
    /// CPU seconds over the stage (it also hashes and signs the model once).
    pub coordinator_cpu_seconds: f64,
    pub agents_cpu_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub params: usize,
    pub cores: usize,
    #[serde(flatten)]
    pub coordinator: CoordinatorSide,
    /// Peak resident memory of the process holding all the agents.
    pub agents_peak_rss_mib: f64,
    /// One site's check of the model on one core: SHA3-512 and decoding of every chunk, then
    /// the signature (best of three).
    pub verify_seconds_per_site: f64,
}

pub fn main(args: &RolloutArgs) -> Result<ExitCode> {
    if args.sites < 3 {
        bail!("--sites {}: a federation needs at least 3", args.sites);
    }
    let hidden = hidden_for(args.params);
    let params = synthetic_spec(hidden).num_params();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let pki = args.out.join("pki");
    let data_dir = args.out.join("coordinator");
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("clearing {}", data_dir.display()))?;
    }
    provision_synthetic(&pki, args.sites)?;
    // Plain mode: the broadcast is the same in both (a model is never masked), and the
    // statistics round before it is quicker.
    let bench = FlBenchArgs {
        sites: args.sites,
        params: args.params,
        rounds: 1,
        modes: "plain".into(),
        modulus_bits: 32,
        quant_bits: 16,
        neighbours: None,
        out: args.out.clone(),
        json: false,
    };
    let config = args.out.join("coordinator.toml");
    std::fs::write(
        &config,
        coordinator_toml(&bench, &pki, &data_dir, hidden, false)?,
    )
    .with_context(|| format!("writing {}", config.display()))?;
    eprintln!(
        "roll-out: {} sites, {params} parameters ({:.1} MB); logs in {}",
        args.sites,
        (params * 4) as f64 / 1e6,
        args.out.display()
    );
    let (coordinator, agents_peak_rss_mib) = run(&args.out, &config, args.sites)?;
    let report = Report {
        params,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        coordinator,
        agents_peak_rss_mib,
        verify_seconds_per_site: verify_seconds(params)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(args.sites, &report);
    }
    if report.coordinator.acknowledged < args.sites {
        bail!(
            "only {} of {} sites acknowledged the model (see {})",
            report.coordinator.acknowledged,
            args.sites,
            args.out.join("agents.log").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn log_file(out: &Path, name: &str) -> Result<std::fs::File> {
    let path = out.join(name);
    std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
}

/// Runs the coordinator process and the agents' process; returns what the coordinator
/// measured and the agents' peak memory.
fn run(out: &Path, config: &Path, sites: usize) -> Result<(CoordinatorSide, f64)> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let report = out.join("report-coordinator.json");
    let _ = std::fs::remove_file(&report);
    let mut coordinator = Reaped(
        Command::new(&exe)
            .args(["fl-bench-role", "rollout", "--config"])
            .arg(config)
            .arg("--report")
            .arg(&report)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file(out, "coordinator.log")?)
            .spawn()
            .context("starting the coordinator process")?,
    );
    let port = listening_port(&mut coordinator.0)?;
    let agents = Reaped(
        Command::new(&exe)
            .args(["fl-bench-role", "agents", "--config"])
            .arg(config)
            .args(["--port", &port.to_string(), "--sites", &sites.to_string()])
            .stderr(log_file(out, "agents.log")?)
            .spawn()
            .context("starting the agents' process")?,
    );
    let agents_pid = agents.0.id().to_string();
    {
        let mut stdin = coordinator
            .0
            .stdin
            .take()
            .context("the coordinator's stdin")?;
        writeln!(stdin, "{agents_pid}").context("telling the coordinator the agents' pid")?;
    }
    let status = coordinator
        .0
        .wait()
        .context("waiting for the coordinator")?;
    // Read before the agents are stopped (dropping `agents` kills them).
    let agents_peak = rss_mib_of(&agents_pid, "VmHWM:");
    drop(agents);
    if !status.success() {
        bail!(
            "the coordinator process failed ({status}); see {}",
            out.join("coordinator.log").display()
        );
    }
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("reading {}", report.display()))?;
    let side =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", report.display()))?;
    Ok((side, agents_peak))
}

/// The coordinator role: serves until its first roll-out (the initial model's evaluation)
/// has finished, sampling its memory meanwhile, then stops and writes what it measured.
pub(crate) fn coordinator(
    rt: &tokio::runtime::Runtime,
    config: CoordinatorConfig,
    report: &Path,
) -> Result<()> {
    let side = rt.block_on(async {
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut run = tokio::spawn(cohort_coordinator::run_observed(config, bound_tx, async {
            let _ = stop_rx.await;
        }));
        let endpoints = bound_rx.await.context("the coordinator did not start")?;
        println!("listening {}", endpoints.grpc);
        let agents = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await?
        .context("reading the agents' pid")?;
        let agents = agents.trim().to_string();
        let progress = endpoints.progress.clone();
        let mut sampler = tokio::task::spawn_blocking(move || sample(&progress, &agents));
        let side = tokio::select! {
            done = &mut run => bail!("the coordinator stopped before its first roll-out: {:?}", done?.map(|_| ())),
            side = &mut sampler => side??,
        };
        let _ = stop_tx.send(());
        run.await.context("the coordinator task")??;
        Ok::<_, anyhow::Error>(side)
    })?;
    std::fs::write(report, serde_json::to_string_pretty(&side)?)
        .with_context(|| format!("writing {}", report.display()))
}

/// Watches the run every millisecond until the first roll-out is recorded.
fn sample(progress: &Progress, agents: &str) -> Result<CoordinatorSide> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut rss_before = rss_mib("VmRSS:");
    let mut peak = 0.0f64;
    let mut cpu_at_start: Option<(f64, f64)> = None;
    loop {
        let rss = rss_mib("VmRSS:");
        let evaluating = progress.position().0 == RunState::Evaluating;
        if evaluating {
            if cpu_at_start.is_none() {
                cpu_at_start = Some((cpu_seconds_of("self"), cpu_seconds_of(agents)));
            }
            peak = peak.max(rss);
        } else if cpu_at_start.is_none() {
            rss_before = rss;
        }
        if let Some(Rollout {
            sites,
            acknowledged,
            model_bytes,
            sent_seconds,
            seconds,
            ..
        }) = progress.last_rollout()
        {
            let (c0, a0) = cpu_at_start.unwrap_or((f64::NAN, f64::NAN));
            return Ok(CoordinatorSide {
                sites,
                acknowledged,
                model_bytes,
                sent_seconds,
                seconds,
                rss_before_mib: rss_before,
                peak_rss_mib: peak.max(rss),
                coordinator_cpu_seconds: cpu_seconds_of("self") - c0,
                agents_cpu_seconds: cpu_seconds_of(agents) - a0,
            });
        }
        if Instant::now() > deadline {
            bail!("no roll-out within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What one site spends checking a model of `params` parameters, on one core: the same
/// [`Incoming`] the agent feeds chunk by chunk.
fn verify_seconds(params: usize) -> Result<f64> {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let values: Vec<f32> = (0..params).map(|i| i as f32 * 1e-7).collect();
    let bytes = model::to_bytes(&values);
    let hash = model::sha3_512(&bytes);
    let signature = model::sign_model(&key, &hash);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        let mut incoming = Incoming::new(bytes.len() as u64)?;
        for chunk in bytes.chunks(cohort_proto::CHUNK_BYTES) {
            incoming.push(chunk)?;
        }
        let got = incoming.finish(&hash, &signature, Some(&key.verifying_key()))?;
        best = best.min(started.elapsed().as_secs_f64());
        if got.len() != params {
            bail!("the check decoded {} of {params} parameters", got.len());
        }
    }
    Ok(best)
}

fn print_report(sites: usize, r: &Report) {
    let c = &r.coordinator;
    println!(
        "roll-out of a {:.1} MB model ({} parameters) to {sites} sites over mTLS on one machine ({} cores)",
        c.model_bytes as f64 / 1e6,
        r.params,
        r.cores
    );
    println!(
        "  queued for all sites         {:>7.2} s   ({} sites; a queue holds 2 MiB)",
        c.sent_seconds, c.sites
    );
    println!(
        "  verified and acknowledged    {:>7.2} s   ({} sites checked SHA3-512 and signature)",
        c.seconds, c.acknowledged
    );
    println!(
        "  coordinator resident memory  {:>7.1} MiB before, {:.1} MiB peak during the broadcast",
        c.rss_before_mib, c.peak_rss_mib
    );
    println!(
        "  CPU during the roll-out      {:>7.1} s coordinator, {:.1} s agents",
        c.coordinator_cpu_seconds, c.agents_cpu_seconds
    );
    println!(
        "  one site's check             {:>7.3} s of one core ({sites} sites: {:.1} CPU-s)",
        r.verify_seconds_per_site,
        r.verify_seconds_per_site * sites as f64
    );
    println!(
        "  agents' process peak memory  {:>7.0} MiB (all {sites} sites)",
        r.agents_peak_rss_mib
    );
}
