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
use tower::{Layer, ServiceBuilder};
use tower_http::{
    sensitive_headers::SetSensitiveRequestHeadersLayer, set_header::SetRequestHeaderLayer,
};

use super::{report::InFlight, Error, Inner, TaskClient};
use crate::{Recovery, Schedule, TerminalRetryLayer};

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
    recovery: Option<Recovery>,
    #[cfg(feature = "outbox")]
    outbox: Option<OutboxSettings>,
    #[cfg(feature = "rustls")]
    roots: Roots,
}

/// Where and how terminal reports are kept on disk.
#[cfg(feature = "outbox")]
#[derive(Debug)]
pub(super) struct OutboxSettings {
    pub(super) path: std::path::PathBuf,
    pub(super) replay_interval: Duration,
    pub(super) replay_concurrency: usize,
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
            recovery: Some(Recovery::default()),
            #[cfg(feature = "outbox")]
            outbox: None,
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

    /// The signal that ends the backoff of parked terminal reports once a
    /// request to the same server succeeds: a `start`, a `progress`, any
    /// other call of this client, or one of the stacks you share it with
    /// (see [`recovery`](crate::recovery)). By default a signal of the
    /// client's own, [`Recovery::default`], releasing
    /// [`DEFAULT_RELEASE_PER_SECOND`](crate::recovery::DEFAULT_RELEASE_PER_SECOND) reports a
    /// second; `None` turns early release off and keeps the schedule exact.
    pub fn recovery(mut self, recovery: Option<Recovery>) -> TaskClientBuilder {
        self.recovery = recovery;
        self
    }

    /// Makes terminal reports durable in the outbox file at `path` (created
    /// if missing): each report of
    /// [`report_task_result`](TaskClient::report_task_result) is committed
    /// to disk before its first attempt, and delivered, across restarts,
    /// however long the server is away (see [`outbox`](crate::outbox)).
    /// [`complete_task`](TaskClient::complete_task) and
    /// [`fail_task`](TaskClient::fail_task) called directly are not stored.
    #[cfg(feature = "outbox")]
    pub fn outbox(mut self, path: impl Into<std::path::PathBuf>) -> TaskClientBuilder {
        let outbox = self.outbox.get_or_insert(OutboxSettings {
            path: std::path::PathBuf::new(),
            replay_interval: crate::outbox::DEFAULT_REPLAY_INTERVAL,
            replay_concurrency: crate::outbox::DEFAULT_REPLAY_CONCURRENCY,
        });
        outbox.path = path.into();
        self
    }

    /// With an [`outbox`](TaskClientBuilder::outbox): the longest wait between
    /// two probes of a server that is down (by default 30 s).
    #[cfg(feature = "outbox")]
    pub fn replay_interval(mut self, interval: Duration) -> TaskClientBuilder {
        if let Some(outbox) = &mut self.outbox {
            outbox.replay_interval = interval;
        }
        self
    }

    /// With an [`outbox`](TaskClientBuilder::outbox): how many stored reports
    /// are sent at once once the server is back (by default 16).
    #[cfg(feature = "outbox")]
    pub fn replay_concurrency(mut self, concurrency: usize) -> TaskClientBuilder {
        if let Some(outbox) = &mut self.outbox {
            outbox.replay_concurrency = concurrency;
        }
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
    /// that cannot be loaded; with an outbox, a file held by another live
    /// client or that is not an outbox (left as it was), or a zero replay
    /// interval or concurrency.
    pub fn build(self) -> Result<TaskClient, Error> {
        let base = base_url(&self.base_url)?;
        let headers = self.headers()?;
        let token = self.token_header()?;
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

        // The token is added to every attempt, stored reports' replays too
        // (the outbox never writes it), and marked sensitive on the way.
        let single = ServiceBuilder::new()
            .layer(SetRequestHeaderLayer::if_not_present(AUTHORIZATION, token))
            .layer(SetSensitiveRequestHeadersLayer::from_shared(Arc::new([
                AUTHORIZATION,
            ])))
            .timeout(self.timeout)
            .service(client);
        // The timeout sits inside the retry layer: a hung attempt is a
        // transient failure, retried like a 502.
        let layer = TerminalRetryLayer::new().with_schedule(self.schedule.clone());
        #[cfg(feature = "outbox")]
        let dispatcher = match &self.outbox {
            Some(outbox) => Some(super::durable::dispatcher(
                outbox,
                single.clone(),
                layer.clone(),
                self.recovery.clone(),
            )?),
            None => None,
        };
        let layer = match &self.recovery {
            Some(recovery) => layer.with_recovery(recovery.clone()),
            None => layer,
        };
        let terminal = layer.layer(single.clone());

        Ok(TaskClient {
            inner: Arc::new(Inner {
                base,
                headers,
                has_token: self.token.is_some(),
                client_version: self.client_version,
                schedule: self.schedule,
                timeout: self.timeout,
                recovery: self.recovery,
                single,
                terminal,
                #[cfg(feature = "outbox")]
                dispatcher,
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
        Ok(headers)
    }

    /// `Bearer <token>`, marked sensitive, if a token is set.
    fn token_header(&self) -> Result<Option<HeaderValue>, Error> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        // The message names no part of the token.
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|error| {
            Error::config(
                "the token holds characters a header cannot carry",
                Some(error.into()),
            )
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
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
            .field("recovery", &self.recovery)
            .field("outbox", &self.outbox_path())
            .finish_non_exhaustive()
    }
}

impl TaskClientBuilder {
    #[cfg(feature = "outbox")]
    fn outbox_path(&self) -> Option<&std::path::Path> {
        self.outbox.as_ref().map(|outbox| outbox.path.as_path())
    }

    #[cfg(not(feature = "outbox"))]
    fn outbox_path(&self) -> Option<&std::path::Path> {
        None
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
