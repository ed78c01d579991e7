//! `cohort-coordinator enroll`: the coordinator's key is made on its own host, like a site's,
//! and only a certificate signing request goes to the consortium's CA (`cohort-ca sign
//! --role coordinator`). The coordinator binary has no CA operations.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ED25519, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("making the key or the request: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{0} already exists: enrolment never overwrites a key")]
    Exists(String),
}

/// The coordinator's key, made on its host, and a certificate signing request for it, written
/// to `dir` (`key.pem`, mode 0600, and `request.csr.pem`; a site makes its own with
/// `cohort-agent enroll`), so the key never leaves the machine that uses it. `names` become the
/// request's subject alternative names (the coordinator's DNS names and IPs).
pub fn coordinator_request(dir: &Path, names: &[String]) -> Result<PathBuf, EnrolError> {
    let key_path = dir.join("key.pem");
    if key_path.exists() {
        return Err(EnrolError::Exists(key_path.display().to_string()));
    }
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let params = leaf_params(
        cohort_protocols::identity::COORDINATOR_COMMON_NAME,
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let csr = params.serialize_request(&key)?;
    std::fs::create_dir_all(dir).map_err(|error| EnrolError::Io {
        path: dir.display().to_string(),
        error,
    })?;
    write_private(&key_path, &key.serialize_pem())?;
    let csr_path = dir.join("request.csr.pem");
    std::fs::write(&csr_path, csr.pem()?).map_err(|error| EnrolError::Io {
        path: csr_path.display().to_string(),
        error,
    })?;
    Ok(csr_path)
}

fn leaf_params(
    common_name: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, EnrolError> {
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

/// Creates `path` readable by its owner only, before any key byte is written.
fn write_private(path: &Path, contents: &str) -> Result<(), EnrolError> {
    use std::io::Write;
    let err = |error| EnrolError::Io {
        path: path.display().to_string(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(err)
}
