//! A coordinator and four hospital agents in one process over real gRPC with mutual TLS 1.3,
//! secure aggregation on, on the shipped heart-disease data.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cohort_sim::run::{Summary, run_file};
use cohort_testkit::heart::{SCHEMA, SITES, csv as data};

/// A heart-disease scenario with `extra` appended (faults, overrides).
fn scenario(dir: &Path, rounds: u64, secure: bool, extra: &str) -> PathBuf {
    let mut text = format!(
        "rounds = {rounds}\nsecure = {secure}\ntest_fraction = 0.34\nsplit_seed = 42\nstage_timeout_secs = 5\ntrain_timeout_secs = 5\n"
    );
    // Top-level keys at the start of `extra` (before its first table) belong up here.
    let (top, extra) = match extra.find('[') {
        Some(i) if !extra[..i].trim().is_empty() => extra.split_at(i),
        // Only top-level keys.
        None if !extra.contains("#MODEL") => (extra, ""),
        _ => ("", extra),
    };
    // ... except `secagg.` keys, which go into the [secagg] table below.
    let (secagg, top): (Vec<&str>, Vec<&str>) = top
        .lines()
        .partition(|l| l.trim_start().starts_with("secagg."));
    text.push_str(&top.join("\n"));
    text.push('\n');
    for site in SITES {
        text.push_str(&format!(
            "\n[[sites]]\nname = \"{site}\"\ncsv = {:?}\n",
            data(site)
        ));
    }
    text.push_str(SCHEMA);
    text.push_str(
        r#"
[model]
{MODEL}

[training]
optimizer = "adam"
learning_rate = 0.001
batch_size = 4
local_steps = 100

[secagg]
quant_bits = 20
modulus_bits = 64
max_weight = 1000
{SECAGG}
"#,
    );
    let secagg: Vec<&str> = secagg
        .iter()
        .map(|l| l.trim_start().trim_start_matches("secagg."))
        .collect();
    text = text.replace("{SECAGG}", &secagg.join("\n"));
    text = text.replace("{MODEL}", model_lines(extra));
    text.push_str(extra.split("#MODEL").next().unwrap_or(""));
    let path = dir.join(format!("scenario-{secure}-{rounds}-{}.toml", extra.len()));
    std::fs::write(&path, text).expect("write scenario");
    path
}

/// `extra` may end with `#MODEL` and lines for the [model] table (default: logistic regression).
fn model_lines(extra: &str) -> &str {
    extra.split("#MODEL").nth(1).unwrap_or("kind = \"logreg\"")
}

