//! The status API of a live run: bearer auth, every endpoint, responses that match the
//! OpenAPI document, and a Prometheus scrape that parses.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use cohort_agent::config::{Fault, FaultAction, FaultStage};
use cohort_coordinator::CoordinatorConfig;
use cohort_coordinator::status::client::get;
use serde_json::Value;

use cohort_testkit::prelude::*;

const TOKEN: &str = "a-status-token-for-tests";

/// Checks `value` against `schema` (a fragment of the OpenAPI document): types, required
/// properties, nullability, arrays and maps. Enough of OpenAPI 3.0 for this API.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        return conforms(doc, &doc["components"]["schemas"][name], value, at);
    }
    if value.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at} is null"))
        };
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        return all.iter().try_for_each(|s| conforms(doc, s, value, at));
    }
    let ok = match schema.get("type").and_then(Value::as_str) {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at} = {value} is not a {}", schema["type"]));
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array)
        && !values.contains(value)
    {
        return Err(format!("{at} = {value} is not one of {values:?}"));
    }
    for key in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = key.as_str().unwrap();
        if value.get(key).is_none() {
            return Err(format!("{at} lacks {key}"));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in value.as_object().unwrap() {
            let Some(s) = props.get(k) else {
                return Err(format!("{at}.{k} is not in the document"));
            };
            conforms(doc, s, v, &format!("{at}.{k}"))?;
        }
    }
    if let Some(extra) = schema.get("additionalProperties") {
        for (k, v) in value.as_object().unwrap() {
            conforms(doc, extra, v, &format!("{at}.{k}"))?;
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, v) in value.as_array().unwrap().iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The schema of `path`'s response with `code`.
fn response_schema<'a>(doc: &'a Value, path: &str, code: u16) -> &'a Value {
    let mut r = &doc["paths"][path]["get"]["responses"][code.to_string()];
    if let Some(name) = r.get("$ref").and_then(Value::as_str) {
        r = &doc["components"]["responses"][name.trim_start_matches("#/components/responses/")];
    }
    &r["content"]["application/json"]["schema"]
}

async fn check(doc: &Value, base: &str, path: &str, template: &str, code: u16) -> Value {
    let (got, body) = get(&format!("{base}{path}"), Some(TOKEN)).await.unwrap();
    assert_eq!(got, code, "{path}: {body}");
    let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
    conforms(doc, response_schema(doc, template, code), &value, path)
        .unwrap_or_else(|e| panic!("{path} does not match the OpenAPI document: {e}"));
    value
}

