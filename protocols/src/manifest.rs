//! The federation manifest: who is a member, with which key, signed by the consortium's CA.
//!
//! A certificate from the CA says only "the CA signed this". Whoever holds the CA key can
//! sign as many names as it likes, so a site that accepted any CA certificate as a peer
//! would accept puppets. The manifest closes that gap: it lists every member by name, role,
//! key and certificate serial, carries a version that only goes up, and is signed by the CA
//! key. Every agent pins the newest version it has seen and accepts as a SecAgg+ peer only a
//! current site member presenting exactly the listed key. The coordinator relays manifests
//! but cannot forge, extend or roll one back; what it could still do is show different
//! versions to different sites in one round, which is why the manifest's digest is part of
//! the round context every site signs (see [`SignedManifest::digest`]).
//!
//! On disk (and on the wire) a manifest is a small TOML document: the signed `body` as a
//! string, byte for byte what was signed, and the `signature`. Parsing the body only after the
//! signature checks means no two encodings of one manifest can verify.
//!
//! No I/O here: callers pass bytes and the current time.

use std::collections::BTreeSet;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// What the CA signs: this label, then the body's bytes.
const SIGNING_LABEL: &[u8] = b"cohort federation manifest v1\0";
/// What a member site signs to vouch for a manifest: this label, then the body's bytes.
const COUNTERSIGNING_LABEL: &[u8] = b"cohort federation manifest countersignature v1\0";
/// What the round context hashes: this label, then the body's bytes.
const DIGEST_LABEL: &[u8] = b"cohort federation manifest digest v1\0";
/// A manifest lists at most this many members: a bound on what a relayed one can cost to
/// parse and check (the wire's message limit is the other).
pub const MAX_MEMBERS: usize = 10_000;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ManifestError {
    #[error("not a federation manifest: {0}")]
    Malformed(String),
    #[error("the manifest's signature is not the CA's")]
    BadSignature,
    #[error("the manifest is for federation {got:?}, this site belongs to {pinned:?}")]
    OtherFederation { pinned: String, got: String },
    #[error("the manifest is version {got}, older than version {pinned} this site already trusts")]
    Rollback { pinned: u64, got: u64 },
    #[error(
        "the manifest is version {version} like the one this site trusts, but its members differ"
    )]
    Forked { version: u64 },
    #[error("the CA certificate has no Ed25519 key: {0}")]
    CaKey(String),
    #[error(
        "manifest version {version} adds or re-keys site(s) {added:?} with {got} countersignature(s) of existing member sites; this site's policy.manifest_quorum asks for {needed}"
    )]
    Quorum {
        version: u64,
        added: Vec<String>,
        got: usize,
        needed: usize,
    },
    #[error("countersignature of {member:?}: {why}")]
    Countersignature { member: String, why: String },
}

/// What a member does in the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Trains and takes part in secure aggregation.
    Site,
    /// Holds only a test set: evaluates, never in a SecAgg+ sum.
    Evaluation,
    /// Runs rounds and signs models; never a SecAgg+ peer.
    Coordinator,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Site => "site",
            Role::Evaluation => "evaluation",
            Role::Coordinator => "coordinator",
        })
    }
}

/// One member: the certificate the CA issued to it, reduced to what peers check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub role: Role,
    /// The member's Ed25519 public key, hex: the key of its certificate.
    pub key: String,
    /// The certificate's serial, lowercase hex.
    pub serial: String,
    /// The certificate's end of validity (Unix seconds).
    pub not_after_unix: i64,
}

/// The signed content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Which federation: a manifest of another one is never accepted, whatever its version.
    pub federation: String,
    /// Goes up by one with every change; agents never go back.
    pub version: u64,
    pub issued_unix: i64,
    #[serde(default, rename = "member")]
    pub members: Vec<Member>,
}

/// A manifest as it travels: the exact signed bytes, the CA's signature and the
/// countersignatures of member sites collected since.
///
/// Countersignatures sit outside the signed body: they are added after the CA signed, do not
/// change the manifest's identity (its digest, its version) and are checked only by a site
/// that asks for them ([`SignedManifest::check_quorum`]), against the keys of the manifest
/// it already trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    body: String,
    signature: [u8; 64],
    manifest: Manifest,
    countersignatures: Vec<Countersignature>,
}

/// A member site's signature over a manifest's body: "I have seen this membership and vouch
/// for it". Made with the site's own key (`cohort-agent countersign`), which the CA never
/// holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Countersignature {
    pub member: String,
    pub signature: [u8; 64],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    signature: String,
    body: String,
    #[serde(
        default,
        rename = "countersignature",
        skip_serializing_if = "Vec::is_empty"
    )]
    countersignatures: Vec<CountersignatureText>,
}

