//! The dashboard in a real browser: the real `cohort-coordinator` and four real
//! `cohort-agent` processes on the heart-disease hospitals, and headless Chromium (Debian's
//! package, which `.ci/run` installs) driven by Playwright from `tests/dashboard/browser.py`.
//!
//! The script logs in with a wrong token and then the right one, waits for rounds to
//! advance, and asks this harness to kill agents and to kill and restart the coordinator;
//! at each step it compares the page with the status API. Its screenshots are the ones in
//! docs/ (set `COHORT_DASHBOARD_SCREENSHOTS=docs/img` to write them there).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cohort_coordinator::status::client::get;
use cohort_testkit::prelude::*;

const TOKEN: &str = "dashboard-browser-token-0123456789";

fn chromium() -> PathBuf {
    let path = PathBuf::from(
        std::env::var("COHORT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    assert!(
        path.exists(),
        "{} is missing: the dashboard test needs Debian's chromium and Playwright for Python \
         (.ci/run installs both)",
        path.display()
    );
    path
}

fn start_agent(dir: &Path, pki: &Path, site: &str, port: u16) -> Proc {
    let file = dir.join(format!("{site}.toml"));
    config::agent(pki, site, port)
        .merge("[policy]\nmax_colluders = 0")
        .write(&file);
    Proc::agent(site, &file, false)
}

/// Waits until the status API on `status` reports at least `n` committed rounds.
fn wait_rounds(status: u16, n: u64, coordinator: &mut Proc) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok((200, body)) = rt.block_on(get(
            &format!("http://127.0.0.1:{status}/api/v1/status"),
            Some(TOKEN),
        )) {
            let s: serde_json::Value = serde_json::from_str(&body).unwrap();
            if s["rounds_completed"].as_u64().unwrap() >= n {
                return;
            }
        }
        if let Some(code) = coordinator.child.try_wait().unwrap() {
            panic!("the coordinator exited ({code}):\n{}", coordinator.log());
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} rounds in 5 minutes:\n{}",
            coordinator.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_dashboard_follows_a_live_federation_in_a_real_browser() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let (port, status) = (free_port(), free_port());
    let config = dir.path().join("coordinator.toml");
    config::coordinator(&pki, &dir.path().join("data"))
        .set("listen", format!("127.0.0.1:{port}"))
        .merge(&format!(
            r#"
[rounds]
count = 100000
min_sites = 3
wait_for_sites_secs = 2
stage_timeout_secs = 20
train_timeout_secs = 20
max_attempts = 5
[secagg]
# Three of four sites carry a round once two agents are killed; no site here colludes.
max_colluders = 0
[status]
listen = "127.0.0.1:{status}"
token = "{TOKEN}"
[training]
optimizer = "adam"
batch_size = 8
local_steps = 2
"#
        ))
        .write(&config);
    let mut coordinator = Proc::coordinator(&config);
    let mut agents: BTreeMap<String, Proc> = SITES
        .iter()
        .map(|s| (s.to_string(), start_agent(dir.path(), &pki, s, port)))
        .collect();
    wait_rounds(status, 2, &mut coordinator);

    let shots = std::env::var("COHORT_DASHBOARD_SCREENSHOTS")
        .map(|d| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d))
        .unwrap_or_else(|_| dir.path().join("shots"));
    std::fs::create_dir_all(&shots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/browser.py");
    let mut browser = Command::new("python3")
        .arg(&script)
        .args(["--url", &format!("http://127.0.0.1:{status}")])
        .args(["--token", TOKEN])
        .arg("--shots")
        .arg(&shots)
        .arg("--chromium")
        .arg(&chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs the browser script");
    let mut to_script = browser.stdin.take().unwrap();
    let stderr = browser.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut said = Vec::new();
    let started = Instant::now();
    for line in BufReader::new(browser.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        eprintln!("browser: {line}");
        said.push(line.clone());
        let Some(what) = line.strip_prefix("ACTION ") else {
            continue;
        };
        match what.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["kill-agent", site] => {
                agents.remove(*site).expect("a running agent").kill();
            }
            ["coordinator-down"] => coordinator.kill(),
            ["coordinator-up"] => coordinator = Proc::coordinator(&config),
            ["start-agents"] => {
                for site in SITES {
                    agents
                        .entry(site.to_string())
                        .or_insert_with(|| start_agent(dir.path(), &pki, site, port));
                }
            }
            other => panic!("the browser script asked for {other:?}"),
        }
        writeln!(to_script, "done").unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the browser test ran for 15 minutes"
        );
    }
    let code = browser.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(
        code.success() && said.last().is_some_and(|l| l == "PASS"),
        "the browser script failed ({code}):\n{}\n{errors}\ncoordinator:\n{}",
        said.join("\n"),
        coordinator.log()
    );
    for shot in [
        "dashboard.png",
        "dashboard-phone.png",
        "dashboard-wrong-token.png",
        "dashboard-after-restart.png",
    ] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{shot} is a PNG");
    }
}
