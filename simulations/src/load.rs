//! `cohort-sim load`: a share of N simulated sites against a running coordinator, so a load
//! test can outgrow one machine — an indexed Kubernetes Job runs one share per pod
//! (`deploy/kubernetes/overlays/loadtest`).
//!
//! The sites are `fl-bench`'s synthetic ones (the agent's own session code, TLS, SecAgg+ and
//! all, with a random update instead of training), site `i` using the bundle
//! `PKI/sites/site-NNN` that `cohort-ca demo --sites site-000,site-001,…` wrote. The coordinator
//! must run the matching synthetic model: an MLP over 16 inputs with the schema of
//! `deploy/kubernetes/overlays/loadtest/coordinator.toml`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use cohort_agent::LocalSite;

use crate::fl_bench::{SyntheticSite, schema, site_name};
use crate::run::{agent_config, table};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The coordinator's gRPC URL, e.g. https://cohort-grpc:7700.
    #[arg(long)]
    pub coordinator: String,
    /// The name in the coordinator's certificate (default: the URL's host).
    #[arg(long)]
    pub server_name: Option<String>,
    /// `cohort-ca demo`'s output folder: holds `sites/site-000/`, `sites/site-001/`, ….
    #[arg(long)]
    pub pki: PathBuf,
    /// Sites in the whole load test (across every shard).
    #[arg(long)]
    pub sites: usize,
    /// This process's share: the sites i with i mod shards = shard. In an indexed Job it is
    /// the pod's index.
    #[arg(long, env = "JOB_COMPLETION_INDEX", default_value_t = 0)]
    pub shard: usize,
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
}

/// The sites of this shard.
pub fn share(args: &LoadArgs) -> Vec<usize> {
    (0..args.sites)
        .filter(|i| i % args.shards.max(1) == args.shard)
        .collect()
}

/// Runs this shard's sites until the coordinator finishes training; fails if any site does.
pub async fn run(args: &LoadArgs) -> Result<()> {
    if args.shards == 0 || args.shard >= args.shards {
        bail!(
            "--shard {} of --shards {}: the shard must be below the number of shards",
            args.shard,
            args.shards
        );
    }
    let schema = schema();
    let mut agents = Vec::new();
    for i in share(args) {
        let name = site_name(i);
        let data = table(vec![("csv", toml::Value::String("synthetic.csv".into()))]);
        let bundle = args.pki.join("sites").join(&name);
        if !bundle.is_dir() {
            bail!(
                "{} is missing: make the load test's sites with `cohort-ca demo` as site-000 … site-{:03}",
                bundle.display(),
                args.sites - 1
            );
        }
        let mut cfg = agent_config(&name, &bundle, 1, data, &schema, Vec::new())?;
        cfg.coordinator.url = args.coordinator.clone();
        cfg.coordinator.server_name = args.server_name.clone();
        let site: Arc<dyn LocalSite> = Arc::new(SyntheticSite { seed: i as u64 });
        agents.push((name, tokio::spawn(cohort_agent::run_site(cfg, site))));
    }
    let mut failed = Vec::new();
    for (name, a) in agents {
        match a.await.context("agent task")? {
            Ok(()) => {}
            Err(e) => failed.push(format!("{name}: {e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{} sites failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

pub fn main(args: &LoadArgs) -> Result<std::process::ExitCode> {
    let n = share(args).len();
    tokio::runtime::Runtime::new()?.block_on(run(args))?;
    println!(
        "shard {} of {}: {n} sites took part until training finished",
        args.shard, args.shards
    );
    Ok(std::process::ExitCode::SUCCESS)
}