/// A countersignature as written in a manifest or a file of its own. `manifest` (the hex
/// digest of what was signed) lets the CA match a file to the right version before checking.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountersignatureText {
    member: String,
    signature: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manifest: Option<String>,
}

/// A manifest carries at most this many countersignatures (one per member at most).
const MAX_COUNTERSIGNATURES: usize = MAX_MEMBERS;

use crate::hex::encode as hex;

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    crate::hex::decode(s)?.try_into().ok()
}

/// The Ed25519 key of a DER CA certificate: what a manifest's signature is checked against.
pub fn ca_key(ca_der: &[u8]) -> Result<VerifyingKey, ManifestError> {
    crate::identity::certificate_key(ca_der).map_err(|e| ManifestError::CaKey(e.to_string()))
}

impl Member {
    /// The member's key, parsed.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&unhex::<32>(&self.key)?).ok()
    }
}

impl Manifest {
    /// The member called `name`, if any.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Names are unique, keys parse, there is something to sign.
    fn check(&self) -> Result<(), ManifestError> {
        if self.federation.is_empty() {
            return Err(ManifestError::Malformed("empty federation name".into()));
        }
        if self.version == 0 {
            return Err(ManifestError::Malformed(
                "version 0 (versions start at 1)".into(),
            ));
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(ManifestError::Malformed(format!(
                "{} members, more than {MAX_MEMBERS}",
                self.members.len()
            )));
        }
        let mut names = BTreeSet::new();
        for m in &self.members {
            if !names.insert(m.name.as_str()) {
                return Err(ManifestError::Malformed(format!(
                    "member {:?} is listed twice",
                    m.name
                )));
            }
            if m.verifying_key().is_none() {
                return Err(ManifestError::Malformed(format!(
                    "member {:?} has no valid Ed25519 key",
                    m.name
                )));
            }
        }
        Ok(())
    }

    /// Signs this manifest with the CA's key.
    pub fn sign(&self, ca: &SigningKey) -> Result<SignedManifest, ManifestError> {
        self.check()?;
        let body = toml::to_string(self).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        let signature = ca.sign(&signed_bytes(&body)).to_bytes();
        Ok(SignedManifest {
            body,
            signature,
            manifest: self.clone(),
            countersignatures: Vec::new(),
        })
    }
}

fn signed_bytes(body: &str) -> Vec<u8> {
    [SIGNING_LABEL, body.as_bytes()].concat()
}

