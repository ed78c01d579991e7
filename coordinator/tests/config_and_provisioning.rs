//! Configuration errors name the key, the value and what is allowed; provisioning creates
//! certificates the identity checks accept and never overwrites keys.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use cohort_ca::demo_keys::{ProvisionOptions, add_site, provision};
use cohort_coordinator::CoordinatorConfig;
use cohort_protocols::identity::{CaVerifier, IdentityError};

const BASE: &str = r#"
listen = "127.0.0.1:7700"
data_dir = "data"

[tls]
ca_cert = "ca.pem"
cert = "cert.pem"
key = "key.pem"

[rounds]
count = 5
min_sites = 4

[secagg]
quant_bits = 20
modulus_bits = 64

[model]
kind = "logreg"
inputs = 13

[schema]
label = { column = "num", greater_than = 0 }
missing = "drop_row"

[training]
learning_rate = 0.001
batch_size = 4
local_steps = 100
"#;

fn with(replace: &str, by: &str) -> String {
    assert!(BASE.contains(replace), "{replace:?} not in the base config");
    BASE.replacen(replace, by, 1)
}

#[test]
fn the_base_configuration_is_valid() {
    CoordinatorConfig::parse(BASE).expect("valid");
}

#[test]
fn bad_configurations_are_refused_with_a_precise_message() {
    let cases: Vec<(String, &str)> = vec![
        (
            with("count = 5", "count = 5\ntreshold = 3"),
            "unknown field `treshold`",
        ),
        (
            with("kind = \"logreg\"", "kind = \"custom\"\nname = \"gated/1\""),
            "a custom model needs name (as its agent binary reports it), parameters (> 0) and init_file",
        ),
        (
            with("kind = \"logreg\"", "kind = \"logreg\"\nname = \"gated/1\""),
            "model.name = given: only for kind = \"custom\"",
        ),
        (
            with(
                "label = { column = \"num\", greater_than = 0 }\nmissing = \"drop_row\"",
                "missing = \"drop_row\"\n[schema.task]\nkind = \"multiclass\"\nlabel = \"num\"\nclasses = [0, 1, 2]\ngreater_than = 1",
            ),
            "task.greater_than does not apply to kind = \"multiclass\"",
        ),
        (
            with("count = 5", "count = 0"),
            "rounds.count = 0: must be at least 1",
        ),
        (
            with("[secagg]", "[aggregation]\nrule = \"median\"\n\n[secagg]"),
            "aggregation.rule = median: a robust rule needs each site's update, which secure aggregation hides",
        ),
        (
            with(
                "[secagg]",
                "[aggregation]\nrule = \"trimmed_mean\"\ntrim = 0.6\n\n[secagg]\nenabled = false",
            ),
            "aggregation.trim = 0.6: must be in [0, 0.5)",
        ),
        (
            with("[secagg]", "[privacy]\nepsilon = 0\n\n[secagg]"),
            "privacy.epsilon = 0: must be a number above 0",
        ),
        (
            with("[secagg]", "[privacy]\nrequired = true\n\n[secagg]"),
            "unknown field `required`",
        ),
        (
            with(
                "[secagg]",
                "[privacy.site_level]\nnoise_multiplier = 1.0\nclip = 1.0\nepsilon = 8\n[privacy.site_level.adaptive_clip]\ncount_noise = 5.0\n\n[secagg]",
            ),
            "privacy.site_level.adaptive_clip = given: adaptive clipping needs the count of clipped updates, which secure aggregation hides",
        ),
        (
            with(
                "[secagg]",
                "[privacy.site_level]\nnoise_multiplier = 1.0\nclip = 1.0\nepsilon = 2\n\n[secagg]",
            ),
            "privacy.site_level.epsilon = 2: one round alone spends ε = 4.",
        ),
        (
            with(
                "[secagg]",
                "[privacy.site_level]\nnoise_multiplier = 2.0\nclip = 1.0\nepsilon = 8\nmin_survivors = 5\n\n[secagg]",
            ),
            "privacy.site_level.min_survivors = 5: between 1 and rounds.min_sites = 4",
        ),
        (
            with(
                "[secagg]",
                "[privacy.site_level]\nnoise_multiplier = 2.0\nclip = 0\nepsilon = 8\n\n[secagg]",
            ),
            "privacy.site_level.clip = 0: must be a number above 0",
        ),
        (
            with(
                "[secagg]",
                "[aggregation]\nrule = \"median\"\n[privacy.site_level]\nnoise_multiplier = 2.0\nclip = 1.0\nepsilon = 8\n\n[secagg]\nenabled = false",
            ),
            "aggregation.rule = median: [privacy.site_level] prices the mean of clipped updates",
        ),
        (
            with(
                "[secagg]",
                "[privacy.site_level]\nnoise_multiplier = 2.0\nclip = 1.0\nepsilon = 8\n[privacy.site_level.adaptive_clip]\ncount_noise = 0\n\n[secagg]\nenabled = false",
            ),
            "privacy.site_level.adaptive_clip.count_noise = 0: must be a number above 0",
        ),
        (
            with("min_sites = 4", "min_sites = 2"),
            "rounds.min_sites = 2: secure aggregation needs at least 3",
        ),
        (
            with("modulus_bits = 64", "modulus_bits = 48"),
            "secagg.modulus_bits = 48: 32 or 64",
        ),
        (
            with("modulus_bits = 64", "modulus_bits = 64\nnorm_bound = -1.0"),
            "norm_bound = -1: the L2 bound on each update must be a finite number greater than 0",
        ),
        (
            with("kind = \"logreg\"", "kind = \"rnn\""),
            "unknown variant `rnn`",
        ),
        (
            with("kind = \"logreg\"", "kind = \"cnn\""),
            "a CNN needs image data: add [schema.images]",
        ),
        (
            with("kind = \"logreg\"", "kind = \"mlp\""),
            "model.hidden = []",
        ),
        (
            with("inputs = 13", "inputs = 0"),
            "model.inputs = (unset): list the feature columns in schema.features",
        ),
        (
            // Listed features give 13 inputs; a hand-computed 12 is caught at start-up
            // instead of every site declining every round.
            with(
                "missing = \"drop_row\"",
                "missing = \"drop_row\"\nfeatures = [\"age\", \"sex\", \"cp\", \"trestbps\", \"chol\", \"fbs\", \"restecg\", \"thalach\", \"exang\", \"oldpeak\"]\ncategorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }",
            )
            .replace("inputs = 13", "inputs = 12"),
            "model.inputs = 12: schema.features give 13 inputs (age, sex, cp=2, cp=3, cp=4",
        ),
        (
            with(
                "[model]",
                "[strategy]\nname = \"fedadam\"\nbeta1 = 1.5\n\n[model]",
            ),
            "strategy.beta1 = 1.5: must be in [0, 1)",
        ),
        (
            with("[model]", "[strategy]\nname = \"fedsgd\"\n\n[model]"),
            "unknown variant `fedsgd`",
        ),
        (
            with("learning_rate = 0.001", "learning_rate = -1.0"),
            "training.learning_rate = -1: must be > 0",
        ),
        (
            with("local_steps = 100", "local_steps = 100\nepochs = 3"),
            "unknown field `epochs`",
        ),
        (
            with("quant_bits = 20", "quant_bits = 20\nthreshold = 1"),
            "threshold = 1",
        ),
        // `missing` may be left out (drop_row), but not misspelt.
        (
            with("missing = \"drop_row\"", "missing = \"sometimes\""),
            "unknown variant `sometimes`",
        ),
        (
            with("listen = \"127.0.0.1:7700\"", "listen = \"somewhere\""),
            "invalid socket address",
        ),
        (
            with("quant_bits = 20", "quant_bits = 20\nmax_weight = 0"),
            "max_weight = 0",
        ),
        // Three sites cannot resist a colluding site and survive a dropout.
        (
            with("min_sites = 4", "min_sites = 3"),
            "secagg.max_colluders = 1: a round of 3 sites cannot both resist 1 colluding sites (threshold > 2) and survive a dropout (threshold < 3): use rounds.min_sites >= 4, or max_colluders = 0",
        ),
        // An explicit threshold of 3 of 5 resists no colluder.
        (
            with(
                "min_sites = 4",
                "min_sites = 5\nsites_per_round = 5",
            )
            .replace("quant_bits = 20", "quant_bits = 20\nthreshold = 3"),
            "secagg.threshold = 3: a round of 5 sites (neighbours = 5) with this threshold resists only 0 colluding sites, secagg.max_colluders = 1: use a threshold of at least 4",
        ),
    ];
    for (text, needle) in cases {
        let err = CoordinatorConfig::parse(&text)
            .expect_err(needle)
            .to_string();
        assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    }
    // The [training] table's own checks read as written, without a key = value prefix
    // around them (they used to read `training = : training.learning_rate = -1: ...`).
    let err = CoordinatorConfig::parse(&with("learning_rate = 0.001", "learning_rate = -1.0"))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "training.learning_rate = -1: must be > 0");
    let err = CoordinatorConfig::parse(&with(
        "batch_size = 4",
        "batch_size = 4\noptimizer = \"adamw\"",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("[training]: unknown variant `adamw`"),
        "{err}"
    );
    // Listed features and no model.inputs: the coordinator derives it.
    let derived = CoordinatorConfig::parse(
        &with(
            "missing = \"drop_row\"",
            "missing = \"drop_row\"\nfeatures = [\"age\", \"sex\", \"cp\", \"trestbps\", \"chol\", \"fbs\", \"restecg\", \"thalach\", \"exang\", \"oldpeak\"]\ncategorical = { cp = [1, 2, 3, 4], restecg = [0, 1, 2] }",
        )
        .replace("inputs = 13\n", ""),
    )
    .expect("derived inputs");
    assert_eq!(derived.model.inputs, 13);
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn der(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path)
        .unwrap()
        .as_ref()
        .to_vec()
}

