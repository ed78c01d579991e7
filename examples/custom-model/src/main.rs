//! `gated-agent`: the Cohort agent, built with `GatedNet` as its model.
//!
//! ```sh
//! gated-agent init --inputs 13 --outputs 1 --out gated.init   # once, for the coordinator
//! gated-agent run --config agent.toml                          # at each site: the widths
//!                                                              # come from the schema
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cohort_agent::model::Shape;

#[derive(Parser)]
#[command(about = "A Cohort agent whose model is GatedNet (examples/custom-model)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the initial parameters for the coordinator's `model.init_file` and print the
    /// `[model]` table that goes with them.
    Init {
        /// Encoded inputs (what the schema gives: the coordinator's `model.inputs`).
        #[arg(long)]
        inputs: usize,
        /// Outputs: 1, or the number of classes of a multiclass task.
        #[arg(long, default_value_t = 1)]
        outputs: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Take part in a federation, as `cohort-agent run` does.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_target(false).init();
    let result = match Cli::parse().command {
        Command::Init {
            inputs,
            outputs,
            out,
        } => cohort_example_custom_model::initial(Shape { inputs, outputs }).and_then(
            |(bytes, n)| {
                std::fs::write(&out, bytes)?;
                println!(
                    "[model]\nkind = \"custom\"\nname = \"{}\"\nparameters = {n}\ninit_file = {:?}",
                    cohort_example_custom_model::NAME,
                    out.display().to_string()
                );
                Ok(())
            },
        ),
        Command::Run { config } => cohort_agent::AgentConfig::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| {
                let model = cohort_example_custom_model::model();
                tokio::runtime::Runtime::new()?
                    .block_on(cohort_agent::Agent::new(cfg).model(model).run())
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
