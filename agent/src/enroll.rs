//! `cohort-agent enroll`: the site makes its own key and asks the consortium's CA to certify
//! it. The CA signs the request and sends back a bundle without any private key, so nobody
//! but the site can sign as the site: not the CA's holder, not the coordinator.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};

/// Writes `dir/key.pem` (mode 0600) and `dir/request.csr.pem` for site `name`; returns the
/// request's path. Refuses to overwrite a key.
pub fn request(dir: &Path, name: &str) -> Result<PathBuf> {
    if !cohort_protocols::identity::valid_site_name(name) {
        bail!(
            "site name {name:?} is not allowed: use letters, digits, '-' and '_' (at most 64), and not \"cohort-coordinator\""
        );
    }
    let key_path = dir.join("key.pem");
    if key_path.exists() {
        bail!(
            "{} already exists: enrolment never overwrites a key (use a new directory to renew)",
            key_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate_for(&PKCS_ED25519).context("generating the site's key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let csr = params.serialize_request(&key)?.pem()?;
    write_private(&key_path, &key.serialize_pem())?;
    let csr_path = dir.join("request.csr.pem");
    std::fs::write(&csr_path, csr).with_context(|| format!("writing {}", csr_path.display()))?;
    Ok(csr_path)
}

/// Creates `path` readable by its owner only, before any key byte is written.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
