//! The deployment files under `deploy/` are exercised, not only written: the systemd units
//! pass `systemd-analyze verify` with no output at all (it exits 0 on some warnings), with
//! their ExecStart pointing at the binaries this build produced.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

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
        ("cohort-agent.service", common::agent_exe()),
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
    let out = run("systemd-analyze", &["verify", &broken.display().to_string()]).unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("NoNewPrivilege"), "{said}");
}
