//! Every key made on one machine: **for throw-away demos, `cohort-sim` and tests only.**
//!
//! [`provision`] writes a CA, the coordinator's key and certificate and every site's key and
//! certificate into one directory, so whoever ran it holds every hospital's key and can sign
//! as any of them: exactly what the enrolment flow ([`crate::sign_request`]) exists to
//! prevent. `cohort-ca demo` says so every time it runs. Real sites enrol with
//! `cohort-agent enroll`.

use std::path::{Path, PathBuf};

use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair, PKCS_ED25519};

use cohort_protocols::manifest::{Manifest, Member, Role};
use cohort_protocols::registry::{RegisteredSite, Registry};

use crate::authority::{
    CaError, ca_params, ca_signing_key, check_site_name, leaf_params, load_issuer, load_registry,
    next_manifest, publish, serial, validity, write, write_manifest,
};
use crate::{federation_id, hex, unix_seconds};

pub use crate::DEFAULT_VALIDITY_DAYS;

/// A whole demo federation.
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

/// Creates a new CA, the coordinator's certificate and the site bundles under `opts.out`.
pub fn provision(opts: &ProvisionOptions) -> Result<(), CaError> {
    let ca_cert_path = opts.out.join("ca.pem");
    if ca_cert_path.exists() {
        return Err(CaError::Exists(ca_cert_path.display().to_string()));
    }
    for (i, s) in opts.sites.iter().enumerate() {
        check_site_name(s)?;
        if opts.sites[..i].contains(s) {
            return Err(CaError::Duplicate(s.clone()));
        }
    }
    if !(1..=36_500).contains(&opts.validity_days) {
        return Err(CaError::BadValidity(opts.validity_days));
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
        key: hex(key.public_key_raw()),
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
    let ca = ca_signing_key(&opts.out)?;
    let manifest = Manifest {
        federation: federation_id(&ca.verifying_key()),
        version: 1,
        issued_unix: unix_seconds(),
        members,
    };
    let signed = manifest
        .sign(&ca)
        .map_err(|e| CaError::Manifest(e.to_string()))?;
    write_manifest(&opts.out, &signed)
}

/// Issues `site` a new key and certificate (valid `validity_days`) in its bundle, keeping its
/// agent.toml, and revokes the old certificate as superseded. Copy the bundle's `cert.pem`
/// and `key.pem` to the site before the coordinator picks up the registry.
pub fn renew(out: &Path, site: &str, validity_days: u32) -> Result<(), CaError> {
    check_site_name(site)?;
    let (issuer, _) = load_issuer(out)?;
    let mut registry = load_registry(out)?;
    let dir = out.join("sites").join(site);
    if !dir.join("cert.pem").exists() {
        return Err(CaError::NotRegistered(site.to_string()));
    }
    let (cert_pem, key_pem, registered, member) = site_certificate(site, &issuer, validity_days)?;
    write(&dir.join("cert.pem"), &cert_pem)?;
    write(&dir.join("key.pem"), &key_pem)?;
    // A project provisioned before registries existed has no entry to supersede.
    registry.retire(site, "superseded", unix_seconds());
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
) -> Result<(), CaError> {
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

/// A new key and client certificate for `site`: (cert PEM, key PEM, registry entry,
/// manifest entry).
fn site_certificate(
    site: &str,
    issuer: &Issuer<'_, KeyPair>,
    validity_days: u32,
) -> Result<(String, String, RegisteredSite, Member), CaError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = leaf_params(site, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let not_after_unix = validity(&mut params, validity_days)?;
    let serial = serial(&mut params);
    let cert = params.signed_by(&key, issuer)?;
    let member = Member {
        name: site.to_string(),
        role: Role::Site,
        key: hex(key.public_key_raw()),
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
) -> Result<(RegisteredSite, Member), CaError> {
    let dir = out.join("sites").join(site);
    if dir.exists() {
        return Err(CaError::Exists(dir.display().to_string()));
    }
    let (cert_pem, key_pem, registered, member) = site_certificate(site, issuer, validity_days)?;
    write(&dir.join("cert.pem"), &cert_pem)?;
    write(&dir.join("key.pem"), &key_pem)?;
    write(&dir.join("ca.pem"), ca_pem)?;
    crate::bundle::write_agent_files(&dir, site, coordinator_url, coordinator_names)?;
    Ok((registered, member))
}