fn run(dir: &Path, rounds: u64, secure: bool, extra: &str) -> Summary {
    let out = dir.join(format!("out-{secure}-{rounds}-{}", extra.len()));
    let summary = run_file(&scenario(dir, rounds, secure, extra), &out).expect("scenario runs");
    for f in [
        "summary.json",
        "rounds.csv",
        "accuracy.png",
        "coordinator.toml",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    // The written configuration is the coordinator's own: its model exports as is.
    let config =
        cohort_coordinator::CoordinatorConfig::load(&out.join("coordinator.toml")).unwrap();
    let exported =
        cohort_coordinator::export::export_model(&config, None, &out.join("model.safetensors"))
            .unwrap();
    assert_eq!(exported.round, summary.rounds_completed as u64);
    // Each round carries every site's accuracy and the example-weighted accuracy, which for
    // the last round follows from the final per-site results.
    if let Some(last) = summary.rounds.last() {
        assert_eq!(last.site_accuracy.len(), summary.per_site.len());
        let total: u64 = summary.per_site.values().map(|s| s.test_examples).sum();
        let weighted = summary
            .per_site
            .values()
            .map(|s| s.accuracy.unwrap() * s.test_examples as f64)
            .sum::<f64>()
            / total as f64;
        assert!((last.weighted_accuracy.unwrap() - weighted).abs() < 1e-12);
        // The mean of sites is the plain mean of the per-site values.
        let mean = summary
            .per_site
            .values()
            .map(|s| s.accuracy.unwrap())
            .sum::<f64>()
            / summary.per_site.len() as f64;
        assert!((last.accuracy.unwrap() - mean).abs() < 1e-12);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in ["rounds_completed", "secure", "final", "rounds", "per_site"] {
        assert!(json.get(key).is_some(), "summary.json has {key}");
    }
    summary
}

#[test]
fn secure_training_learns_and_matches_plain_fedavg() {
    let dir = tempfile::tempdir().unwrap();
    let secure = run(dir.path(), 3, true, "");
    assert_eq!(secure.rounds_completed, 3);
    assert!(secure.secure);
    assert!(
        secure.final_.accuracy > secure.initial.accuracy,
        "accuracy {:?} -> {:?}",
        secure.initial.accuracy,
        secure.final_.accuracy
    );
    // Binary metrics beside accuracy, and a summed confusion matrix over every test row.
    let m = &secure.final_.weighted;
    assert!(
        m.balanced_accuracy.is_some() && m.f1.is_some() && m.auc.is_some(),
        "{m:?}"
    );
    let test_rows: u64 = secure.per_site.values().map(|s| s.test_examples).sum();
    assert_eq!(secure.final_.confusion.iter().sum::<u64>(), test_rows);
    assert!(secure.final_.loss < secure.initial.loss - 0.05);
    assert_eq!(secure.per_site.len(), 4);
    assert!(secure.rounds.iter().all(|r| r.sites == 4 && r.dropped == 0));
    // What the coordinator received: updates only as SecAgg+ chunks, never in the clear.
    assert_eq!(secure.coordinator_received.plain_updates, 0);
    assert!(secure.coordinator_received.secagg_chunks >= 4 * 4 * 4);

    // Same seeds without secure aggregation: the only difference is quantisation (q = 20).
    let plain = run(dir.path(), 3, false, "");
    assert!(!plain.secure);
    // the plain run is the control: there the updates do arrive in the clear
    assert_eq!(plain.coordinator_received.plain_updates, 4 * 4);
    assert_eq!(plain.coordinator_received.secagg_chunks, 0);
    assert!(
        (secure.final_.loss - plain.final_.loss).abs() < 1e-3,
        "{} vs {}",
        secure.final_.loss,
        plain.final_.loss
    );
    assert!((secure.final_.accuracy.unwrap() - plain.final_.accuracy.unwrap()).abs() < 0.02);
}

/// `[privacy]` for every site, secure aggregation on: the hospitals train with DP-SGD, the
/// smallest (switzerland, 31 training rows) runs out of budget first, and training stops with
/// a message once a round of four can no longer be had. summary.json and rounds.csv say what
/// each site and the federation spent.
#[test]
fn a_private_federation_stops_at_the_budget_and_the_summary_says_what_was_spent() {
    let dir = tempfile::tempdir().unwrap();
    let private = run(
        dir.path(),
        30,
        true,
        "[privacy]\nepsilon = 3.0\nnoise_multiplier = 3.5\n",
    );
    let reason = private.stopped.clone().expect("stopped at the budget");
    assert!(
        reason.starts_with("privacy budget: switzerland"),
        "{reason}"
    );
    // Switzerland's rounds: 3 fit in ε = 3 at this sampling rate and noise.
    assert_eq!(private.rounds_completed, 3, "{reason}");
    let p = private.privacy.as_ref().expect("privacy in summary.json");
    assert_eq!(p.per_site.len(), 4);
    assert_eq!(p.delta, 1e-5);
    let swiss = &p.per_site["switzerland"];
    assert!(
        swiss.epsilon <= 3.0 && swiss.next_epsilon.unwrap() > 3.0,
        "{swiss:?}"
    );
    assert_eq!(p.epsilon, swiss.epsilon, "the smallest site spends fastest");
    for (site, s) in &p.per_site {
        assert!(s.epsilon > 0.0 && s.epsilon <= s.budget, "{site}: {s:?}");
    }
    let spent: Vec<f64> = private.rounds.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(spent.windows(2).all(|w| w[0] < w[1]), "{spent:?}");
    assert_eq!(*spent.last().unwrap(), p.epsilon);
    let out = dir.path().join("out-true-30-47");
    let csv = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",epsilon,site_epsilon"),
        "{csv}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["stopped"].as_str(), Some(reason.as_str()));
    assert_eq!(json["privacy"]["per_site"]["va"]["budget"], 3.0);
    // Noise costs little here: the model still learns.
    assert!(
        private.final_.accuracy.unwrap() > private.initial.accuracy.unwrap(),
        "{:?} -> {:?}",
        private.initial.accuracy,
        private.final_.accuracy
    );
}

/// Site-level DP under secure aggregation through cohort-sim: every hospital adds discrete
/// Gaussian noise before masking; the federation's ε grows every round, the run stops before
/// the budget, and summary.json and rounds.csv say what was spent.
#[test]
fn a_site_level_private_federation_stops_before_its_budget_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        30,
        true,
        "[site_level_privacy]\nnoise_multiplier = 2.0\nclip = 0.5\nepsilon = 6.0\n",
    );
    let reason = s.stopped.clone().expect("stopped at the budget");
    assert!(reason.starts_with("site-level privacy budget"), "{reason}");
    let spent = s
        .site_level_privacy
        .expect("site_level_privacy in summary.json");
    assert!(spent.epsilon > 0.0 && spent.epsilon <= 6.0, "{spent:?}");
    assert_eq!((spent.budget, spent.delta), (6.0, 1e-5));
    assert!(
        s.rounds_completed >= 2 && s.rounds_completed < 30,
        "{reason}"
    );
    let eps: Vec<f64> = s.rounds.iter().map(|r| r.site_epsilon.unwrap()).collect();
    assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
    assert_eq!(*eps.last().unwrap(), spent.epsilon);
    assert!(
        s.rounds
            .iter()
            .all(|r| r.clipped == 0 && r.failed.is_none())
    );
    let out = dir.path().join("out-true-30-69");
    let csv = std::fs::read_to_string(out.join("rounds.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",epsilon,site_epsilon"),
        "{csv}"
    );
}

