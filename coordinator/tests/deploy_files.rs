//! The deployment files under `deploy/` are exercised, not only written: the systemd units
//! pass `systemd-analyze verify` with no output at all (it exits 0 on some warnings), with
//! their ExecStart pointing at the binaries this build produced.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use cohort_testkit::prelude::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use cohort_testkit::repo;

/// Runs a validator; None when it is missing outside CI (`.ci/run` installs it).
fn run(tool: &str, args: &[&str]) -> Option<std::process::Output> {
    match Command::new(tool).args(args).output() {
        Ok(o) => Some(o),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{tool} is required in CI (.ci/run installs it): {e}"
            );
            eprintln!("{tool} not found ({e}): this check is skipped");
            None
        }
    }
}

#[test]
fn the_systemd_units_are_hardened_and_pass_systemd_analyze_verify_silently() {
    let dir = tempfile::tempdir().unwrap();
    let binaries = [
        (
            "cohort-coordinator.service",
            PathBuf::from(env!("CARGO_BIN_EXE_cohort-coordinator")),
        ),
        ("cohort-agent.service", workspace_exe("cohort-agent")),
    ];
    let mut units = Vec::new();
    for (unit, exe) in &binaries {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        for directive in [
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "RestartPreventExitStatus=2",
            "LoadCredential=key.pem:",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(directive), "{unit} lacks {directive:?}");
        }
        // Restarted on a failure a restart may fix, never on one it repeats: the coordinator's
        // configuration (2) and data directory (4), the agent's configuration (2) and a
        // permanent refusal (3).
        let never = if unit.contains("coordinator") {
            format!(
                "RestartPreventExitStatus={} {}\n",
                cohort_coordinator::EXIT_CONFIG,
                cohort_coordinator::EXIT_STORAGE
            )
        } else {
            format!(
                "RestartPreventExitStatus=2 {}\n",
                cohort_agent::EXIT_REFUSED
            )
        };
        assert!(text.contains(&never), "{unit} lacks {never:?}");
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        let local = text.replace(
            &format!("/usr/local/bin/{name}"),
            &exe.display().to_string(),
        );
        assert_ne!(local, text, "{unit} starts /usr/local/bin/{name}");
        let path = dir.path().join(unit);
        std::fs::write(&path, local).unwrap();
        units.push(path.display().to_string());
    }
    let mut args = vec!["verify"];
    args.extend(units.iter().map(String::as_str));
    let Some(out) = run("systemd-analyze", &args) else {
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // The check is sensitive: a misspelt directive is reported.
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&units[0])
            .unwrap()
            .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
    )
    .unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", &broken.display().to_string()],
    )
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("NoNewPrivilege"), "{said}");
}

/// The Kubernetes versions the manifests are validated against.
const KUBERNETES: [&str; 2] = ["1.30.0", "1.33.0"];

