//! TLS 1.3 with client certificates, on rustls with the ring provider.
//!
//! tonic's own TLS configuration would also accept TLS 1.2; building the rustls config here
//! pins TLS 1.3 and requires a client certificate issued by the project CA on every connection.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The DER of the first certificate in a PEM file (the leaf, or the CA itself).
pub fn first_cert_der(path: &Path) -> Result<Vec<u8>, TlsError> {
    let certs = load_certs(path)?;
    Ok(certs[0].as_ref().to_vec())
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

/// The CRLs in a PEM file (`cohort-ca` writes one, signed by the project CA).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if crls.is_empty() {
        return Err(file_err(path, "no CRL in the file"));
    }
    Ok(crls)
}

/// The server's TLS configuration. A client certificate `crls` lists fails the handshake;
/// with CRLs, a certificate of our CA that they do not cover cannot exist (the CRL is the
/// CA's own), so unknown revocation status is refused too.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| file_err(ca, e))?;
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls.iter().cloned())
            .only_check_end_entity_revocation();
    }
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The status server's TLS configuration (`[status.tls]`): TLS 1.3, HTTP/1.1, no client
/// certificate — browsers of consortium members log in with the status token instead.
pub fn status_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a TLS handshake failed, in words an operator can act on.
pub fn handshake_reason(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return e.to_string();
    };
    match tls {
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "the client certificate is not issued by this project's CA (another project's \
              bundle, or a CA that was re-created?)"
            .into(),
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "the client certificate has expired: renew the site's bundle".into()
        }
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "the client certificate is not valid yet (is the site's clock right?)".into()
        }
        Error::InvalidCertificate(CertificateError::Revoked) => {
            "the client certificate is revoked (tls.crl): the site needs a new certificate: it enrols again (`cohort-agent enroll`, `cohort-ca sign`)".into()
        }
        Error::NoCertificatesPresented => "the client presented no certificate".into(),
        Error::AlertReceived(alert) => format!(
            "the client aborted the handshake ({alert:?}): it does not trust this \
             coordinator's certificate (the site has another project's ca.pem?)"
        ),
        Error::PeerIncompatible(p) => format!("the client cannot speak TLS 1.3: {p:?}"),
        other => other.to_string(),
    }
}

/// Logs refused TLS handshakes without letting a client that retries every second (or an
/// attacker) flood the log: at most one line per peer address and reason per `every`, which
/// says how many were left unsaid since the last one. A new reason from the same address is
/// new information and is logged at once.
#[derive(Debug)]
pub struct RejectLog {
    every: std::time::Duration,
    /// (last line, refused since) per peer IP. Cleared when it grows past 4096 peers, so a
    /// scan from many addresses cannot grow it without bound.
    #[allow(clippy::type_complexity)]
    peers: std::sync::Mutex<
        std::collections::HashMap<(std::net::IpAddr, String), (std::time::Instant, u64)>,
    >,
}

impl RejectLog {
    pub fn new(every: std::time::Duration) -> Self {
        RejectLog {
            every,
            peers: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Records a refused handshake from `peer`; true when a line was logged.
    pub fn handshake_failed(&self, peer: std::net::SocketAddr, reason: &str) -> bool {
        let now = std::time::Instant::now();
        let suppressed = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let key = (peer.ip(), reason.to_string());
            if peers.len() >= 4096 && !peers.contains_key(&key) {
                peers.clear();
            }
            let entry = peers.entry(key).or_insert((now - self.every, 0));
            if now.duration_since(entry.0) < self.every {
                entry.1 += 1;
                return false;
            }
            let suppressed = entry.1;
            *entry = (now, 0);
            suppressed
        };
        tracing::warn!(%peer, reason, suppressed, "TLS handshake refused");
        true
    }
}

/// Closes a connection whose TLS handshake was refused so that the client reads why. rustls
/// has already written its alert (revoked, unknown CA, bad certificate); closing a socket
/// with unread bytes in it (the rest of the client's flight) would send a reset, and a reset
/// can overtake the alert — the agent then sees "connection reset" and takes a refusal for a
/// network fault. So: FIN after the alert, then read and drop what the client still sends,
/// for at most two seconds, before closing.
pub async fn close_refused(mut tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_handshakes_are_logged_once_per_peer_and_window() {
        let log = RejectLog::new(std::time::Duration::from_secs(3600));
        let a: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap_or_else(|_| unreachable!());
        let b: std::net::SocketAddr = "127.0.0.2:4000".parse().unwrap_or_else(|_| unreachable!());
        assert!(log.handshake_failed(a, "x"));
        assert!(!log.handshake_failed(a, "x"));
        assert!(!log.handshake_failed("127.0.0.1:5000".parse().unwrap_or(a), "x"));
        assert!(log.handshake_failed(b, "y"));
        assert!(log.handshake_failed(a, "another reason"));
    }

    #[test]
    fn a_foreign_issuer_is_named_as_such() {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(handshake_reason(&e).contains("not issued by this project's CA"));
    }
}