#[test]
fn provisioned_sites_verify_and_add_site_leaves_the_others_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let opts = ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out: out.clone(),
        sites: vec![
            "hospital-a".into(),
            "hospital-b".into(),
            "hospital-c".into(),
        ],
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:7700".into(),
    };
    provision(&opts).unwrap();
    let ca = CaVerifier::new(der(&out.join("ca.pem")), now()).unwrap();
    let a = ca
        .verify(&der(&out.join("sites/hospital-a/cert.pem")))
        .unwrap();
    assert_eq!(a.common_name, "hospital-a");
    let agent_toml = std::fs::read_to_string(out.join("sites/hospital-a/agent.toml")).unwrap();
    assert!(agent_toml.contains("site = \"hospital-a\""));

    let before = std::fs::read(out.join("sites/hospital-b/key.pem")).unwrap();
    add_site(
        &out,
        "hospital-d",
        "https://localhost:7700",
        &["localhost".into()],
        365,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(out.join("sites/hospital-b/key.pem")).unwrap(),
        before
    );
    let d = ca
        .verify(&der(&out.join("sites/hospital-d/cert.pem")))
        .unwrap();
    assert_eq!(d.common_name, "hospital-d");

    // never overwrite, never accept odd names
    assert!(
        provision(&opts)
            .unwrap_err()
            .to_string()
            .contains("already exists")
    );
    assert!(
        add_site(&out, "hospital-d", "https://x:1", &[], 365)
            .unwrap_err()
            .to_string()
            .contains("already exists")
    );
    assert!(
        add_site(&out, "../evil", "https://x:1", &[], 365)
            .unwrap_err()
            .to_string()
            .contains("not allowed")
    );

    // a certificate from another project's CA is refused
    let other = dir.path().join("other");
    provision(&ProvisionOptions {
        validity_days: cohort_ca::DEFAULT_VALIDITY_DAYS,
        out: other.clone(),
        ..opts
    })
    .unwrap();
    assert_eq!(
        ca.verify(&der(&other.join("sites/hospital-a/cert.pem"))),
        Err(IdentityError::WrongIssuer)
    );
}

