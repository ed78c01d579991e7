//! A consortium's PKI for the four hospitals, made by the real CA code
//! (`cohort_ca::demo_keys::provision`), and what tests read back from it.
//!
//! Layout under the returned directory: `ca.pem`, `manifest.toml`, `coordinator/{ca,cert,
//! key,crl}.pem` and `coordinator/manifest.toml`, and `sites/<site>/` with each bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cohort_ca::demo_keys::{DEFAULT_VALIDITY_DAYS, ProvisionOptions, provision as make};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::heart::SITES;

/// A CA, the coordinator's certificate (for `localhost`) and the four hospitals' bundles in
/// `dir/pki`; that directory.
pub fn provision(dir: &Path) -> PathBuf {
    provision_sites(dir, &SITES)
}

/// As [`provision`], for the sites named (a federation larger or smaller than the four).
pub fn provision_sites(dir: &Path, sites: &[&str]) -> PathBuf {
    let pki = dir.join("pki");
    make(&ProvisionOptions {
        validity_days: DEFAULT_VALIDITY_DAYS,
        out: pki.clone(),
        sites: sites.iter().map(|s| s.to_string()).collect(),
        coordinator_names: vec!["localhost".into()],
        coordinator_url: "https://localhost:1".into(),
    })
    .expect("provisioning the test PKI");
    pki
}

/// A site's bundle: `ca.pem`, `cert.pem`, `key.pem`, `manifest.toml`.
pub fn bundle(pki: &Path, site: &str) -> PathBuf {
    pki.join("sites").join(site)
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .and_then(|mut certs| certs.next().expect("a certificate"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .as_ref()
        .to_vec()
}

/// The Ed25519 key in a PKCS#8 PEM file of the PKI.
pub fn signing_key(path: &Path) -> ed25519_dalek::SigningKey {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let pem = std::fs::read_to_string(path).unwrap();
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The coordinator's CRL (`cohort_ca::revoke` writes it), DER.
pub fn crl_der(pki: &Path) -> Vec<u8> {
    let path = pki.join("coordinator/crl.pem");
    CertificateRevocationListDer::pem_file_iter(&path)
        .and_then(|mut crls| crls.next().expect("a CRL"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .as_ref()
        .to_vec()
}

/// The digest of the federation's current manifest, verified under the CA: the round
/// context agents that pin that manifest expect in every SecAgg+ round.
pub fn manifest_digest(pki: &Path) -> [u8; 32] {
    use cohort_protocols::manifest::{SignedManifest, ca_key};
    let ca = ca_key(&cert_der(&pki.join("ca.pem"))).unwrap();
    SignedManifest::verify(&std::fs::read(pki.join("manifest.toml")).unwrap(), &ca)
        .unwrap()
        .digest()
}

/// The `[tls]` table of the coordinator's configuration.
pub fn coordinator_tls(pki: &Path) -> String {
    format!(
        "[tls]\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\nmanifest = {:?}\n",
        pki.join("coordinator/ca.pem"),
        pki.join("coordinator/cert.pem"),
        pki.join("coordinator/key.pem"),
        pki.join("coordinator/manifest.toml"),
    )
}

/// A TLS 1.3 server with the coordinator's certificate that requires a client certificate
/// of the project CA and honours the CA's CRL: a terminator in front of a coordinator, for
/// tests of how the agent reads a refused handshake.
pub fn terminator(pki: &Path) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert_der(&pki.join("ca.pem"))))
        .unwrap();
    let crl = CertificateRevocationListDer::from(crl_der(pki));
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .with_crls([crl])
    .only_check_end_entity_revocation()
    .build()
    .unwrap();
    let chain = CertificateDer::pem_file_iter(pki.join("coordinator/cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.join("coordinator/key.pem")).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