#[test]
fn status_api_answers_with_auth_and_matches_its_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let config = config::coordinator(&pki, &dir.path().join("data"))
        .merge(&format!(
            r#"
[limits]
memory_mib = 65536
[rounds]
count = 12
wait_for_sites_secs = 60
stage_timeout_secs = 10
train_timeout_secs = 10
[status]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[training]
local_steps = 50
"#
        ))
        .build(CoordinatorConfig::parse);
    let doc: Value = serde_json::from_str(cohort_coordinator::status::OPENAPI).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (report_tx, mut report) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(cohort_coordinator::run_with_progress(
            config,
            Some(tx),
            Some(report_tx),
        ));
        let endpoints = rx.await.unwrap();
        let base = format!(
            "http://{}",
            endpoints.status.expect("status API configured")
        );

        // Public health, private everything else.
        assert_eq!(get(&format!("{base}/healthz"), None).await.unwrap().0, 200);
        for path in [
            "/api/v1/status",
            "/api/v1/sites",
            "/metrics",
            "/api/v1/openapi.json",
        ] {
            let (code, body) = get(&format!("{base}{path}"), None).await.unwrap();
            assert_eq!(code, 401, "{path}");
            assert!(body.contains("bearer token"), "{path}: {body}");
            let wrong = get(&format!("{base}{path}"), Some("not-the-token-at-all"))
                .await
                .unwrap();
            assert_eq!(wrong.0, 401, "{path}");
        }
        let status = check(&doc, &base, "/api/v1/status", "/api/v1/status", 200).await;
        assert_eq!(status["state"], "waiting_for_sites");
        assert!(status["last_rollout"].is_null());
        assert_eq!(status["sites_expected"], 4);
        assert_eq!(status["rounds_completed"], 0);
        let (code, served) = get(&format!("{base}/api/v1/openapi.json"), Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(code, 200);
        assert_eq!(serde_json::from_str::<Value>(&served).unwrap(), doc);

        // The dashboard's files need no token and hold no data; the lock-contention samples
        // for its heat map arrive every two seconds, one number per shard of the three maps.
        let (code, page) = get(&format!("{base}/"), None).await.unwrap();
        assert_eq!(code, 200);
        assert!(page.contains(r#"<script src="/dashboard.js" defer></script>"#));
        assert_eq!(
            get(&format!("{base}/dashboard.js"), None).await.unwrap().0,
            200
        );
        assert_eq!(
            get(&format!("{base}/dashboard.css"), None).await.unwrap().0,
            200
        );
        let (doc_ref, base_ref) = (&doc, &base);
        let shards = |min: usize| async move {
            for _ in 0..100 {
                let got = check(doc_ref, base_ref, "/api/v1/shards", "/api/v1/shards", 200).await;
                if got["samples"].as_array().unwrap().len() >= min {
                    return got;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("fewer than {min} lock-contention samples within 10 s");
        };
        let before = shards(1).await["samples"].as_array().unwrap().len();
        for _ in 0..3 {
            check(&doc, &base, "/api/v1/status", "/api/v1/status", 200).await;
        }
        let after = shards(before + 1).await;
        let names = after["shards"].as_array().unwrap();
        assert_eq!(names.len(), 48, "{after}");
        let samples = &after["samples"].as_array().unwrap()[before..];
        // Each status request reads the sites map, shard by shard: three requests, at least
        // three acquisitions of every sites shard since the last sample before them.
        for (row, name) in names.iter().enumerate() {
            let taken: u64 = samples
                .iter()
                .map(|s| s["acquisitions"][row].as_u64().unwrap())
                .sum();
            if name.as_str().unwrap().starts_with("sites/") {
                assert!(taken >= 3, "{name}: {taken} in {after}");
            }
        }
        // va sends an input in round 2 that no honest site can (round-integrity review: the run
        // stopped after `max_attempts`); the round fails and the run goes on.
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| {
                let mut cfg = config::agent(&pki, s, endpoints.grpc.port())
                    .merge(SCHEMA)
                    .build(cohort_agent::AgentConfig::parse);
                if *s == "va" {
                    cfg.faults = vec![Fault {
                        round: 2,
                        stage: FaultStage::MaskedInput,
                        action: FaultAction::OutOfRange,
                    }];
                }
                tokio::spawn(cohort_agent::run(cfg))
            })
            .collect();
        // Round 1 is committed; eleven more keep the run (and its connections) going while the
        // API is questioned.
        let first = report.recv().await.expect("round 1");
        assert_eq!(first.summary.round, 1);
        let ready = check(&doc, &base, "/readyz", "/readyz", 200).await;
        assert_eq!(ready["grpc"], true);
        let status = check(&doc, &base, "/api/v1/status", "/api/v1/status", 200).await;
        assert!(status["rounds_completed"].as_u64().unwrap() >= 1);
        assert_eq!(status["sites_connected"], 4);
        assert!(status["last_round"]["accuracy"].as_f64().unwrap() > 0.5);
        // The model of the last evaluation went out to and was verified by all four sites.
        let rollout = &status["last_rollout"];
        assert!(rollout["round"].as_u64().unwrap() >= 1, "{rollout}");
        assert_eq!(rollout["sites"], 4);
        assert_eq!(rollout["acknowledged"], 4);
        assert!(rollout["model_bytes"].as_u64().unwrap() > 0);
        assert!(rollout["seconds"].as_f64().unwrap() >= rollout["sent_seconds"].as_f64().unwrap());
        let page = check(
            &doc,
            &base,
            "/api/v1/rounds?per_page=1",
            "/api/v1/rounds",
            200,
        )
        .await;
        assert_eq!(page["rounds"][0]["summary"]["round"], 1);
        assert_eq!(page["per_page"], 1);
        let one = check(&doc, &base, "/api/v1/rounds/1", "/api/v1/rounds/{n}", 200).await;
        assert_eq!(one["summary"]["sites"], 4);
        assert_eq!(one["per_site"].as_object().unwrap().len(), 4);
        check(&doc, &base, "/api/v1/rounds/99", "/api/v1/rounds/{n}", 404).await;
        check(&doc, &base, "/api/v1/rounds/x", "/api/v1/rounds/{n}", 400).await;
        // A page that is not a number is a JSON error like every other (it was axum's
        // text/plain), documented in the OpenAPI document.
        let bad = check(&doc, &base, "/api/v1/rounds?page=x", "/api/v1/rounds", 400).await;
        assert!(
            bad["error"]
                .as_str()
                .unwrap()
                .contains("page and per_page are positive whole numbers"),
            "{bad}"
        );
        // Round 2 is given up: in its record, the status, the metrics and the CLI table.
        let second = report.recv().await.expect("round 2");
        assert_eq!(second.summary.round, 2);
        let reason = second.summary.failed.clone().unwrap_or_default();
        assert!(reason.contains("the unmasked sum is refused"), "{reason}");
        let status = check(&doc, &base, "/api/v1/status", "/api/v1/status", 200).await;
        assert_eq!(status["rounds_failed"], 1, "{status}");
        assert_eq!(status["last_failure"]["round"], 2, "{status}");
        let two = check(&doc, &base, "/api/v1/rounds/2", "/api/v1/rounds/{n}", 200).await;
        assert_eq!(two["summary"]["failed"].as_str(), Some(reason.as_str()));
        // Its attempts are in the record: each aborted, with why and how long its stages took.
        let log = two["summary"]["attempt_log"].as_array().unwrap();
        assert_eq!(
            log.len() as u64,
            two["summary"]["attempts"].as_u64().unwrap()
        );
        for a in log {
            assert!(a["aborted"].as_str().is_some(), "{a}");
            assert!(!a["stages"].as_array().unwrap().is_empty(), "{a}");
        }
        let one = check(&doc, &base, "/api/v1/rounds/1", "/api/v1/rounds/{n}", 200).await;
        let log = one["summary"]["attempt_log"].as_array().unwrap();
        let last = log.last().unwrap();
        assert!(last.get("aborted").is_none(), "{last}");
        let stages: Vec<&str> = last["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert_eq!(
            stages,
            [
                "AdvertiseKeys",
                "ShareKeys",
                "MaskedInput",
                "ConsistencyCheck",
                "Unmask"
            ]
        );
        // `after` pages from a given round: what the dashboard polls for new rounds.
        let newer = check(
            &doc,
            &base,
            "/api/v1/rounds?after=1&per_page=1",
            "/api/v1/rounds",
            200,
        )
        .await;
        assert_eq!(newer["rounds"][0]["summary"]["round"], 2, "{newer}");
        let none = check(
            &doc,
            &base,
            "/api/v1/rounds?after=999",
            "/api/v1/rounds",
            200,
        )
        .await;
        assert_eq!(none["rounds"].as_array().unwrap().len(), 0);
        // The overview's facts, and what the sites table shows of each site.
        assert_eq!(status["secure_aggregation"], true);
        assert_eq!(status["coordinator_version"], env!("CARGO_PKG_VERSION"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let sites = check(&doc, &base, "/api/v1/sites", "/api/v1/sites", 200).await;
        for site in sites["sites"].as_array().unwrap() {
            assert_eq!(site["agent_version"], env!("CARGO_PKG_VERSION"), "{site}");
            let expires = site["certificate_expires_unix"].as_i64().unwrap();
            assert!(expires > now + 30 * 86_400, "{site}");
        }
        // The run goes on.
        let third = report.recv().await.expect("round 3");
        assert_eq!(third.summary.failed, None);
        assert_eq!(third.summary.sites, 4);
        // The status says how long since the run last moved (the stall signal).
        assert!(status["seconds_since_progress"].as_f64().unwrap() >= 0.0);
        let sites = check(&doc, &base, "/api/v1/sites", "/api/v1/sites", 200).await;
        let names: Vec<&str> = sites["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, SITES);

        // The `status` command prints the same as a table; a wrong token is a clear error.
        let cli = |token: &str| {
            std::process::Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
                .args(["status", "--url", &base, "--token", token])
                .output()
                .unwrap()
        };
        let out = cli(TOKEN);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8_lossy(&out.stdout);
        // The run may be further along by now: the layout, not the live numbers, is checked.
        assert!(
            table.contains("state ") && table.contains("sites "),
            "{table}"
        );
        assert!(table.contains("/4"), "{table}");
        assert!(
            table.contains("rounds given up: 1   the last: round 2: the unmasked sum is refused"),
            "{table}"
        );
        for site in SITES {
            assert!(table.contains(site), "{table}");
        }
        let out = cli("wrong-token-wrong-token");
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("answered 401"));

        // The scrape parses: every sample line is `name{labels} value` with a number.
        let (code, text) = get(&format!("{base}/metrics"), Some(TOKEN)).await.unwrap();
        assert_eq!(code, 200);
        let samples = parse_metrics(&text);
        assert!(samples["cohort_rounds_completed_total"] >= 2.0, "{text}");
        assert_eq!(samples["cohort_rounds_failed_total"], 1.0, "{text}");
        assert_eq!(samples["cohort_sites_connected"], 4.0);
        assert_eq!(samples["cohort_model_parameters"], 14.0);
        assert!(samples["cohort_received_bytes_total"] > 0.0);
        assert!(
            samples.contains_key("cohort_shard_lock_acquisitions_total{map=\"sites\",shard=\"0\"}")
        );
        assert!(
            samples
                .contains_key("cohort_shard_lock_wait_seconds_total{map=\"uploads\",shard=\"15\"}")
        );
        assert!(samples["cohort_stage_duration_seconds_count{stage=\"MaskedInput\"}"] >= 2.0);

        // Every metric the Grafana dashboard queries is exported.
        let dashboard = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/cohort.json"),
        )
        .unwrap();
        let mut queried = 0;
        for part in dashboard.split("cohort_").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name.is_empty() || name == "coordinator" {
                continue;
            }
            queried += 1;
            assert!(
                text.contains(&format!("\ncohort_{name}")),
                "the dashboard queries cohort_{name}, which /metrics does not export"
            );
        }
        assert!(queried >= 14, "{queried}");

        let summary = run.await.unwrap().unwrap();
        assert_eq!(summary.rounds().unwrap().len(), 12);
        for a in agents {
            a.await.unwrap().unwrap();
        }
    });
}

/// Sample lines of a Prometheus text exposition as `series → value`; panics on a malformed
/// line, and on anything `promtool check metrics` (or our copy of its lint rules) reports.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let problems = promlint(text);
    assert!(problems.is_empty(), "promlint: {problems:#?}\n{text}");
    promtool(&["check", "metrics"], Some(text));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (series.to_string(), value)
        })
        .collect()
}

