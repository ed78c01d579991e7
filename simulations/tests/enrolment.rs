//! Keys born where they are used: the consortium's CA is created on its own, the coordinator
//! and four hospitals each make their key and a certificate signing request, the CA signs the
//! requests, and the federation trains with bundles that never held a private key. The CA's
//! directory is walked to show it never saw one but its own.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};

use cohort_coordinator::provision::{self, DEFAULT_VALIDITY_DAYS, Enrolment};

const SITES: [&str; 4] = ["cleveland", "hungary", "switzerland", "va"];

fn data(site: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/heart-disease")
        .join(format!("{site}.csv"))
}

/// Every file under `dir` that holds a private key.
fn private_keys(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .unwrap()
                .windows(11)
                .any(|w| w == b"PRIVATE KEY")
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Copies the files of `bundle` into `dir` (what a site does with what the CA sends back).
fn unpack(bundle: &Path, dir: &Path) {
    for entry in std::fs::read_dir(bundle).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn four_hospitals_enrol_with_their_own_keys_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("consortium-ca");
    provision::init(&ca, DEFAULT_VALIDITY_DAYS).unwrap();

    // The coordinator's host makes its key; the CA signs its request.
    let host = dir.path().join("coordinator-host");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let csr = provision::coordinator_request(&host, &names).unwrap();
    let pem = std::fs::read_to_string(&csr).unwrap();
    let bundle = provision::sign_request(
        &ca,
        &pem,
        Enrolment::Coordinator,
        "https://localhost:1",
        &names,
        DEFAULT_VALIDITY_DAYS,
    )
    .unwrap();
    unpack(&bundle, &host);

    // Each hospital enrols with the agent's own command.
    for site in SITES {
        let home = dir.path().join(site);
        let csr = cohort_agent::enroll::request(&home, site).unwrap();
        let pem = std::fs::read_to_string(&csr).unwrap();
        let bundle = provision::sign_request(
            &ca,
            &pem,
            Enrolment::Site,
            "https://localhost:1",
            &names,
            DEFAULT_VALIDITY_DAYS,
        )
        .unwrap();
        assert!(
            !bundle.join("key.pem").exists(),
            "a bundle never holds a key"
        );
        unpack(&bundle, &home);
    }
    // A site key or the coordinator's never reached the CA: only the CA's own is there.
    assert_eq!(private_keys(&ca), vec![ca.join("ca.key")]);
    // The manifest the last site received lists everyone, each with the key made at home.
    let manifest = std::fs::read(ca.join("manifest.toml")).unwrap();
    let ca_der = cohort_coordinator::tls::first_cert_der(&ca.join("ca.pem")).unwrap();
    let signed = cohort_protocols::manifest::SignedManifest::verify(
        &manifest,
        &cohort_protocols::manifest::ca_key(&ca_der).unwrap(),
    )
    .unwrap();
    // init, the coordinator, four sites: version 6.
    assert_eq!(signed.version(), 6);
    assert_eq!(signed.manifest().members.len(), 5);
    // The sites that enrolled first got older manifests; the coordinator relays the newest.
    let oldest = std::fs::read(dir.path().join(SITES[0]).join("manifest.toml")).unwrap();
    for site in SITES {
        std::fs::write(dir.path().join(site).join("manifest.toml"), &oldest).unwrap();
    }
    std::fs::copy(ca.join("manifest.toml"), host.join("manifest.toml")).unwrap();

    let coordinator = cohort_coordinator::CoordinatorConfig::parse(&format!(
        r#"
listen = "127.0.0.1:0"
data_dir = {data:?}
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
manifest = {manifest:?}
[rounds]
count = 2
min_sites = 4
[model]
kind = "logreg"
inputs = 13
[schema]
label = {{ column = "num", greater_than = 0 }}
drop = ["slope", "ca", "thal"]
categorical = {{ cp = [1, 2, 3, 4], restecg = [0, 1, 2] }}
missing = "drop_row"
[training]
learning_rate = 0.01
batch_size = 16
local_steps = 5
"#,
        data = dir.path().join("coordinator-data"),
        ca = host.join("ca.pem"),
        cert = host.join("cert.pem"),
        key = host.join("key.pem"),
        manifest = host.join("manifest.toml"),
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(cohort_coordinator::run(coordinator, Some(tx)));
        let addr = rx.await.unwrap().grpc;
        let mut agents = Vec::new();
        for site in SITES {
            let home = dir.path().join(site);
            std::fs::copy(data(site), home.join("data.csv")).unwrap();
            let text = std::fs::read_to_string(home.join("agent.toml"))
                .unwrap()
                .replace(
                    "https://localhost:1",
                    &format!("https://127.0.0.1:{}", addr.port()),
                );
            std::fs::write(home.join("agent.toml"), text).unwrap();
            let cfg = cohort_agent::AgentConfig::load(&home.join("agent.toml")).unwrap();
            agents.push(tokio::spawn(cohort_agent::run(cfg)));
        }
        for (site, agent) in SITES.iter().zip(agents) {
            tokio::time::timeout(std::time::Duration::from_secs(300), agent)
                .await
                .expect("training finishes")
                .unwrap()
                .unwrap_or_else(|e| panic!("{site}: {e:#}"));
        }
        server.abort();
    });
    // Every site adopted the coordinator's newer manifest and kept it for its next start.
    for site in SITES {
        let kept = std::fs::read(dir.path().join(site).join("manifest.toml")).unwrap();
        assert_eq!(kept, manifest, "{site}");
    }
    // A revocation is a new manifest version without the site.
    provision::revoke(&ca, "hungary").unwrap();
    let after = cohort_protocols::manifest::SignedManifest::verify(
        &std::fs::read(ca.join("manifest.toml")).unwrap(),
        &cohort_protocols::manifest::ca_key(&ca_der).unwrap(),
    )
    .unwrap();
    assert_eq!(after.version(), 7);
    assert!(after.supersedes(&signed).unwrap());
    assert!(after.manifest().member("hungary").is_none());
    assert_eq!(after.manifest().members.len(), 4);
}
