//! `cohort-sim`: many Cohort sites in one process, for benchmarks and simulations.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cohort_sim::{fl_bench, run, secagg_bench};

#[derive(Debug, Parser)]
#[command(
    name = "cohort-sim",
    version,
    about = "Simulate and benchmark Cohort federated rounds in one process",
    long_about = "Simulate and benchmark Cohort federated rounds in one process.\n\n\
        Exit codes: 0 success, 1 error (bad arguments or parameters), 3 the secure-aggregation \
        result was not exact."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one SecAgg+ round with N sites and a server in memory (no network) and report
    /// timings, bandwidth and whether the unmasked sum is exact.
    SecaggBench(secagg_bench::BenchArgs),
    /// Run a federated scenario: one coordinator and one agent per site in this process,
    /// over real gRPC and mutual TLS on 127.0.0.1. Writes summary.json, rounds.csv and
    /// accuracy.png to --out.
    Run(run::RunArgs),
    /// Benchmark federated rounds at scale: N synthetic sites send random updates of a
    /// P-parameter model over mTLS gRPC; reports seconds per round, secure against plain, and
    /// the coordinator's peak RSS (its own process).
    FlBench(fl_bench::FlBenchArgs),
    /// Measure a model roll-out: how long N sites take to receive, verify and acknowledge a
    /// new P-parameter model over mTLS gRPC, with the coordinator's memory meanwhile.
    Rollout(cohort_sim::rollout::RolloutArgs),
    /// Generate a learnable image dataset (four classes of strokes, PNG, one ImageFolder per
    /// site) for CNN scenarios such as examples/shapes-cnn.toml.
    GenImages(cohort_sim::shapes::GenArgs),
    /// Run a share of N synthetic sites against a running coordinator (a load test across
    /// machines: one share per pod of an indexed Kubernetes Job).
    Load(cohort_sim::load::LoadArgs),
    /// Run the real coordinator and four real agents (separate processes, the shipped
    /// hospitals) for thousands of short rounds, with every site away for a while and a
    /// restart at the end; report the coordinator's memory and disk at given rounds.
    Soak(cohort_sim::soak::SoakArgs),
    /// Internal: one process of `fl-bench` (the coordinator, or all the agents).
    #[command(hide = true)]
    FlBenchRole(fl_bench::RoleArgs),
}

/// Colour codes only on a terminal, and never with NO_COLOR set.
fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::SecaggBench(args) => secagg_bench::main(&args),
        Command::GenImages(args) => cohort_sim::shapes::main(&args),
        Command::Load(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .init();
            cohort_sim::load::main(&args)
        }
        Command::FlBench(args) => fl_bench::main(&args),
        Command::Rollout(args) => cohort_sim::rollout::main(&args),
        Command::Soak(args) => cohort_sim::soak::main(&args),
        Command::FlBenchRole(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(colour(std::io::stderr().is_terminal()))
                .init();
            fl_bench::role(&args)
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                        tracing_subscriber::EnvFilter::new("warn,cohort_coordinator=info")
                    }),
                )
                .with_ansi(colour(std::io::stdout().is_terminal()))
                .init();
            run::main(&args)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
