//! `cohort-agent`: the site side of Cohort.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cohort_agent::AgentConfig;

#[derive(Debug, Parser)]
#[command(
    name = "cohort-agent",
    version,
    about = "The Cohort agent: trains the global model on this site's data",
    long_about = "The Cohort agent: dials out to the coordinator (a site opens no inbound port), \
        trains the global model on local data and sends back only a masked update.\n\n\
        Exit codes: 0 training finished, 1 runtime error, 2 invalid configuration, \
        3 refused: permanent failures in a row (foreign CA, refused certificate, schema \
        mismatch; see the log for what to fix)."
)]
struct Cli {
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the coordinator and take part in rounds until training finishes.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Score a CSV with a model exported by `cohort-coordinator export-model`: one line per
    /// usable row (file line, probability, prediction, and the label when the CSV has it),
    /// then accuracy and AUC on standard error. Exit 1 when the model or the CSV is unusable.
    Predict {
        /// The exported .safetensors file.
        #[arg(long)]
        model: PathBuf,
        /// A CSV with the columns of the federation's schema (the label column is optional).
        #[arg(long, required_unless_present = "images", conflicts_with = "images")]
        csv: Option<PathBuf>,
        /// Images, for a model trained on images: a folder of class folders or a manifest
        /// (CSV of path,label).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Write the scores here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make this site's key and a certificate signing request for the consortium's CA. The
    /// key (DIR/key.pem) never leaves this machine; send DIR/request.csr.pem to the CA, which
    /// answers with a bundle (certificate, CA certificate, manifest, agent.toml) to unpack
    /// into DIR. Run it again for a renewal, into a new directory.
    Enroll {
        /// The site's name, as the federation will know it (letters, digits, '-', '_').
        #[arg(long)]
        name: String,
        /// Directory for key.pem and request.csr.pem (created; an existing key is never
        /// overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show this site's identity, the federation manifest it pins (version, members and
    /// their keys) and its trust policy, from its files: no coordinator needed.
    Status {
        #[arg(long)]
        config: PathBuf,
    },
    /// Vouch for a new manifest version (needed where sites set policy.manifest_quorum):
    /// checks the CA's signature, prints what it adds, re-keys and removes against the
    /// manifest this site pins, and writes this site's countersignature for the CA
    /// (`cohort-ca countersign`). Read the changes before sending the file.
    Countersign {
        #[arg(long)]
        config: PathBuf,
        /// The new manifest.toml from the CA.
        #[arg(long)]
        manifest: PathBuf,
        /// Where to write the countersignature.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // status, countersign and enroll print a report of their own: log lines would only
    // interleave with it on standard output.
    if !matches!(
        cli.command,
        Command::Status { .. } | Command::Countersign { .. } | Command::Enroll { .. }
    ) {
        init_logging(cli.log_format);
    }
    let config = match cli.command {
        Command::Run { config } => config,
        Command::Predict {
            model,
            csv,
            images,
            out,
        } => return predict(&model, csv.as_deref(), images.as_deref(), out.as_deref()),
        Command::Status { config } => {
            return match AgentConfig::load(&config)
                .map_err(anyhow::Error::from)
                .and_then(|c| cohort_agent::status_report(&c))
            {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Countersign {
            config,
            manifest,
            out,
        } => {
            let signed = AgentConfig::load(&config)
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    let bytes = std::fs::read(&manifest)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", manifest.display()))?;
                    let (changes, file) = cohort_agent::countersign(&c, &bytes)?;
                    std::fs::write(&out, file)
                        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
                    Ok(changes)
                });
            return match signed {
                Ok(changes) => {
                    print!("{changes}");
                    println!(
                        "countersigned: send {} to the CA (it holds no secret)",
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Enroll { name, out } => {
            return match cohort_agent::certificate_request(&out, &name) {
                Ok(csr) => {
                    println!(
                        "site {name}: key in {}, request in {} (send the request to the consortium's CA; never the key)",
                        out.join("key.pem").display(),
                        csr.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
    };
    // With JSON logs the last word is a log record too: a log pipeline reads every line.
    let json = matches!(cli.log_format, LogFormat::Json);
    let fail = |message: String, code: u8| {
        if json {
            tracing::error!(exit_code = code, "{message}");
        } else {
            eprintln!("error: {message}");
        }
        ExitCode::from(code)
    };
    let config = match AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string(), 2),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("starting the async runtime: {e}"), 1),
    };
    // SIGTERM (a service manager, a container runtime: as PID 1 a signal without a handler
    // would be ignored) and Ctrl-C end the agent at once with exit 0. Nothing is lost: the
    // site holds no state the coordinator needs, and the round in progress goes on without it.
    let stopped = rt.block_on(async {
        tokio::select! {
            r = cohort_agent::run(config) => Some(r),
            () = stop_signal() => None,
        }
    });
    let Some(result) = stopped else {
        // The session was dropped with the future: give the connection a moment to tell the
        // coordinator the stream has ended, instead of vanishing mid-stream.
        rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(200)).await });
        tracing::info!("stopped by a signal");
        return ExitCode::SUCCESS;
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cohort_agent::ConfigProblem>() => fail(format!("{e:#}"), 2),
        Err(e) if e.is::<cohort_agent::GaveUp>() => {
            fail(format!("{e:#}"), cohort_agent::EXIT_REFUSED)
        }
        Err(e) => fail(format!("{e:#}"), 1),
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

fn predict(
    model: &std::path::Path,
    csv: Option<&std::path::Path>,
    images: Option<&std::path::Path>,
    out: Option<&std::path::Path>,
) -> ExitCode {
    use cohort_agent::data::images::ImageSource;
    let scored = cohort_agent::predict::ExportedModel::read(model).and_then(|m| {
        let s = match (csv, images) {
            (Some(csv), _) => m.score(csv)?,
            (None, Some(p)) if p.is_dir() => m.score_images(&ImageSource::Folder(p.into()))?,
            (None, Some(p)) => m.score_images(&ImageSource::Manifest(p.into()))?,
            (None, None) => anyhow::bail!("give --csv or --images"),
        };
        Ok((m, s))
    });
    let (m, scored) = match scored {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let text = predictions_csv(&m, &scored);
    let written = match out {
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| format!("writing {}: {e}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    };
    if let Err(e) = written {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    eprintln!(
        "scored {} rows with the round-{} model ({} inputs){}",
        scored.rows.len(),
        m.round,
        m.inputs.len(),
        if scored.dropped.is_empty() {
            String::new()
        } else {
            format!(
                "; {} rows dropped for missing values (lines {:?})",
                scored.dropped.len(),
                scored.dropped
            )
        }
    );
    if let Some(e) = scored.evaluation {
        let metrics = serde_json::to_string(&e.metrics()).unwrap_or_default();
        eprintln!(
            "on {} labelled rows: loss {:.4}, metrics {metrics}",
            e.examples, e.loss
        );
    }
    ExitCode::SUCCESS
}

/// The predictions as CSV. Binary: `line,probability,prediction[,label]` (0/1);
/// multiclass: `line,prediction,p_<class>…[,label]` with class names; regression:
/// `line,prediction[,label]` in the label's units.
fn predictions_csv(
    m: &cohort_agent::predict::ExportedModel,
    scored: &cohort_agent::predict::Scored,
) -> String {
    use cohort_protocols::model::Task;
    use std::fmt::Write;
    let labelled = scored.evaluation.is_some();
    let names = m.schema.task.class_names();
    let class = |i: f64| names.get(i as usize).cloned().unwrap_or_default();
    let mut text = match &m.schema.task {
        Task::Binary { .. } => String::from("line,probability,prediction"),
        Task::Multiclass { .. } => {
            let mut h = String::from("line,prediction");
            for n in &names {
                let _ = write!(h, ",p_{n}");
            }
            h
        }
        Task::Regression { .. } => String::from("line,prediction"),
    };
    if labelled {
        text.push_str(",label");
    }
    if !scored.files.is_empty() {
        text = text.replacen("line,", "line,image,", 1);
    }
    text.push('\n');
    for r in &scored.rows {
        let _ = match &m.schema.task {
            Task::Binary { .. } => write!(
                text,
                "{},{:.6},{}",
                r.line,
                r.probabilities.first().copied().unwrap_or(f32::NAN),
                r.prediction
            ),
            Task::Multiclass { .. } => {
                let _ = write!(text, "{}", r.line);
                if let Some(f) = r.line.checked_sub(1).and_then(|i| scored.files.get(i)) {
                    let _ = write!(text, ",{f}");
                }
                let _ = write!(text, ",{}", class(r.prediction));
                r.probabilities
                    .iter()
                    .try_for_each(|p| write!(text, ",{p:.6}"))
            }
            Task::Regression { .. } => write!(text, "{},{}", r.line, r.prediction),
        };
        if let Some(y) = r.label {
            let _ = match &m.schema.task {
                Task::Multiclass { .. } => write!(text, ",{}", class(y)),
                _ => write!(text, ",{y}"),
            };
        }
        text.push('\n');
    }
    text
}
