//! HTTPS through the `rustls` feature, against a loopback server with a
//! self-signed certificate made here.

#![cfg(feature = "rustls")]

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rcgen::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::{
    rustls::{
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
        ServerConfig,
    },
    TlsAcceptor,
};
use tower_terminal_retry::{
    client::{ErrorKind, ReportOutcome, TaskClient, TaskResult, TlsRoots},
    Recovery, Schedule, TerminalRetryPolicy,
};

/// A TLS server on 127.0.0.1 that answers 200 to the requests of its first
/// `connections` connections and records their paths; its URL and certificate.
async fn tls_server(
    connections: usize,
) -> (String, CertificateDer<'static>, Arc<Mutex<Vec<String>>>) {
    let CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let paths = Arc::new(Mutex::new(Vec::new()));

    let seen = paths.clone();
    tokio::spawn(async move {
        for _ in 0..connections {
            let (stream, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends it here.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |request: Request<Incoming>| {
                    seen.lock().unwrap().push(request.uri().path().to_owned());
                    async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, cert.der().clone(), paths)
}

#[tokio::test]
async fn completes_over_https_with_a_trusted_self_signed_certificate() {
    let (url, certificate, paths) = tls_server(1).await;
    let client = TaskClient::builder(url)
        .tls_roots(TlsRoots::Only(vec![certificate.to_vec()]))
        .token("secret")
        .build()
        .unwrap();

    let outcome = client
        .report_task_result("t1", TaskResult::completed("done"))
        .await;

    assert_eq!(outcome, ReportOutcome::Completed);

    assert_eq!(*paths.lock().unwrap(), ["/api/daemon/tasks/t1/complete"]);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_transient_transport_error() {
    let (url, _certificate, paths) = tls_server(1).await;
    // The public roots do not vouch for a self-signed certificate.
    let client = TaskClient::builder(url)
        .policy(
            TerminalRetryPolicy::default()
                .with_schedule(Schedule::new([]).unwrap())
                .with_recovery(Recovery::default()),
        )
        .build()
        .unwrap();

    let error = client.start_task("t1").await.unwrap_err();

    assert_eq!(error.kind(), ErrorKind::Transport);
    assert!(error.is_transient());
    // Transient: never turned into `fail`.
    let outcome = client
        .report_task_result("t1", TaskResult::completed("done"))
        .await;
    assert_eq!(outcome, ReportOutcome::LeftRunning);
    assert!(paths.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_bad_root_certificate_is_an_error_at_build() {
    let error = TaskClient::builder("https://127.0.0.1:8443")
        .tls_roots(TlsRoots::Only(vec![b"not a certificate".to_vec()]))
        .build()
        .unwrap_err();

    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
}
