//! The CA's registry of enrolled sites: which certificate (by serial) each site currently
//! holds, and which certificates were revoked.
//!
//! `cohort-ca` writes it (`coordinator/registry.toml` in the CA's directory) beside the CRL it
//! signs from the same list; the coordinator, given `tls.registry`, admits a session only from
//! a certificate listed there under its site's name. The CA check still comes first: the
//! registry narrows what the CA admits (a certificate minted with the CA key outside
//! `cohort-ca`, or a superseded one, is refused), it never widens it.
//!
//! No I/O here: the CA and the coordinator read and write the text.

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("not a site registry: {0}")]
    Parse(Box<toml::de::Error>),
    #[error("encoding the registry: {0}")]
    Encode(#[from] toml::ser::Error),
}

/// A site's current certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredSite {
    pub name: String,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// The end of the certificate's validity, Unix seconds.
    pub not_after_unix: i64,
}

/// A certificate that must no longer be admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedCertificate {
    pub name: String,
    pub serial: String,
    pub revoked_unix: i64,
    /// "revoked" (`cohort-ca revoke`) or "superseded" (a renewal).
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Incremented with every CRL signed from this registry.
    #[serde(default)]
    pub crl_number: u64,
    #[serde(default)]
    pub site: Vec<RegisteredSite>,
    #[serde(default)]
    pub revoked: Vec<RevokedCertificate>,
}

impl Registry {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        toml::from_str(text).map_err(|e| RegistryError::Parse(Box::new(e)))
    }

    /// The file's text, with a header saying what it is.
    pub fn encode(&self) -> Result<String, RegistryError> {
        Ok(format!(
            "# Written by `cohort-ca`: the sites' current certificates and the revoked ones.\n\
             # The coordinator admits only the certificates listed under [[site]].\n{}",
            toml::to_string(self)?
        ))
    }

    /// Moves `name`'s current certificate to the revoked list with `reason`; false if the
    /// site has none.
    pub fn retire(&mut self, name: &str, reason: &str, now_unix: i64) -> bool {
        let Some(at) = self.site.iter().position(|s| s.name == name) else {
            return false;
        };
        let old = self.site.remove(at);
        self.revoked.push(RevokedCertificate {
            name: old.name,
            serial: old.serial,
            revoked_unix: now_unix,
            reason: reason.into(),
        });
        true
    }

    pub fn current(&self, name: &str) -> Option<&RegisteredSite> {
        self.site.iter().find(|s| s.name == name)
    }

    /// Why the certificate `serial` of site `name` is not admitted, or None if it is.
    pub fn refusal(&self, name: &str, serial: &str) -> Option<String> {
        if let Some(r) = self.revoked.iter().find(|r| r.serial == serial) {
            return Some(format!(
                "the certificate of site {name:?} (serial {serial}) was {} by the CA",
                r.reason
            ));
        }
        match self.current(name) {
            Some(s) if s.serial == serial => None,
            Some(s) => Some(format!(
                "site {name:?} presents certificate {serial}, but its registered certificate is {}: install the certificate of its renewal",
                s.serial
            )),
            None => Some(format!(
                "site {name:?} is not in the CA's registry of enrolled sites"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_current_unrevoked_certificate_of_a_registered_site_is_admitted() {
        let r = Registry {
            crl_number: 2,
            site: vec![RegisteredSite {
                name: "va".into(),
                serial: "0b".into(),
                not_after_unix: 0,
            }],
            revoked: vec![RevokedCertificate {
                name: "va".into(),
                serial: "0a".into(),
                revoked_unix: 0,
                reason: "superseded".into(),
            }],
        };
        assert_eq!(r.refusal("va", "0b"), None);
        assert!(r.refusal("va", "0a").unwrap().contains("superseded"));
        assert!(r.refusal("va", "0c").unwrap().contains("renewal"));
        assert!(r.refusal("mallory", "0d").unwrap().contains("not in"));
        assert_eq!(Registry::parse(&r.encode().unwrap()).unwrap(), r);
        assert!(Registry::parse("site = 7").is_err());
    }
}
