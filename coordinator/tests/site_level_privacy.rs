//! Site-level differential privacy under secure aggregation, with the real agents: every
//! hospital adds its own discrete Gaussian noise before masking, the coordinator accounts for
//! every noisy sum it unmasks, shows the federation's ε after each round (status API,
//! `/metrics`, the round records), stops training before the budget is passed, and a
//! restarted coordinator resumes the account instead of starting from zero.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use cohort_coordinator::CoordinatorConfig;
use cohort_coordinator::status::client::get;
use cohort_protocols::privacy::{Accountant, central_gaussian, distributed_discrete_gaussian};
use serde_json::Value;

use cohort_testkit::prelude::*;

const TOKEN: &str = "a-status-token-for-site-level-dp";
const BUDGET: f64 = 8.0;
const Z: f64 = 2.0;

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
batch_size = 16
local_steps = 20
[privacy.site_level]
noise_multiplier = {Z}
clip = 0.5
epsilon = {BUDGET}
"#
        ))
        .build(CoordinatorConfig::parse)
}

fn agent(pki: &std::path::Path, site: &str, port: u16) -> cohort_agent::AgentConfig {
    config::agent(pki, site, port)
        .merge(SCHEMA)
        .set("policy.max_colluders", 0)
        // Each hospital insists on the noise it was promised: the round's set-up says z = 2.
        .set("policy.min_noise_multiplier", 1.9)
        .build(cohort_agent::AgentConfig::parse)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in the scrape:\n{text}"))
}

/// A running coordinator of this file's tests: the run, the status API's base URL (when
/// configured), the gRPC port, and each committed round as it comes.
struct Started {
    run: tokio::task::JoinHandle<anyhow::Result<cohort_coordinator::driver::RunSummary>>,
    base: String,
    port: u16,
    report: tokio::sync::mpsc::UnboundedReceiver<cohort_coordinator::driver::RoundRecord>,
}

/// Starts `cfg` in the current runtime and waits until it listens.
async fn start(cfg: CoordinatorConfig) -> Started {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (report_tx, report) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn(cohort_coordinator::run_with_progress(
        cfg,
        Some(tx),
        Some(report_tx),
    ));
    let endpoints = rx.await.unwrap();
    Started {
        run,
        base: endpoints
            .status
            .map_or_else(String::new, |a| format!("http://{a}")),
        port: endpoints.grpc.port(),
        report,
    }
}

#[test]
fn the_federation_accounts_for_every_noisy_sum_and_stops_before_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let data = dir.path().join("data");
    let cfg = coordinator(&pki, &data);
    let dim = cfg.model.spec().num_params() as u32;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (summary, rounds) = rt.block_on(async {
        let Started {
            run,
            base,
            port,
            mut report,
        } = start(coordinator(&pki, &data)).await;
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| tokio::spawn(cohort_agent::run(agent(&pki, s, port))))
            .collect();
        let mut rounds = Vec::new();
        while let Some(record) = report.recv().await {
            let s = record.summary;
            assert_eq!(s.failed, None, "round {}", s.round);
            let eps = s
                .site_epsilon
                .expect("every round records the site-level ε");
            let (_, body) = get(&format!("{base}/api/v1/status"), Some(TOKEN))
                .await
                .unwrap();
            let status: Value = serde_json::from_str(&body).unwrap();
            let p = &status["site_level_privacy"];
            assert_eq!(p["epsilon"].as_f64(), Some(eps), "{status}");
            assert_eq!(p["budget"], BUDGET, "{status}");
            assert_eq!(p["noise_multiplier"], Z, "{status}");
            assert_eq!(p["min_survivors"], 3, "{status}");
            assert_eq!(p["mode"], "distributed", "{status}");
            assert_eq!(p["clip"], 0.5, "{status}");
            let (_, text) = get(&format!("{base}/metrics"), Some(TOKEN)).await.unwrap();
            assert_eq!(metric(&text, "cohort_privacy_site_epsilon"), eps);
            rounds.push((s.sites, s.dropped, s.clipped, eps));
        }
        let summary = run.await.unwrap().unwrap();
        for a in agents {
            a.await.unwrap().unwrap();
        }
        (summary, rounds)
    });

    // The account, recomputed independently of the coordinator from what the rounds say:
    // one distributed discrete Gaussian per round over its survivors, with the σ the
    // configuration gives (z Δ₂ / √3).
    let p = cfg.training_params(4, dim);
    let noise = p.noise.expect("training rounds carry noise");
    assert!((noise.sigma - Z * p.l2_sensitivity() / 3f64.sqrt()).abs() < 1e-9);
    let mut acc = Accountant::new();
    let mut last = 0.0;
    for (sites, dropped, clipped, eps) in &rounds {
        assert_eq!(*clipped, 0, "no clipped count is sent under site-level DP");
        let survivors = (sites - dropped) as u32;
        let mech =
            distributed_discrete_gaussian(survivors, noise.sigma, p.l2_sensitivity(), dim.into())
                .unwrap();
        acc.compose(mech, 1).unwrap();
        let expected = acc.epsilon(1e-5).unwrap().epsilon;
        assert!((eps - expected).abs() < 1e-9, "{eps} vs {expected}");
        assert!(*eps > last && *eps <= BUDGET, "{rounds:?}");
        last = *eps;
    }
    // Training stopped because a round over the fewest survivors a round accepts would pass
    // the budget, and not before.
    let reason = summary.stopped.clone().expect("stopped at the budget");
    assert!(reason.starts_with("site-level privacy budget"), "{reason}");
    let worst =
        distributed_discrete_gaussian(3, noise.sigma, p.l2_sensitivity(), dim.into()).unwrap();
    assert!(acc.epsilon_after(worst, 1, 1e-5).unwrap().epsilon > BUDGET);
    assert!(rounds.len() >= 5 && summary.rounds_completed == rounds.len() as u64);
    let spent = summary
        .site_level
        .clone()
        .expect("the summary carries the account");
    assert_eq!(spent.epsilon, last);
    assert!(summary.model.iter().all(|v| v.is_finite()));

    // A restarted coordinator resumes the account from the last committed round: it stops
    // at once, with the same figures, without a round and without waiting for a site.
    drop(rt);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let again = rt
        .block_on(cohort_coordinator::run(coordinator(&pki, &data), None))
        .unwrap();
    assert_eq!(again.rounds_completed, summary.rounds_completed);
    assert_eq!(again.stopped.as_deref(), Some(reason.as_str()));
    assert_eq!(again.site_level, summary.site_level);
}

