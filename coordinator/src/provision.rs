//! `cohort-coordinator provision`: a project CA, the coordinator's certificate and one bundle
//! per site, all with Ed25519 keys.
//!
//! A site's identity is its certificate: the coordinator admits only certificates issued by
//! this CA, and the SecAgg+ key signatures are checked against the same certificates. Keep
//! `ca.key` offline after provisioning: whoever holds it can mint sites.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProvisionError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "site name {0:?} is not allowed: use letters, digits, '-' and '_' (at most 64), and not \"cohort-coordinator\""
    )]
    BadSiteName(String),
    #[error("{0} already exists: provisioning never overwrites keys (use --add-site)")]
    Exists(String),
    #[error("site {0:?} is listed twice")]
    Duplicate(String),
    #[error("{0} has no CA: run `provision --sites ...` first")]
    NoCa(String),
}

/// Options for a new project.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    pub out: PathBuf,
    pub sites: Vec<String>,
    /// DNS names and IPs the coordinator is reached at (its certificate's subject alt names).
    pub coordinator_names: Vec<String>,
    /// URL the agents dial, written into each `agent.toml`.
    pub coordinator_url: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |error| ProvisionError::Io {
        path: path.display().to_string(),
        error,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), ProvisionError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    fs::write(path, contents).map_err(io(path))?;
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "key") || path.ends_with("key.pem") {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    }
    Ok(())
}

pub fn check_site_name(name: &str) -> Result<(), ProvisionError> {
    let ok = !name.is_empty()
        && name != cohort_protocols::identity::COORDINATOR_COMMON_NAME
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ProvisionError::BadSiteName(name.to_string()))
    }
}

fn ca_params() -> Result<CertificateParams, ProvisionError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Cohort project CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn leaf_params(
    common_name: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, ProvisionError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    for n in names {
        p.subject_alt_names
            .push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    Ok(p)
}

/// Creates a new CA, the coordinator's certificate and the site bundles under `opts.out`.
pub fn provision(opts: &ProvisionOptions) -> Result<(), ProvisionError> {
    let ca_cert_path = opts.out.join("ca.pem");
    if ca_cert_path.exists() {
        return Err(ProvisionError::Exists(ca_cert_path.display().to_string()));
    }
    for (i, s) in opts.sites.iter().enumerate() {
        check_site_name(s)?;
        if opts.sites[..i].contains(s) {
            return Err(ProvisionError::Duplicate(s.clone()));
        }
    }
    let ca_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_cert_path, &ca_cert.pem())?;
    write(&opts.out.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let dir = opts.out.join("coordinator");
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let cert = leaf_params(
        cohort_protocols::identity::COORDINATOR_COMMON_NAME,
        &opts.coordinator_names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?
    .signed_by(&key, &issuer)?;
    write(&dir.join("cert.pem"), &cert.pem())?;
    write(&dir.join("key.pem"), &key.serialize_pem())?;
    write(&dir.join("ca.pem"), &ca_cert.pem())?;

    for site in &opts.sites {
        site_bundle(
            &opts.out,
            site,
            &issuer,
            &ca_cert.pem(),
            &opts.coordinator_url,
            &opts.coordinator_names,
        )?;
    }
    Ok(())
}

/// Adds one site to an existing project without touching the others.
pub fn add_site(
    out: &Path,
    site: &str,
    coordinator_url: &str,
    coordinator_names: &[String],
) -> Result<(), ProvisionError> {
    check_site_name(site)?;
    let ca_pem = fs::read_to_string(out.join("ca.pem"))
        .map_err(|_| ProvisionError::NoCa(out.display().to_string()))?;
    let ca_key_pem = fs::read_to_string(out.join("ca.key")).map_err(io(&out.join("ca.key")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    site_bundle(
        out,
        site,
        &issuer,
        &ca_pem,
        coordinator_url,
        coordinator_names,
    )
}

fn site_bundle(
    out: &Path,
    site: &str,
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    coordinator_url: &str,
    coordinator_names: &[String],
) -> Result<(), ProvisionError> {
    let dir = out.join("sites").join(site);
    if dir.exists() {
        return Err(ProvisionError::Exists(dir.display().to_string()));
    }
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let cert =
        leaf_params(site, &[], ExtendedKeyUsagePurpose::ClientAuth)?.signed_by(&key, issuer)?;
    write(&dir.join("cert.pem"), &cert.pem())?;
    write(&dir.join("key.pem"), &key.serialize_pem())?;
    write(&dir.join("ca.pem"), ca_pem)?;
    let server_name = coordinator_names
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    write(
        &dir.join("agent.toml"),
        &format!(
            r#"# Cohort agent for site {site}. Fill in [data]: the path of this site's CSV. The data
# schema comes from the coordinator (signed); add [data.rename] if a column is named
# differently here, e.g.  [data.rename]  "Heart rate" = "thalach".
site = "{site}"

[coordinator]
url = "{coordinator_url}"
server_name = "{server_name}"

[tls]
ca_cert = "ca.pem"
cert = "cert.pem"
key = "key.pem"

[data]
csv = "data.csv"
test_fraction = 0.34
split_seed = 42

"#
        ),
    )?;
    Ok(())
}
