//! `cohort-sim soak`: the coordinator as a long-running service, measured.
//!
//! The real `cohort-coordinator` and four real `cohort-agent` processes (the shipped
//! heart-disease hospitals, secure, short rounds) run `--rounds` rounds. The coordinator's
//! resident memory, its database and its round journal are read when the run passes each of
//! `--at` (default 100, 1000, 10000), once every hospital has been away for `--away-secs`
//! (all agents stopped with SIGTERM at round `--away-at`, then started again), and after the
//! coordinator is stopped and started again at the end. A coordinator that keeps every round
//! in memory shows it as memory growing with rounds; one that exits when its sites are away
//! shows it as a failure here.
//!
//! With `--kill-every K` the coordinator is also killed with SIGKILL every K rounds (mid-round,
//! wherever it is) and started again on the same data directory. With `--site-level-dp z`
//! every hospital adds site-level noise under secure aggregation (`[privacy.site_level]`,
//! budget out of reach), and at the end the coordinator's ε is checked against an independent
//! recomputation from the journal's rounds: one noisy sum per completed round, over its
//! survivors — a restart that forgot the account, or counted a sum twice, shows as a
//! mismatch (exit 1).
//!
//! Binaries are taken from beside this one (`cargo build --release` builds all three).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::fl_bench::rss_mib_of;

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    #[arg(long, default_value_t = 10_000)]
    pub rounds: u64,
    /// Rounds at which to read memory and disk (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub at: Vec<u64>,
    /// Stop every agent at this round (0: never) ...
    #[arg(long, default_value_t = 5_000)]
    pub away_at: u64,
    /// ... for this many seconds, then start them again.
    #[arg(long, default_value_t = 900)]
    pub away_secs: u64,
    /// The hospitals' CSVs (cleveland.csv, hungary.csv, switzerland.csv, va.csv).
    #[arg(long, default_value = "data/heart-disease")]
    pub data: PathBuf,
    #[arg(long, default_value = "runs/soak")]
    pub out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Kill the coordinator with SIGKILL every this many rounds and start it again (0: never).
    #[arg(long, default_value_t = 0)]
    pub kill_every: u64,
    /// Site-level DP with this noise multiplier (`[privacy.site_level]`, clip 1, a budget
    /// out of reach); the final ε is checked against the journal.
    #[arg(long)]
    pub site_level_dp: Option<f64>,
}

/// One reading of the coordinator.
#[derive(Debug, Serialize)]
pub struct Sample {
    /// What was going on: "round 1000", "after 900 s with every site away", "after a restart".
    pub when: String,
    pub rounds_completed: u64,
    pub rss_mib: f64,
    /// Bytes of `data_dir/db` (sled) and of the round journal.
    pub db_bytes: u64,
    pub journal_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rounds: u64,
    pub samples: Vec<Sample>,
    pub wall_seconds: f64,
    /// Seconds per round over the whole run, the time away excepted.
    pub seconds_per_round: f64,
    /// Disk growth per round between the first and the last sample taken while running.
    pub db_bytes_per_round: f64,
    pub journal_bytes_per_round: f64,
    /// The coordinator's peak RSS over its first run (`VmHWM`).
    pub peak_rss_mib: f64,
    /// Exit code of the coordinator on SIGTERM, both times (0 expected).
    pub exits: Vec<Option<i32>>,
    /// SIGKILLs of the coordinator (`--kill-every`).
    pub kills: u64,
    /// `--site-level-dp`: the coordinator's ε after the last round, and the same recomputed
    /// from the journal's rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_epsilon: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_epsilon_expected: Option<f64>,
}

const TOKEN: &str = "cohort-soak-status-token-0123456789";
const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace (cargo build --release builds all three binaries)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

struct Run {
    coordinator_exe: PathBuf,
    agent_exe: PathBuf,
    out: PathBuf,
    config: PathBuf,
    data_dir: PathBuf,
    status: u16,
    rt: tokio::runtime::Runtime,
}

impl Run {
    fn coordinator(&self, log: &str) -> Result<Child> {
        let log = std::fs::File::create(self.out.join(log))?;
        Command::new(&self.coordinator_exe)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cohort-coordinator")
    }

    fn agents(&self) -> Result<Vec<Child>> {
        SITES
            .iter()
            .map(|site| {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.out.join(format!("{site}.log")))?;
                Command::new(&self.agent_exe)
                    .args(["run", "--config"])
                    .arg(self.out.join("pki/sites").join(site).join("agent.toml"))
                    .env("RUST_LOG", "warn")
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting cohort-agent")
            })
            .collect()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/status", self.status);
        let (code, body) = self
            .rt
            .block_on(cohort_coordinator::status::client::get(&url, Some(TOKEN)))
            .ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    fn completed(&self) -> Option<u64> {
        self.status()?["rounds_completed"].as_u64()
    }

    fn sample(&self, pid: u32, when: String) -> Sample {
        Sample {
            when,
            rounds_completed: self.completed().unwrap_or(0),
            rss_mib: rss_mib_of(&pid.to_string(), "VmRSS:"),
            db_bytes: dir_bytes(&self.data_dir.join("db")),
            journal_bytes: dir_bytes(&self.data_dir.join(cohort_coordinator::journal::JOURNAL)),
        }
    }

