//! Building a [`TaskClient`]: every setting is checked here, so no request
//! meets a bad one.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    header::{AUTHORIZATION, CONTENT_TYPE},
    HeaderMap, HeaderName, HeaderValue, Uri,
};
use http_body_util::Full;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tower::ServiceBuilder;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use super::{report::InFlight, Error, Inner, TaskClient};
use crate::{Schedule, TerminalRetryLayer};

/// The connector under the client: plain HTTP, or HTTP and HTTPS with the
/// `rustls` feature.
#[cfg(not(feature = "rustls"))]
pub(super) type Connector = HttpConnector;
/// The connector under the client: plain HTTP, or HTTP and HTTPS with the
/// `rustls` feature.
#[cfg(feature = "rustls")]
pub(super) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The default per-attempt timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Configures a [`TaskClient`]; made by [`TaskClient::builder`].
///
/// Nothing is checked until [`build`](TaskClientBuilder::build), which reports
/// every problem as an [`Error`].
pub struct TaskClientBuilder {
    base_url: String,
    token: Option<String>,
    client_version: Option<String>,
    schedule: Schedule,
    timeout: Duration,
    #[cfg(feature = "rustls")]
    roots: Roots,
}

/// Which certificate authorities an HTTPS connection trusts.
#[cfg(feature = "rustls")]
enum Roots {
    /// Mozilla's, as shipped by `webpki-roots`.
    Webpki,
    /// The platform's store.
    Native,
    /// Only these, DER-encoded.
    Only(Vec<Vec<u8>>),
}

