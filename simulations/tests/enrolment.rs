//! Keys born where they are used: the consortium's CA is created on its own, the coordinator
//! and four hospitals each make their key and a certificate signing request, the CA signs the
//! requests, and the federation trains with bundles that never held a private key. The CA's
//! directory is walked to show it never saw one but its own.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};

use cohort_ca::{DEFAULT_VALIDITY_DAYS, Enrolment};

use cohort_testkit::heart::{SCHEMA, SITES};

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

fn names() -> Vec<String> {
    vec!["localhost".to_string(), "127.0.0.1".to_string()]
}

/// The coordinator's host makes its key; the CA signs its request.
fn enrol_coordinator(ca: &Path, host: &Path) {
    let names = names();
    let csr = cohort_coordinator::enrol::coordinator_request(host, &names).unwrap();
    let pem = std::fs::read_to_string(&csr).unwrap();
    let bundle = cohort_ca::sign_request(
        ca,
        &pem,
        Enrolment::Coordinator,
        "https://localhost:1",
        &names,
        DEFAULT_VALIDITY_DAYS,
    )
    .unwrap();
    unpack(&bundle, host);
}

/// A hospital enrols with the agent's own command.
fn enrol_site(ca: &Path, home: &Path, site: &str) {
    let names = names();
    let csr = cohort_agent::certificate_request(home, site).unwrap();
    let pem = std::fs::read_to_string(&csr).unwrap();
    let bundle = cohort_ca::sign_request(
        ca,
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
    unpack(&bundle, home);
}

/// The coordinator of the federation enrolled under `dir`, for `rounds` rounds of four sites.
fn coordinator_config(dir: &Path, rounds: u32) -> cohort_coordinator::CoordinatorConfig {
    let host = dir.join("coordinator-host");
    cohort_coordinator::CoordinatorConfig::parse(&format!(
        r#"
listen = "127.0.0.1:0"
data_dir = {data:?}
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
manifest = {manifest:?}
[rounds]
count = {rounds}
min_sites = 4
[model]
kind = "logreg"
inputs = 13
{SCHEMA}
[training]
learning_rate = 0.01
batch_size = 16
local_steps = 5
"#,
        data = dir.join("coordinator-data"),
        ca = host.join("ca.pem"),
        cert = host.join("cert.pem"),
        key = host.join("key.pem"),
        manifest = host.join("manifest.toml"),
    ))
    .unwrap()
}

/// Runs the coordinator and the four sites homed under `dir` (each site's agent.toml with
/// `extra` appended) until every agent has finished training.
fn train(dir: &Path, rounds: u32, extra: &str) {
    train_with(dir, rounds, extra, || {});
}

/// [`train`], with `meanwhile` run (on a thread of its own) once the agents have started;
/// training must finish after it returns.
fn train_with(dir: &Path, rounds: u32, extra: &str, meanwhile: impl FnOnce() + Send + 'static) {
    let coordinator = coordinator_config(dir, rounds);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(cohort_coordinator::run(coordinator, Some(tx)));
        let addr = rx.await.unwrap().grpc;
        let mut agents = Vec::new();
        for site in SITES {
            let home = dir.join(site);
            std::fs::copy(data(site), home.join("data.csv")).unwrap();
            let text = std::fs::read_to_string(home.join("agent.toml"))
                .unwrap()
                .replace(
                    "https://localhost:1",
                    &format!("https://127.0.0.1:{}", addr.port()),
                );
            let mut text = if text.contains(extra) {
                text
            } else {
                format!("{text}\n{extra}")
            };
            // Four hospitals: three others, one of which may drop out (the agent's default
            // asks for 5 live others).
            if !text.contains("min_live_neighbours") {
                text = if text.contains("[policy]\n") {
                    text.replacen("[policy]\n", "[policy]\nmin_live_neighbours = 2\n", 1)
                } else {
                    format!("{text}\n[policy]\nmin_live_neighbours = 2\n")
                };
            }
            std::fs::write(home.join("agent.toml"), text).unwrap();
            let cfg = cohort_agent::AgentConfig::load(&home.join("agent.toml")).unwrap();
            agents.push(tokio::spawn(cohort_agent::run(cfg)));
        }
        tokio::task::spawn_blocking(meanwhile).await.unwrap();
        assert!(!server.is_finished(), "the coordinator is still running");
        for (site, agent) in SITES.iter().zip(agents) {
            tokio::time::timeout(std::time::Duration::from_secs(300), agent)
                .await
                .expect("training finishes")
                .unwrap()
                .unwrap_or_else(|e| panic!("{site}: {e:#}"));
        }
        server.abort();
    });
}

