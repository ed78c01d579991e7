//! A refusal is a refusal however the TLS stack reports it.
//!
//! The coordinator closes a refused handshake gracefully, so the agent reads the TLS alert.
//! A terminator in front of it (a proxy, an older coordinator) may instead hang up at once,
//! and then whether hyper reports the alert or only a broken pipe depends on which of the
//! client's preface and the server's hang-up comes first (the operator trial saw "connection
//! closed" and "broken pipe" for refused certificates). Whichever it is here, the agent must
//! stop with the reason after its permanent-failure budget, not retry forever: when a
//! connection fails before the site was welcomed, it looks at the handshake itself.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use cohort_testkit::{pki, stub};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[test]
fn a_revoked_certificate_refused_by_a_terminator_that_hangs_up_is_a_permanent_failure() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::provision(dir.path());
    cohort_ca::revoke(&pki, "cleveland").unwrap();
    let tls = pki::terminator(&pki);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let (port, result) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let count = refused.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                // The handshake fails on the revoked certificate; the socket is dropped at
                // once, with whatever the client sent after its flight still unread.
                if acceptor.accept(tcp).await.is_err() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let agent = stub::cleveland(&pki, port).build(cohort_agent::AgentConfig::parse);
        let result =
            tokio::time::timeout(std::time::Duration::from_secs(60), cohort_agent::run(agent))
                .await
                .expect("the agent stops instead of retrying a refusal forever");
        (port, result)
    });
    let err = result.expect_err("a revoked site cannot run");
    let text = format!("{err:#}");
    assert!(
        err.is::<cohort_agent::GaveUp>(),
        "gave up on permanent failures (port {port}): {text}"
    );
    assert!(
        text.contains("CertificateRevoked"),
        "names the alert: {text}"
    );
    assert!(
        refused.load(Ordering::Relaxed) >= 5,
        "refused at the handshake each time"
    );
}
