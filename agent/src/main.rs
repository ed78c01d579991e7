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
        Exit codes: 0 training finished, 1 runtime error, 2 invalid configuration."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the coordinator and take part in rounds until training finishes.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Command::Run { config } = Cli::parse().command;
    let config = match AgentConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cohort_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