#[test]
fn the_kubernetes_manifests_render_and_validate_strictly() {
    let k8s = repo().join("deploy/kubernetes");
    // The configuration files the manifests mount are valid configurations.
    cohort_coordinator::CoordinatorConfig::parse(
        &std::fs::read_to_string(k8s.join("base/coordinator.toml")).unwrap(),
    )
    .unwrap();
    cohort_agent::AgentConfig::parse(
        &std::fs::read_to_string(k8s.join("agent/agent.toml")).unwrap(),
    )
    .unwrap();
    cohort_coordinator::CoordinatorConfig::parse(
        &std::fs::read_to_string(k8s.join("overlays/loadtest/coordinator.toml")).unwrap(),
    )
    .unwrap();
    // kubectl is not in the package registries these machines reach (the machine image
    // carries Google's build); without it the manifests cannot be rendered, so this part is
    // skipped, in CI too, with a message.
    let Ok(version) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        eprintln!("kubectl not found: the Kubernetes manifests are not rendered or validated");
        return;
    };
    eprintln!("{}", String::from_utf8_lossy(&version.stdout).trim());
    let dir = tempfile::tempdir().unwrap();
    let mut kinds = Vec::new();
    for overlay in ["base", "overlays/production", "overlays/loadtest", "agent"] {
        let out = Command::new("kubectl")
            .args(["kustomize", &k8s.join(overlay).display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        kinds.extend(
            rendered
                .lines()
                .filter_map(|l| l.strip_prefix("kind: "))
                .map(|k| format!("{overlay}/{k}")),
        );
        let file = dir
            .path()
            .join(format!("{}.yaml", overlay.replace('/', "-")));
        std::fs::write(&file, &rendered).unwrap();
        for version in KUBERNETES {
            let Some(out) = run(
                "kubernetes-validate",
                &[
                    "--strict",
                    "-k",
                    version,
                    "--quiet",
                    &file.display().to_string(),
                ],
            ) else {
                return;
            };
            assert!(
                out.status.success(),
                "{overlay} against Kubernetes {version}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if overlay == "base" {
            // Strict validation is sensitive: a misspelt field fails.
            let broken = dir.path().join("broken.yaml");
            std::fs::write(&broken, rendered.replacen("replicas: 1", "replicaz: 1", 1)).unwrap();
            let out = run(
                "kubernetes-validate",
                &["--strict", "--quiet", &broken.display().to_string()],
            )
            .unwrap();
            assert!(!out.status.success(), "a misspelt field passed validation");
        }
    }
    for kind in [
        "base/StatefulSet",
        "base/Service",
        "base/NetworkPolicy",
        "base/ConfigMap",
        "overlays/production/Namespace",
        "overlays/loadtest/Job",
        "agent/Deployment",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
}

/// The enrolment a README reader follows, with the real binaries as separate processes: the
/// consortium creates its CA (`cohort-ca init`), the coordinator's host and four hospitals
/// each make their own key and request (`cohort-coordinator enroll`, `cohort-agent enroll`),
/// the CA signs the requests (`cohort-ca sign`) and sees no key but its own; then each
/// hospital, with its bundle unpacked and its CSV dropped in as `data.csv`, starts with one
/// command (`./start.sh`) and completes a secure federation against the real coordinator.
#[test]
fn each_site_enrols_and_then_starts_from_its_bundle_with_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ca = dir.path().join("consortium-ca");
    let ok = |what: &str, cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(
        "cohort-ca init",
        Command::new(workspace_exe("cohort-ca"))
            .args(["init", "--ca"])
            .arg(&ca),
    );
    let url = format!("https://localhost:{port}");
    let sign = |csr: &Path, role: &str| {
        ok(
            "cohort-ca sign",
            Command::new(workspace_exe("cohort-ca"))
                .args(["sign", "--ca"])
                .arg(&ca)
                .arg(csr)
                .args(["--role", role, "--coordinator-names", "localhost"])
                .args(["--coordinator-url", &url]),
        )
    };
    let unpack = |bundle: &Path, home: &Path| {
        for entry in std::fs::read_dir(bundle).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, home.join(path.file_name().unwrap())).unwrap();
        }
    };
    // Sites and the coordinator each keep their key at home.
    let pki = dir.path().join("coordinator-host");
    ok(
        "cohort-coordinator enroll",
        Command::new(env!("CARGO_BIN_EXE_cohort-coordinator"))
            .args(["enroll", "--names", "localhost", "--out"])
            .arg(pki.join("coordinator")),
    );
    sign(&pki.join("coordinator/request.csr.pem"), "coordinator");
    for site in SITES {
        let home = dir.path().join(site);
        ok(
            "cohort-agent enroll",
            Command::new(workspace_exe("cohort-agent"))
                .args(["enroll", "--name", site, "--out"])
                .arg(&home),
        );
        let said = sign(&home.join("request.csr.pem"), "site");
        assert!(said.contains("holds no private key"), "{said}");
        // The CA sends each bundle as soon as it is signed.
        unpack(&ca.join("sites").join(site), &home);
    }
    unpack(&ca.join("coordinator"), &pki.join("coordinator"));
    // The CA's directory holds one private key: its own.
    let mut keys = Vec::new();
    let mut stack = vec![ca.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("PRIVATE KEY")) {
                keys.push(path);
            }
        }
    }
    assert_eq!(keys, vec![ca.join("ca.key")]);
    // Each site's status shows the manifest it pins. The first site enrolled got version 3
    // (init, coordinator, itself); the coordinator relays the newest.
    let status = ok(
        "cohort-agent status",
        Command::new(workspace_exe("cohort-agent"))
            .args(["status", "--config"])
            .arg(dir.path().join(SITES[0]).join("agent.toml")),
    );
    assert!(
        status.contains("manifest v3") && status.contains("(this site)"),
        "{status}"
    );
    // The schema lists its features, so the coordinator derives the model's inputs.
    let config = config::coordinator(&pki, &dir.path().join("data"))
        .set("listen", format!("127.0.0.1:{port}"))
        .remove("model.inputs")
        .remove("schema")
        .merge(LISTED_SCHEMA)
        .merge("[rounds]\ncount = 2\n[training]\nlocal_steps = 50")
        .write(&dir.path().join("coordinator.toml"));
    let start = |site: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg(dir.path().join(site).join("start.sh"))
            .env("COHORT_AGENT", workspace_exe("cohort-agent"));
        Proc::spawn(site, cmd)
    };
    let _coordinator = Proc::coordinator(&config);
    // Before its data is in place, the one command says what is missing (configuration: 2;
    // the agent learns the schema from the coordinator before it reads its data).
    let mut early = start("cleveland");
    let code = wait_exit(&mut early);
    assert_eq!(code, Some(2), "{}", early.log());
    assert!(early.log().contains("data.csv"), "{}", early.log());

    let mut agents = Vec::new();
    for site in SITES {
        std::fs::copy(csv(site), dir.path().join(site).join("data.csv")).unwrap();
        // What a site of a four-hospital federation adds to its bundle's agent.toml: the
        // agent's default asks for 5 live others, and there are three.
        let toml = dir.path().join(site).join("agent.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        std::fs::write(
            &toml,
            format!("{text}\n[policy]\nmin_live_neighbours = 2\n"),
        )
        .unwrap();
        agents.push(start(site));
    }
    for mut a in agents {
        let code = wait_exit(&mut a);
        assert_eq!(code, Some(0), "{}: {}", a.name, a.log());
        assert!(a.log().contains("finished training"), "{}", a.log());
    }
    // The first site adopted the newest manifest from the coordinator and kept it.
    assert_eq!(
        std::fs::read(dir.path().join(SITES[0]).join("manifest.toml")).unwrap(),
        std::fs::read(ca.join("manifest.toml")).unwrap()
    );
}

