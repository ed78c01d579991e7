//! `cohort-coordinator provision`: a project CA, the coordinator's certificate and one bundle
//! per site, all with Ed25519 keys.
//!
//! A site's identity is its certificate: the coordinator admits only certificates issued by
//! this CA, and the SecAgg+ key signatures are checked against the same certificates. Keep
//! `ca.key` offline after provisioning: whoever holds it can mint sites.
//!
//! Certificates expire (`validity_days`, one year by default; the CA lasts ten years or
//! longer than any of its certificates), so a stolen bundle does not work forever. Every
//! certificate gets a random serial, recorded in `coordinator/registry.toml`; `--revoke` and
//! `--renew` move serials to its revoked list and re-sign `coordinator/crl.pem` from it, which
//! the coordinator loads (`tls.crl`, `tls.registry`).
//!
//! Every change also publishes a new version of the federation manifest (`manifest.toml`,
//! [`cohort_protocols::manifest`]): the members, their roles, keys and serials, signed with
//! the CA key. Agents pin it and accept as SecAgg+ peers only the sites it lists with the
//! listed key, so a certificate the CA key mints later is not a member until a new manifest
//! says so. It is written at the top of `--out`, beside the coordinator's files and into
//! every bundle on disk; agents also receive newer versions through the coordinator, which
//! cannot forge them.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ED25519, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use thiserror::Error;
use time::OffsetDateTime;

use cohort_protocols::manifest::{Manifest, Member, Role, SignedManifest};

use crate::registry::{RegisteredSite, Registry, RegistryError};

/// Default validity of a site's or the coordinator's certificate.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// The CA outlives its certificates: ten years, or a year beyond the longest validity asked for.
const CA_VALIDITY_DAYS: u32 = 3650;

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(
        "site {0:?} has no current certificate in the registry (never provisioned, or already revoked)"
    )]
    NotRegistered(String),
    #[error("validity_days must be between 1 and 36500, not {0}")]
    BadValidity(u32),
    #[error("the federation manifest: {0}")]
    Manifest(String),
    #[error("the certificate signing request: {0}")]
    BadCsr(String),
}

/// What a certificate signing request asks to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolment {
    /// A training site: a client certificate, a SecAgg+ peer.
    Site,
    /// A site that only evaluates.
    Evaluation,
    /// The coordinator: a server certificate for the names its request lists.
    Coordinator,
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
    /// How long the site and coordinator certificates are valid.
    pub validity_days: u32,
}

/// Where `provision` keeps the registry and the CRL: with the coordinator's files.
pub fn registry_path(out: &Path) -> PathBuf {
    out.join("coordinator").join("registry.toml")
}

pub fn crl_path(out: &Path) -> PathBuf {
    out.join("coordinator").join("crl.pem")
}

/// The CA's copy of the current manifest (the one the next version is made from).
pub fn manifest_path(out: &Path) -> PathBuf {
    out.join("manifest.toml")
}

/// What a manifest calls the federation: derived from the CA's key, so two projects never
/// share a name and a manifest of another CA is refused as another federation's before its
/// signature is even looked at.
pub fn federation_id(ca_der: &[u8]) -> Result<String, ProvisionError> {
    use sha3::Digest;
    let key = cohort_protocols::identity::certificate_key(ca_der)
        .map_err(|e| ProvisionError::Manifest(e.to_string()))?;
    let digest = sha3::Sha3_256::digest(key.as_bytes());
    Ok(format!("cohort-{}", crate::hex(&digest[..8])))
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(crate::unix_seconds() as i64)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A validity window starting an hour ago (clocks at sites drift) and lasting `days`.
fn validity(p: &mut CertificateParams, days: u32) -> Result<i64, ProvisionError> {
    if !(1..=36_500).contains(&days) {
        return Err(ProvisionError::BadValidity(days));
    }
    let start = now() - time::Duration::hours(1);
    let end = now() + time::Duration::days(days as i64);
    p.not_before = start;
    p.not_after = end;
    Ok(end.unix_timestamp())
}

/// A random positive 128-bit serial, and its hex as the registry records it.
fn serial(p: &mut CertificateParams) -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    p.serial_number = Some(SerialNumber::from_slice(&bytes));
    crate::hex(&bytes)
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
    #[cfg(unix)]
    if path.extension().is_some_and(|e| e == "sh") {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io(path))?;
    }
    Ok(())
}