impl TaskClientBuilder {
    pub(super) fn new(base_url: String) -> TaskClientBuilder {
        TaskClientBuilder {
            base_url,
            token: None,
            client_version: None,
            schedule: Schedule::default(),
            timeout: DEFAULT_TIMEOUT,
            #[cfg(feature = "rustls")]
            roots: Roots::Webpki,
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request. The header is
    /// marked sensitive, and the token appears in no `Debug` output or event.
    pub fn token(mut self, token: impl Into<String>) -> TaskClientBuilder {
        self.token = Some(token.into());
        self
    }

    /// Sends `X-Client-Version: <version>` with every request.
    pub fn client_version(mut self, version: impl Into<String>) -> TaskClientBuilder {
        self.client_version = Some(version.into());
        self
    }

    /// The delays between attempts of `complete` and `fail` (by default 4, 8,
    /// 16, 32 and 64 s). The other routes are tried once.
    pub fn terminal_schedule(mut self, schedule: Schedule) -> TaskClientBuilder {
        self.schedule = schedule;
        self
    }

    /// How long one attempt may take, until the response headers and again for
    /// reading the response body (by default [`DEFAULT_TIMEOUT`], 30 s). An
    /// attempt that times out is a transient failure, retried on the terminal
    /// routes.
    pub fn timeout(mut self, timeout: Duration) -> TaskClientBuilder {
        self.timeout = timeout;
        self
    }

    /// Trusts the platform's certificate store for HTTPS instead of Mozilla's
    /// roots.
    #[cfg(feature = "rustls")]
    pub fn native_roots(mut self) -> TaskClientBuilder {
        self.roots = Roots::Native;
        self
    }

    /// Trusts this DER-encoded certificate for HTTPS, *instead of* the public
    /// roots: for a private certificate authority or a self-signed server.
    /// Call it again to trust several.
    #[cfg(feature = "rustls")]
    pub fn root_certificate(mut self, der: impl Into<Vec<u8>>) -> TaskClientBuilder {
        match &mut self.roots {
            Roots::Only(certificates) => certificates.push(der.into()),
            Roots::Webpki | Roots::Native => self.roots = Roots::Only(vec![der.into()]),
        }
        self
    }

    /// Checks the settings and builds the client.
    ///
    /// Call it inside a tokio runtime: terminal reports are delivered by tasks
    /// spawned onto it.
    ///
    /// # Errors
    ///
    /// A base URL that is not an absolute `http` URL (or `https` with the
    /// `rustls` feature) without query; a token or version a header cannot
    /// carry; a zero timeout; no tokio runtime; with `rustls`, a trust store
    /// that cannot be loaded.
    pub fn build(self) -> Result<TaskClient, Error> {
        let base = base_url(&self.base_url)?;
        let headers = self.headers()?;
        if self.timeout.is_zero() {
            return Err(Error::config(
                "the per-attempt timeout must not be zero",
                None,
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| {
            Error::config(
                "a task client must be built inside a tokio runtime",
                Some(error.into()),
            )
        })?;
        let client =
            Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(self.connector()?);

        // Marks the header on every request, whatever layer logs it later.
        let sensitive = SetSensitiveRequestHeadersLayer::from_shared(Arc::new([AUTHORIZATION]));
        let single = ServiceBuilder::new()
            .layer(sensitive.clone())
            .timeout(self.timeout)
            .service(client.clone());
        // The timeout sits inside the retry layer: a hung attempt is a
        // transient failure, retried like a 502.
        let terminal = ServiceBuilder::new()
            .layer(sensitive)
            .layer(TerminalRetryLayer::new().with_schedule(self.schedule.clone()))
            .timeout(self.timeout)
            .service(client);

        Ok(TaskClient {
            inner: Arc::new(Inner {
                base,
                headers,
                has_token: self.token.is_some(),
                client_version: self.client_version,
                schedule: self.schedule,
                timeout: self.timeout,
                single,
                terminal,
                runtime,
                reports: InFlight::default(),
            }),
        })
    }

    fn headers(&self) -> Result<HeaderMap, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            HeaderName::from_static("x-client-platform"),
            HeaderValue::from_static("daemon"),
        );
        headers.insert(
            HeaderName::from_static("x-client-os"),
            HeaderValue::from_static(std::env::consts::OS),
        );
        if let Some(version) = &self.client_version {
            let value = HeaderValue::from_str(version).map_err(|error| {
                Error::config(
                    "the client version holds characters a header cannot carry",
                    Some(error.into()),
                )
            })?;
            headers.insert(HeaderName::from_static("x-client-version"), value);
        }
        if let Some(token) = &self.token {
            // The message names no part of the token.
            let value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|error| {
                Error::config(
                    "the token holds characters a header cannot carry",
                    Some(error.into()),
                )
            })?;
            headers.insert(AUTHORIZATION, value);
        }
        Ok(headers)
    }

    #[cfg(not(feature = "rustls"))]
    fn connector(&self) -> Result<Connector, Error> {
        Ok(HttpConnector::new())
    }

    #[cfg(feature = "rustls")]
    fn connector(&self) -> Result<Connector, Error> {
        use hyper_rustls::HttpsConnectorBuilder;
        use rustls::{pki_types::CertificateDer, ClientConfig, RootCertStore};

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error =
            |error: rustls::Error| Error::config("TLS cannot be set up", Some(error.into()));
        let builder = HttpsConnectorBuilder::new();
        let builder = match &self.roots {
            Roots::Webpki => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(tls_error)?,
            Roots::Native => builder
                .with_provider_and_native_roots(provider)
                .map_err(|error| {
                    Error::config(
                        "the platform's certificates cannot be loaded",
                        Some(error.into()),
                    )
                })?,
            Roots::Only(certificates) => {
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
}

impl fmt::Debug for TaskClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskClientBuilder")
            .field("base_url", &self.base_url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client_version", &self.client_version)
            .field("terminal_schedule", &self.schedule.delays())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `scheme://authority/prefix`, without a trailing slash, from the base URL.
fn base_url(base_url: &str) -> Result<String, Error> {
    let invalid = |reason: &str| Error::config(format!("base URL {base_url:?} {reason}"), None);
    let uri: Uri = base_url.parse().map_err(|error: http::uri::InvalidUri| {
        Error::config(
            format!("base URL {base_url:?} is not a URL"),
            Some(error.into()),
        )
    })?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(invalid("is not absolute (scheme and host)"));
    };
    match scheme {
        "http" => {}
        "https" if cfg!(feature = "rustls") => {}
        "https" => return Err(invalid("needs the `rustls` feature for https")),
        _ => return Err(invalid("is neither http nor https")),
    }
    if uri.query().is_some() {
        return Err(invalid("has a query"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("{scheme}://{authority}{prefix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_keep_their_prefix_and_lose_the_trailing_slash() {
        assert_eq!(
            base_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080/tenant/").unwrap(),
            "http://127.0.0.1:8080/tenant"
        );
    }

    #[test]
    fn bad_base_urls_are_configuration_errors() {
        for bad in [
            "",
            "not a url",
            "/api",
            "127.0.0.1:8080",
            "ftp://127.0.0.1",
            "http://127.0.0.1/?x=1",
        ] {
            let error = base_url(bad).unwrap_err();
            assert!(error.is_config(), "{bad:?}: {error}");
            assert!(!error.is_transient());
        }
    }

    #[test]
    fn https_needs_the_rustls_feature() {
        assert_eq!(
            base_url("https://127.0.0.1").is_ok(),
            cfg!(feature = "rustls")
        );
    }
}