/// Central DP in plain mode through cohort-sim: the coordinator clips and noises the mean
/// itself, moving the clip with adaptive clipping; summary.json says which mode and where
/// the clip went.
#[test]
fn a_central_dp_federation_reports_its_mode_and_its_moving_clip() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        6,
        false,
        "[site_level_privacy]\nnoise_multiplier = 3.0\nclip = 1.0\nepsilon = 50.0\nadaptive_clip = { count_noise = 4.0 }\n",
    );
    assert_eq!(s.stopped, None);
    assert_eq!(s.rounds_completed, 6);
    let spent = s
        .site_level_privacy
        .expect("site_level_privacy in summary.json");
    assert_eq!(spent.mode, "central");
    let clips: Vec<f64> = s.rounds.iter().map(|r| r.site_clip.unwrap()).collect();
    assert_eq!(clips[0], 1.0);
    assert!(clips.iter().all(|c| c.is_finite() && *c > 0.0), "{clips:?}");
    let eps: Vec<f64> = s.rounds.iter().map(|r| r.site_epsilon.unwrap()).collect();
    assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
    assert!(s.final_.accuracy.is_some());
}

/// Plain mode (the coordinator sees every update): one of the four hospitals — cleveland,
/// the largest — sends −10 times its update every round. The mean follows it; the median
/// and the trimmed mean keep the model near the clean run's.
#[test]
fn robust_aggregation_keeps_a_poisoned_federation_near_the_clean_run() {
    let dir = tempfile::tempdir().unwrap();
    let poison = "[[faults]]\nrounds = [1, 2, 3, 4, 5]\nstage = \"masked_input\"\nfraction = 0.25\naction = \"poison\"\n";
    let accuracy = |s: &Summary| s.final_.accuracy.unwrap();
    let clean = run(dir.path(), 5, false, "");
    let mean = run(dir.path(), 5, false, poison);
    assert!(
        accuracy(&mean) < accuracy(&clean) - 0.1,
        "the mean should follow the poisoned site: {} vs clean {}",
        accuracy(&mean),
        accuracy(&clean)
    );
    for rule in ["rule = \"median\"", "rule = \"trimmed_mean\"\ntrim = 0.25"] {
        let robust = run(
            dir.path(),
            5,
            false,
            &format!("{poison}\n[aggregation]\n{rule}\n"),
        );
        assert_eq!(robust.rounds_completed, 5);
        assert!(
            (accuracy(&robust) - accuracy(&clean)).abs() < 0.05,
            "{rule}: {} vs clean {}",
            accuracy(&robust),
            accuracy(&clean)
        );
    }
}

