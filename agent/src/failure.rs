//! Which session failures can heal by themselves and which need a person.
//!
//! An agent reconnects after every failure, because coordinators restart and networks drop.
//! But some failures repeat identically forever — a bundle from another project, a
//! certificate the coordinator refuses, a schema that differs — and retrying them only hides
//! the problem in a log nobody reads. Those are *permanent*: the agent says what to do and,
//! after a bounded number in a row, exits with [`EXIT_REFUSED`] so a service manager shows a
//! failed unit instead of a busy loop.

use tonic::Code;

/// Exit code of an agent that gave up after repeated permanent failures.
pub const EXIT_REFUSED: u8 = 3;

/// A failure that no retry can fix, with what the operator should do.
#[derive(Debug, thiserror::Error)]
#[error("{reason}. {advice}")]
pub struct Permanent {
    pub reason: String,
    pub advice: &'static str,
}

impl Permanent {
    pub fn new(reason: impl Into<String>, advice: &'static str) -> Self {
        Permanent {
            reason: reason.into(),
            advice,
        }
    }
}

/// A failure caused by the agent's configuration (a certificate or key it names, its CSV
/// against the schema): the binary exits with code 2 for these.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0:#}")]
pub struct ConfigProblem(pub anyhow::Error);

/// The agent gave up: the last permanent failure, repeated `times` in a row.
#[derive(Debug, thiserror::Error)]
#[error("giving up after {times} permanent failures in a row; the last: {last}")]
pub struct GaveUp {
    pub times: u32,
    pub last: String,
}

/// How a failed session is treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Retry with backoff (the coordinator is down, restarting, busy).
    Transient,
    /// Retry with backoff, but say loudly why: another agent holds this site's session.
    Duplicate(String),
    /// Retrying cannot help; the message says what differs and what to do.
    Permanent(String),
}

const WRONG_CA: &str = "The coordinator's certificate is not issued by the CA in this site's \
    ca.pem: the bundle belongs to another project, or the CA was re-created. Install the \
    bundle this coordinator's operator provisioned for this site.";
const REFUSED_CERT: &str = "The coordinator refused this site's certificate: it was issued \
    by another CA, has expired, or was revoked. Ask the coordinator's operator for a current \
    bundle for this site.";

/// Classifies a session failure by walking its chain of causes.
pub fn classify(e: &anyhow::Error) -> Class {
    for cause in e.chain() {
        if let Some(p) = cause.downcast_ref::<Permanent>() {
            return Class::Permanent(p.to_string());
        }
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            return match status.code() {
                Code::AlreadyExists => Class::Duplicate(status.message().to_string()),
                Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition => {
                    Class::Permanent(format!(
                        "the coordinator refused the session: {}",
                        status.message()
                    ))
                }
                // Transport failures arrive as Unknown: their cause is further down.
                Code::Unknown => continue,
                _ => Class::Transient,
            };
        }
        let tls = cause.downcast_ref::<rustls::Error>().or_else(|| {
            cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return classify_tls(tls);
        }
    }
    // Some transports flatten the TLS error into text; recognise rustls's wording, and say
    // only that phrase, not the whole chain of wrappers around it.
    let text = format!("{e:#}");
    let phrase = |start: usize| {
        text[start..]
            .split(['"', ')', ';', '\n'])
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    if let Some(at) = text.find("invalid peer certificate") {
        return Class::Permanent(format!(
            "the coordinator's TLS certificate was refused ({}). {WRONG_CA}",
            phrase(at)
        ));
    }
    if let Some(at) = text.find("received fatal alert") {
        return Class::Permanent(format!(
            "the coordinator ended the TLS handshake ({}). {REFUSED_CERT}",
            phrase(at)
        ));
    }
    Class::Transient
}

/// How a TLS error is treated: a certificate refused by either side cannot heal.
pub fn classify_tls(tls: &rustls::Error) -> Class {
    match tls {
        rustls::Error::InvalidCertificate(c) => Class::Permanent(format!(
            "the coordinator's TLS certificate was refused ({c:?}). {WRONG_CA}"
        )),
        rustls::Error::AlertReceived(alert) => Class::Permanent(format!(
            "the coordinator ended the TLS handshake ({alert:?}). {REFUSED_CERT}"
        )),
        _ => Class::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_cannot_heal_are_permanent_and_the_rest_transient() {
        let status = |s: tonic::Status| classify(&anyhow::Error::new(s).context("session"));
        assert!(matches!(
            status(tonic::Status::failed_precondition("schema differs")),
            Class::Permanent(m) if m.contains("schema differs")
        ));
        assert!(matches!(
            status(tonic::Status::permission_denied("x")),
            Class::Permanent(_)
        ));
        assert!(matches!(
            status(tonic::Status::already_exists("site x is already connected")),
            Class::Duplicate(m) if m.contains("already connected")
        ));
        assert_eq!(status(tonic::Status::unavailable("down")), Class::Transient);
        assert_eq!(
            status(tonic::Status::resource_exhausted("memory")),
            Class::Transient
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(
            classify(&anyhow::Error::new(io).context("connecting")),
            Class::Permanent(m) if m.contains("not issued by the CA")
        ));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::DecryptError);
        assert!(matches!(
            classify(&anyhow::Error::new(alert)),
            Class::Permanent(m) if m.contains("refused this site's certificate")
        ));
        let refused = Permanent::new("the certificate in Welcome is for \"x\"", "Check it.");
        assert!(matches!(
            classify(&anyhow::Error::new(refused).context("session")),
            Class::Permanent(_)
        ));
        // hyper flattens the alert into text inside a transport error: the refusal is still
        // recognised, and said in a phrase rather than the chain of wrappers.
        let flattened = anyhow::anyhow!(
            "transport error: connection error: received fatal alert: CertificateRevoked"
        )
        .context("asking for the schema");
        assert!(matches!(
            classify(&flattened),
            Class::Permanent(m) if m.starts_with("the coordinator ended the TLS handshake (received fatal alert: CertificateRevoked). The coordinator refused")
        ));
        let dropped = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            classify(&anyhow::Error::new(dropped).context("reading")),
            Class::Transient
        );
    }
}