impl SignedManifest {
    /// Parses `bytes` and checks the signature against the CA's key.
    pub fn verify(bytes: &[u8], ca: &VerifyingKey) -> Result<Self, ManifestError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ManifestError::Malformed("not UTF-8 text".into()))?;
        let envelope: Envelope =
            toml::from_str(text).map_err(|e| ManifestError::Malformed(e.message().to_string()))?;
        let signature = unhex::<64>(&envelope.signature).ok_or_else(|| {
            ManifestError::Malformed("the signature is not 128 hex digits".into())
        })?;
        ca.verify(
            &signed_bytes(&envelope.body),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| ManifestError::BadSignature)?;
        let manifest: Manifest = toml::from_str(&envelope.body)
            .map_err(|e| ManifestError::Malformed(format!("body: {}", e.message())))?;
        manifest.check()?;
        if envelope.countersignatures.len() > MAX_COUNTERSIGNATURES {
            return Err(ManifestError::Malformed(format!(
                "{} countersignatures, more than {MAX_COUNTERSIGNATURES}",
                envelope.countersignatures.len()
            )));
        }
        let countersignatures = envelope
            .countersignatures
            .into_iter()
            .map(Countersignature::from_text)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SignedManifest {
            body: envelope.body,
            signature,
            manifest,
            countersignatures,
        })
    }

    /// The file (and wire) form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let envelope = Envelope {
            signature: hex(&self.signature),
            body: self.body.clone(),
            countersignatures: self
                .countersignatures
                .iter()
                .map(|c| CountersignatureText {
                    member: c.member.clone(),
                    signature: hex(&c.signature),
                    manifest: None,
                })
                .collect(),
        };
        let text = toml::to_string(&envelope).unwrap_or_default();
        format!(
            "# Cohort federation manifest, signed by the consortium's CA. Do not edit: any change\n\
             # breaks the signature. Publish a new version with `cohort-ca`.\n{text}"
        )
        .into_bytes()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    /// A digest that names this manifest exactly: sites put it in the round context they sign,
    /// so two sites shown different manifests in one round cannot verify each other.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(DIGEST_LABEL);
        h.update(self.body.as_bytes());
        h.finalize().into()
    }

    /// Whether `self` may replace `pinned`, the newest manifest a site trusts: the same
    /// federation, and a newer version or the very same document. `Ok(true)` means newer.
    pub fn supersedes(&self, pinned: &SignedManifest) -> Result<bool, ManifestError> {
        let (p, n) = (pinned.manifest(), self.manifest());
        if p.federation != n.federation {
            return Err(ManifestError::OtherFederation {
                pinned: p.federation.clone(),
                got: n.federation.clone(),
            });
        }
        if n.version < p.version {
            return Err(ManifestError::Rollback {
                pinned: p.version,
                got: n.version,
            });
        }
        if n.version == p.version {
            if self.body != pinned.body {
                return Err(ManifestError::Forked { version: n.version });
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// A one-line summary for logs and status: version and members by role.
    pub fn summary(&self) -> String {
        let m = self.manifest();
        let names = |role: Role| {
            m.members
                .iter()
                .filter(|x| x.role == role)
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "federation {:?} manifest v{}: sites [{}], evaluation [{}], coordinator [{}]",
            m.federation,
            m.version,
            names(Role::Site),
            names(Role::Evaluation),
            names(Role::Coordinator)
        )
    }
}

impl SignedManifest {
    /// The countersignatures this copy carries (unchecked: see [`Self::check_quorum`]).
    pub fn countersignatures(&self) -> &[Countersignature] {
        &self.countersignatures
    }

    /// Member `member`'s countersignature over this manifest, made with its own key.
    pub fn countersign(&self, member: &str, key: &SigningKey) -> Countersignature {
        Countersignature {
            member: member.to_string(),
            signature: key.sign(&countersigned_bytes(&self.body)).to_bytes(),
        }
    }

    /// Whether `c` is a valid countersignature of this manifest by `key`.
    fn countersigned_by(&self, c: &Countersignature, key: &VerifyingKey) -> bool {
        key.verify(
            &countersigned_bytes(&self.body),
            &Signature::from_bytes(&c.signature),
        )
        .is_ok()
    }

    /// Adds `c`, which must be by a site this manifest lists, made with the listed key (what
    /// the CA can check; each site checks against the manifest it trusted before). A second
    /// countersignature by the same member replaces the first.
    pub fn attach(&mut self, c: Countersignature) -> Result<(), ManifestError> {
        let bad = |why: &str| ManifestError::Countersignature {
            member: c.member.clone(),
            why: why.to_string(),
        };
        let member = self
            .manifest
            .member(&c.member)
            .ok_or_else(|| bad("not a member of this manifest"))?;
        if member.role != Role::Site {
            return Err(bad("only training sites countersign"));
        }
        let key = member
            .verifying_key()
            .ok_or_else(|| bad("the member's key does not parse"))?;
        if !self.countersigned_by(&c, &key) {
            return Err(bad(
                "the signature does not verify with the member's key over this manifest version",
            ));
        }
        self.countersignatures.retain(|x| x.member != c.member);
        self.countersignatures.push(c);
        Ok(())
    }

    /// The quorum rule, checked by a site about to replace `pinned` with `self`: if `self`
    /// lists a training site that `pinned` does not list with the same key (a new member, a
    /// new key, or an evaluation site turned training site), it must carry valid
    /// countersignatures of at least `quorum` sites that `pinned` lists as training sites and
    /// that `self` keeps, unchanged; the sites being added do not count. So the CA's holder
    /// alone cannot make a puppet a peer: it needs `quorum` existing hospitals to vouch for
    /// the change. Removals need nobody's consent (a revocation must not wait).
    pub fn check_quorum(
        &self,
        pinned: &SignedManifest,
        quorum: usize,
    ) -> Result<(), ManifestError> {
        if quorum == 0 {
            return Ok(());
        }
        let trusted = |m: &Member| {
            pinned
                .manifest
                .member(&m.name)
                .is_some_and(|p| p.role == Role::Site && p.key == m.key)
        };
        let added: Vec<String> = self
            .manifest
            .members
            .iter()
            .filter(|m| m.role == Role::Site && !trusted(m))
            .map(|m| m.name.clone())
            .collect();
        if added.is_empty() {
            return Ok(());
        }
        let got = self
            .countersignatures
            .iter()
            .filter(|c| {
                let Some(m) = self.manifest.member(&c.member) else {
                    return false;
                };
                m.role == Role::Site
                    && trusted(m)
                    && m.verifying_key()
                        .is_some_and(|key| self.countersigned_by(c, &key))
            })
            .map(|c| c.member.as_str())
            .collect::<BTreeSet<_>>()
            .len();
        if got < quorum {
            return Err(ManifestError::Quorum {
                version: self.version(),
                added,
                got,
                needed: quorum,
            });
        }
        Ok(())
    }
}

fn countersigned_bytes(body: &str) -> Vec<u8> {
    [COUNTERSIGNING_LABEL, body.as_bytes()].concat()
}

impl Countersignature {
    fn from_text(t: CountersignatureText) -> Result<Self, ManifestError> {
        let signature = unhex::<64>(&t.signature).ok_or_else(|| {
            ManifestError::Malformed(format!(
                "the countersignature of {:?} is not 128 hex digits",
                t.member
            ))
        })?;
        Ok(Countersignature {
            member: t.member,
            signature,
        })
    }

    /// The file a site sends to the CA: who, the signature, and the digest of the manifest it
    /// signed, so the CA can tell at once which version it is for.
    pub fn to_file(&self, manifest: &SignedManifest) -> String {
        let text = CountersignatureText {
            member: self.member.clone(),
            signature: hex(&self.signature),
            manifest: Some(hex(&manifest.digest())),
        };
        format!(
            "# A Cohort site's countersignature of federation manifest v{}: send it to the CA\n\
             # (`cohort-ca countersign`). It holds no secret.\n{}",
            manifest.version(),
            toml::to_string(&text).unwrap_or_default()
        )
    }

    /// Reads [`Self::to_file`]'s form; the digest, if present, must be `for_manifest`'s.
    pub fn parse_for(text: &str, for_manifest: &SignedManifest) -> Result<Self, ManifestError> {
        let t: CountersignatureText =
            toml::from_str(text).map_err(|e| ManifestError::Malformed(e.message().to_string()))?;
        if let Some(d) = &t.manifest
            && d != &hex(&for_manifest.digest())
        {
            return Err(ManifestError::Countersignature {
                member: t.member,
                why: format!(
                    "it is for another manifest (digest {d}), not the current version {}",
                    for_manifest.version()
                ),
            });
        }
        Self::from_text(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, role: Role, key: &SigningKey) -> Member {
        Member {
            name: name.into(),
            role,
            key: hex(key.verifying_key().as_bytes()),
            serial: "01".into(),
            not_after_unix: 2_000_000_000,
        }
    }

    fn manifest(version: u64, names: &[&str]) -> Manifest {
        Manifest {
            federation: "heart".into(),
            version,
            issued_unix: 1_700_000_000,
            members: names
                .iter()
                .enumerate()
                .map(|(i, n)| member(n, Role::Site, &SigningKey::from_bytes(&[i as u8 + 1; 32])))
                .collect(),
        }
    }

    #[test]
    fn a_signed_manifest_round_trips_and_a_changed_byte_breaks_it() {
        let ca = SigningKey::from_bytes(&[9; 32]);
        let signed = manifest(3, &["a", "b"]).sign(&ca).unwrap();
        let bytes = signed.to_bytes();
        let back = SignedManifest::verify(&bytes, &ca.verifying_key()).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.manifest().member("b").unwrap().role, Role::Site);

        let text = String::from_utf8(bytes).unwrap();
        let tampered = text.replace(r#"name = "b""#, r#"name = "c""#);
        assert_ne!(tampered, text, "the body holds member b");
        assert_eq!(
            SignedManifest::verify(tampered.as_bytes(), &ca.verifying_key()),
            Err(ManifestError::BadSignature)
        );
        let other_ca = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            SignedManifest::verify(&signed.to_bytes(), &other_ca.verifying_key()),
            Err(ManifestError::BadSignature)
        );
    }

    #[test]
    fn versions_only_go_forward_within_one_federation() {
        let ca = SigningKey::from_bytes(&[9; 32]);
        let v3 = manifest(3, &["a", "b"]).sign(&ca).unwrap();
        let v4 = manifest(4, &["a", "b", "c"]).sign(&ca).unwrap();
        let v3_forked = manifest(3, &["a", "c"]).sign(&ca).unwrap();
        assert_eq!(v4.supersedes(&v3), Ok(true));
        assert_eq!(v3.supersedes(&v3), Ok(false));
        assert_eq!(
            v3.supersedes(&v4),
            Err(ManifestError::Rollback { pinned: 4, got: 3 })
        );
        assert_eq!(
            v3_forked.supersedes(&v3),
            Err(ManifestError::Forked { version: 3 })
        );
        let mut other = manifest(9, &["a"]);
        other.federation = "other".into();
        let other = other.sign(&ca).unwrap();
        assert!(matches!(
            other.supersedes(&v3),
            Err(ManifestError::OtherFederation { .. })
        ));
        assert_ne!(v3.digest(), v4.digest());
        assert_ne!(v3.digest(), v3_forked.digest());
    }

    #[test]
    fn a_new_site_needs_the_quorum_of_sites_already_trusted() {
        let ca = SigningKey::from_bytes(&[9; 32]);
        let key = |i: u8| SigningKey::from_bytes(&[i + 1; 32]);
        let pinned = manifest(3, &["a", "b", "c"]).sign(&ca).unwrap();
        // v4 adds d (index 3) and two puppets the CA's holder made keys for.
        let mut v4 = manifest(4, &["a", "b", "c", "d", "p1", "p2"])
            .sign(&ca)
            .unwrap();
        let refused = |m: &SignedManifest, q| match m.check_quorum(&pinned, q) {
            Err(ManifestError::Quorum { got, added, .. }) => Some((got, added)),
            Ok(()) => None,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            refused(&v4, 2),
            Some((0, vec!["d".into(), "p1".into(), "p2".into()]))
        );
        assert_eq!(refused(&v4, 0), None, "quorum 0 trusts the CA alone");
        // The additions vouching for themselves count for nothing...
        for (name, i) in [("d", 3), ("p1", 4), ("p2", 5)] {
            let c = v4.countersign(name, &key(i));
            v4.attach(c).unwrap();
        }
        assert_eq!(refused(&v4, 1).map(|r| r.0), Some(0));
        // ...a signature by a trusted name made with another key is not attached...
        let forged = v4.countersign("a", &key(4));
        assert!(matches!(
            v4.attach(forged),
            Err(ManifestError::Countersignature { .. })
        ));
        // ...one over another version does not verify.
        let other = pinned.countersign("a", &key(0));
        assert!(v4.attach(other).is_err());
        // Two trusted sites vouch: quorum 2 is met, 3 is not; a repeat does not count twice.
        for i in [0u8, 1, 1] {
            let name = ["a", "b"][i as usize];
            let c = v4.countersign(name, &key(i));
            v4.attach(c).unwrap();
        }
        assert_eq!(refused(&v4, 2), None);
        assert_eq!(refused(&v4, 3).map(|r| r.0), Some(2));
        // Countersignatures travel with the manifest and leave its identity alone.
        let back = SignedManifest::verify(&v4.to_bytes(), &ca.verifying_key()).unwrap();
        assert_eq!(back.countersignatures().len(), 5);
        assert_eq!(
            back.digest(),
            manifest(4, &["a", "b", "c", "d", "p1", "p2"])
                .sign(&ca)
                .unwrap()
                .digest()
        );
        assert_eq!(refused(&back, 2), None);
        // Re-keying a trusted site is an addition; a removal needs nobody.
        let mut rekeyed = manifest(5, &["a", "b", "c"]);
        rekeyed.members[2].key = hex(key(7).verifying_key().as_bytes());
        let rekeyed = rekeyed.sign(&ca).unwrap();
        assert_eq!(refused(&rekeyed, 1), Some((0, vec!["c".into()])));
        let removed = manifest(5, &["a", "b"]).sign(&ca).unwrap();
        assert_eq!(refused(&removed, 3), None);
    }

    #[test]
    fn malformed_manifests_are_refused_with_the_reason() {
        let ca = SigningKey::from_bytes(&[9; 32]);
        let twice = manifest(1, &["a", "a"]);
        assert!(matches!(twice.sign(&ca), Err(ManifestError::Malformed(m)) if m.contains("twice")));
        let mut bad_key = manifest(1, &["a"]);
        bad_key.members[0].key = "zz".into();
        assert!(matches!(bad_key.sign(&ca), Err(ManifestError::Malformed(m)) if m.contains("key")));
        for junk in [
            &b"\xff\xfe"[..],
            b"signature = 1",
            b"",
            b"body = \"x\"\nsignature = \"00\"",
        ] {
            assert!(matches!(
                SignedManifest::verify(junk, &ca.verifying_key()),
                Err(ManifestError::Malformed(_))
            ));
        }
    }
}
