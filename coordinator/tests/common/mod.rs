//! Shared by the coordinator's integration tests: the heart-disease hospitals, their schema,
//! provisioning and agent configurations.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use cohort_ca::demo_keys::{ProvisionOptions, provision};

pub const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

/// The FLamby heart-disease schema (13 inputs), identical on both sides.
pub const SCHEMA: &str = r#"
[schema]
label = { column = "num", greater_than = 0 }
drop = ["slope", "ca", "thal"]
categorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }
missing = "drop_row"
"#;

pub fn data(site: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/heart-disease")
        .join(format!("{site}.csv"))
        .canonicalize()
        .expect("shipped data")
}

/// A CA, the coordinator's certificate and the four hospitals' bundles in `dir/pki`.
pub fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    provision(&ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .unwrap();
    pki
}

/// The `[tls]` table of the coordinator's configuration.
pub fn coordinator_tls(pki: &Path) -> String {
    format!(
        "[tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\nmanifest = {:?}\n",
        pki.join("coordinator/ca.pem"),
        pki.join("coordinator/cert.pem"),
        pki.join("coordinator/key.pem"),
        pki.join("coordinator/manifest.toml"),
    )
}

/// An agent.toml for `site` from the bundle in `bundle`, dialling `port`: only what is local
/// to the site (the schema comes from the coordinator), plus `extra` (which must not hold a
/// `[policy]` table: this one asks for 2 live others, as a federation of four can).
pub fn agent_toml(bundle: &Path, site: &str, port: u16, extra: &str) -> String {
    let data = format!(
        "csv = {:?}\ntest_fraction = 0.34\nsplit_seed = 42",
        data(site)
    );
    agent_toml_with_data(bundle, site, port, &data, extra)
}

/// As [`agent_toml`], with `data` as the body of the `[data]` table.
pub fn agent_toml_with_data(
    bundle: &Path,
    site: &str,
    port: u16,
    data: &str,
    extra: &str,
) -> String {
    format!(
        r#"
site = "{site}"
[coordinator]
url = "https://127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
[data]
{data}
[reconnect]
initial_ms = 100
max_ms = 500
max_refusals = 2
{extra}
# Four hospitals: three others, one of which may drop out (the agent's default asks for 5).
[policy]
min_live_neighbours = 2
"#,
        ca = bundle.join("ca.pem"),
        cert = bundle.join("cert.pem"),
        key = bundle.join("key.pem"),
    )
}

/// An agent for `site` dialling 127.0.0.1:`port`, reconnecting quickly, pinning the schema.
pub fn agent(pki: &Path, site: &str, port: u16) -> cohort_agent::AgentConfig {
    cohort_agent::AgentConfig::parse(&agent_toml(
        &pki.join("sites").join(site),
        site,
        port,
        SCHEMA,
    ))
    .expect("agent configuration")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cohort-agent`, built next to this test's binary by `cargo test --workspace`.
pub fn agent_exe() -> PathBuf {
    workspace_exe("cohort-agent")
}

/// The consortium's CA tool, built beside the agent.
#[allow(dead_code)]
pub fn ca_exe() -> PathBuf {
    workspace_exe("cohort-ca")
}

fn workspace_exe(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A process whose stdout and stderr lines arrive on a channel and are kept.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: mpsc::Receiver<String>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let (tx, all) = (tx.clone(), all.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    all.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Proc {
            name: name.into(),
            child,
            lines,
            all,
        }
    }

    pub fn coordinator(config: &Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
        cmd.args(["run", "--config"]).arg(config);
        Self::spawn("coordinator", cmd)
    }

    pub fn agent(name: &str, config: &Path, json: bool) -> Self {
        let mut cmd = Command::new(agent_exe());
        if json {
            cmd.args(["--log-format", "json"]);
        }
        cmd.args(["run", "--config"]).arg(config);
        Self::spawn(name, cmd)
    }

    /// Waits (up to two minutes) for a line containing all of `parts`; returns the lines seen
    /// meanwhile.
    pub fn wait_for(&self, parts: &[&str]) -> Vec<String> {
        self.wait_for_within(parts, Duration::from_secs(120))
    }

    pub fn wait_for_within(&self, parts: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = parts.iter().all(|p| line.contains(p));
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => panic!(
                    "{}: no line with {parts:?} within {timeout:?}; last lines:\n{}",
                    self.name,
                    seen[seen.len().saturating_sub(40)..].join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit by itself; its exit code.
    pub fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a directory tree (a data directory, say), leaving out a `LOCK` file: a copy is
/// another directory, not the same one in use.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
