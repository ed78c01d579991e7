//! Site identities: X.509 certificates with Ed25519 keys, issued by the project's CA.
//!
//! The same certificate authenticates a site's TLS connection and signs its SecAgg+ keys, so
//! the coordinator cannot substitute a site's keys without a certificate from the CA. Every
//! site checks its peers' certificates here before trusting their keys. No I/O: the caller
//! passes the certificates' bytes and the current time.

use ed25519_dalek::VerifyingKey;
use thiserror::Error;
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::prelude::*;

use crate::secagg::{ClientId, IdentityVerifier};

/// Common name of the coordinator's certificate. Provisioning refuses it as a site name, so a
/// certificate from the project CA with this name is the coordinator's.
pub const COORDINATOR_COMMON_NAME: &str = "cohort-coordinator";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error("not a DER X.509 certificate: {0}")]
    Malformed(String),
    #[error("the certificate was not issued by this project's CA")]
    WrongIssuer,
    #[error("the certificate is not valid at this time")]
    Expired,
    #[error("the certificate has no common name")]
    NoCommonName,
    #[error("the certificate's key is not an Ed25519 key")]
    NotEd25519,
    #[error("the certificate is not for client authentication, so it is not a site's")]
    NotClientAuth,
    #[error("the certificate belongs to the coordinator, which is never a peer")]
    CoordinatorAsPeer,
    #[error("the roster lists this site as {expected:?} but the certificate is {got:?}'s")]
    NameMismatch { expected: String, got: String },
    #[error("the certificate (serial {serial}) is revoked by the project CA's CRL")]
    Revoked { serial: String },
    #[error("the revocation list is not the project CA's: {0}")]
    BadCrl(String),
    #[error("{name:?} is not a member of the federation (manifest v{version})")]
    NotAMember { name: String, version: u64 },
    #[error("{name:?} is a member as {role}, not as a training site (manifest v{version})")]
    WrongRole {
        name: String,
        role: crate::manifest::Role,
        version: u64,
    },
    #[error(
        "the certificate for {name:?} (serial {serial}) is not the one manifest v{version} lists for it: another key or a certificate the federation never admitted"
    )]
    NotTheMembersKey {
        name: String,
        serial: String,
        version: u64,
    },
}

/// The Ed25519 key of a DER certificate, whoever issued it: what the CA's own certificate is
/// read for, to check manifests.
pub fn certificate_key(cert_der: &[u8]) -> Result<VerifyingKey, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    ed25519_key(&cert)
}

fn ed25519_key(cert: &X509Certificate<'_>) -> Result<VerifyingKey, IdentityError> {
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(IdentityError::NotEd25519);
    }
    let bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| IdentityError::NotEd25519)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| IdentityError::NotEd25519)
}

/// Whether `name` may be a site's name: letters, digits, '-' and '_', at most 64, and never
/// [`COORDINATOR_COMMON_NAME`] (that name is how a site recognises the coordinator). One rule
/// for whoever makes a request (the agent) and whoever signs it (the CA).
pub fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name != COORDINATOR_COMMON_NAME
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The common name of a certificate, without checking who issued it: what a site calls itself
/// in the roster (its peers check the certificate).
pub fn common_name(cert_der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    subject_common_name(&cert)
}

fn subject_common_name(cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or(IdentityError::NoCommonName)
}

/// Checks certificates against one CA certificate.
#[derive(Debug, Clone)]
pub struct CaVerifier {
    ca_der: Vec<u8>,
    /// Seconds since the Unix epoch at which validity is checked.
    now_unix: i64,
    /// Serial numbers (raw DER bytes) the CA has revoked, from its CRLs.
    revoked: std::collections::BTreeSet<Vec<u8>>,
    /// The federation's members: when set, a certificate is a peer's only if the manifest
    /// lists its name, role, key and serial. Without it any CA certificate passes, which is
    /// what lets the CA's holder mint puppets.
    manifest: Option<crate::manifest::Manifest>,
}

/// What a valid certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteCertificate {
    pub common_name: String,
    pub key: VerifyingKey,
    /// The certificate's extended key usage includes client authentication (what provisioning
    /// gives site certificates and never the coordinator's).
    pub client_auth: bool,
    /// The serial number, lowercase hex (what the CA's registry records).
    pub serial: String,
    /// When the certificate stops being valid (seconds since the Unix epoch): the status
    /// API warns before a site is locked out by its own certificate.
    pub not_after_unix: i64,
}