/// Runs the real `promtool` (Debian's `prometheus` package; `.ci/run` installs it) with
/// `stdin`, and panics unless it exits 0. Without promtool on PATH the check is left to
/// [`promlint`], except in CI, where its absence is a failure.
fn promtool(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required in CI (.ci/run installs Debian's prometheus): {e}"
            );
            eprintln!("promtool not found ({e}); relying on the built-in lint rules");
            return;
        }
    };
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} exited {:?}:\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rules of `promtool check metrics` (Prometheus' promlint) that can apply to us: every
/// family has help text and a type; counters end in `_total` and nothing else does; no
/// reserved `:` or camelCase; no type in the name; base units, not abbreviations; every
/// sample belongs to a declared family.
fn promlint(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            help.insert(name.into(), h.trim().into());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap_or((rest, ""));
            types.insert(name.into(), t.trim().into());
        } else if line.starts_with('#') {
            problems.push(format!("not a classic-format comment: {line}"));
        }
    }
    for (name, t) in &types {
        if help.get(name).is_none_or(|h| h.is_empty()) {
            problems.push(format!("{name}: no help text"));
        }
        if t == "counter" && !name.ends_with("_total") {
            problems.push(format!(
                "{name}: counter metrics should have \"_total\" suffix"
            ));
        }
        if t != "counter" && name.ends_with("_total") {
            problems.push(format!(
                "{name}: non-counter metrics should not have \"_total\" suffix"
            ));
        }
        if name.contains(':') {
            problems.push(format!("{name}: metric names should not contain ':'"));
        }
        if name.chars().any(|c| c.is_ascii_uppercase()) {
            problems.push(format!(
                "{name}: metric names should be written in 'snake_case'"
            ));
        }
        for ty in ["_counter", "_gauge", "_histogram", "_summary", "_untyped"] {
            if name.contains(ty) {
                problems.push(format!(
                    "{name}: metric name should not include type '{ty}'"
                ));
            }
        }
        for unit in [
            "_milliseconds",
            "_microseconds",
            "_nanoseconds",
            "_minutes",
            "_hours",
            "_days",
            "_kilobytes",
            "_megabytes",
            "_gigabytes",
        ] {
            if name.contains(unit) {
                problems.push(format!("{name}: use base units, not {unit}"));
            }
        }
        for abbr in [
            "_sec", "_ms", "_us", "_ns", "_msec", "_secs", "_kb", "_mb", "_gb",
        ] {
            if name.split('_').any(|p| format!("_{p}") == abbr) {
                problems.push(format!(
                    "{name}: metric names should not contain abbreviated units {abbr}"
                ));
            }
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name: String = line
            .chars()
            .take_while(|c| *c != '{' && *c != ' ')
            .collect();
        let family = types.keys().any(|f| {
            name == *f
                || (types[f] == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name == format!("{f}{suffix}")))
        });
        if !family {
            problems.push(format!("{name}: a sample without a declared family"));
        }
    }
    problems
}