/// The exit code of a process that should end within two minutes.
fn wait_exit(p: &mut Proc) -> Option<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if let Some(code) = p.exit_code() {
            return Some(code);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    p.kill();
    None
}

/// The Containerfile passes hadolint and the Compose file the Compose specification's schema;
/// the demo's coordinator.toml is a valid configuration.
#[test]
fn the_containerfile_and_the_compose_file_pass_their_linters() {
    let deploy = repo().join("deploy");
    cohort_coordinator::CoordinatorConfig::parse(
        &std::fs::read_to_string(deploy.join("compose/coordinator.toml")).unwrap(),
    )
    .unwrap();
    let containerfile = deploy.join("container/Containerfile");
    let text = std::fs::read_to_string(&containerfile).unwrap();
    assert!(text.contains("FROM scratch") && text.contains("USER 65532:65532"));
    if let Some(out) = run("hadolint", &[&containerfile.display().to_string()]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let compose = deploy.join("compose/compose.yaml");
    if let Some(out) = run(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            &compose.display().to_string(),
        ],
    ) {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Sensitive: a misspelt service key fails the schema.
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("compose.yaml");
        std::fs::write(
            &broken,
            std::fs::read_to_string(&compose).unwrap().replacen(
                "network_mode: host",
                "network_mod: host",
                1,
            ),
        )
        .unwrap();
        let out = run(
            "check-jsonschema",
            &[
                "--builtin-schema",
                "vendor.compose-spec",
                &broken.display().to_string(),
            ],
        )
        .unwrap();
        assert!(!out.status.success(), "a misspelt key passed the schema");
    }
}