/// Five sites (cleveland's rows dealt alternately into two), plain mode, the first of them
/// poisoning every round in each of the ways a poisoner can: −10 × its update, its sign
/// flipped, or N(0, 1) noise. Multi-Krum (f = 1, which needs five sites) and the median keep
/// the model near the clean run's whatever the attack; the mean follows the amplified one.
#[test]
fn krum_and_the_median_withstand_each_kind_of_poisoned_update_among_five_sites() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(data("cleveland")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let (mut a, mut b) = (vec![header], vec![header]);
    for (i, line) in lines.enumerate() {
        if i % 2 == 0 {
            a.push(line)
        } else {
            b.push(line)
        }
    }
    let (pa, pb) = (
        dir.path().join("cleveland-a.csv"),
        dir.path().join("cleveland-b.csv"),
    );
    std::fs::write(&pa, a.join("\n") + "\n").unwrap();
    std::fs::write(&pb, b.join("\n") + "\n").unwrap();
    let five = |name: &str, extra: &str| -> Summary {
        let path = scenario(dir.path(), 5, false, extra);
        let text = std::fs::read_to_string(&path).unwrap();
        let cleveland = format!(
            "\n[[sites]]\nname = \"cleveland\"\ncsv = {:?}\n",
            data("cleveland")
        );
        assert!(text.contains(&cleveland), "{text}");
        let split = format!(
            "\n[[sites]]\nname = \"cleveland-a\"\ncsv = {pa:?}\n\n[[sites]]\nname = \"cleveland-b\"\ncsv = {pb:?}\n"
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text.replace(&cleveland, &split)).unwrap();
        let s = run_file(&path, &dir.path().join(name)).expect("scenario runs");
        assert_eq!((s.rounds_completed, s.per_site.len()), (5, 5), "{name}");
        s
    };
    let accuracy = |s: &Summary| s.final_.accuracy.unwrap();
    let clean = accuracy(&five("clean", ""));
    let attack = |action: &str| {
        format!(
            "[[faults]]\nrounds = [1, 2, 3, 4, 5]\nstage = \"masked_input\"\nfraction = 0.2\naction = \"{action}\"\n"
        )
    };
    let mean = accuracy(&five("mean-poison", &attack("poison")));
    assert!(
        mean < clean - 0.1,
        "the mean follows the poisoner: {mean} vs {clean}"
    );
    for action in ["poison", "sign_flip", "random"] {
        for rule in ["rule = \"krum\"\nbyzantine = 1", "rule = \"median\""] {
            let name = format!("{action}-{}", rule.len());
            let robust = accuracy(&five(
                &name,
                &format!("{}\n[aggregation]\n{rule}\n", attack(action)),
            ));
            assert!(
                (robust - clean).abs() < 0.05,
                "{action}, {rule}: {robust} vs clean {clean}"
            );
        }
    }
}