#[test]
fn promlint_reports_what_promtool_reports() {
    // The rules must be able to fail: the OpenMetrics form of a counter is an error in the
    // classic format, and so is a help-less family.
    let openmetrics = "# HELP x_rounds Rounds.\n# TYPE x_rounds counter\nx_rounds_total 1\n# EOF\n";
    let found = promlint(openmetrics);
    assert!(
        found.iter().any(|p| p.contains("\"_total\" suffix")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("without a declared family")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.contains("not a classic-format")),
        "{found:?}"
    );
    assert!(!promlint("# TYPE g gauge\ng 1\n").is_empty());
    let classic = cohort_coordinator::metrics::classic_text(openmetrics);
    assert_eq!(promlint(&classic), Vec::<String>::new(), "{classic}");
}

#[test]
fn the_alert_rules_and_scrape_config_pass_promtool() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let rules = deploy.join("alerts.yml");
    let text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "CohortRunStalled",
        "CohortCoordinatorDown",
        "CohortTooFewSites",
    ] {
        assert!(
            text.contains(&format!("alert: {alert}")),
            "{alert} in alerts.yml"
        );
    }
    assert!(text.contains("cohort_seconds_since_progress"));
    assert!(
        text.contains("cohort_sites_connected < cohort_min_sites"),
        "the site alert follows rounds.min_sites"
    );
    promtool(&["check", "rules", rules.to_str().unwrap()], None);
    // Prometheus' own evaluation of the rules against made-up series: one hospital of four
    // away fires CohortTooFewSites, three of three does not.
    promtool(
        &[
            "test",
            "rules",
            deploy.join("alerts.test.yml").to_str().unwrap(),
        ],
        None,
    );
}

