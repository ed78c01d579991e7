//! The operator trial, as a test: a coordinator that runs for months, lived through in a few
//! minutes.
//!
//! The real `cohort-coordinator` (JSON logs, as under systemd) and four real `cohort-agent`
//! processes on the heart-disease hospitals run thousands of short secure rounds, and meet
//! what a hospital network does to them: `repair` and a second coordinator started against
//! the live data directory, `kill -9` mid-round, every hospital away at once (stopped the
//! normal way, with SIGTERM), the database moved from under the running coordinator, the
//! database truncated and corrupted, the journal cut mid-line, and a hospital revoked. After
//! each, the federation either carries on or stops with a refusal that says what to do, and
//! doing it brings every committed round back. The long version (10 000 rounds, every
//! hospital away for 15 minutes) is `cohort-sim soak`, reported in docs/benchmarks.md.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cohort_coordinator::status::client::get;

use cohort_testkit::prelude::*;

const TOKEN: &str = "operator-trial-token-0123456789";
/// Rounds before the first fault: enough for sled's file to outgrow a 512 KiB cut.
const FIRST: u64 = 1200;

fn coordinator_toml(pki: &Path, data_dir: &Path, port: u16, status: u16) -> String {
    config::coordinator(pki, data_dir)
        .set("listen", format!("127.0.0.1:{port}"))
        .path("tls.crl", &pki.join("coordinator/crl.pem"))
        .path("tls.registry", &pki.join("coordinator/registry.toml"))
        .merge(&format!(
            r#"
[rounds]
count = 1000000
# Only an alert threshold now: the coordinator waits as long as it takes.
wait_for_sites_secs = 2
stage_timeout_secs = 60
train_timeout_secs = 60
max_attempts = 5
[storage]
keep_checkpoints = 2
keep_round_detail = 300
[status]
listen = "127.0.0.1:{status}"
token = "{TOKEN}"
[training]
optimizer = "adam"
batch_size = 8
local_steps = 2
"#
        ))
        .to_string()
}

fn coordinator(config: &Path) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(config);
    Proc::spawn("coordinator", cmd)
}

/// `cohort-coordinator ARGS`: its exit code and everything it printed.
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn sigterm(p: &Proc) {
    Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
}

struct Api {
    rt: tokio::runtime::Runtime,
    base: String,
}

impl Api {
    fn new(status: u16) -> Self {
        Api {
            rt: tokio::runtime::Runtime::new().unwrap(),
            base: format!("http://127.0.0.1:{status}"),
        }
    }

    /// The answer to GET `path`, None while nothing answers.
    fn try_get(&self, path: &str) -> Option<(u16, String)> {
        self.rt
            .block_on(get(&format!("{}{path}", self.base), Some(TOKEN)))
            .ok()
    }

    fn json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.try_get(path).expect("the status API answers");
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn status(&self) -> serde_json::Value {
        self.json("/api/v1/status")
    }

    fn completed(&self) -> u64 {
        self.status()["rounds_completed"].as_u64().unwrap()
    }

    /// Waits until at least `n` rounds are committed.
    fn wait_rounds(&self, n: u64, coordinator: &Proc) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some((200, body)) = self.try_get("/api/v1/status") {
                let s: serde_json::Value = serde_json::from_str(&body).unwrap();
                let done = s["rounds_completed"].as_u64().unwrap();
                if done >= n {
                    return done;
                }
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} rounds within 10 minutes:\n{}",
                tail(&coordinator.log())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every counter sample of /metrics (counters, and histograms' buckets, sums and counts).
    fn counters(&self) -> BTreeMap<String, f64> {
        let (code, text) = self.try_get("/metrics").expect("metrics answer");
        assert_eq!(code, 200, "{text}");
        assert!(text.contains("le=\"+Inf\""), "histograms end at +Inf");
        let cumulative: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (name, kind) = l.split_once(' ')?;
                (kind == "counter" || kind == "histogram").then(|| name.to_string())
            })
            .collect();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                let family = key.split('{').next()?;
                let belongs = cumulative.iter().any(|c| {
                    family == c
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| family == format!("{c}{s}"))
                });
                belongs.then(|| (key.to_string(), value.parse().unwrap()))
            })
            .collect()
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Every counter in `after` is at least its value in `before`; none has vanished.
fn monotonic(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, when: &str) {
    for (key, was) in before {
        let now = after
            .get(key)
            .unwrap_or_else(|| panic!("{when}: {key} vanished from /metrics"));
        assert!(now >= was, "{when}: {key} went down from {was} to {now}");
    }
}

/// Every line the coordinator wrote is a JSON object (`--log-format json`).
fn all_json(p: &Proc) {
    for line in p.log().lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()),
            "a line of the JSON log is not JSON: {line}"
        );
    }
}