    /// Waits for round `at`, kills the coordinator with SIGKILL wherever it is, and starts it
    /// again on the same data directory (its log: `coordinator-{kills}.log`).
    fn kill_and_restart(&self, c: &mut Child, at: u64, kills: &mut u64) -> Result<()> {
        self.wait_rounds(c, at)?;
        let _ = c.kill();
        let _ = c.wait();
        *kills += 1;
        *c = self.coordinator(&format!("coordinator-{kills}.log"))?;
        Ok(())
    }

    /// Waits for `rounds` committed rounds, failing if the coordinator exits meanwhile.
    fn wait_rounds(&self, c: &mut Child, rounds: u64) -> Result<()> {
        loop {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "the coordinator exited ({status}) before round {rounds}: see {}",
                    self.out.join("coordinator.log").display()
                );
            }
            if self.completed().is_some_and(|n| n >= rounds) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

fn stop_all(children: &mut Vec<Child>) {
    for c in children.iter() {
        sigterm(c);
    }
    for mut c in children.drain(..) {
        let _ = c.wait();
    }
}

pub fn main(args: &SoakArgs) -> Result<ExitCode> {
    let coordinator_exe = sibling("cohort-coordinator")?;
    let agent_exe = sibling("cohort-agent")?;
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("clearing {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let (port, status) = (free_port()?, free_port()?);
    let pki = out.join("pki");
    cohort_ca::demo_keys::provision(&cohort_ca::demo_keys::ProvisionOptions {
        out: pki.clone(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        coordinator_names: vec!["localhost".into()],
        coordinator_url: format!("https://127.0.0.1:{port}"),
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
    })?;
    for site in SITES {
        let csv = args.data.join(format!("{site}.csv"));
        std::fs::copy(&csv, pki.join("sites").join(site).join("data.csv"))
            .with_context(|| format!("copying {}", csv.display()))?;
        // Four hospitals have three others; the agent's default asks for 5 live others.
        let toml = pki.join("sites").join(site).join("agent.toml");
        let text = std::fs::read_to_string(&toml)?;
        std::fs::write(
            &toml,
            format!("{text}\n[policy]\nmin_live_neighbours = 2\n"),
        )?;
    }
    let data_dir = out.join("coordinator-data");
    let config = out.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"
data_dir = {data_dir:?}
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
crl = {crl:?}
registry = {registry:?}
manifest = {manifest:?}
[rounds]
count = {rounds}
min_sites = 4
wait_for_sites_secs = 60
stage_timeout_secs = 60
train_timeout_secs = 60
[status]
listen = "127.0.0.1:{status}"
token = "{TOKEN}"
[secagg]
max_weight = 1000
[model]
kind = "logreg"
[schema]
label = {{ column = "num", greater_than = 0 }}
features = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
categorical = {{ cp = [1, 2, 3, 4], restecg = [0, 1, 2] }}
missing = "drop_row"
[training]
optimizer = "adam"
learning_rate = 0.001
batch_size = 8
local_steps = 2
"#,
            ca = pki.join("coordinator/ca.pem"),
            cert = pki.join("coordinator/cert.pem"),
            key = pki.join("coordinator/key.pem"),
            crl = pki.join("coordinator/crl.pem"),
            registry = pki.join("coordinator/registry.toml"),
            manifest = pki.join("coordinator/manifest.toml"),
            rounds = args.rounds,
        ) + &args.site_level_dp.map_or(String::new(), |z| {
            format!("[privacy.site_level]\nnoise_multiplier = {z}\nclip = 1.0\nepsilon = 1e12\n")
        }),
    )?;
    let run = Run {
        coordinator_exe,
        agent_exe,
        out: out.clone(),
        config,
        data_dir,
        status,
        rt: tokio::runtime::Runtime::new()?,
    };
    let started = Instant::now();
    let mut coordinator = run.coordinator("coordinator.log")?;
    let mut pid = coordinator.id();
    let mut kills = 0u64;
    let mut agents = run.agents()?;
    let mut samples = Vec::new();
    let mut marks: Vec<(u64, bool)> = args
        .at
        .iter()
        .filter(|r| **r <= args.rounds)
        .map(|r| (*r, false))
        .collect();
    if args.away_at > 0 && args.away_at < args.rounds {
        marks.push((args.away_at, true));
    }
    marks.sort();
    // SIGKILLs between the marks: each waits for its round, kills, restarts.
    let mut kill_at: Vec<u64> = if args.kill_every > 0 {
        (1..)
            .map(|i| i * args.kill_every)
            .take_while(|r| *r < args.rounds)
            .collect()
    } else {
        Vec::new()
    };
    kill_at.reverse();
    let mut away = Duration::ZERO;
    for (round, leave) in marks {
        while let Some(k) = kill_at.pop_if(|k| *k <= round) {
            run.kill_and_restart(&mut coordinator, k, &mut kills)?;
            pid = coordinator.id();
        }
        run.wait_rounds(&mut coordinator, round)?;
        if !leave {
            samples.push(run.sample(pid, format!("round {round}")));
            eprintln!("{:?}", samples.last());
            continue;
        }
        stop_all(&mut agents);
        let left = Instant::now();
        eprintln!("every site away for {} s", args.away_secs);
        while left.elapsed() < Duration::from_secs(args.away_secs) {
            if let Some(status) = coordinator.try_wait()? {
                bail!("the coordinator exited ({status}) while the sites were away");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let s = run
            .status()
            .context("the status API stopped answering while the sites were away")?;
        samples.push(run.sample(
            pid,
            format!(
                "after {} s with every site away (state {})",
                args.away_secs, s["state"]
            ),
        ));
        eprintln!("{:?}", samples.last());
        away += left.elapsed();
        agents = run.agents()?;
    }
    while let Some(k) = kill_at.pop() {
        run.kill_and_restart(&mut coordinator, k, &mut kills)?;
        pid = coordinator.id();
    }
    run.wait_rounds(&mut coordinator, args.rounds)?;
    let running = started.elapsed().saturating_sub(away);
    let site_epsilon = args
        .site_level_dp
        .and_then(|_| run.status()?["site_level_privacy"]["epsilon"].as_f64());
    let peak = rss_mib_of(&pid.to_string(), "VmHWM:");
    stop_all(&mut agents);
    sigterm(&coordinator);
    let mut exits = vec![coordinator.wait()?.code()];
    let mut again = run.coordinator("coordinator-restart.log")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while run.completed().is_none() {
        if Instant::now() > deadline {
            bail!("the restarted coordinator does not answer");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    samples.push(run.sample(again.id(), "after a restart".into()));
    sigterm(&again);
    exits.push(again.wait()?.code());
    let running_samples: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.when.starts_with("round "))
        .collect();
    let growth = |f: fn(&Sample) -> u64| match (running_samples.first(), running_samples.last()) {
        (Some(a), Some(b)) if b.rounds_completed > a.rounds_completed => {
            (f(b) as f64 - f(a) as f64) / (b.rounds_completed - a.rounds_completed) as f64
        }
        _ => f64::NAN,
    };
    let site_epsilon_expected = match args.site_level_dp {
        Some(_) => Some(expected_site_epsilon(&run.config, &run.data_dir)?),
        None => None,
    };
    let report = Report {
        kills,
        site_epsilon,
        site_epsilon_expected,
        rounds: args.rounds,
        wall_seconds: started.elapsed().as_secs_f64(),
        seconds_per_round: running.as_secs_f64() / args.rounds.max(1) as f64,
        db_bytes_per_round: growth(|s| s.db_bytes),
        journal_bytes_per_round: growth(|s| s.journal_bytes),
        peak_rss_mib: peak,
        samples,
        exits,
    };
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} rounds in {:.0} s ({:.3} s per round, time away excepted)",
            report.rounds, report.wall_seconds, report.seconds_per_round
        );
        println!(
            "{:<48} {:>8} {:>9} {:>12} {:>12}",
            "when", "rounds", "RSS MiB", "db bytes", "journal"
        );
        for s in &report.samples {
            println!(
                "{:<48} {:>8} {:>9.1} {:>12} {:>12}",
                s.when, s.rounds_completed, s.rss_mib, s.db_bytes, s.journal_bytes
            );
        }
        println!(
            "per round: db {:.0} bytes, journal {:.0} bytes; peak RSS {:.1} MiB; exits {:?}",
            report.db_bytes_per_round, report.journal_bytes_per_round, peak, report.exits
        );
    }
    if let (Some(got), Some(want)) = (report.site_epsilon, report.site_epsilon_expected) {
        println!("site-level ε: the coordinator says {got}, the journal's rounds give {want}");
    }
    let accounted = report.site_epsilon == report.site_epsilon_expected;
    let clean = report.exits.iter().all(|c| *c == Some(0)) && accounted;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The federation's site-level ε recomputed from the journal, independently of the
/// coordinator's account: one distributed discrete Gaussian per completed round, over the
/// round's survivors, with the σ the configuration gives.
fn expected_site_epsilon(config: &Path, data_dir: &Path) -> Result<f64> {
    use cohort_protocols::privacy::Accountant;
    let cfg = cohort_coordinator::CoordinatorConfig::load(config)?;
    let dp = cfg
        .privacy
        .site_level
        .clone()
        .context("no [privacy.site_level] in the configuration")?;
    let dim = cfg.model.spec().num_params() as u32;
    let mut acc = Accountant::new();
    let mut reader = cohort_coordinator::journal::Reader::open(data_dir)?;
    while let Some(entry) = reader.next_entry()? {
        let cohort_coordinator::journal::Entry::Round { record, .. } = entry else {
            continue;
        };
        let r = record.summary;
        if r.failed.is_some() {
            continue;
        }
        let survivors = (r.sites - r.dropped) as u32;
        let mechanism = cfg
            .training_params(survivors, dim)
            .noise_mechanism(survivors)
            .context("training rounds carry noise")?;
        acc.compose(mechanism, 1)?;
    }
    Ok(acc.epsilon(dp.delta)?.epsilon)
}
