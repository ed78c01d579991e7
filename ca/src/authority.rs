//! The CA's directory and what it does with it: init, sign requests, revoke, countersign.
//!
//! Layout of the CA's directory: `ca.pem`, `ca.key` (the only private key it ever holds),
//! `manifest.toml` (the current signed manifest), `coordinator/` (what the coordinator's
//! operator receives: its certificate, `ca.pem`, `registry.toml`, `crl.pem`, the manifest) and
//! `sites/NAME/` (a site's bundle: certificate, `ca.pem`, manifest, `agent.toml`, `start.sh`).
//!
//! Certificates expire (`validity_days`, one year by default; the CA lasts ten years or longer
//! than any of its certificates), so a stolen certificate does not work forever. Every
//! certificate gets a random serial, recorded in `coordinator/registry.toml`; revocation and
//! renewal move serials to its revoked list and re-sign `coordinator/crl.pem` from it, which
//! the coordinator loads (`tls.crl`, `tls.registry`).

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ED25519, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use thiserror::Error;
use time::OffsetDateTime;

use cohort_protocols::manifest::{Countersignature, Manifest, Member, Role, SignedManifest};
use cohort_protocols::registry::{RegisteredSite, Registry};

use crate::{from_hex, hex, unix_seconds};

/// Default validity of a site's or the coordinator's certificate.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// The CA outlives its certificates: ten years, or a year beyond the longest validity asked for.
const CA_VALIDITY_DAYS: u32 = 3650;

#[derive(Debug, Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "site name {0:?} is not allowed: use letters, digits, '-' and '_' (at most 64), and not \"cohort-coordinator\""
    )]
    BadSiteName(String),
    #[error("{0} already exists: the CA never overwrites keys or bundles")]
    Exists(String),
    #[error("site {0:?} is listed twice")]
    Duplicate(String),
    #[error("{0} has no CA: run `cohort-ca init` first")]
    NoCa(String),
    #[error("the site registry: {0}")]
    Registry(#[from] cohort_protocols::registry::RegistryError),
    #[error(
        "site {0:?} has no current certificate in the registry (never enrolled, or already revoked)"
    )]
    NotRegistered(String),
    #[error("validity_days must be between 1 and 36500, not {0}")]
    BadValidity(u32),
    #[error("the federation manifest: {0}")]
    Manifest(String),
    #[error("the certificate signing request: {0}")]
    BadCsr(String),
    #[error("the countersignature: {0}")]
    BadCountersignature(String),
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

/// Where the CA keeps the registry and the CRL: with the coordinator's files.
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
pub fn federation_id(ca_key: &ed25519_dalek::VerifyingKey) -> String {
    use sha3::Digest;
    let digest = sha3::Sha3_256::digest(ca_key.as_bytes());
    format!("cohort-{}", hex(&digest[..8]))
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix_seconds()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A validity window starting an hour ago (clocks at sites drift) and lasting `days`.
pub(crate) fn validity(p: &mut CertificateParams, days: u32) -> Result<i64, CaError> {
    if !(1..=36_500).contains(&days) {
        return Err(CaError::BadValidity(days));
    }
    let start = now() - time::Duration::hours(1);
    let end = now() + time::Duration::days(days as i64);
    p.not_before = start;
    p.not_after = end;
    Ok(end.unix_timestamp())
}

/// A random positive 128-bit serial, and its hex as the registry records it.
pub(crate) fn serial(p: &mut CertificateParams) -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    p.serial_number = Some(SerialNumber::from_slice(&bytes));
    hex(&bytes)
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |error| CaError::Io {
        path: path.display().to_string(),
        error,
    }
}