fn plain_coordinator(
    pki: &std::path::Path,
    data: &std::path::Path,
    budget: f64,
) -> CoordinatorConfig {
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
enabled = false
[training]
learning_rate = 0.05
batch_size = 16
local_steps = 20
[privacy.site_level]
noise_multiplier = 2.0
clip = 4.0
epsilon = {budget}
[privacy.site_level.adaptive_clip]
target_quantile = 0.5
learning_rate = 0.5
count_noise = 5.0
"#
        ))
        .build(CoordinatorConfig::parse)
}

fn plain_agent(pki: &std::path::Path, site: &str, port: u16) -> cohort_agent::AgentConfig {
    config::agent(pki, site, port)
        .merge(SCHEMA)
        .set("policy.require_secure", false)
        .build(cohort_agent::AgentConfig::parse)
}

/// Runs a plain coordinator with the four hospitals until it stops; returns the summary and
/// each round's (site_clip, site_epsilon).
fn run_plain(
    pki: &std::path::Path,
    data: &std::path::Path,
    budget: f64,
) -> (cohort_coordinator::driver::RunSummary, Vec<(f64, f64)>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let Started {
            run,
            port,
            mut report,
            ..
        } = start(plain_coordinator(pki, data, budget)).await;
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| tokio::spawn(cohort_agent::run(plain_agent(pki, s, port))))
            .collect();
        let mut rounds = Vec::new();
        while let Some(record) = report.recv().await {
            let s = record.summary;
            assert_eq!(s.failed, None, "round {}", s.round);
            rounds.push((s.site_clip.unwrap(), s.site_epsilon.unwrap()));
        }
        let summary = run.await.unwrap().unwrap();
        for a in agents {
            a.await.unwrap().unwrap();
        }
        (summary, rounds)
    })
}