#[test]
fn the_example_configuration_is_valid_local_and_watched() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/coordinator.toml");
    let cfg = CoordinatorConfig::load(&path).expect("examples/coordinator.toml is valid");
    assert_eq!(cfg.model.inputs, 13, "derived from schema.features");
    assert!(cfg.listen.ip().is_loopback(), "{}", cfg.listen);
    let status = cfg.status.expect("[status] is configured");
    assert!(status.listen.ip().is_loopback());
    assert!(cfg.secagg.consistency_check);
    assert!(
        cfg.tls
            .manifest
            .as_ref()
            .is_some_and(|m| m.ends_with("pki/coordinator/manifest.toml")),
        "agents pin a manifest, so the example's coordinator relays it"
    );
}

/// (serial hex, not_before, not_after) of a PEM certificate.
fn cert_facts(path: &std::path::Path) -> (String, i64, i64) {
    let der = der(path);
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    let v = c.validity();
    (
        c.tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        v.not_before.timestamp(),
        v.not_after.timestamp(),
    )
}

/// The serials (hex) a PEM CRL lists, after checking it is signed by the CA in `ca`.
fn crl_serials(crl: &std::path::Path, ca: &std::path::Path) -> Vec<String> {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateRevocationListDer::from_pem_file(crl).unwrap();
    let (_, list) = x509_parser::parse_x509_crl(der.as_ref()).unwrap();
    let ca_der = self::der(ca);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    list.verify_signature(ca.public_key())
        .expect("the CRL is signed by the project CA");
    list.iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect()
}