pub fn check_site_name(name: &str) -> Result<(), ProvisionError> {
    if cohort_protocols::identity::valid_site_name(name) {
        Ok(())
    } else {
        Err(ProvisionError::BadSiteName(name.to_string()))
    }
}

fn ca_params(leaf_days: u32) -> Result<CertificateParams, ProvisionError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    validity(&mut p, CA_VALIDITY_DAYS.max(leaf_days.saturating_add(365)))?;
    serial(&mut p);
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

/// Creates only a CA under `out` (`ca.pem`, `ca.key`, an empty registry and CRL, manifest
/// version 1 with no members): the consortium's side of enrolment. The coordinator and each
/// site then make their own keys and send requests for [`sign_request`].
pub fn init(out: &Path, validity_days: u32) -> Result<(), ProvisionError> {
    let ca_cert_path = out.join("ca.pem");
    if ca_cert_path.exists() {
        return Err(ProvisionError::Exists(ca_cert_path.display().to_string()));
    }
    let ca_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let ca_params = ca_params(validity_days)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_cert_path, &ca_cert.pem())?;
    write(&out.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    publish(out, &mut Registry::default(), &issuer)?;
    let manifest = Manifest {
        federation: federation_id(ca_cert.der())?,
        version: 1,
        issued_unix: crate::unix_seconds() as i64,
        members: Vec::new(),
    };
    write_manifest(out, &manifest, &ca_signing_key(out)?)
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
    if !(1..=36_500).contains(&opts.validity_days) {
        return Err(ProvisionError::BadValidity(opts.validity_days));
    }
    let ca_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let ca_params = ca_params(opts.validity_days)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_cert_path, &ca_cert.pem())?;
    write(&opts.out.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);

    let dir = opts.out.join("coordinator");
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = leaf_params(
        cohort_protocols::identity::COORDINATOR_COMMON_NAME,
        &opts.coordinator_names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    validity(&mut params, opts.validity_days)?;
    serial(&mut params);
    let coordinator_serial = serial(&mut params);
    let cert = params.signed_by(&key, &issuer)?;
    write(&dir.join("cert.pem"), &cert.pem())?;
    write(&dir.join("key.pem"), &key.serialize_pem())?;
    write(&dir.join("ca.pem"), &ca_cert.pem())?;
    let mut members = vec![Member {
        name: cohort_protocols::identity::COORDINATOR_COMMON_NAME.to_string(),
        role: Role::Coordinator,
        key: crate::hex(key.public_key_raw()),
        serial: coordinator_serial,
        not_after_unix: params.not_after.unix_timestamp(),
    }];

    let mut registry = Registry::default();
    for site in &opts.sites {
        let (registered, member) = site_bundle(
            &opts.out,
            site,
            &issuer,
            &ca_cert.pem(),
            &opts.coordinator_url,
            &opts.coordinator_names,
            opts.validity_days,
        )?;
        registry.site.push(registered);
        members.push(member);
    }
    publish(&opts.out, &mut registry, &issuer)?;
    let manifest = Manifest {
        federation: federation_id(ca_cert.der())?,
        version: 1,
        issued_unix: crate::unix_seconds() as i64,
        members,
    };
    write_manifest(&opts.out, &manifest, &ca_signing_key(&opts.out)?)
}

/// The CA key as a signer of manifests.
fn ca_signing_key(out: &Path) -> Result<ed25519_dalek::SigningKey, ProvisionError> {
    crate::signing_key(&out.join("ca.key")).map_err(|e| ProvisionError::Manifest(format!("{e:#}")))
}

/// Signs `manifest` and writes it where the CA keeps it, beside the coordinator's files and
/// into every site bundle under `out/sites`.
fn write_manifest(
    out: &Path,
    manifest: &Manifest,
    ca: &ed25519_dalek::SigningKey,
) -> Result<(), ProvisionError> {
    let signed = manifest
        .sign(ca)
        .map_err(|e| ProvisionError::Manifest(e.to_string()))?;
    let text = String::from_utf8_lossy(&signed.to_bytes()).into_owned();
    write(&manifest_path(out), &text)?;
    write(&out.join("coordinator").join("manifest.toml"), &text)?;
    let sites = out.join("sites");
    if let Ok(entries) = fs::read_dir(&sites) {
        for entry in entries.flatten() {
            if entry.path().join("cert.pem").exists() {
                write(&entry.path().join("manifest.toml"), &text)?;
            }
        }
    }
    Ok(())
}