/// Plain mode, a coordinator trusted with the updates: it clips them, adds the noise itself
/// on the integer grid, moves the clip toward the median norm from a noisy count, prices
/// each round with the count, stops at the budget, and — restarted with a larger budget —
/// resumes both the account and the clip where they were.
#[test]
fn central_dp_in_plain_mode_adapts_its_clip_and_resumes_the_account_and_the_clip() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let data = dir.path().join("data");
    let (summary, rounds) = run_plain(&pki, &data, 10.0);
    let reason = summary.stopped.clone().expect("stopped at the budget");
    assert!(reason.starts_with("site-level privacy budget"), "{reason}");
    let per_round = central_gaussian(2.0, Some(5.0)).unwrap();
    let mut acc = Accountant::new();
    for (i, (_, eps)) in rounds.iter().enumerate() {
        acc.compose(per_round, 1).unwrap();
        let expected = acc.epsilon(1e-5).unwrap().epsilon;
        assert!(
            (eps - expected).abs() < 1e-9,
            "round {}: {eps} vs {expected}",
            i + 1
        );
    }
    assert!(acc.epsilon_after(per_round, 1, 1e-5).unwrap().epsilon > 10.0);
    // The clip starts at 4 and moves every round with the noisy count (with four sites
    // and σ_b = 5 the count is mostly noise: the unit test `adaptive_clipping_follows_the_
    // target_quantile_of_the_norms` shows where an exact count takes it).
    assert_eq!(rounds[0].0, 4.0);
    assert!(rounds.iter().any(|r| r.0 != 4.0), "{rounds:?}");
    let spent = summary.site_level.clone().unwrap();
    assert_eq!(spent.mode, "central");
    assert!(spent.clip.is_finite() && spent.clip > 0.0, "{spent:?}");
    assert!(summary.model.iter().all(|v| v.is_finite()));

    // The operator raises the budget and restarts: the account goes on from where it was
    // (the first new round's ε is the next composition, not a fresh start), and so does
    // the clip.
    let (more, next) = run_plain(&pki, &data, 13.0);
    assert!(!next.is_empty(), "{:?}", more.stopped);
    assert_eq!(next[0].0, spent.clip, "the first round after the restart");
    acc.compose(per_round, 1).unwrap();
    assert!((next[0].1 - acc.epsilon(1e-5).unwrap().epsilon).abs() < 1e-9);
    assert_eq!(
        more.rounds_completed,
        summary.rounds_completed + next.len() as u64
    );
}

/// A hospital keeps its own site-level budget in its contribution ledger, priced at the
/// fewest survivors a round accepts, whatever the coordinator's account says. Here the
/// coordinator would go on to ε = 8 (it prices the four survivors it gets); every site's own
/// budget is 5. The sites decline once their count would pass it, naming the setting, the
/// rounds fail, and the run stops for the operator — with no site past its own budget.
#[test]
fn each_site_keeps_its_own_site_level_budget_whatever_the_coordinator_counts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = provision(dir.path());
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (result, declines) = rt.block_on(async {
        let Started {
            run,
            base,
            port,
            mut report,
        } = start(coordinator(&pki, &data)).await;
        let agents: Vec<_> = SITES
            .iter()
            .map(|s| {
                let cfg = config::agent(&pki, s, port)
                    .merge(SCHEMA)
                    .set("policy.max_colluders", 0)
                    .set("policy.site_level_epsilon", 5.0)
                    .build(cohort_agent::AgentConfig::parse);
                tokio::spawn(cohort_agent::run(cfg))
            })
            .collect();
        let mut declines = Vec::new();
        while let Some(record) = report.recv().await {
            if record.summary.failed.is_some() {
                let (_, body) = get(&format!("{base}/api/v1/sites"), Some(TOKEN))
                    .await
                    .unwrap();
                let sites: Value = serde_json::from_str(&body).unwrap();
                for s in sites["sites"].as_array().unwrap() {
                    if let Some(reason) = s["last_decline"]["reason"].as_str() {
                        declines.push(reason.to_string());
                    }
                }
            }
        }
        let result = run.await.unwrap();
        for a in agents {
            a.abort();
        }
        (result, declines)
    });
    let err = result.expect_err("the rounds fail once the sites' budgets are spent");
    assert!(format!("{err:#}").contains("given up"), "{err:#}");
    assert!(
        declines
            .iter()
            .any(|d| d.contains("site-level privacy budget")
                && d.contains("policy.site_level_epsilon")),
        "{declines:?}"
    );
    for site in SITES {
        let text = std::fs::read_to_string(pki::bundle(&pki, site).join("ledger.toml")).unwrap();
        let ledger: toml::Table = toml::from_str(&text).unwrap();
        let rdp: Vec<f64> = ledger["site_level_rdp"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_float().unwrap())
            .collect();
        let acc =
            Accountant::resume(cohort_protocols::privacy::DEFAULT_ORDERS.to_vec(), rdp).unwrap();
        let eps = acc.epsilon(1e-5).unwrap().epsilon;
        assert!(eps > 0.0 && eps <= 5.0, "{site}: ε = {eps}");
    }
}