/// `[status.tls]`: the API and the dashboard over HTTPS with the server's own certificate,
/// which a client must trust; plain HTTP on that port gets nothing; `status --ca-cert` reads
/// it; a certificate that does not load stops the start with the key named.
#[test]
fn the_status_server_speaks_tls_with_its_own_certificate() {
    use cohort_coordinator::status::client::get_with;
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    // A web certificate, as a hospital's own CA would issue one (self-signed here).
    let web =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = dir.path().join("status-cert.pem");
    let key = dir.path().join("status-key.pem");
    std::fs::write(&cert, web.cert.pem()).unwrap();
    std::fs::write(&key, web.signing_key.serialize_pem()).unwrap();
    let toml = |cert: &Path| {
        config::coordinator(&pki, &dir.path().join("data")).merge(&format!(
            r#"
[rounds]
count = 1
wait_for_sites_secs = 60
[training]
local_steps = 1
[status]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[status.tls]
cert = {cert:?}
key = {key:?}
"#
        ))
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let missing = toml(&dir.path().join("nowhere.pem")).build(CoordinatorConfig::parse);
        let refused = cohort_coordinator::run_with_progress(missing, None, None)
            .await
            .expect_err("a status certificate that is not there");
        let said = format!("{refused:#}");
        assert!(
            said.contains("status.tls") && said.contains("nowhere.pem"),
            "{said}"
        );

        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(cohort_coordinator::run_with_progress(
            toml(&cert).build(CoordinatorConfig::parse),
            Some(tx),
            None,
        ));
        let at = rx.await.unwrap().status.expect("status API configured");
        let base = format!("https://127.0.0.1:{}", at.port());
        let (code, body) = get_with(&format!("{base}/api/v1/status"), Some(TOKEN), Some(&cert))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        let status: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["state"], "waiting_for_sites");
        let (code, page) = get_with(&format!("{base}/"), None, Some(&cert))
            .await
            .unwrap();
        assert_eq!(code, 200);
        assert!(page.contains("<title>Cohort"), "{page}");
        // Still the token behind TLS.
        let (code, _) = get_with(&format!("{base}/api/v1/sites"), None, Some(&cert))
            .await
            .unwrap();
        assert_eq!(code, 401);
        // A client that trusts another CA (the project's) refuses this server.
        let other = get_with(
            &format!("{base}/healthz"),
            None,
            Some(&pki.join("coordinator/ca.pem")),
        )
        .await;
        assert!(other.is_err(), "{other:?}");
        // Plain HTTP to the TLS port gets no answer.
        let plain = get(&format!("http://127.0.0.1:{}/healthz", at.port()), None).await;
        assert!(plain.is_err(), "{plain:?}");
        // Without --ca-cert the command says what is missing; with it, it reads the run.
        let cli = |ca: Option<&Path>| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"));
            cmd.args(["status", "--url", &base, "--token", TOKEN])
                .env_remove("COHORT_STATUS_CA_CERT");
            if let Some(ca) = ca {
                cmd.arg("--ca-cert").arg(ca);
            }
            cmd.output().unwrap()
        };
        let out = cli(None);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--ca-cert"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cli(Some(&cert));
        let text = String::from_utf8_lossy(&out.stdout);
        // Waiting for sites from the start is no stall yet: exit 0.
        assert_eq!(
            out.status.code(),
            Some(0),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("state waiting_for_sites"), "{text}");
        assert!(text.contains("aggregation secure (SecAgg+)"), "{text}");
        run.abort();
    });
}