/// The next manifest version: the current one (checked against the CA) changed by `edit`.
fn next_manifest(out: &Path, edit: impl FnOnce(&mut Vec<Member>)) -> Result<(), ProvisionError> {
    let ca = ca_signing_key(out)?;
    let path = manifest_path(out);
    let mut manifest = match fs::read(&path) {
        Ok(bytes) => SignedManifest::verify(&bytes, &ca.verifying_key())
            .map_err(|e| ProvisionError::Manifest(format!("{}: {e}", path.display())))?
            .manifest()
            .clone(),
        // A project provisioned before manifests existed: its first one lists what is
        // (re)issued from now on.
        Err(_) => {
            let der = crate::tls::first_cert_der(&out.join("ca.pem"))
                .map_err(|_| ProvisionError::NoCa(out.display().to_string()))?;
            Manifest {
                federation: federation_id(&der)?,
                version: 0,
                issued_unix: 0,
                members: Vec::new(),
            }
        }
    };
    edit(&mut manifest.members);
    manifest.version += 1;
    manifest.issued_unix = crate::unix_seconds() as i64;
    write_manifest(out, &manifest, &ca)
}

/// Saves the registry and re-signs the CRL from its revoked list.
fn publish(
    out: &Path,
    registry: &mut Registry,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(), ProvisionError> {
    registry.crl_number += 1;
    let revoked_certs = registry
        .revoked
        .iter()
        .filter_map(|r| {
            Some(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&crate::from_hex(&r.serial)?),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_unix).ok()?,
                reason_code: Some(if r.reason == "superseded" {
                    RevocationReason::Superseded
                } else {
                    RevocationReason::Unspecified
                }),
                invalidity_date: None,
            })
        })
        .collect();
    let crl = CertificateRevocationListParams {
        this_update: now() - time::Duration::hours(1),
        // The coordinator does not treat an old CRL as expired (it is offline-signed and
        // replaced by the next `provision`); a year keeps strict readers content.
        next_update: now() + time::Duration::days(365),
        crl_number: SerialNumber::from(registry.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(issuer)?;
    write(&crl_path(out), &crl.pem()?)?;
    registry.save(&registry_path(out))?;
    Ok(())
}

/// The CA's issuer and its certificate's PEM, from a provisioned directory.
fn load_issuer(out: &Path) -> Result<(Issuer<'static, KeyPair>, String), ProvisionError> {
    let ca_pem = fs::read_to_string(out.join("ca.pem"))
        .map_err(|_| ProvisionError::NoCa(out.display().to_string()))?;
    let ca_key_pem = fs::read_to_string(out.join("ca.key")).map_err(io(&out.join("ca.key")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    Ok((Issuer::from_ca_cert_pem(&ca_pem, ca_key)?, ca_pem))
}

/// The registry of a provisioned directory; an empty one for a project provisioned before
/// registries existed (its sites are then added as they are renewed or added).
fn load_registry(out: &Path) -> Result<Registry, ProvisionError> {
    let path = registry_path(out);
    if path.exists() {
        Ok(Registry::load(&path)?)
    } else {
        Ok(Registry::default())
    }
}

/// Revokes the current certificate of `site`: the coordinator refuses it from the next
/// session on (registry) or its next start (CRL). The site's bundle is left in place.
pub fn revoke(out: &Path, site: &str) -> Result<(), ProvisionError> {
    let (issuer, _) = load_issuer(out)?;
    let mut registry = load_registry(out)?;
    if !registry.retire(site, "revoked", crate::unix_seconds() as i64) {
        return Err(ProvisionError::NotRegistered(site.to_string()));
    }
    publish(out, &mut registry, &issuer)?;
    next_manifest(out, |members| members.retain(|m| m.name != site))
}

/// Issues `site` a new key and certificate (valid `validity_days`) in its bundle, keeping its
/// agent.toml, and revokes the old certificate as superseded. Copy the bundle's `cert.pem`
/// and `key.pem` to the site before the coordinator picks up the registry.
pub fn renew(out: &Path, site: &str, validity_days: u32) -> Result<(), ProvisionError> {
    check_site_name(site)?;
    let (issuer, _) = load_issuer(out)?;
    let mut registry = load_registry(out)?;
    let dir = out.join("sites").join(site);
    if !dir.join("cert.pem").exists() {
        return Err(ProvisionError::NotRegistered(site.to_string()));
    }
    let (cert_pem, key_pem, registered, member) = site_certificate(site, &issuer, validity_days)?;
    write(&dir.join("cert.pem"), &cert_pem)?;
    write(&dir.join("key.pem"), &key_pem)?;
    // A project provisioned before registries existed has no entry to supersede.
    registry.retire(site, "superseded", crate::unix_seconds() as i64);
    registry.site.push(registered);
    publish(out, &mut registry, &issuer)?;
    next_manifest(out, |members| {
        members.retain(|m| m.name != site);
        members.push(member);
    })
}

/// Adds one site to an existing project without touching the others.
pub fn add_site(
    out: &Path,
    site: &str,
    coordinator_url: &str,
    coordinator_names: &[String],
    validity_days: u32,
) -> Result<(), ProvisionError> {
    check_site_name(site)?;
    let (issuer, ca_pem) = load_issuer(out)?;
    let mut registry = load_registry(out)?;
    let (registered, member) = site_bundle(
        out,
        site,
        &issuer,
        &ca_pem,
        coordinator_url,
        coordinator_names,
        validity_days,
    )?;
    registry.site.push(registered);
    publish(out, &mut registry, &issuer)?;
    next_manifest(out, |members| members.push(member))
}

/// The coordinator's key, made on its host, and a certificate signing request for it, written
/// to `dir` (`key.pem`, mode 0600, and `request.csr.pem`; a site makes its own with
/// `cohort-agent enroll`), so the key never leaves the machine that uses it. `names` become the
/// request's subject alternative names (the coordinator's DNS names and IPs).
pub fn coordinator_request(dir: &Path, names: &[String]) -> Result<PathBuf, ProvisionError> {
    let key_path = dir.join("key.pem");
    if key_path.exists() {
        return Err(ProvisionError::Exists(key_path.display().to_string()));
    }
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let params = leaf_params(
        cohort_protocols::identity::COORDINATOR_COMMON_NAME,
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let csr = params.serialize_request(&key)?;
    write(&key_path, &key.serialize_pem())?;
    let csr_path = dir.join("request.csr.pem");
    write(&csr_path, &csr.pem()?)?;
    Ok(csr_path)
}

/// Signs a certificate signing request made where its key lives (see [`coordinator_request`] and `cohort-agent enroll`):
/// the CA sees only the public key. The common name and, for the coordinator, the subject
/// alternative names come from the request; everything else (usages, validity, serial) is
/// the CA's. A site's certificate replaces its current one (renewal: the old one is revoked
/// as superseded). Registry, CRL and a new manifest version are published; the bundle
/// (`sites/NAME/` or `coordinator/`) gets the certificate, the CA certificate and the
/// manifest, and a new site's bundle its `agent.toml` and `start.sh`. Returns the bundle.
pub fn sign_request(
    out: &Path,
    csr_pem: &str,
    role: Enrolment,
    coordinator_url: &str,
    coordinator_names: &[String],
    validity_days: u32,
) -> Result<PathBuf, ProvisionError> {
    use rcgen::{CertificateSigningRequestParams, PublicKeyData};
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| ProvisionError::BadCsr(e.to_string()))?;
    if csr.public_key.algorithm() != &PKCS_ED25519 {
        return Err(ProvisionError::BadCsr(
            "the key is not an Ed25519 key (make requests with `cohort-agent enroll`)".into(),
        ));
    }
    let name = csr
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            rcgen::DnValue::Utf8String(s) => Some(s.clone()),
            rcgen::DnValue::PrintableString(p) => Some(p.as_str().to_string()),
            _ => None,
        })
        .ok_or_else(|| ProvisionError::BadCsr("no common name".into()))?;
    let (usage, names, member_role) = match role {
        Enrolment::Coordinator => {
            if name != cohort_protocols::identity::COORDINATOR_COMMON_NAME {
                return Err(ProvisionError::BadCsr(format!(
                    "a coordinator's request must be for {:?}, not {name:?}",
                    cohort_protocols::identity::COORDINATOR_COMMON_NAME
                )));
            }
            let names: Vec<String> = csr
                .params
                .subject_alt_names
                .iter()
                .filter_map(|n| match n {
                    SanType::DnsName(d) => Some(d.as_str().to_string()),
                    SanType::IpAddress(ip) => Some(ip.to_string()),
                    _ => None,
                })
                .collect();
            (
                ExtendedKeyUsagePurpose::ServerAuth,
                names,
                Role::Coordinator,
            )
        }
        Enrolment::Site | Enrolment::Evaluation => {
            check_site_name(&name)?;
            let role = if role == Enrolment::Site {
                Role::Site
            } else {
                Role::Evaluation
            };
            (ExtendedKeyUsagePurpose::ClientAuth, Vec::new(), role)
        }
    };
    let (issuer, ca_pem) = load_issuer(out)?;
    let mut registry = load_registry(out)?;
    let mut params = leaf_params(&name, &names, usage)?;
    let not_after_unix = validity(&mut params, validity_days)?;
    let serial = serial(&mut params);
    let key_hex = crate::hex(csr.public_key.der_bytes());
    let cert = CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    }
    .signed_by(&issuer)?;
    let dir = match role {
        Enrolment::Coordinator => out.join("coordinator"),
        _ => out.join("sites").join(&name),
    };
    let new_bundle = !dir.join("cert.pem").exists();
    write(&dir.join("cert.pem"), &cert.pem())?;
    write(&dir.join("ca.pem"), &ca_pem)?;
    if role != Enrolment::Coordinator {
        if new_bundle && !dir.join("agent.toml").exists() {
            write_agent_files(&dir, &name, coordinator_url, coordinator_names)?;
        }
        registry.retire(&name, "superseded", crate::unix_seconds() as i64);
        registry.site.push(RegisteredSite {
            name: name.clone(),
            serial: serial.clone(),
            not_after_unix,
        });
    }
    publish(out, &mut registry, &issuer)?;
    let member = Member {
        name: name.clone(),
        role: member_role,
        key: key_hex,
        serial,
        not_after_unix,
    };
    next_manifest(out, |members| {
        members.retain(|m| m.name != name);
        members.push(member);
    })?;
    Ok(dir)
}