fn start_agents(dir: &Path, pki: &Path, port: u16) -> Vec<Proc> {
    SITES
        .iter()
        .map(|site| {
            let file = dir.join(format!("{site}.toml"));
            config::agent(pki, site, port).write(&file);
            Proc::agent(site, &file, false)
        })
        .collect()
}

/// Starts the coordinator on `config` with no agents: Ok(rounds completed) once its status
/// API answers (then stops it with SIGTERM, which must exit 0), or Err(what it said) when
/// it refuses to start — which must be exit code 4 and never a panic.
fn start_or_refusal(config: &Path, status: u16) -> Result<u64, String> {
    let mut c = coordinator(config);
    let api = Api::new(status);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = c.child.try_wait().unwrap() {
            let log = c.log();
            assert_eq!(
                status.code(),
                Some(4),
                "a refused start exits 4 (never 101, never 1):\n{log}"
            );
            // Exit 4 and JSON lines only already rule out an uncontained panic. The one
            // mention allowed is the refusal naming the panic sled raised on a damaged file
            // and the coordinator contained (which cut makes sled panic rather than return
            // an error depends on the bytes the cut hits).
            let uncontained = log
                .lines()
                .filter(|l| l.contains("panicked"))
                .any(|l| !l.contains("the database does not open (sled panicked reading it"));
            assert!(!uncontained, "{log}");
            all_json(&c);
            return Err(log);
        }
        if let Some((200, body)) = api.try_get("/api/v1/status") {
            let s: serde_json::Value = serde_json::from_str(&body).unwrap();
            let done = s["rounds_completed"].as_u64().unwrap();
            assert_eq!(s["round"].as_u64(), Some(done + 1), "the round shown: {s}");
            sigterm(&c);
            assert_eq!(c.exit_code(), Some(0), "{}", c.log());
            all_json(&c);
            return Ok(done);
        }
        assert!(Instant::now() < deadline, "{}", c.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_federation_lives_through_what_a_hospital_network_does_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let (port, status) = (free_port(), free_port());
    let data_dir = dir.path().join("coordinator-data");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, coordinator_toml(&pki, &data_dir, port, status)).unwrap();
    let config_arg = config.to_str().unwrap();
    let api = Api::new(status);

    let mut c = coordinator(&config);
    let mut agents = start_agents(dir.path(), &pki, port);
    api.wait_rounds(FIRST, &c);

    // 1. `repair`, as a refused second start once advised, and a second coordinator are both
    // refused while the run is live: exit 4, the holder named, nothing moved; the run goes on.
    let pid = c.child.id();
    let (code, out) = cli(&["run", "--config", config_arg]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&format!("in use by a running coordinator (pid {pid}")),
        "{out}"
    );
    let (code, out) = cli(&["repair", "--config", config_arg]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&format!("in use by a running coordinator (pid {pid}")),
        "{out}"
    );
    let (code, out) = cli(&["repair", "--undo", "--config", config_arg]);
    assert_eq!(code, 4, "{out}");
    let names: Vec<String> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("db.") || n.starts_with("REPAIR")),
        "nothing was moved or repaired: {names:?}"
    );
    let before = api.completed();
    api.wait_rounds(before + 20, &c);
    let sites = api.json("/api/v1/sites");
    assert_eq!(sites["sites"].as_array().unwrap().len(), 4, "{sites}");

    // 2. kill -9 mid-round: the restart resumes after the last committed round, shows the
    // next round (not 0), and no counter a scrape has seen goes down.
    let scraped = api.counters();
    c.wait_for(&["SecAgg+ stage open"]);
    c.kill();
    let committed = {
        let journal = cohort_coordinator::journal::Journal::read(&data_dir).unwrap();
        journal.last_round().unwrap()
    };
    c = coordinator(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.try_get("/api/v1/status").is_none() {
        assert!(Instant::now() < deadline, "{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = api.status();
    assert!(s["rounds_completed"].as_u64().unwrap() >= committed, "{s}");
    assert_ne!(s["round"], 0, "the round after a restart: {s}");
    monotonic(&scraped, &api.counters(), "across kill -9");
    api.wait_rounds(committed + 50, &c);

    // 3. Every hospital away (their agents stopped the normal way): the coordinator keeps
    // waiting and serving, says whom it waits for, and `status` calls the run stalled.
    let scraped = api.counters();
    for a in &agents {
        sigterm(a);
    }
    for a in &mut agents {
        assert_eq!(a.exit_code(), Some(0), "{}", a.log());
    }
    let waiting = c.wait_for_within(
        &[
            "still waiting for sites",
            "cleveland",
            "hungary",
            "switzerland",
            "va",
        ],
        Duration::from_secs(60),
    );
    let stops = waiting.join("\n");
    assert!(
        !stops.contains("session error"),
        "a normal agent stop is no session error:\n{stops}"
    );
    assert!(
        stops.contains("still too few sites after rounds.wait_for_sites_secs"),
        "the alert threshold is a warning, not an exit:\n{stops}"
    );
    assert!(
        c.child.try_wait().unwrap().is_none(),
        "the coordinator is still there"
    );
    let s = api.status();
    assert_eq!(s["state"], "waiting_for_sites", "{s}");
    assert_eq!(s["sites_connected"], 0, "{s}");
    let url = format!("http://127.0.0.1:{status}");
    let (code, table) = cli(&[
        "status",
        "--url",
        &url,
        "--token",
        TOKEN,
        "--stalled-after",
        "20",
    ]);
    assert_eq!(code, 3, "stalled: no progress for 20 s:\n{table}");
    assert!(
        !table.contains('\u{1b}'),
        "no terminal codes in a pipe: {table:?}"
    );
    let header = table.lines().find(|l| l.starts_with("site ")).unwrap();
    let column = header.find("connected").unwrap();
    for site in SITES {
        let row = table.lines().find(|l| l.starts_with(site)).unwrap();
        assert_eq!(
            &row[column..column + 2],
            "no",
            "the columns line up:\n{table}"
        );
    }
    let (code, json) = cli(&["status", "--url", &url, "--token", TOKEN, "--json"]);
    assert_eq!(code, 0, "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["sites"].as_array().unwrap().len(), 4, "{doc}");
    assert_eq!(doc["rounds"].as_array().unwrap().len(), 5, "{doc}");
    monotonic(&scraped, &api.counters(), "while the sites were away");
    agents = start_agents(dir.path(), &pki, port);
    let back = api.completed();
    api.wait_rounds(back + 50, &c);

    // 4. The database moved from under the running coordinator (what the old `repair` did):
    // it stops at its next commit with exit 4, before the journal moves on without the
    // database. Then run refuses naming repair, repair rebuilds, --undo puts the directory
    // back as it was, and repairing again resumes every committed round.
    std::fs::rename(data_dir.join("db"), dir.path().join("db-moved")).unwrap();
    assert_eq!(c.exit_code(), Some(4), "{}", tail(&c.log()));
    assert!(
        c.log().contains("changed under the running coordinator"),
        "{}",
        tail(&c.log())
    );
    all_json(&c);
    let journal_last = cohort_coordinator::journal::Journal::read(&data_dir)
        .unwrap()
        .last_round()
        .unwrap();
    let refusal = start_or_refusal(&config, status).unwrap_err();
    assert!(refusal.contains("db/ is missing"), "{refusal}");
    assert!(refusal.contains("cohort-coordinator repair"), "{refusal}");
    let (code, out) = cli(&["repair", "--config", config_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("rebuilt the database from the round journal"),
        "{out}"
    );
    assert_eq!(start_or_refusal(&config, status), Ok(journal_last));
    let (code, out) = cli(&["repair", "--undo", "--config", config_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        start_or_refusal(&config, status).is_err(),
        "as before the repair"
    );
    let (code, out) = cli(&["repair", "--config", config_arg]);
    assert_eq!(code, 0, "{out}");
    c = coordinator(&config);
    api.wait_rounds(journal_last + 30, &c);

    // 5. Stopped cleanly, then damaged in every way of the storage trial, each on a copy:
    // every start resumes after the last round, or refuses with exit 4 naming repair, after
    // which repair and a start bring back every committed round.
    sigterm(&c);
    assert_eq!(c.exit_code(), Some(0), "{}", tail(&c.log()));
    all_json(&c);
    for a in &mut agents {
        a.kill();
    }
    let last = cohort_coordinator::journal::Journal::read(&data_dir)
        .unwrap()
        .last_round()
        .unwrap();
    assert!(last > FIRST + 100, "thousands of rounds: {last}");
    let db_size = std::fs::metadata(data_dir.join("db/db")).unwrap().len();
    assert!(db_size > 1 << 20, "sled's file: {db_size} bytes");
    let truncate = |path: PathBuf, by: u64| {
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len.saturating_sub(by)).unwrap();
    };
    let flip = |path: PathBuf| {
        let mut bytes = std::fs::read(&path).unwrap();
        let mut state = 0x2545f4914f6cdd1du64;
        for _ in 0..10 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = state as usize % bytes.len();
            bytes[at] ^= 0x20;
        }
        std::fs::write(&path, bytes).unwrap();
    };
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "db cut by 4 KiB",
            Box::new(|d| truncate(d.join("db/db"), 4 << 10)),
        ),
        (
            "db cut by 64 KiB",
            Box::new(|d| truncate(d.join("db/db"), 64 << 10)),
        ),
        (
            "db cut by 512 KiB",
            Box::new(|d| truncate(d.join("db/db"), 512 << 10)),
        ),
        (
            "db cut by half",
            Box::new(|d| truncate(d.join("db/db"), db_size / 2)),
        ),
        (
            "db cut to nothing",
            Box::new(|d| truncate(d.join("db/db"), db_size)),
        ),
        ("db: 10 bytes changed", Box::new(|d| flip(d.join("db/db")))),
        (
            "journal cut mid-line",
            Box::new(|d| truncate(d.join(cohort_coordinator::journal::JOURNAL), 300)),
        ),
    ];
    let mut seen = Vec::new();
    for (name, damage) in &cases {
        let copy = dir.path().join(name.replace([' ', ':'], "-"));
        copy_dir(&data_dir, &copy);
        damage(&copy);
        let copy_config = dir
            .path()
            .join(format!("{}.toml", name.replace([' ', ':'], "-")));
        let s = free_port();
        std::fs::write(&copy_config, coordinator_toml(&pki, &copy, free_port(), s)).unwrap();
        let outcome = match start_or_refusal(&copy_config, s) {
            Ok(done) => {
                assert_eq!(done, last, "{name}: resumed after the last round");
                "resumed"
            }
            Err(refusal) => {
                assert!(
                    refusal.contains("cohort-coordinator repair"),
                    "{name}: the refusal says what to do:\n{refusal}"
                );
                let (code, out) = cli(&["repair", "--config", copy_config.to_str().unwrap()]);
                assert_eq!(code, 0, "{name}: repair\n{out}");
                assert_eq!(
                    start_or_refusal(&copy_config, s),
                    Ok(last),
                    "{name}: every committed round back after repair"
                );
                "refused, repaired, resumed"
            }
        };
        seen.push(format!("{name}: {outcome}"));
    }
    println!("{}", seen.join("\n"));

    // 6. A hospital revoked while it takes part: the coordinator ends its session within
    // about a second saying so (PERMISSION_DENIED, from the re-read registry); its agent knows
    // at the first refusal that retrying cannot help and exits 3 naming the reason. After a
    // restart the CRL refuses it in the TLS handshake, which the agent also recognises
    // however hyper reports it. Never a "reconnecting" for either.
    c = coordinator(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.try_get("/api/v1/status").is_none() {
        assert!(Instant::now() < deadline, "{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    agents = start_agents(dir.path(), &pki, port);
    api.wait_rounds(last + 20, &c);
    cohort_ca::revoke(&pki, "va").unwrap();
    let refused = |va: &mut Proc, reason: &str| {
        assert_eq!(va.exit_code(), Some(3), "{}", va.log());
        let log = va.log();
        assert!(log.contains(reason), "{log}");
        assert!(log.contains("attempt=1 of=2"), "{log}");
        assert!(
            !log.contains("session failed; reconnecting"),
            "a refusal is never taken for a network fault:\n{log}"
        );
    };
    let va = agents.iter_mut().find(|a| a.name == "va").unwrap();
    refused(va, "was revoked by the CA");
    c.wait_for(&["session refused by the site registry", "va"]);
    sigterm(&c);
    assert_eq!(c.exit_code(), Some(0), "{}", tail(&c.log()));
    all_json(&c);
    c = coordinator(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.try_get("/api/v1/status").is_none() {
        assert!(Instant::now() < deadline, "{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut va = Proc::agent("va", &dir.path().join("va.toml"), false);
    refused(&mut va, "CertificateRevoked");
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.status()["sites_connected"] != 3 {
        assert!(Instant::now() < deadline, "{}", tail(&c.log()));
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm(&c);
    assert_eq!(c.exit_code(), Some(0), "{}", tail(&c.log()));
    all_json(&c);
}

#[test]
fn the_help_names_the_exit_codes_and_the_documents_that_exist() {
    let help = |args: &[&str]| {
        let (code, text) = cli(args);
        assert_eq!(code, 0, "{text}");
        text
    };
    let top = help(&["--help"]);
    for needle in [
        "1 a runtime failure a restart may fix",
        "2 invalid configuration",
        "4 the data directory needs an operator",
    ] {
        assert!(top.contains(needle), "{needle:?} in:\n{top}");
    }
    let export = help(&["export-model", "--help"]);
    assert!(export.contains("README.md, \"The model\""), "{export}");
    assert!(!export.contains("docs/configuration.md"), "{export}");
    for doc in ["README.md", "docs/deploy.md"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(doc);
        assert!(path.exists(), "{doc}");
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert!(
        readme.contains("**The model.**"),
        "the section export-model --help names"
    );
    let repair = help(&["repair", "--help"]);
    assert!(repair.contains("--undo"), "{repair}");
    assert!(repair.contains("4 refused"), "{repair}");
    let status = help(&["status", "--help"]);
    assert!(status.contains("3 the run is stalled"), "{status}");
    assert!(status.contains("--json"), "{status}");
}
