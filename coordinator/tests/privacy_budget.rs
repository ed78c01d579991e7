//! A federation whose hospitals train with DP-SGD under their own budgets, secure
//! aggregation on: the coordinator says what each site and the federation have spent (status
//! API, `/metrics`, the run summary), stops asking a site whose budget cannot pay for another
//! round, stops training with a message when too few sites are left, and stops again after a
//! restart as soon as the sites have said they cannot go on.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use cohort_coordinator::CoordinatorConfig;
use cohort_coordinator::status::client::get;
use serde_json::Value;

use cohort_testkit::prelude::*;

const TOKEN: &str = "a-status-token-for-privacy";
const BUDGET: f64 = 3.0;

fn coordinator(pki: &std::path::Path, data: &std::path::Path) -> CoordinatorConfig {
    config::coordinator(pki, data)
        .merge(&format!(
            r#"
[rounds]
count = 60
min_sites = 3
wait_for_sites_secs = 60
stage_timeout_secs = 20
train_timeout_secs = 60
[secagg]
max_colluders = 0
[status]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[training]
learning_rate = 0.05
batch_size = 8
local_steps = 30
[privacy]
require = true
"#
        ))
        .build(CoordinatorConfig::parse)
}

fn agent(pki: &std::path::Path, site: &str, port: u16, privacy: bool) -> cohort_agent::AgentConfig {
    // Rounds of three sites cannot resist a colluder and survive a dropout: these sites
    // accept rounds that resist none, as the coordinator's `secagg.max_colluders = 0` says.
    let mut toml = config::agent(pki, site, port)
        .merge(SCHEMA)
        .set("policy.max_colluders", 0);
    if privacy {
        toml = toml.merge(&format!(
            "[privacy]\nepsilon = {BUDGET}\nnoise_multiplier = 2.5\nmax_grad_norm = 1.0\n"
        ));
    }
    toml.build(cohort_agent::AgentConfig::parse)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in the scrape:\n{text}"))
}

