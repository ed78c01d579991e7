//! The real binaries as separate processes, the way a hospital network runs them: their
//! stdout and stderr read line by line, so a test waits for what a process says.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 a moment ago (for a process that must be told its port before
/// it starts; in-process servers bind port 0 instead).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A binary of the workspace (`cohort-coordinator`, `cohort-agent`, `cohort-ca`), built next
/// to the running test by `cargo test --workspace`.
pub fn workspace_exe(name: &str) -> PathBuf {
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

/// A process whose stdout and stderr lines arrive on a channel and are kept. Dropping it
/// kills the process.
#[derive(Debug)]
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

    /// `cohort-coordinator run --config config`.
    pub fn coordinator(config: &Path) -> Self {
        let mut cmd = Command::new(workspace_exe("cohort-coordinator"));
        cmd.args(["run", "--config"]).arg(config);
        Self::spawn("coordinator", cmd)
    }

    /// `cohort-agent run --config config`, logging JSON lines when `json`.
    pub fn agent(name: &str, config: &Path, json: bool) -> Self {
        let mut cmd = Command::new(workspace_exe("cohort-agent"));
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

    /// Waits (up to two minutes) for the process to exit by itself; its exit code.
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

    /// Everything the process has printed so far.
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
