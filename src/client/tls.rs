//! The connector under the client: plain HTTP, or with the `rustls` feature
//! HTTP and HTTPS over rustls, trusting the [`TlsRoots`] it is given.

#[cfg(feature = "rustls")]
use std::sync::Arc;

use hyper_util::client::legacy::connect::HttpConnector;

use super::error::Error;

/// The connector under the client: plain HTTP, or HTTP and HTTPS with the
/// `rustls` feature.
#[cfg(not(feature = "rustls"))]
pub(super) type Connector = HttpConnector;
/// The connector under the client: plain HTTP, or HTTP and HTTPS with the
/// `rustls` feature.
#[cfg(feature = "rustls")]
pub(super) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The certificate authorities the client trusts for HTTPS (feature
/// `rustls`): [`TaskClientBuilder::tls_roots`](super::TaskClientBuilder::tls_roots).
#[cfg(feature = "rustls")]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsRoots {
    /// Mozilla's, as shipped by `webpki-roots`. The default.
    #[default]
    Webpki,
    /// The platform's certificate store.
    Native,
    /// Only these DER-encoded certificates, *instead of* any public root:
    /// for a private certificate authority or a self-signed server.
    Only(Vec<Vec<u8>>),
}

/// The plain HTTP connector.
#[cfg(not(feature = "rustls"))]
pub(super) fn connector() -> Result<Connector, Error> {
    Ok(HttpConnector::new())
}

/// The HTTP and HTTPS connector, trusting `roots`.
#[cfg(feature = "rustls")]
pub(super) fn connector(roots: &TlsRoots) -> Result<Connector, Error> {
    use hyper_rustls::HttpsConnectorBuilder;
    use rustls::{pki_types::CertificateDer, ClientConfig, RootCertStore};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_error =
        |error: rustls::Error| Error::config("TLS cannot be set up", Some(error.into()));
    let builder = HttpsConnectorBuilder::new();
    let builder = match roots {
        TlsRoots::Webpki => builder
            .with_provider_and_webpki_roots(provider)
            .map_err(tls_error)?,
        TlsRoots::Native => builder
            .with_provider_and_native_roots(provider)
            .map_err(|error| {
                Error::config(
                    "the platform's certificates cannot be loaded",
                    Some(error.into()),
                )
            })?,
        TlsRoots::Only(certificates) => {
            let mut roots = RootCertStore::empty();
            for der in certificates {
                roots
                    .add(CertificateDer::from(der.clone()))
                    .map_err(tls_error)?;
            }
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(tls_error)?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(config)
        }
    };
    Ok(builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build())
}
