//! What an agent receives from the coordinator and the CA reads from sites: a federation
//! manifest (envelope, signed body, countersignatures), a countersignature file and the site
//! registry. The bytes are checked as received (almost never signed: the envelope's parser),
//! then signed by the harness's CA so the body parser, the member checks, the quorum rule and
//! re-encoding run on them too.

#![no_main]

use cohort_protocols::manifest::{Countersignature, SignedManifest};
use cohort_protocols::registry::Registry;
use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;

/// What the CA signs before a body: `manifest::SIGNING_LABEL`.
const SIGNING_LABEL: &[u8] = b"cohort federation manifest v1\0";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let ca = SigningKey::from_bytes(&[7; 32]);
    if let Ok(m) = SignedManifest::verify(data, &ca.verifying_key()) {
        let again = SignedManifest::verify(&m.to_bytes(), &ca.verifying_key())
            .expect("a verified manifest re-encodes to one that verifies");
        assert_eq!(again, m);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut envelope = toml::Table::new();
    let signature = ca.sign(&[SIGNING_LABEL, text.as_bytes()].concat());
    envelope.insert("signature".into(), hex(&signature.to_bytes()).into());
    envelope.insert("body".into(), text.into());
    let Ok(bytes) = toml::to_string(&envelope) else {
        return;
    };
    if let Ok(m) = SignedManifest::verify(bytes.as_bytes(), &ca.verifying_key()) {
        let _ = m.summary();
        let _ = m.check_quorum(&m, 1);
        let member = SigningKey::from_bytes(&[9; 32]);
        let mut with = m.clone();
        if let Some(first) = m.manifest().members.first() {
            let _ = with.attach(m.countersign(&first.name, &member));
        }
        let back = SignedManifest::verify(&with.to_bytes(), &ca.verifying_key())
            .expect("a manifest with countersignatures re-encodes");
        assert_eq!(back.digest(), m.digest());
        let _ = Countersignature::parse_for(text, &m);
    }
    if let Ok(r) = Registry::parse(text) {
        let encoded = r.encode().expect("a parsed registry encodes");
        assert_eq!(Registry::parse(&encoded).expect("and parses again"), r);
    }
});