impl CaVerifier {
    pub fn new(ca_der: Vec<u8>, now_unix: i64) -> Result<Self, IdentityError> {
        X509Certificate::from_der(&ca_der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        Ok(CaVerifier {
            ca_der,
            now_unix,
            revoked: Default::default(),
            manifest: None,
        })
    }

    /// Accepts only the members `manifest` lists, each with its listed certificate. The
    /// manifest must already be verified (see [`crate::manifest::SignedManifest::verify`]).
    pub fn with_manifest(mut self, manifest: &crate::manifest::SignedManifest) -> Self {
        self.manifest = Some(manifest.manifest().clone());
        self
    }

    /// Checks `cert` against the manifest entry for its name and `role`, if there is a manifest.
    fn check_member(
        &self,
        cert: &SiteCertificate,
        role: crate::manifest::Role,
    ) -> Result<(), IdentityError> {
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        let member = m
            .member(&cert.common_name)
            .ok_or_else(|| IdentityError::NotAMember {
                name: cert.common_name.clone(),
                version: m.version,
            })?;
        if member.role != role {
            return Err(IdentityError::WrongRole {
                name: cert.common_name.clone(),
                role: member.role,
                version: m.version,
            });
        }
        if member.verifying_key() != Some(cert.key) || member.serial != cert.serial {
            return Err(IdentityError::NotTheMembersKey {
                name: cert.common_name.clone(),
                serial: cert.serial.clone(),
                version: m.version,
            });
        }
        Ok(())
    }

    /// Checks that `cert_der` is a certificate the coordinator may open a session for: issued
    /// by the CA, valid now and, with a manifest, a site's or evaluation site's as listed.
    pub fn verify_member(&self, cert_der: &[u8]) -> Result<SiteCertificate, IdentityError> {
        let cert = self.verify(cert_der)?;
        if let Some(m) = &self.manifest {
            let role = m
                .member(&cert.common_name)
                .map_or(crate::manifest::Role::Site, |x| x.role);
            if role == crate::manifest::Role::Coordinator {
                return Err(IdentityError::CoordinatorAsPeer);
            }
            self.check_member(&cert, role)?;
        }
        Ok(cert)
    }

    /// Checks that `cert_der` is the coordinator's certificate: issued by the CA, valid now,
    /// named [`COORDINATOR_COMMON_NAME`] and, with a manifest, the coordinator member's.
    pub fn verify_coordinator(&self, cert_der: &[u8]) -> Result<SiteCertificate, IdentityError> {
        let cert = self.verify(cert_der)?;
        if cert.common_name != COORDINATOR_COMMON_NAME {
            return Err(IdentityError::NameMismatch {
                expected: COORDINATOR_COMMON_NAME.to_string(),
                got: cert.common_name,
            });
        }
        self.check_member(&cert, crate::manifest::Role::Coordinator)?;
        Ok(cert)
    }

    /// Also refuses every certificate the CA revoked in `crl_der` (a DER CRL, as `cohort-ca`
    /// writes it). The CRL must be signed by the CA, so whoever hands it over (the coordinator,
    /// in Welcome) cannot add to it or forge one; it can only withhold a newer one.
    pub fn with_crl(mut self, crl_der: &[u8]) -> Result<Self, IdentityError> {
        let (_, ca) = X509Certificate::from_der(&self.ca_der)
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der)
            .map_err(|e| IdentityError::BadCrl(e.to_string()))?;
        if crl.issuer() != ca.subject() || crl.verify_signature(ca.public_key()).is_err() {
            return Err(IdentityError::BadCrl("not signed by the project CA".into()));
        }
        self.revoked.extend(
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec()),
        );
        Ok(self)
    }

    /// Checks that `cert_der` is a site certificate (issued by the CA, valid now, for client
    /// authentication, not the coordinator's) for the site named `name`.
    pub fn verify_site(
        &self,
        name: &str,
        cert_der: &[u8],
    ) -> Result<SiteCertificate, IdentityError> {
        let cert = self.verify(cert_der)?;
        if cert.common_name == COORDINATOR_COMMON_NAME {
            return Err(IdentityError::CoordinatorAsPeer);
        }
        if !cert.client_auth {
            return Err(IdentityError::NotClientAuth);
        }
        if cert.common_name != name {
            return Err(IdentityError::NameMismatch {
                expected: name.to_string(),
                got: cert.common_name,
            });
        }
        self.check_member(&cert, crate::manifest::Role::Site)?;
        Ok(cert)
    }

    /// Checks that `cert_der` was issued by the CA and is valid now; says whose it is.
    pub fn verify(&self, cert_der: &[u8]) -> Result<SiteCertificate, IdentityError> {
        let (_, ca) = X509Certificate::from_der(&self.ca_der)
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let (rest, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::Malformed("trailing bytes".into()));
        }
        if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
            return Err(IdentityError::WrongIssuer);
        }
        let serial: String = cert
            .tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if self.revoked.contains(cert.tbs_certificate.raw_serial()) {
            return Err(IdentityError::Revoked { serial });
        }
        let now = ASN1Time::from_timestamp(self.now_unix).map_err(|_| IdentityError::Expired)?;
        if !cert.validity().is_valid_at(now) {
            return Err(IdentityError::Expired);
        }
        let common_name = subject_common_name(&cert)?;
        let key = ed25519_key(&cert)?;
        let client_auth = matches!(
            cert.extended_key_usage(),
            Ok(Some(eku)) if eku.value.client_auth
        );
        Ok(SiteCertificate {
            common_name,
            key,
            client_auth,
            serial,
            not_after_unix: cert.validity().not_after.timestamp(),
        })
    }
}

/// A SecAgg+ peer is accepted only as the site the roster names for its id; the roster itself
/// is checked by the client (distinct names, no coordinator, this site at its own id).
impl IdentityVerifier for CaVerifier {
    fn verify_identity(
        &self,
        _id: ClientId,
        name: &str,
        credential: &[u8],
    ) -> Result<VerifyingKey, String> {
        self.verify_site(name, credential)
            .map(|c| c.key)
            .map_err(|e| e.to_string())
    }
}
