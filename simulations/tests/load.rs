//! `cohort-sim load` in shards against one coordinator, configured with the load-test
//! overlay's own coordinator.toml: what an indexed Kubernetes Job does, in one process.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;

use cohort_ca::demo_keys::{DEFAULT_VALIDITY_DAYS, ProvisionOptions, provision};
use cohort_sim::load::{LoadArgs, run, share};

#[test]
fn two_shards_of_synthetic_sites_complete_the_load_test_overlays_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let sites = 6;
    provision(&ProvisionOptions {
        validity_days: DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: (0..sites).map(|i| format!("site-{i:03}")).collect(),
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .unwrap();
    // The overlay's configuration, pointed at this test's files and port.
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes/overlays/loadtest/coordinator.toml");
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(overlay).unwrap()).unwrap();
    config.insert("listen".into(), "127.0.0.1:0".into());
    config.insert(
        "data_dir".into(),
        dir.path().join("data").display().to_string().into(),
    );
    config.remove("status");
    let tls = config["tls"].as_table().unwrap().clone();
    let mut tls = tls;
    for (key, file) in [
        ("ca_cert", "ca.pem"),
        ("cert", "coordinator/cert.pem"),
        ("key", "coordinator/key.pem"),
        ("manifest", "coordinator/manifest.toml"),
    ] {
        tls.insert(key.into(), pki.join(file).display().to_string().into());
    }
    config.insert("tls".into(), tls.into());
    let rounds = config["rounds"].as_table().unwrap().clone();
    let mut rounds = rounds;
    rounds.insert("count".into(), 2.into());
    rounds.insert("min_sites".into(), (sites as i64).into());
    config.insert("rounds".into(), rounds.into());
    let config =
        cohort_coordinator::CoordinatorConfig::parse(&toml::to_string(&config).unwrap()).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let coordinator = tokio::spawn(cohort_coordinator::run_with_progress(
            config,
            Some(tx),
            None,
        ));
        let port = rx.await.unwrap().grpc.port();
        let shard = |shard: usize| LoadArgs {
            coordinator: format!("https://127.0.0.1:{port}"),
            server_name: Some("localhost".into()),
            pki: pki.clone(),
            sites,
            shard,
            shards: 2,
        };
        let (a, b) = (shard(0), shard(1));
        assert_eq!(share(&a), vec![0, 2, 4]);
        assert_eq!(share(&b), vec![1, 3, 5]);
        let (ra, rb) = tokio::join!(run(&a), run(&b));
        ra.unwrap();
        rb.unwrap();
        coordinator.await.unwrap().unwrap()
    });
    assert!(summary.secure);
    assert_eq!(summary.rounds().unwrap().len(), 2);
    assert!(summary.rounds().unwrap().iter().all(|r| r.sites == sites));
    // A shard outside the Job's range is refused, naming both.
    let bad = LoadArgs {
        coordinator: "https://127.0.0.1:1".into(),
        server_name: None,
        pki: pki.clone(),
        sites,
        shard: 2,
        shards: 2,
    };
    let err = rt.block_on(run(&bad)).unwrap_err().to_string();
    assert!(err.contains("--shard 2 of --shards 2"), "{err}");
}