#[test]
fn private_sites_spend_their_budgets_and_training_stops_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let first = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (report_tx, mut report) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(cohort_coordinator::run_with_progress(
            coordinator(&pki, &data),
            Some(tx),
            Some(report_tx),
        ));
        let endpoints = rx.await.unwrap();
        let base = format!("http://{}", endpoints.status.unwrap());
        let port = endpoints.grpc.port();

        // `privacy.require`: a site without DP-SGD is refused at its join, and told why.
        let refused = cohort_agent::run(agent(&pki, "va", port, false))
            .await
            .expect_err("a site without [privacy] is refused");
        assert!(
            format!("{refused:#}").contains("privacy.require"),
            "{refused:#}"
        );

        let agents: Vec<_> = SITES
            .iter()
            .map(|s| tokio::spawn(cohort_agent::run(agent(&pki, s, port, true))))
            .collect();

        // Every committed round: the federation's ε is the largest site's, never over a
        // budget, never going down; a site that cannot afford another round is not asked.
        let mut federation = 0.0;
        let mut exhausted_seen = 0;
        let mut rounds = Vec::new();
        while let Some(record) = report.recv().await {
            let summary = record.summary;
            let (_, body) = get(&format!("{base}/api/v1/status"), Some(TOKEN))
                .await
                .unwrap();
            let status: Value = serde_json::from_str(&body).unwrap();
            let (_, body) = get(&format!("{base}/api/v1/sites"), Some(TOKEN))
                .await
                .unwrap();
            let sites: Value = serde_json::from_str(&body).unwrap();
            let spent: Vec<(String, f64, bool)> = sites["sites"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let p = &s["privacy"];
                    assert_eq!(p["budget"], BUDGET, "{s}");
                    assert_eq!(p["delta"], 1e-5, "{s}");
                    (
                        s["name"].as_str().unwrap().to_string(),
                        p["epsilon"].as_f64().unwrap(),
                        p["exhausted"].as_bool().unwrap(),
                    )
                })
                .collect();
            assert_eq!(spent.len(), 4, "{sites}");
            let largest = spent.iter().map(|s| s.1).fold(0.0, f64::max);
            let p = &status["privacy"];
            assert_eq!(p["epsilon"].as_f64(), Some(largest), "{status}");
            assert_eq!(p["sites"], 4, "{status}");
            assert!(largest > 0.0 && largest <= BUDGET, "{spent:?}");
            assert!(
                largest >= federation,
                "ε went down: {federation} → {largest}"
            );
            federation = largest;
            let exhausted = spent.iter().filter(|s| s.2).count();
            assert_eq!(p["sites_exhausted"], exhausted as u64, "{status}");
            exhausted_seen = exhausted_seen.max(exhausted);
            let (_, text) = get(&format!("{base}/metrics"), Some(TOKEN)).await.unwrap();
            assert_eq!(metric(&text, "cohort_privacy_epsilon"), largest);
            assert_eq!(
                metric(&text, "cohort_privacy_sites_exhausted"),
                exhausted as f64
            );
            assert_eq!(summary.failed, None, "round {}", summary.round);
            rounds.push((summary.round, summary.sites, exhausted));
        }
        let summary = run.await.unwrap().unwrap();
        for a in agents {
            a.await.unwrap().unwrap();
        }
        (summary, rounds, exhausted_seen)
    });
    let (summary, rounds, exhausted_seen) = first;

    // Training stopped before `rounds.count`, saying why.
    let reason = summary
        .stopped
        .clone()
        .expect("the run stopped at the budget");
    assert!(reason.starts_with("privacy budget:"), "{reason}");
    assert!(reason.contains("rounds.min_sites = 3"), "{reason}");
    assert!(
        summary.rounds_completed < 60,
        "{}",
        summary.rounds_completed
    );
    // A site out of budget was left out while enough others went on: rounds of 3 sites
    // after the first rounds of 4, and no site was ever asked a round it had to decline.
    assert!(exhausted_seen >= 1, "{rounds:?}");
    assert!(rounds.iter().any(|r| r.1 == 4), "{rounds:?}");
    assert!(rounds.iter().any(|r| r.1 == 3 && r.2 >= 1), "{rounds:?}");
    // A round trains only sites with budget left after the round before it.
    for w in rounds.windows(2) {
        assert!(w[1].1 + w[0].2 <= 4, "{rounds:?}");
    }
    assert_eq!(summary.received.declines, 0, "{:?}", summary.received);
    // The summary holds each site's spend, within its budget; at least two cannot go on.
    assert_eq!(summary.privacy.len(), 4);
    let out: Vec<_> = summary
        .privacy
        .iter()
        .filter(|(_, p)| p.exhausted(None))
        .collect();
    assert!(out.len() >= 2, "{:?}", summary.privacy);
    for (site, p) in &summary.privacy {
        assert!(p.epsilon > 0.0 && p.epsilon <= BUDGET, "{site}: {p:?}");
    }
    // The model learnt despite the noise.
    let accuracy = summary.last.as_ref().unwrap().eval.accuracy.unwrap();
    assert!(accuracy > 0.6, "{accuracy}");

    // Restarted, coordinator and agents: the coordinator waits for the sites (one may come
    // back with a larger budget), each says at its join what it has spent — from its own
    // privacy.toml — and training stops again with the same reason, without a round.
    // A new runtime, as a new process would have: the first one's tasks (its status server
    // holds the store) end with it.
    drop(rt);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let again = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(cohort_coordinator::run(coordinator(&pki, &data), Some(tx)));
        let Ok(endpoints) = rx.await else {
            panic!("the coordinator ended before serving: {:?}", run.await);
        };
        let port = endpoints.grpc.port();
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| tokio::spawn(cohort_agent::run(agent(&pki, s, port, true))))
            .collect();
        let summary = run.await.unwrap().unwrap();
        for a in agents {
            a.await.unwrap().unwrap();
        }
        summary
    });
    assert_eq!(again.rounds_completed, summary.rounds_completed);
    assert_eq!(again.stopped.as_deref(), Some(reason.as_str()));
    assert_eq!(again.privacy, summary.privacy);
}
