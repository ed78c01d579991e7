//! The `cohort-ca` binary as the consortium runs it: every refusal exits 2 and names what was
//! wrong, a signed bundle holds no private key, and the demo mode says what it is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn ca(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cohort-ca"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A site's request, made as `cohort-agent enroll` makes it: the key stays in this function.
fn request(name: &str) -> String {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ED25519};
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn refused(o: &Output, why: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", text(o));
    assert!(text(o).contains(why), "expected {why:?} in: {}", text(o));
}

#[test]
fn the_ca_signs_requests_and_refuses_what_it_must_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    refused(&ca(&["sign", "--ca", "ca", "x.csr"], d), "reading x.csr");
    std::fs::write(d.join("a.csr"), request("hospital-a")).unwrap();
    refused(
        &ca(&["sign", "--ca", "ca", "a.csr"], d),
        "has no CA: run `cohort-ca init` first",
    );
    assert!(ca(&["init", "--ca", "ca"], d).status.success());
    refused(&ca(&["init", "--ca", "ca"], d), "already exists");

    let o = ca(&["sign", "--ca", "ca", "a.csr"], d);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("holds no private key"), "{}", text(&o));
    assert!(!d.join("ca/sites/hospital-a/key.pem").exists());
    for f in [
        "cert.pem",
        "ca.pem",
        "manifest.toml",
        "agent.toml",
        "start.sh",
    ] {
        assert!(d.join("ca/sites/hospital-a").join(f).exists(), "{f}");
    }

    std::fs::write(
        d.join("junk.csr"),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n",
    )
    .unwrap();
    refused(
        &ca(&["sign", "--ca", "ca", "junk.csr"], d),
        "the certificate signing request",
    );
    std::fs::write(d.join("coordinator.csr"), request("hospital-b")).unwrap();
    refused(
        &ca(
            &[
                "sign",
                "--ca",
                "ca",
                "--role",
                "coordinator",
                "coordinator.csr",
            ],
            d,
        ),
        "a coordinator's request must be for \"cohort-coordinator\"",
    );
    std::fs::write(d.join("bad-name.csr"), request("cohort-coordinator")).unwrap();
    refused(
        &ca(&["sign", "--ca", "ca", "bad-name.csr"], d),
        "is not allowed",
    );
    refused(
        &ca(&["revoke", "--ca", "ca", "hospital-z"], d),
        "no current certificate",
    );

    let shown = text(&ca(&["show", "--ca", "ca"], d));
    assert!(
        shown.contains("manifest v2") && shown.contains("hospital-a"),
        "{shown}"
    );

    // A countersignature for another manifest is refused, naming the current version.
    std::fs::write(
        d.join("old.sig"),
        format!(
            "member = \"hospital-a\"\nsignature = \"{}\"\nmanifest = \"{}\"\n",
            "00".repeat(64),
            "11".repeat(32)
        ),
    )
    .unwrap();
    refused(
        &ca(&["countersign", "--ca", "ca", "old.sig"], d),
        "not the current version 2",
    );
    // One with no digest is checked against the member's key, and refused.
    std::fs::write(
        d.join("forged.sig"),
        format!(
            "member = \"hospital-a\"\nsignature = \"{}\"\n",
            "00".repeat(64)
        ),
    )
    .unwrap();
    refused(
        &ca(&["countersign", "--ca", "ca", "forged.sig"], d),
        "does not verify with the member's key",
    );
    assert!(
        ca(&["revoke", "--ca", "ca", "hospital-a"], d)
            .status
            .success()
    );
    let shown = text(&ca(&["show", "--ca", "ca"], d));
    assert!(
        shown.contains("manifest v3") && !shown.contains("hospital-a"),
        "{shown}"
    );
}

#[test]
fn the_demo_mode_warns_that_it_holds_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = ca(&["demo", "--out", "pki", "--sites", "a,b,c"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("WARNING")
            && text(&o).contains("can sign as any site"),
        "{}",
        text(&o)
    );
    assert!(dir.path().join("pki/sites/b/key.pem").exists());
    refused(
        &ca(&["demo", "--out", "pki", "--sites", "a,a"], dir.path()),
        "already exists",
    );
}