/// Secure mode, where no robust rule can see an update: `secagg.norm_bound` has every site
/// running the agent scale its update to the bound before masking (it is in the round
/// context, so no site can be told a looser one). A site whose training went wrong — here
/// the `poison` fault, applied to the update before the agent's own code quantises it —
/// then pulls the mean by at most the bound: the run stays within 0.05 of its clean run,
/// where without the bound it collapses.
#[test]
fn a_norm_bound_under_secure_aggregation_limits_a_poisoned_update() {
    let dir = tempfile::tempdir().unwrap();
    let poison = "[[faults]]\nrounds = [1, 2, 3, 4, 5]\nstage = \"masked_input\"\nfraction = 0.25\naction = \"poison\"\n";
    let accuracy = |s: &Summary| s.final_.accuracy.unwrap();
    let bound = "secagg.norm_bound = 0.1\n";
    let clean = run(dir.path(), 5, true, bound);
    let bounded = run(dir.path(), 5, true, &format!("{bound}{poison}"));
    let unbounded = run(dir.path(), 5, true, poison);
    assert_eq!(bounded.rounds_completed, 5);
    assert!(
        (accuracy(&bounded) - accuracy(&clean)).abs() < 0.05,
        "{} vs clean {}",
        accuracy(&bounded),
        accuracy(&clean)
    );
    assert!(
        accuracy(&unbounded) < accuracy(&bounded) - 0.1,
        "without the bound: {} vs {}",
        accuracy(&unbounded),
        accuracy(&bounded)
    );
}

#[test]
fn a_site_that_dies_after_sharing_keys_is_recovered_over_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        3,
        true,
        "\n[[faults]]\nrounds = [2]\nstage = \"masked_input\"\nfraction = 0.25\n",
    );
    assert_eq!(s.rounds_completed, 3);
    assert_eq!(s.rounds[1].sites, 4);
    assert_eq!(s.rounds[1].dropped, 1, "{:?}", s.rounds);
    assert_eq!(s.rounds[0].dropped, 0);
    assert!(s.final_.loss < s.initial.loss);
}

#[test]
fn a_wrong_length_upload_drops_only_that_site() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        2,
        true,
        "\n[[faults]]\nrounds = [1]\nstage = \"masked_input\"\naction = \"truncate\"\nfraction = 0.25\n",
    );
    assert_eq!(s.rounds_completed, 2);
    assert_eq!(s.rounds[0].dropped, 1, "{:?}", s.rounds);
    assert_eq!(s.rounds[1].dropped, 0);
}

#[test]
fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    use cohort_ca::demo_keys::{ProvisionOptions, provision};
    let dir = tempfile::tempdir().unwrap();
    let opts = |out: PathBuf| ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out,
        sites: vec!["cleveland".into()],
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    };
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    provision(&opts(ours.clone())).unwrap();
    provision(&opts(theirs.clone())).unwrap();
    let coordinator = cohort_coordinator::CoordinatorConfig::parse(&format!(
        r#"
listen = "127.0.0.1:0"
data_dir = {data:?}
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
[rounds]
count = 1
min_sites = 4
wait_for_sites_secs = 3
[model]
kind = "logreg"
inputs = 13
{SCHEMA}
[training]
learning_rate = 0.001
batch_size = 4
local_steps = 10
"#,
        data = dir.path().join("data"),
        ca = ours.join("ca.pem"),
        cert = ours.join("coordinator/cert.pem"),
        key = ours.join("coordinator/key.pem"),
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(cohort_coordinator::run(coordinator, Some(tx)));
        let addr = rx.await.unwrap().grpc;
        let site = theirs.join("sites/cleveland");
        let agent = cohort_agent::AgentConfig::parse(&format!(
            r#"
site = "cleveland"
[coordinator]
url = "https://127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
[data]
csv = {csv:?}
{SCHEMA}
[reconnect]
initial_ms = 100
max_ms = 200
"#,
            port = addr.port(),
            ca = ours.join("ca.pem"),
            cert = site.join("cert.pem"),
            key = site.join("key.pem"),
            csv = data("cleveland"),
        ))
        .unwrap();
        let agent = tokio::spawn(cohort_agent::run(agent));
        let refused = tokio::time::timeout(std::time::Duration::from_secs(60), agent)
            .await
            .expect("the agent gives up within a minute")
            .unwrap()
            .expect_err("no site may join");
        // The coordinator does not give up: it waits for sites it can admit.
        assert!(!server.is_finished(), "the coordinator keeps waiting");
        server.abort();
        refused
    });
    assert!(
        err.is::<cohort_agent::GaveUp>(),
        "a permanent refusal: {err:#}"
    );
    assert!(
        format!("{err:#}").contains("refused this site's certificate"),
        "{err:#}"
    );
}

