//! `cohort-coordinator`: run the coordinator, enrol its key, repair, export and watch it.
//! Certificate authority operations are `cohort-ca`'s, which the coordinator's host never needs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cohort_coordinator::{CoordinatorConfig, enrol};

#[derive(Debug, Parser)]
#[command(
    name = "cohort-coordinator",
    version,
    about = "The Cohort coordinator: federated rounds with secure aggregation",
    long_about = "The Cohort coordinator: runs federated training rounds with SecAgg+ secure \
        aggregation over gRPC with mutual TLS 1.3.\n\nExit codes: 0 success (run: finished or \
        stopped by SIGTERM); 1 a runtime failure a restart may fix (a round that failed all its \
        attempts); 2 invalid configuration or arguments (the file or anything it names: TLS \
        files, the token, a data_dir of another federation, a port in use); 4 the data \
        directory needs an operator (damaged, in use by another coordinator or a repair, or \
        changed under the running coordinator): the message says what to do, and a restart \
        cannot fix it. `status` has codes of its own (see `status --help`)."
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
    /// Make the coordinator's key and a certificate signing request on this host, for the
    /// consortium's CA (`cohort-ca sign --role coordinator FILE`). The key (DIR/key.pem)
    /// never leaves this host.
    Enroll {
        /// Names the coordinator is reached at (its certificate's subject alt names).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        names: Vec<String>,
        /// Directory for key.pem and request.csr.pem.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuild a damaged database from the round journal (or a damaged journal from the
    /// database) in the configuration's data_dir. Refused while the directory is in use (a
    /// coordinator holds its lock, or answers on the configured ports); a directory that
    /// would start as it is is left unchanged. What is replaced is kept (db.damaged-<time>,
    /// rounds.journal.before-repair-<time>) and `--undo` puts it back. Exit codes: 0
    /// repaired or nothing to repair, 2 configuration, 4 refused (the message says why).
    Repair {
        #[arg(long)]
        config: PathBuf,
        /// Undo the last repair: put back the database and journal it replaced (refused
        /// once rounds were committed after it).
        #[arg(long)]
        undo: bool,
    },
    /// Show a running coordinator's status, sites and last rounds (from its status API).
    /// Exit codes: 0 the run is progressing (or finished), 1 the API cannot be reached or
    /// refuses the token, 3 the run is stalled: no progress for --stalled-after seconds
    /// (waiting for sites included).
    Status {
        /// Base URL of the status API, e.g. http://127.0.0.1:7701 (https:// when the
        /// coordinator has `[status.tls]`; then give --ca-cert).
        #[arg(long, default_value = "http://127.0.0.1:7701")]
        url: String,
        /// PEM certificate of the CA that issued the status server's certificate (`status.tls`),
        /// for an https:// URL.
        #[arg(long, env = "COHORT_STATUS_CA_CERT", value_name = "PEM")]
        ca_cert: Option<PathBuf>,
        /// Bearer token (default: the COHORT_STATUS_TOKEN environment variable).
        #[arg(long, env = "COHORT_STATUS_TOKEN", hide_env_values = true)]
        token: String,
        /// Refresh every this many seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        /// Print the status, the sites and the last rounds as one JSON object (for scripts).
        #[arg(long)]
        json: bool,
        /// Seconds without progress after which the run counts as stalled (exit code 3);
        /// the default matches the CohortRunStalled alert.
        #[arg(long, value_name = "SECONDS", default_value_t = 900)]
        stalled_after: u64,
    },
    /// Write a global model checkpoint from the data directory as safetensors, in PyTorch's
    /// layout, with the whole preprocessing pipeline (README.md, "The model": loading it with
    /// PyTorch, numpy or `cohort-agent predict`). Works while the coordinator runs.
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
    let out = Report {
        json: matches!(cli.log_format, LogFormat::Json),
    };
    match cli.command {
        Command::Run {
            config,
            exit_when_done,
        } => {
            let config = match CoordinatorConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    return out.fail(&anyhow::anyhow!("{e}"), cohort_coordinator::EXIT_CONFIG);
                }
            };
            let after = if exit_when_done {
                cohort_coordinator::AfterFinish::Exit
            } else {
                cohort_coordinator::AfterFinish::Serve
            };
            match run(config, after, out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => out.fail(&e, cohort_coordinator::exit_code(&e)),
            }
        }
        Command::ExportModel {
            config,
            round,
            out: file,
        } => export(&config, round, &file, out),
        Command::Repair { config, undo } => repair(&config, undo, out),
        Command::Status {
            url,
            ca_cert,
            token,
            watch,
            json,
            stalled_after,
        } => status(&url, ca_cert.as_deref(), &token, watch, json, stalled_after),
        Command::Enroll { names, out: dir } => match enrol::coordinator_request(&dir, &names) {
            Ok(csr) => {
                println!(
                    "the coordinator's key is in {}; send {} to the consortium's CA, `cohort-ca sign --role coordinator` (never the key)",
                    dir.join("key.pem").display(),
                    csr.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => out.fail(&anyhow::anyhow!("{e}"), cohort_coordinator::EXIT_CONFIG),
        },
    }
}