#[test]
fn four_hospitals_enrol_with_their_own_keys_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("consortium-ca");
    cohort_ca::init(&ca, DEFAULT_VALIDITY_DAYS).unwrap();
    let host = dir.path().join("coordinator-host");
    enrol_coordinator(&ca, &host);
    for site in SITES {
        enrol_site(&ca, &dir.path().join(site), site);
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

    train(dir.path(), 2, "");
    // Every site adopted the coordinator's newer manifest and kept it for its next start.
    for site in SITES {
        let kept = std::fs::read(dir.path().join(site).join("manifest.toml")).unwrap();
        assert_eq!(kept, manifest, "{site}");
    }
    // A revocation is a new manifest version without the site.
    cohort_ca::revoke(&ca, "hungary").unwrap();
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

fn ca_key(ca: &Path) -> ed25519_dalek::VerifyingKey {
    let der = cohort_coordinator::tls::first_cert_der(&ca.join("ca.pem")).unwrap();
    cohort_protocols::manifest::ca_key(&der).unwrap()
}

fn read_manifest(path: &Path, ca: &Path) -> cohort_protocols::manifest::SignedManifest {
    cohort_protocols::manifest::SignedManifest::verify(&std::fs::read(path).unwrap(), &ca_key(ca))
        .unwrap()
}

/// With `policy.manifest_quorum = 2` at the sites, neither the CA alone nor the CA's holder
/// with puppets of its own can add a member; two hospitals that vouch for the newcomer can.
#[test]
fn a_new_member_takes_part_only_with_the_countersignatures_the_sites_ask_for() {
    use cohort_protocols::manifest::{Member, Role};
    use ed25519_dalek::pkcs8::DecodePrivateKey;

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("consortium-ca");
    cohort_ca::init(&ca, DEFAULT_VALIDITY_DAYS).unwrap();
    enrol_coordinator(&ca, &dir.path().join("coordinator-host"));
    let (founders, newcomer) = (&SITES[..3], SITES[3]);
    for site in founders {
        enrol_site(&ca, &dir.path().join(site), site);
    }
    // The founders pin the manifest that lists the three of them (v5).
    let founded = std::fs::read(ca.join("manifest.toml")).unwrap();
    for site in founders {
        std::fs::write(dir.path().join(site).join("manifest.toml"), &founded).unwrap();
    }
    let policy = "[policy]\nmanifest_quorum = 2\n";
    let config = |site: &str| {
        let path = dir.path().join(site).join("agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("manifest_quorum") {
            std::fs::write(&path, format!("{text}\n{policy}")).unwrap();
        }
        cohort_agent::AgentConfig::load(&path).unwrap()
    };
    let trust_of = |site: &str| {
        let cfg = config(site);
        let der = cohort_coordinator::tls::first_cert_der(&cfg.tls.ca_cert).unwrap();
        cohort_agent::Trust::load(&der, cfg.tls.manifest.as_deref(), 2).unwrap()
    };

    // The CA signs the newcomer's request: v6, signed by the CA only.
    enrol_site(&ca, &dir.path().join(newcomer), newcomer);
    let v6 = std::fs::read(ca.join("manifest.toml")).unwrap();
    for site in founders {
        let e = trust_of(site).offer(&v6).unwrap_err().to_string();
        assert!(
            e.contains(r#"adds or re-keys site(s) ["va"] with 0 countersignature(s)"#)
                && e.contains("manifest_quorum asks for 2"),
            "{site}: {e}"
        );
    }

    // The CA's holder adds two puppets of its own and has them vouch for each other.
    let ca_signing = ed25519_dalek::SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(ca.join("ca.key")).unwrap(),
    )
    .unwrap();
    let mut forged = read_manifest(&ca.join("manifest.toml"), &ca)
        .manifest()
        .clone();
    forged.version = 7;
    let puppets: Vec<_> = (0..2u8)
        .map(|i| ed25519_dalek::SigningKey::from_bytes(&[40 + i; 32]))
        .collect();
    for (i, key) in puppets.iter().enumerate() {
        forged.members.push(Member {
            name: format!("puppet-{i}"),
            role: Role::Site,
            key: cohort_protocols::hex::encode(key.verifying_key().as_bytes()),
            serial: "01".into(),
            not_after_unix: i64::MAX,
        });
    }
    let mut forged = forged.sign(&ca_signing).unwrap();
    for (i, key) in puppets.iter().enumerate() {
        let c = forged.countersign(&format!("puppet-{i}"), key);
        forged.attach(c).unwrap();
    }
    let e = trust_of("cleveland")
        .offer(&forged.to_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("with 0 countersignature(s)"), "{e}");

    // One founder vouches: not enough. A second: v6 is adopted.
    let v6_path = dir.path().join("v6.toml");
    std::fs::write(&v6_path, &v6).unwrap();
    let mut files = Vec::new();
    for site in &founders[..2] {
        let (changes, file) = cohort_agent::countersign(&config(site), &v6).unwrap();
        assert!(changes.contains("+ va (site"), "{changes}");
        files.push(file);
    }
    // The newcomer's own countersignature would not count, and is refused at the site.
    let e = cohort_agent::countersign(&config(newcomer), &v6).unwrap_err();
    assert!(format!("{e:#}").contains("nothing to vouch for"), "{e:#}");
    assert_eq!(
        cohort_ca::countersign(&ca, &[files[0].as_str()]).unwrap(),
        1
    );
    let one = std::fs::read(ca.join("manifest.toml")).unwrap();
    let e = trust_of("switzerland").offer(&one).unwrap_err().to_string();
    assert!(e.contains("with 1 countersignature(s)"), "{e}");
    // A countersignature for another version is refused by the CA, naming the version.
    let stale = files[0].replace(
        &format!(
            "{:02x}",
            read_manifest(&ca.join("manifest.toml"), &ca).digest()[0]
        ),
        "zz",
    );
    assert!(cohort_ca::countersign(&ca, &[stale.as_str()]).is_err());
    // The coordinator's operator installs the version with one countersignature: the founders
    // refuse it and decline its rounds (the newcomer accepts it: it is the one it holds). The
    // coordinator waits for them to agree instead of failing the round after max_attempts.
    let host = dir.path().join("coordinator-host");
    std::fs::copy(ca.join("manifest.toml"), host.join("manifest.toml")).unwrap();
    let second = files[1].clone();
    let (ca_dir, host_manifest) = (ca.clone(), host.join("manifest.toml"));
    train_with(dir.path(), 2, policy, move || {
        // Long enough for every attempt of round 0 to be declined several times over.
        std::thread::sleep(std::time::Duration::from_secs(3));
        // The second founder's countersignature arrives: the CA attaches it and the operator
        // installs the manifest again; the coordinator relays it and the round goes on.
        assert_eq!(
            cohort_ca::countersign(&ca_dir, &[second.as_str()]).unwrap(),
            2
        );
        std::fs::copy(ca_dir.join("manifest.toml"), &host_manifest).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&host_manifest)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
    });
    let countersigned = read_manifest(&ca.join("manifest.toml"), &ca);
    assert_eq!(
        countersigned.version(),
        6,
        "countersigning is not a new version"
    );
    for site in founders {
        let kept = read_manifest(&dir.path().join(site).join("manifest.toml"), &ca);
        assert_eq!(kept.digest(), countersigned.digest(), "{site}");
        assert_eq!(kept.countersignatures().len(), 2, "{site}");
    }
}
