//! `cohort-coordinator`: run the coordinator, or provision certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cohort_coordinator::{CoordinatorConfig, provision};

#[derive(Debug, Parser)]
#[command(
    name = "cohort-coordinator",
    version,
    about = "The Cohort coordinator: federated rounds with secure aggregation",
    long_about = "The Cohort coordinator: runs federated training rounds with SecAgg+ secure \
        aggregation over gRPC with mutual TLS 1.3.\n\nExit codes: 0 success, 1 runtime error, \
        2 invalid configuration or arguments."
)]
struct Cli {
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve agents and run the configured rounds.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Exit when the last round is committed. Without it the coordinator keeps serving
        /// the status API (and tells joining agents that training is over) until SIGTERM.
        #[arg(long)]
        exit_when_done: bool,
    },
    /// Create a project CA, the coordinator's certificate and one bundle per site; add a
    /// site to an existing project; renew or revoke a site's certificate.
    Provision {
        /// Output directory (created; existing keys are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated site names, e.g. hospital-a,hospital-b.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present_any = ["add_site", "renew", "revoke"]
        )]
        sites: Vec<String>,
        /// Add one site to the existing CA in --out.
        #[arg(long, conflicts_with_all = ["sites", "renew", "revoke"])]
        add_site: Option<String>,
        /// Issue this site a new key and certificate in its bundle; the old certificate is
        /// revoked as superseded (registry and CRL in --out/coordinator).
        #[arg(long, conflicts_with_all = ["sites", "revoke"])]
        renew: Option<String>,
        /// Revoke this site's certificate (registry and CRL in --out/coordinator).
        #[arg(long, conflicts_with = "sites")]
        revoke: Option<String>,
        /// Validity of new certificates, in days (the CA gets ten years, or more).
        #[arg(long, default_value_t = provision::DEFAULT_VALIDITY_DAYS)]
        validity_days: u32,
        /// Names the coordinator is reached at (certificate subject alt names).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        coordinator_names: Vec<String>,
        /// URL written into each agent.toml.
        #[arg(long, default_value = "https://localhost:7700")]
        coordinator_url: String,
    },
    /// Rebuild a damaged database from the round journal (or a damaged journal from the
    /// database) in the configuration's data_dir. The coordinator must not be running. The
    /// damaged database is kept beside the new one as db.damaged-<time>.
    Repair {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running coordinator's status and sites (from its status API).
    Status {
        /// Base URL of the status API, e.g. http://127.0.0.1:7701.
        #[arg(long, default_value = "http://127.0.0.1:7701")]
        url: String,
        /// Bearer token (default: the COHORT_STATUS_TOKEN environment variable).
        #[arg(long, env = "COHORT_STATUS_TOKEN", hide_env_values = true)]
        token: String,
        /// Refresh every this many seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Write a global model checkpoint from the data directory as safetensors, in PyTorch's
    /// layout (see docs/configuration.md for loading it).
    ExportModel {
        /// The coordinator's configuration (for data_dir, the CA, the key and the model).
        #[arg(long)]
        config: PathBuf,
        /// Round whose model to export (default: the latest). 0 is the initial model.
        #[arg(long)]
        round: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run {
            config,
            exit_when_done,
        } => {
            let config = match CoordinatorConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let after = if exit_when_done {
                cohort_coordinator::AfterFinish::Exit
            } else {
                cohort_coordinator::AfterFinish::Serve
            };
            match run(config, after) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e)
                    if e.chain()
                        .any(|c| c.is::<cohort_coordinator::ConfigProblem>()) =>
                {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::ExportModel { config, round, out } => export(&config, round, &out),
        Command::Repair { config } => repair(&config),
        Command::Status { url, token, watch } => status(&url, &token, watch),
        Command::Provision {
            out,
            sites,
            add_site,
            renew,
            revoke,
            validity_days,
            coordinator_names,
            coordinator_url,
        } => {
            let (result, done) = match (add_site, renew, revoke) {
                (Some(site), _, _) => (
                    provision::add_site(
                        &out,
                        &site,
                        &coordinator_url,
                        &coordinator_names,
                        validity_days,
                    ),
                    format!("added site {site}"),
                ),
                (_, Some(site), _) => (
                    provision::renew(&out, &site, validity_days),
                    format!(
                        "renewed site {site}: send it sites/{site}/cert.pem and key.pem; its old certificate is revoked"
                    ),
                ),
                (_, _, Some(site)) => (
                    provision::revoke(&out, &site),
                    format!("revoked site {site}"),
                ),
                _ => (
                    provision::provision(&provision::ProvisionOptions {
                        out: out.clone(),
                        sites,
                        coordinator_names,
                        coordinator_url,
                        validity_days,
                    }),
                    "provisioned".to_string(),
                ),
            };
            match result {
                Ok(()) => {
                    println!("{done}: {} (keep ca.key offline)", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn repair(config: &std::path::Path) -> ExitCode {
    let config = match CoordinatorConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let identity = match cohort_coordinator::tls::first_cert_der(&config.tls.ca_cert) {
        Ok(ca) => cohort_coordinator::store::Identity::new(
            &ca,
            config.model.spec().describe(),
            config.schema.hash(),
        ),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cohort_coordinator::store::Store::repair(&config.data_dir, &identity) {
        Ok(r) => {
            match r.source {
                cohort_coordinator::store::RepairSource::Journal => println!(
                    "rebuilt the database from the round journal: rounds 0..={} committed{}",
                    r.last_round,
                    r.moved_aside
                        .map(|p| format!("; the damaged database is kept at {}", p.display()))
                        .unwrap_or_default()
                ),
                cohort_coordinator::store::RepairSource::Database => println!(
                    "rewrote the round journal from the database: rounds 0..={} committed",
                    r.last_round
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn export(config: &std::path::Path, round: Option<u64>, out: &std::path::Path) -> ExitCode {
    let config = match CoordinatorConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cohort_coordinator::export::export_model(&config, round, out) {
        Ok(x) => {
            println!(
                "wrote {} ({} tensors): round {}, SHA3-512 {}",
                out.display(),
                x.tensors,
                x.round,
                x.sha3_512
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Text logs carry colour only on a terminal (and never with NO_COLOR set), so files and
/// journald get plain lines; JSON logs are one object per line.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .init(),
    }
}

fn run(config: CoordinatorConfig, after: cohort_coordinator::AfterFinish) -> Result<()> {
    cohort_coordinator::crash::install_panic_hook();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let Some(summary) = rt.block_on(cohort_coordinator::run_until(config, stop_signal(), after))?
    else {
        println!("stopped: committed rounds are on disk; start again to resume");
        return Ok(());
    };
    if let Some(last) = summary.rounds.last() {
        let metric = |m: &cohort_protocols::model::metrics::Metrics| {
            m.headline()
                .map_or("no metric".to_string(), |(n, v)| format!("{n} {v:.4}"))
        };
        println!(
            "finished {} rounds: {} (mean of sites), {} (pooled test sets), loss {:.4}{}",
            summary.rounds.len(),
            metric(&last.eval.site_mean),
            metric(&last.eval.weighted),
            last.eval.loss,
            last.eval
                .auc
                .map_or(String::new(), |a| format!(", AUC {a:.4}"))
        );
    }
    Ok(())
}

fn status(url: &str, token: &str, watch: Option<u64>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let base = url.trim_end_matches('/');
    loop {
        match rt.block_on(status_table(base, token)) {
            Ok(table) => {
                if watch.is_some() {
                    // Clear the screen and go home, like `watch`.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{table}");
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                if watch.is_none() {
                    return ExitCode::from(1);
                }
            }
        }
        match watch {
            Some(secs) => std::thread::sleep(std::time::Duration::from_secs(secs.max(1))),
            None => return ExitCode::SUCCESS,
        }
    }
}

/// The status and the sites as a readable table.
async fn status_table(base: &str, token: &str) -> Result<String> {
    use cohort_coordinator::status::client::get;
    use std::fmt::Write;
    let fetch = |path: &'static str| async move {
        let (code, body) = get(&format!("{base}{path}"), Some(token)).await?;
        if code != 200 {
            anyhow::bail!("{base}{path} answered {code}: {body}");
        }
        serde_json::from_str::<serde_json::Value>(&body)
            .with_context(|| format!("{base}{path} did not answer JSON"))
    };
    let s = fetch("/api/v1/status").await?;
    let sites = fetch("/api/v1/sites").await?;
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "state {}   round {} (attempt {}){}   rounds {}/{}   sites {}/{}",
        s["state"].as_str().unwrap_or("?"),
        s["round"],
        s["attempt"],
        s["stage"]
            .as_str()
            .map_or(String::new(), |st| format!(", stage {st}")),
        s["rounds_completed"],
        s["rounds_total"],
        s["sites_connected"],
        s["sites_expected"],
    );
    let _ = writeln!(
        out,
        "last round: accuracy {}  loss {}  AUC {}   elapsed {:.0} s   remaining ~{}",
        num(&s["last_round"]["accuracy"]),
        num(&s["last_round"]["loss"]),
        num(&s["last_round"]["auc"]),
        s["elapsed_seconds"].as_f64().unwrap_or(0.0),
        s["estimated_remaining_seconds"]
            .as_f64()
            .map_or("?".to_string(), |x| format!("{x:.0} s")),
    );
    let _ = writeln!(
        out,
        "\n{:<24} {:>9} {:>7} {:>8} {:>12} {:>12} {:>9}",
        "site", "connected", "rounds", "dropouts", "received", "sent", "accuracy"
    );
    for site in sites["sites"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>7} {:>8} {:>12} {:>12} {:>9}",
            site["name"].as_str().unwrap_or("?"),
            if site["connected"] == true {
                "yes"
            } else {
                "no"
            },
            site["rounds_joined"],
            site["dropouts"],
            site["bytes_received"],
            site["bytes_sent"],
            num(&site["last_accuracy"]),
        );
    }
    Ok(out)
}