#[test]
fn an_mlp_trained_with_fedadam_learns() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        3,
        true,
        "\n[strategy]\nname = \"fedadam\"\nserver_lr = 0.05\n#MODEL\nkind = \"mlp\"\nhidden = [8]\nseed = 3\n",
    );
    assert_eq!(s.rounds_completed, 3);
    assert!(
        s.final_.loss < s.initial.loss,
        "{} -> {}",
        s.initial.loss,
        s.final_.loss
    );
    assert!(s.final_.accuracy > Some(0.7), "{:?}", s.final_.accuracy);
}

/// A site dies half-way through its masked input: the attempt is aborted. The other three
/// sent their whole inputs in it, and an honest site sends its input for a round once (a
/// second attempt over the same sites minus one would give that one's input away), so the
/// round is given up rather than retried, with the model unchanged; the next round runs
/// with the site back. (Before the contribution ledger the round was retried with the three
/// others: exactly the second sum the differencing attack needs.)
#[test]
fn a_site_that_dies_mid_upload_costs_its_round_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        3,
        true,
        // Every round waits for all four: the site that died is noticed at once now, so
        // without this the next round could start before it has reconnected.
        "min_sites = 4\nsecagg.max_colluders = 0\n[[faults]]\nrounds = [2]\nstage = \"masked_input\"\naction = \"interrupt\"\nfraction = 0.25\n",
    );
    assert_eq!(s.rounds_completed, 3);
    assert_eq!(s.rounds[0].attempts, 1);
    assert_eq!(s.rounds[0].failed, None);
    let failed = s.rounds[1].failed.as_deref().unwrap_or_default();
    assert!(
        failed.contains("already sent their input for this round"),
        "{:?}",
        s.rounds
    );
    assert_eq!(s.rounds[1].attempts, 1, "not retried: {:?}", s.rounds);
    // The model is the round before's: its evaluation is carried, not repeated.
    assert_eq!(s.rounds[1].loss, s.rounds[0].loss);
    // The site reconnects and is back for the next round.
    assert_eq!(s.rounds[2].sites, 4);
    assert_eq!(s.rounds[2].failed, None);
    assert!(s.final_.loss < s.initial.loss);
}

/// One site sends a well-formed masked input whose content no honest input can have (its
/// clipped-value count beyond any bound): only the unmasked sum shows it, and nothing says
/// whose it is without zero-knowledge range proofs. The sum is refused, the round fails with
/// the model as it was, and the run goes on. (Round-integrity review: the driver retried the
/// same sites and stopped the whole run after `max_attempts`.)
#[test]
fn an_out_of_range_input_fails_its_round_and_the_next_round_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(
        dir.path(),
        3,
        true,
        "min_sites = 4\n[[faults]]\nrounds = [2]\nstage = \"masked_input\"\naction = \"out_of_range\"\nfraction = 0.25\n",
    );
    assert_eq!(s.rounds_completed, 3);
    let failed = s.rounds[1].failed.as_deref().unwrap_or_default();
    assert!(
        failed.contains("the unmasked sum is refused") && failed.contains("clipped"),
        "{:?}",
        s.rounds
    );
    assert_eq!(s.rounds[1].attempts, 1, "{:?}", s.rounds);
    assert_eq!(s.rounds[2].failed, None);
    assert_eq!(s.rounds[2].sites, 4);
    assert!(s.final_.loss < s.initial.loss);
}