pub(crate) fn write(path: &Path, contents: &str) -> Result<(), CaError> {
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

pub(crate) fn check_site_name(name: &str) -> Result<(), CaError> {
    if cohort_protocols::identity::valid_site_name(name) {
        Ok(())
    } else {
        Err(CaError::BadSiteName(name.to_string()))
    }
}

pub(crate) fn ca_params(leaf_days: u32) -> Result<CertificateParams, CaError> {
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

pub(crate) fn leaf_params(
    common_name: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, CaError> {
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
pub fn init(out: &Path, validity_days: u32) -> Result<(), CaError> {
    let ca_cert_path = out.join("ca.pem");
    if ca_cert_path.exists() {
        return Err(CaError::Exists(ca_cert_path.display().to_string()));
    }
    let ca_key = KeyPair::generate_for(&PKCS_ED25519)?;
    let ca_params = ca_params(validity_days)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write(&ca_cert_path, &ca_cert.pem())?;
    write(&out.join("ca.key"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    publish(out, &mut Registry::default(), &issuer)?;
    let ca = ca_signing_key(out)?;
    let manifest = Manifest {
        federation: federation_id(&ca.verifying_key()),
        version: 1,
        issued_unix: unix_seconds(),
        members: Vec::new(),
    };
    write_manifest(
        out,
        &manifest
            .sign(&ca)
            .map_err(|e| CaError::Manifest(e.to_string()))?,
    )
}

/// The CA key as a signer of manifests.
pub(crate) fn ca_signing_key(out: &Path) -> Result<ed25519_dalek::SigningKey, CaError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let path = out.join("ca.key");
    let pem = fs::read_to_string(&path).map_err(|_| CaError::NoCa(out.display().to_string()))?;
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        CaError::Manifest(format!(
            "{}: not an Ed25519 PKCS#8 key: {e}",
            path.display()
        ))
    })
}

/// Writes `signed` where the CA keeps it, beside the coordinator's files and into every site
/// bundle under `out/sites`.
pub(crate) fn write_manifest(out: &Path, signed: &SignedManifest) -> Result<(), CaError> {
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

/// The CA's current manifest, checked against its key.
pub fn current_manifest(out: &Path) -> Result<SignedManifest, CaError> {
    let ca = ca_signing_key(out)?;
    let path = manifest_path(out);
    let bytes = fs::read(&path).map_err(io(&path))?;
    SignedManifest::verify(&bytes, &ca.verifying_key())
        .map_err(|e| CaError::Manifest(format!("{}: {e}", path.display())))
}

/// The next manifest version: the current one changed by `edit`, signed and published.
pub(crate) fn next_manifest(
    out: &Path,
    edit: impl FnOnce(&mut Vec<Member>),
) -> Result<(), CaError> {
    let ca = ca_signing_key(out)?;
    let mut manifest = current_manifest(out)?.manifest().clone();
    edit(&mut manifest.members);
    manifest.version += 1;
    manifest.issued_unix = unix_seconds();
    let signed = manifest
        .sign(&ca)
        .map_err(|e| CaError::Manifest(e.to_string()))?;
    write_manifest(out, &signed)
}

/// Attaches countersignatures (from `cohort-agent countersign` at existing member sites) to
/// the current manifest and republishes it: same version, same body, same digest, so sites
/// that already adopted it see no change, and sites whose `policy.manifest_quorum` refused it
/// adopt it once enough members vouched for it. Each must be by a site member with the key
/// the manifest lists, over this very manifest; returns how many it now carries.
pub fn countersign(out: &Path, countersignatures: &[&str]) -> Result<usize, CaError> {
    let mut current = current_manifest(out)?;
    for text in countersignatures {
        let c = Countersignature::parse_for(text, &current)
            .map_err(|e| CaError::BadCountersignature(e.to_string()))?;
        current
            .attach(c)
            .map_err(|e| CaError::BadCountersignature(e.to_string()))?;
    }
    write_manifest(out, &current)?;
    Ok(current.countersignatures().len())
}

/// Saves the registry and re-signs the CRL from its revoked list.
pub(crate) fn publish(
    out: &Path,
    registry: &mut Registry,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(), CaError> {
    registry.crl_number += 1;
    let revoked_certs = registry
        .revoked
        .iter()
        .filter_map(|r| {
            Some(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&from_hex(&r.serial)?),
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
        // replaced by the next change the CA makes); a year keeps strict readers content.
        next_update: now() + time::Duration::days(365),
        crl_number: SerialNumber::from(registry.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(issuer)?;
    write(&crl_path(out), &crl.pem()?)?;
    write(&registry_path(out), &registry.encode()?)?;
    Ok(())
}

/// The CA's issuer and its certificate's PEM, from a provisioned directory.
pub(crate) fn load_issuer(out: &Path) -> Result<(Issuer<'static, KeyPair>, String), CaError> {
    let ca_pem = fs::read_to_string(out.join("ca.pem"))
        .map_err(|_| CaError::NoCa(out.display().to_string()))?;
    let ca_key_pem = fs::read_to_string(out.join("ca.key")).map_err(io(&out.join("ca.key")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    Ok((Issuer::from_ca_cert_pem(&ca_pem, ca_key)?, ca_pem))
}

/// The registry of a CA directory; an empty one for a project made before
/// registries existed (its sites are then added as they are renewed or added).
pub(crate) fn load_registry(out: &Path) -> Result<Registry, CaError> {
    let path = registry_path(out);
    if path.exists() {
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        Ok(Registry::parse(&text)?)
    } else {
        Ok(Registry::default())
    }
}

/// Revokes the current certificate of `site`: the coordinator refuses it from the next
/// session on (registry) or its next start (CRL). The site's bundle is left in place.
pub fn revoke(out: &Path, site: &str) -> Result<(), CaError> {
    let (issuer, _) = load_issuer(out)?;
    let mut registry = load_registry(out)?;
    if !registry.retire(site, "revoked", unix_seconds()) {
        return Err(CaError::NotRegistered(site.to_string()));
    }
    publish(out, &mut registry, &issuer)?;
    next_manifest(out, |members| members.retain(|m| m.name != site))
}

/// Signs a certificate signing request made where its key lives (`cohort-agent enroll` at a
/// site, `cohort-coordinator enroll` on the coordinator's host):
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
) -> Result<PathBuf, CaError> {
    use rcgen::{CertificateSigningRequestParams, PublicKeyData};
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    if csr.public_key.algorithm() != &PKCS_ED25519 {
        return Err(CaError::BadCsr(
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
        .ok_or_else(|| CaError::BadCsr("no common name".into()))?;
    let (usage, names, member_role) = match role {
        Enrolment::Coordinator => {
            if name != cohort_protocols::identity::COORDINATOR_COMMON_NAME {
                return Err(CaError::BadCsr(format!(
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
    let key_hex = hex(csr.public_key.der_bytes());
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
            crate::bundle::write_agent_files(&dir, &name, coordinator_url, coordinator_names)?;
        }
        registry.retire(&name, "superseded", unix_seconds());
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