/// Where the binary's own messages go: plain lines, or — with `--log-format json` — log
/// records like every other line, so a JSON log stays JSON to its last line.
#[derive(Debug, Clone, Copy)]
struct Report {
    json: bool,
}

impl Report {
    fn say(self, message: &str) {
        if self.json {
            tracing::info!("{message}");
        } else {
            println!("{message}");
        }
    }

    fn fail(self, e: &anyhow::Error, code: u8) -> ExitCode {
        if self.json {
            tracing::error!(exit_code = code, "{e:#}");
        } else {
            eprintln!("error: {e:#}");
        }
        ExitCode::from(code)
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

/// Something answering on one of the configured ports, as a reason to refuse a repair: the
/// directory's lock is the real guard, this also catches a coordinator that holds it from
/// another mount of the same directory.
fn port_answers(config: &CoordinatorConfig) -> Option<String> {
    let loopback = |mut a: std::net::SocketAddr| {
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        a
    };
    let ports = std::iter::once(("gRPC", config.listen))
        .chain(config.status.as_ref().map(|s| ("status", s.listen)))
        .filter(|(_, a)| a.port() != 0);
    for (what, addr) in ports {
        let addr = loopback(addr);
        if std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_ok() {
            return Some(format!(
                "something answers on the configured {what} port {addr}: a coordinator of this configuration may be running; stop it first (repair never acts on a data directory in use)"
            ));
        }
    }
    None
}

fn repair(config: &std::path::Path, undo: bool, out: Report) -> ExitCode {
    use cohort_coordinator::store::{RepairSource, Store};
    let config = match CoordinatorConfig::load(config) {
        Ok(c) => c,
        Err(e) => return out.fail(&anyhow::anyhow!("{e}"), cohort_coordinator::EXIT_CONFIG),
    };
    let identity = match cohort_coordinator::tls::first_cert_der(&config.tls.ca_cert) {
        Ok(ca) => cohort_coordinator::store::Identity::of(&ca, &config),
        Err(e) => return out.fail(&e.into(), cohort_coordinator::EXIT_CONFIG),
    };
    // The lock names the holder (its pid): asked first. The ports catch what a lock cannot
    // see (the same directory mounted on another host).
    if let Some(holder) = cohort_coordinator::lockfile::DirLock::holder(&config.data_dir) {
        let e = cohort_coordinator::store_problem(cohort_coordinator::store::StoreError::InUse {
            path: config.data_dir.clone(),
            holder: Some(holder),
        });
        return out.fail(&e, cohort_coordinator::exit_code(&e));
    }
    if let Some(why) = port_answers(&config) {
        return out.fail(
            &anyhow::anyhow!(
                "data_dir {}: {why}; nothing was changed",
                config.data_dir.display()
            ),
            cohort_coordinator::EXIT_STORAGE,
        );
    }
    if undo {
        return match Store::undo_repair(&config.data_dir, &identity) {
            Ok(r) => {
                out.say(&format!(
                    "undid the repair of unix time {}: {}{}; the directory is as it was before that repair",
                    r.at_unix,
                    r.moved_db
                        .map(|m| format!("the database is back from {m}"))
                        .unwrap_or_else(|| "the database it built is set aside".into()),
                    r.journal_backup
                        .map(|b| format!(", the journal is back from {b}"))
                        .unwrap_or_default(),
                ));
                ExitCode::SUCCESS
            }
            Err(e) => {
                let e = cohort_coordinator::store_problem(e);
                out.fail(&e, cohort_coordinator::exit_code(&e))
            }
        };
    }
    match Store::repair(&config.data_dir, &identity) {
        Ok(r) => {
            out.say(&match r.source {
                RepairSource::NothingToDo => format!(
                    "nothing to repair: the database and the round journal agree up to round {}; nothing was changed",
                    r.last_round
                ),
                RepairSource::Journal => format!(
                    "rebuilt the database from the round journal: rounds 0..={} committed{}; `repair --undo` puts it back",
                    r.last_round,
                    r.moved_aside
                        .map(|p| format!("; the damaged database is kept at {}", p.display()))
                        .unwrap_or_default()
                ),
                RepairSource::Database => format!(
                    "rewrote the round journal from the database: rounds 0..={} committed{}; `repair --undo` puts it back",
                    r.last_round,
                    r.journal_backup
                        .map(|p| format!("; the old journal is kept at {}", p.display()))
                        .unwrap_or_default()
                ),
            });
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e = cohort_coordinator::store_problem(e);
            out.fail(&e, cohort_coordinator::exit_code(&e))
        }
    }
}

fn export(
    config: &std::path::Path,
    round: Option<u64>,
    file: &std::path::Path,
    out: Report,
) -> ExitCode {
    let config = match CoordinatorConfig::load(config) {
        Ok(c) => c,
        Err(e) => return out.fail(&anyhow::anyhow!("{e}"), cohort_coordinator::EXIT_CONFIG),
    };
    match cohort_coordinator::export::export_model(&config, round, file) {
        Ok(x) => {
            out.say(&format!(
                "wrote {} ({} tensors): round {}, SHA3-512 {}",
                file.display(),
                x.tensors,
                x.round,
                x.sha3_512
            ));
            ExitCode::SUCCESS
        }
        Err(e) => out.fail(&e, cohort_coordinator::EXIT_TRANSIENT),
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

fn run(
    config: CoordinatorConfig,
    after: cohort_coordinator::AfterFinish,
    out: Report,
) -> Result<()> {
    cohort_coordinator::crash::install_panic_hook();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let Some(summary) = rt.block_on(cohort_coordinator::run_until(config, stop_signal(), after))?
    else {
        out.say("stopped: committed rounds are on disk; start again to resume");
        return Ok(());
    };
    if let Some(last) = &summary.last {
        let metric = |m: &cohort_protocols::model::metrics::Metrics| {
            m.headline()
                .map_or("no metric".to_string(), |(n, v)| format!("{n} {v:.4}"))
        };
        out.say(&format!(
            "finished {} rounds: {} (mean of sites), {} (pooled test sets), loss {:.4}{}",
            summary.rounds_completed,
            metric(&last.eval.site_mean),
            metric(&last.eval.weighted),
            last.eval.loss,
            last.eval
                .auc
                .map_or(String::new(), |a| format!(", AUC {a:.4}"))
        ));
    }
    Ok(())
}

/// Exit code of `status` for a run that has not progressed for `--stalled-after` seconds.
const EXIT_STALLED: u8 = 3;

fn status(
    url: &str,
    ca_cert: Option<&Path>,
    token: &str,
    watch: Option<u64>,
    json: bool,
    stalled_after: u64,
) -> ExitCode {
    use std::io::IsTerminal;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let base = url.trim_end_matches('/');
    // Screen control only for a person at a terminal; a pipe or a file gets plain blocks.
    let terminal = std::io::stdout().is_terminal();
    loop {
        let code = match rt.block_on(fetch_status(base, ca_cert, token)) {
            Ok(doc) => {
                if watch.is_some() {
                    if terminal && !json {
                        // Clear the screen and go home, like `watch`.
                        print!("\x1b[2J\x1b[H");
                    } else if !json {
                        println!("--- {} (unix time)", unix_now());
                    }
                }
                if json {
                    println!("{}", doc.json);
                } else {
                    print!("{}", status_text(&doc));
                }
                if doc.stalled_for(stalled_after).is_some() {
                    EXIT_STALLED
                } else {
                    0
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        };
        match watch {
            Some(secs) => std::thread::sleep(std::time::Duration::from_secs(secs.max(1))),
            None => return ExitCode::from(code),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `status` shows: the status document, the sites and the newest rounds.
#[derive(Debug)]
struct StatusDoc {
    status: serde_json::Value,
    sites: serde_json::Value,
    rounds: serde_json::Value,
    /// All three as one object (`--json`).
    json: serde_json::Value,
}

impl StatusDoc {
    /// Seconds without progress, when at least `limit` (a finished run never stalls).
    fn stalled_for(&self, limit: u64) -> Option<f64> {
        let idle = self.status["seconds_since_progress"].as_f64()?;
        (idle >= limit as f64).then_some(idle)
    }
}

async fn fetch_status(base: &str, ca_cert: Option<&Path>, token: &str) -> Result<StatusDoc> {
    use cohort_coordinator::status::client::get_with;
    let fetch = |path: String| async move {
        let (code, body) = get_with(&format!("{base}{path}"), Some(token), ca_cert).await?;
        if code != 200 {
            anyhow::bail!("{base}{path} answered {code}: {body}");
        }
        serde_json::from_str::<serde_json::Value>(&body)
            .with_context(|| format!("{base}{path} did not answer JSON"))
    };
    let status = fetch("/api/v1/status".into()).await?;
    let sites = fetch("/api/v1/sites".into()).await?;
    // The last five committed rounds.
    let completed = status["rounds_completed"].as_u64().unwrap_or(0);
    let after = completed.saturating_sub(5);
    let mut rounds = fetch(format!("/api/v1/rounds?per_page=5&after={after}")).await?;
    let rounds = rounds["rounds"].take();
    let json = serde_json::json!({
        "status": status,
        "sites": sites["sites"],
        "rounds": rounds,
    });
    Ok(StatusDoc {
        sites: json["sites"].clone(),
        rounds: json["rounds"].clone(),
        status: json["status"].clone(),
        json,
    })
}

/// A table whose columns are as wide as their widest cell: text left, numbers right.
fn table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    use std::fmt::Write;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                l.push_str(&" ".repeat(pad));
                l.push_str(cell);
            } else {
                l.push_str(cell);
                if i + 1 < cells.len() {
                    l.push_str(&" ".repeat(pad));
                }
            }
        }
        l
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The status, sites and last rounds as readable text.
fn status_text(doc: &StatusDoc) -> String {
    use std::fmt::Write;
    let s = &doc.status;
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
    let int = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |x| x.to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "state {}   round {} (attempt {}){}   rounds completed {}/{}   sites {}/{} (min_sites)",
        s["state"].as_str().unwrap_or("?"),
        int(&s["round"]),
        int(&s["attempt"]),
        s["stage"]
            .as_str()
            .map_or(String::new(), |st| format!(", stage {st}")),
        int(&s["rounds_completed"]),
        int(&s["rounds_total"]),
        int(&s["sites_connected"]),
        int(&s["sites_expected"]),
    );
    let _ = writeln!(
        out,
        "last round: accuracy {}  loss {}  AUC {}   no progress for {:.0} s   elapsed {:.0} s   remaining ~{}",
        num(&s["last_round"]["accuracy"]),
        num(&s["last_round"]["loss"]),
        num(&s["last_round"]["auc"]),
        s["seconds_since_progress"].as_f64().unwrap_or(0.0),
        s["elapsed_seconds"].as_f64().unwrap_or(0.0),
        s["estimated_remaining_seconds"]
            .as_f64()
            .map_or("?".to_string(), |x| format!("{x:.0} s")),
    );
    let _ = writeln!(
        out,
        "aggregation {}   federation manifest {}   coordinator {}",
        if s["secure_aggregation"] == false {
            "plain (the coordinator sees each update)"
        } else {
            "secure (SecAgg+)"
        },
        s["manifest_version"]
            .as_u64()
            .map_or("none".to_string(), |v| format!("v{v}")),
        s["coordinator_version"].as_str().unwrap_or("?"),
    );
    if let Some(r) = s["last_rollout"].as_object() {
        let _ = writeln!(
            out,
            "last roll-out: round {}'s model to {} sites, {} verified and reported, in {:.2} s",
            r.get("round").map_or("?".to_string(), int),
            r.get("sites").map_or("?".to_string(), int),
            r.get("acknowledged").map_or("?".to_string(), int),
            r.get("seconds").and_then(|x| x.as_f64()).unwrap_or(0.0),
        );
    }
    if let Some(f) = s["last_failure"].as_object() {
        let _ = writeln!(
            out,
            "rounds given up: {}   the last: round {}: {}",
            int(&s["rounds_failed"]),
            f.get("round").map_or("?".to_string(), int),
            f.get("reason").and_then(|r| r.as_str()).unwrap_or("?"),
        );
    }
    if let Some(reason) = s["stopped"].as_str() {
        let _ = writeln!(out, "training stopped: {reason}");
    }
    if let Some(p) = s["privacy"].as_object() {
        let _ = writeln!(
            out,
            "privacy: ε {} at δ {} (the largest site's)   sites out of budget {}/{}{}",
            p.get("epsilon").map_or("-".to_string(), num),
            p.get("delta")
                .and_then(|d| d.as_f64())
                .map_or("-".to_string(), |d| format!("{d:e}")),
            p.get("sites_exhausted").map_or("-".to_string(), int),
            p.get("sites").map_or("-".to_string(), int),
            p.get("target_epsilon")
                .and_then(|t| t.as_f64())
                .map_or(String::new(), |t| format!("   target ε {t}")),
        );
    }
    if let Some(p) = s["site_level_privacy"].as_object() {
        let _ = writeln!(
            out,
            "site-level privacy: ε {} of {} at δ {}   noise multiplier {} over {} survivors",
            p.get("epsilon").map_or("-".to_string(), num),
            p.get("budget").map_or("-".to_string(), num),
            p.get("delta")
                .and_then(|d| d.as_f64())
                .map_or("-".to_string(), |d| format!("{d:e}")),
            p.get("noise_multiplier").map_or("-".to_string(), num),
            p.get("min_survivors").map_or("-".to_string(), int),
        );
    }
    let sites: Vec<Vec<String>> = doc
        .sites
        .as_array()
        .into_iter()
        .flatten()
        .map(|site| {
            vec![
                site["name"].as_str().unwrap_or("?").to_string(),
                if site["connected"] == true {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
                int(&site["rounds_joined"]),
                int(&site["dropouts"]),
                int(&site["rejections"]),
                int(&site["bytes_received"]),
                int(&site["bytes_sent"]),
                num(&site["last_accuracy"]),
                site["last_seen_unix"]
                    .as_u64()
                    .map_or("never".to_string(), |t| {
                        format!("{} s ago", unix_now().saturating_sub(t))
                    }),
                site["certificate_expires_unix"]
                    .as_i64()
                    .map_or("-".to_string(), |t| {
                        let days = (t - unix_now() as i64).div_euclid(86_400);
                        // The dashboard's warning, as text: a site is locked out at expiry.
                        if days < 0 {
                            "EXPIRED".to_string()
                        } else if days < 30 {
                            format!("{days} d (renew!)")
                        } else {
                            format!("{days} d")
                        }
                    }),
                site["agent_version"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    let _ = writeln!(out);
    out.push_str(&table(
        &[
            "site",
            "connected",
            "rounds",
            "dropouts",
            "rejections",
            "received",
            "sent",
            "accuracy",
            "last seen",
            "certificate",
            "agent",
        ],
        &sites,
        &[
            false, false, true, true, true, true, true, true, true, true, false,
        ],
    ));
    // Why sites said no, or were refused: one line each, after the table (reasons are long).
    for site in doc.sites.as_array().into_iter().flatten() {
        let name = site["name"].as_str().unwrap_or("?");
        for (what, key) in [("declined", "last_decline"), ("refused", "last_rejection")] {
            if let Some(d) = site[key].as_object() {
                let _ = writeln!(
                    out,
                    "  {name} {what} round {}: {}",
                    d.get("round").map_or("?".to_string(), int),
                    d.get("reason").and_then(|r| r.as_str()).unwrap_or("?"),
                );
            }
        }
    }
    let rounds: Vec<Vec<String>> = doc
        .rounds
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = &r["summary"];
            vec![
                int(&s["round"]),
                if s["failed"].is_string() {
                    "given up"
                } else {
                    "committed"
                }
                .to_string(),
                int(&s["attempts"]),
                int(&s["sites"]),
                int(&s["dropped"]),
                s["seconds"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.2}")),
                num(&s["accuracy"]),
                num(&s["loss"]),
            ]
        })
        .collect();
    if !rounds.is_empty() {
        let _ = writeln!(out);
        out.push_str(&table(
            &[
                "round", "result", "attempts", "sites", "dropped", "seconds", "accuracy", "loss",
            ],
            &rounds,
            &[true, false, true, true, true, true, true, true],
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A run the sites' budgets ended: the terminal says so, and what was spent.
    #[test]
    fn the_status_text_says_why_training_stopped_and_what_privacy_was_spent() {
        let status = serde_json::json!({
            "state": "finished", "round": 9, "attempt": 0, "stage": null,
            "rounds_total": 60, "rounds_completed": 9, "sites_connected": 0,
            "sites_expected": 3, "last_round": null, "seconds_since_progress": 0.0,
            "elapsed_seconds": 3.0, "estimated_remaining_seconds": null,
            "last_failure": null,
            "stopped": "privacy budget: switzerland (ε = 2.899 of 3, next round 4.133) cannot afford another round",
            "privacy": { "epsilon": 2.9763, "delta": 1e-5, "target_epsilon": null, "sites": 4, "sites_exhausted": 2 },
            "site_level_privacy": { "epsilon": 7.5, "delta": 1e-5, "budget": 8.0, "noise_multiplier": 2.0, "min_survivors": 3 },
        });
        let doc = StatusDoc {
            status,
            sites: serde_json::json!([]),
            rounds: serde_json::json!([]),
            json: serde_json::Value::Null,
        };
        let text = status_text(&doc);
        assert!(
            text.contains("training stopped: privacy budget: switzerland"),
            "{text}"
        );
        assert!(
            text.contains(
                "privacy: ε 2.9763 at δ 1e-5 (the largest site's)   sites out of budget 2/4"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "site-level privacy: ε 7.5000 of 8.0000 at δ 1e-5   noise multiplier 2.0000 over 3 survivors"
            ),
            "{text}"
        );
    }

    /// The sites table warns of certificates about to lock their sites out, as the
    /// dashboard does, and the reasons sites gave follow it.
    #[test]
    fn the_status_text_warns_of_expiring_certificates_and_gives_the_sites_reasons() {
        let now = unix_now() as i64;
        let site = |name: &str, expires: i64| {
            serde_json::json!({
                "name": name, "connected": true, "rounds_joined": 3, "dropouts": 0,
                "rejections": 0, "bytes_received": 1, "bytes_sent": 1, "last_accuracy": 0.8,
                "last_seen_unix": now, "certificate_expires_unix": expires,
                "agent_version": "0.1.0", "last_decline": null, "last_rejection": null,
            })
        };
        let mut va = site("va", now + 10 * 86_400 + 60);
        va["last_decline"] =
            serde_json::json!({ "round": 4, "reason": "policy: too few neighbours" });
        let doc = StatusDoc {
            status: serde_json::json!({ "state": "training", "secure_aggregation": false, "manifest_version": 3 }),
            sites: serde_json::json!([
                site("cleveland", now + 200 * 86_400 + 60),
                va,
                site("hungary", now - 86_400),
            ]),
            rounds: serde_json::json!([]),
            json: serde_json::Value::Null,
        };
        let text = status_text(&doc);
        assert!(
            text.contains(
                "aggregation plain (the coordinator sees each update)   federation manifest v3"
            ),
            "{text}"
        );
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        assert!(line("cleveland").contains("200 d  0.1.0"), "{text}");
        assert!(line("va").contains("10 d (renew!)"), "{text}");
        assert!(line("hungary").contains("EXPIRED"), "{text}");
        assert!(
            text.contains("  va declined round 4: policy: too few neighbours"),
            "{text}"
        );
    }
}