/// A new key and client certificate for `site`: (cert PEM, key PEM, registry entry,
/// manifest entry).
fn site_certificate(
    site: &str,
    issuer: &Issuer<'_, KeyPair>,
    validity_days: u32,
) -> Result<(String, String, RegisteredSite, Member), ProvisionError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = leaf_params(site, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let not_after_unix = validity(&mut params, validity_days)?;
    let serial = serial(&mut params);
    let cert = params.signed_by(&key, issuer)?;
    let member = Member {
        name: site.to_string(),
        role: Role::Site,
        key: crate::hex(key.public_key_raw()),
        serial: serial.clone(),
        not_after_unix,
    };
    Ok((
        cert.pem(),
        key.serialize_pem(),
        RegisteredSite {
            name: site.to_string(),
            serial,
            not_after_unix,
        },
        member,
    ))
}

fn site_bundle(
    out: &Path,
    site: &str,
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    coordinator_url: &str,
    coordinator_names: &[String],
    validity_days: u32,
) -> Result<(RegisteredSite, Member), ProvisionError> {
    let dir = out.join("sites").join(site);
    if dir.exists() {
        return Err(ProvisionError::Exists(dir.display().to_string()));
    }
    let (cert_pem, key_pem, registered, member) = site_certificate(site, issuer, validity_days)?;
    write(&dir.join("cert.pem"), &cert_pem)?;
    write(&dir.join("key.pem"), &key_pem)?;
    write(&dir.join("ca.pem"), ca_pem)?;
    write_agent_files(&dir, site, coordinator_url, coordinator_names)?;
    Ok((registered, member))
}

/// A site bundle's `agent.toml` and `start.sh`.
fn write_agent_files(
    dir: &Path,
    site: &str,
    coordinator_url: &str,
    coordinator_names: &[String],
) -> Result<(), ProvisionError> {
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
# The federation's members, signed by the CA: only these sites are accepted as peers. Newer
# versions from the coordinator replace this file.
manifest = "manifest.toml"

[data]
csv = "data.csv"
test_fraction = 0.34
split_seed = 42

"#
        ),
    )?;
    write(
        &dir.join("start.sh"),
        &format!(
            r#"#!/bin/sh
# Site {site}: the one command that starts this site's Cohort agent. Put the site's CSV at
# data.csv beside this file (or point [data] csv in agent.toml at it), then run ./start.sh.
# It needs cohort-agent on PATH, or COHORT_AGENT set to its path. Exit codes: 0 training
# finished, 1 runtime failure, 2 configuration (e.g. no data.csv), 3 refused for good.
set -eu
cd "$(dirname "$0")"
exec "${{COHORT_AGENT:-cohort-agent}}" run --config agent.toml "$@"
"#
        ),
    )?;
    Ok(())
}
