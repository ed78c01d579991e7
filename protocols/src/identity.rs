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
}

/// Checks certificates against one CA certificate.
#[derive(Debug, Clone)]
pub struct CaVerifier {
    ca_der: Vec<u8>,
    /// Seconds since the Unix epoch at which validity is checked.
    now_unix: i64,
}

/// What a valid certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteCertificate {
    pub common_name: String,
    pub key: VerifyingKey,
}

impl CaVerifier {
    pub fn new(ca_der: Vec<u8>, now_unix: i64) -> Result<Self, IdentityError> {
        X509Certificate::from_der(&ca_der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
        Ok(CaVerifier { ca_der, now_unix })
    }

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
        let now = ASN1Time::from_timestamp(self.now_unix).map_err(|_| IdentityError::Expired)?;
        if !cert.validity().is_valid_at(now) {
            return Err(IdentityError::Expired);
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(IdentityError::NoCommonName)?
            .to_string();
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
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| IdentityError::NotEd25519)?;
        Ok(SiteCertificate { common_name, key })
    }
}

impl IdentityVerifier for CaVerifier {
    fn verify_identity(&self, _id: ClientId, credential: &[u8]) -> Result<VerifyingKey, String> {
        self.verify(credential)
            .map(|c| c.key)
            .map_err(|e| e.to_string())
    }
}