#[test]
fn certificates_expire_and_renewal_and_revocation_update_the_registry_and_the_crl() {
    use cohort_ca::demo_keys::renew;
    use cohort_ca::{crl_path, registry_path, revoke};
    use cohort_coordinator::registry::load as load_registry;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    provision(&ProvisionOptions {
        out: out.clone(),
        sites: vec!["hospital-a".into(), "hospital-b".into()],
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:7700".into(),
        validity_days: 30,
    })
    .unwrap();
    let day = 86_400;
    let (serial_a, from, to) = cert_facts(&out.join("sites/hospital-a/cert.pem"));
    assert_eq!(to - from, 30 * day + 3600, "30 days from an hour ago");
    let (_, ca_from, ca_to) = cert_facts(&out.join("ca.pem"));
    assert!(
        ca_to - ca_from >= 3650 * day,
        "the CA outlives its certificates"
    );
    let (_, _, coordinator_to) = cert_facts(&out.join("coordinator/cert.pem"));
    assert_eq!(coordinator_to, to);

    let registry = load_registry(&registry_path(&out)).unwrap();
    assert_eq!(registry.current("hospital-a").unwrap().serial, serial_a);
    assert_eq!(registry.current("hospital-a").unwrap().not_after_unix, to);
    assert!(registry.revoked.is_empty());
    assert!(crl_serials(&crl_path(&out), &out.join("ca.pem")).is_empty());

    // Renewal: a new key and serial in the same bundle; the old one is superseded.
    let old_key = std::fs::read(out.join("sites/hospital-a/key.pem")).unwrap();
    let agent_toml = std::fs::read(out.join("sites/hospital-a/agent.toml")).unwrap();
    renew(&out, "hospital-a", 365).unwrap();
    let (renewed, from, to) = cert_facts(&out.join("sites/hospital-a/cert.pem"));
    assert_ne!(renewed, serial_a);
    assert_eq!(to - from, 365 * day + 3600);
    assert_ne!(
        std::fs::read(out.join("sites/hospital-a/key.pem")).unwrap(),
        old_key
    );
    assert_eq!(
        std::fs::read(out.join("sites/hospital-a/agent.toml")).unwrap(),
        agent_toml,
        "the site's own settings are kept"
    );
    let registry = load_registry(&registry_path(&out)).unwrap();
    assert_eq!(registry.refusal("hospital-a", &renewed), None);
    assert!(
        registry
            .refusal("hospital-a", &serial_a)
            .unwrap()
            .contains("superseded")
    );
    assert_eq!(
        crl_serials(&crl_path(&out), &out.join("ca.pem")),
        vec![serial_a.clone()]
    );

    // Revocation: the site leaves the registry and its serial joins the CRL.
    let (serial_b, _, _) = cert_facts(&out.join("sites/hospital-b/cert.pem"));
    revoke(&out, "hospital-b").unwrap();
    let registry = load_registry(&registry_path(&out)).unwrap();
    assert!(registry.current("hospital-b").is_none());
    assert!(
        registry
            .refusal("hospital-b", &serial_b)
            .unwrap()
            .contains("revoked")
    );
    let mut listed = crl_serials(&crl_path(&out), &out.join("ca.pem"));
    listed.sort();
    let mut expected = vec![serial_a, serial_b];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(registry.crl_number, 3, "one CRL per change");
    assert!(
        revoke(&out, "hospital-b")
            .unwrap_err()
            .to_string()
            .contains("no current certificate")
    );
    assert!(
        provision(&ProvisionOptions {
            out: dir.path().join("bad"),
            sites: vec!["x".into()],
            coordinator_names: vec![],
            coordinator_url: "https://x:1".into(),
            validity_days: 0,
        })
        .unwrap_err()
        .to_string()
        .contains("validity_days")
    );
}

#[test]
fn a_site_verifier_with_the_cas_crl_refuses_revoked_sites_and_other_cas_lists() {
    use cohort_ca::{crl_path, revoke};
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let opts = |out: std::path::PathBuf| ProvisionOptions {
        out,
        sites: vec!["hospital-a".into(), "hospital-b".into()],
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:7700".into(),
        validity_days: 30,
    };
    let out = dir.path().join("pki");
    provision(&opts(out.clone())).unwrap();
    revoke(&out, "hospital-b").unwrap();
    let crl = CertificateRevocationListDer::from_pem_file(crl_path(&out)).unwrap();
    let ca = CaVerifier::new(der(&out.join("ca.pem")), now())
        .unwrap()
        .with_crl(crl.as_ref())
        .unwrap();
    assert!(
        ca.verify_site("hospital-a", &der(&out.join("sites/hospital-a/cert.pem")))
            .is_ok()
    );
    assert!(matches!(
        ca.verify_site("hospital-b", &der(&out.join("sites/hospital-b/cert.pem"))),
        Err(IdentityError::Revoked { .. })
    ));
    // Another project's CRL cannot be slipped in.
    let other = dir.path().join("other");
    provision(&opts(other.clone())).unwrap();
    let foreign = CertificateRevocationListDer::from_pem_file(crl_path(&other)).unwrap();
    assert!(matches!(
        CaVerifier::new(der(&out.join("ca.pem")), now())
            .unwrap()
            .with_crl(foreign.as_ref()),
        Err(IdentityError::BadCrl(_))
    ));
}