/// The same refused sum in a federation whose sites all train with DP-SGD: each update a
/// site sends is a release its own accountant prices, so the round is retried with the same
/// sites (their ledgers allow a fresh release) instead of given up after one attempt — and
/// every attempt is paid for: the sites end the run having spent more than in the same run
/// without the fault.
#[test]
fn a_private_federation_retries_a_refused_round_and_pays_for_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let privacy = "[privacy]\nepsilon = 100.0\nnoise_multiplier = 1.0\n";
    let clean = run(dir.path(), 3, true, &format!("min_sites = 4\n{privacy}"));
    assert!(
        clean
            .rounds
            .iter()
            .all(|r| r.attempts == 1 && r.failed.is_none())
    );
    let s = run(
        dir.path(),
        3,
        true,
        &format!(
            "min_sites = 4\n{privacy}[[faults]]\nrounds = [2]\nstage = \"masked_input\"\naction = \"out_of_range\"\nfraction = 0.25\n"
        ),
    );
    assert_eq!(s.rounds_completed, 3);
    let round2 = &s.rounds[1];
    assert!(
        round2
            .failed
            .as_deref()
            .unwrap_or_default()
            .contains("the unmasked sum is refused"),
        "{:?}",
        s.rounds
    );
    assert_eq!(
        round2.attempts, 3,
        "retried with the same private sites: {:?}",
        s.rounds
    );
    assert_eq!(s.rounds[2].failed, None);
    let spent = |s: &Summary| s.privacy.as_ref().unwrap().epsilon;
    assert!(
        spent(&s) > spent(&clean),
        "three attempts cost more than one: {} vs {}",
        spent(&s),
        spent(&clean)
    );
}

/// A short scenario text for checking how mistakes in it are reported.
fn small_scenario(dir: &Path, top: &str, model: &str, secagg: &str) -> PathBuf {
    let mut text = format!("rounds = 1\n{top}\n");
    for site in SITES {
        text.push_str(&format!(
            "\n[[sites]]\nname = \"{site}\"\ncsv = {:?}\n",
            data(site)
        ));
    }
    text.push_str(&format!(
        "\n[schema]\nlabel = {{ column = \"num\", greater_than = 0 }}\ndrop = [\"slope\", \"ca\", \"thal\"]\n\n[model]\n{model}\n\n[training]\nlearning_rate = 0.001\nbatch_size = 4\nlocal_steps = 1\n\n[secagg]\n{secagg}\n"
    ));
    let path = dir.join("mistake.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn mistakes_in_a_scenario_are_reported_at_the_users_own_line() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown [model] key: named with its line in the scenario, not in the configuration
    // generated from it.
    let path = small_scenario(dir.path(), "", "kind = \"logreg\"\nclasses = 10", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().position(|l| l.starts_with("classes")).unwrap() + 1;
    let err = format!(
        "{:#}",
        run_file(&path, &dir.path().join("out")).unwrap_err()
    );
    assert!(
        err.contains(&format!("mistake.toml, line {line}: [model] classes"))
            && err.contains("unknown field"),
        "{err}"
    );
    // `secure` and `[secagg] enabled` are one setting: disagreeing is an error, not a
    // silent winner.
    let path = small_scenario(
        dir.path(),
        "secure = true",
        "kind = \"logreg\"",
        "enabled = false",
    );
    let err = format!(
        "{:#}",
        run_file(&path, &dir.path().join("out")).unwrap_err()
    );
    assert!(
        err.contains("secure = true but [secagg] enabled = false"),
        "{err}"
    );
}

/// The coordinator waits for its sites as long as it takes; a simulation, which owns every
/// site, must not: with one hospital's CSV unusable, the run stops and says which agent
/// stopped and why, instead of waiting forever.
#[test]
fn a_site_that_cannot_start_ends_the_simulation_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("va-without-label.csv");
    let text = std::fs::read_to_string(data("va")).unwrap();
    let cut: Vec<String> = text
        .lines()
        .map(|l| l.rsplit_once(',').map_or(l, |(rest, _)| rest).to_string())
        .collect();
    std::fs::write(&bad, cut.join("\n") + "\n").unwrap();
    let path = scenario(dir.path(), 2, true, "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&format!("{:?}", data("va")), &format!("{bad:?}"));
    std::fs::write(&path, text).unwrap();
    let Err(err) = run_file(&path, &dir.path().join("out")) else {
        panic!("the run cannot complete");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("too few sites are left for a round"),
        "{text}"
    );
    assert!(text.contains("agents that stopped: va:"), "{text}");
    assert!(
        text.contains("num"),
        "names the missing label column: {text}"
    );
}
