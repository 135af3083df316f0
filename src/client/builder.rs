//! Building a [`TaskClient`]: every setting is checked here, so no request
//! meets a bad one.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    header::{AUTHORIZATION, CONTENT_TYPE},
    HeaderMap, HeaderName, HeaderValue, Uri,
};
use http_body_util::Full;
#[cfg(not(feature = "rustls"))]
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::ServiceBuilder;
use tower_http::{
    sensitive_headers::SetSensitiveRequestHeadersLayer, set_header::SetRequestHeaderLayer,
};

use super::durable;
use super::{
    error::Error,
    limit::ExchangeLimit,
    task_client::TaskClient,
    transport::{Connector, Credentials, Transport},
};
use crate::{
    origin::has_user_info, outbox::Replay, Recovery, TerminalRetryLayer, TerminalRetryPolicy,
};

/// The default per-attempt timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The default bound on a client's requests in flight at once.
const DEFAULT_CONCURRENCY_LIMIT: usize = 64;

/// Configures a [`TaskClient`]; made by [`TaskClient::builder`].
///
/// Nothing is checked until [`build`](TaskClientBuilder::build), which reports
/// every problem as an [`Error`].
pub struct TaskClientBuilder {
    base_url: String,
    token: Option<String>,
    client_version: Option<String>,
    policy: TerminalRetryPolicy,
    timeout: Duration,
    concurrency_limit: usize,
    #[cfg(feature = "outbox")]
    outbox: Option<std::path::PathBuf>,
    replay: Replay,
    #[cfg(feature = "rustls")]
    tls_roots: TlsRoots,
}

/// The certificate authorities the client trusts for HTTPS (feature
/// `rustls`): [`TaskClientBuilder::tls_roots`].
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

impl TaskClient {
    /// Starts configuring a client for the server at `base_url`, such as
    /// `http://127.0.0.1:8080` (a path prefix is kept).
    pub fn builder(base_url: impl Into<String>) -> TaskClientBuilder {
        TaskClientBuilder::new(base_url.into())
    }
}

impl TaskClientBuilder {
    fn new(base_url: String) -> TaskClientBuilder {
        TaskClientBuilder {
            base_url,
            token: None,
            client_version: None,
            policy: TerminalRetryPolicy::default().with_recovery(Recovery::default()),
            timeout: DEFAULT_TIMEOUT,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
            #[cfg(feature = "outbox")]
            outbox: None,
            replay: Replay::default(),
            #[cfg(feature = "rustls")]
            tls_roots: TlsRoots::default(),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request to the base
    /// URL's own scheme, host and port, and to no other. The header is marked
    /// sensitive, and the token appears in no `Debug` output, error or event:
    /// a server that echoes it back in an error body, in any ASCII case,
    /// percent-encoded or not, sees it replaced by `[redacted]`.
    pub fn token(mut self, token: impl Into<String>) -> TaskClientBuilder {
        self.token = Some(token.into());
        self
    }

    /// Sends `X-Client-Version: <version>` with every request.
    pub fn client_version(mut self, version: impl Into<String>) -> TaskClientBuilder {
        self.client_version = Some(version.into());
        self
    }

    /// The retry policy of the terminal routes, `complete` and `fail`, and
    /// of the outbox's deliveries (the other routes are tried once): its
    /// schedule, its `Retry-After` rule (also honoured by the outbox's
    /// probes), jitter, budget and attempt header, and its
    /// [`Recovery`]. The signal ends the backoff of parked terminal reports
    /// once a request to the same server succeeds: a `start`, a `progress`,
    /// any other call of this client, or one of the stacks you share it
    /// with.
    ///
    /// By default `TerminalRetryPolicy::default().with_recovery(Recovery::default())`:
    /// delays of 4, 8, 16, 32 and 64 s, `Retry-After` honoured up to five
    /// minutes, and a signal of the client's own releasing 50 reports a
    /// second. A policy without a recovery turns early release off and keeps
    /// the schedule exact.
    pub fn policy(mut self, policy: TerminalRetryPolicy) -> TaskClientBuilder {
        self.policy = policy;
        self
    }

    /// How long one attempt may take, until the response headers and again for
    /// reading the response body (by default 30 s). An
    /// attempt that times out is a transient failure, retried on the terminal
    /// routes. It starts when the attempt is sent, not while it waits for its
    /// turn under the [`concurrency_limit`](TaskClientBuilder::concurrency_limit).
    pub fn timeout(mut self, timeout: Duration) -> TaskClientBuilder {
        self.timeout = timeout;
        self
    }

    /// At most `limit` requests of this client are in flight at once, across
    /// every route, its clones, and the outbox's replay (by default 64). The
    /// others wait their turn: ten thousand reports at once open no more
    /// connections than this. A request holds its turn for the whole
    /// exchange, until its response body has been read or dropped, so that a
    /// server trickling its bodies cannot draw more connections either. Zero
    /// is a configuration error.
    pub fn concurrency_limit(mut self, limit: usize) -> TaskClientBuilder {
        self.concurrency_limit = limit;
        self
    }

    /// Makes terminal reports durable in the outbox file at `path` (created
    /// if missing, with its folder): each report of
    /// [`report_task_result`](TaskClient::report_task_result) is committed
    /// to disk before its first attempt, and delivered, across restarts,
    /// however long the server is away (see [`outbox`](crate::outbox)).
    ///
    /// Only reports to the base URL's own origin are replayed: one stored
    /// under another base URL (or planted in the file) is quarantined, with
    /// an `error` event naming its host, never sent with this client's token.
    #[cfg(feature = "outbox")]
    pub fn outbox(mut self, path: impl Into<std::path::PathBuf>) -> TaskClientBuilder {
        self.outbox = Some(path.into());
        self
    }

    /// With an [`outbox`](TaskClientBuilder::outbox): how stored reports
    /// are replayed (see [`Replay`]; by default every 30 s at most while the
    /// server is down, 16 at once and 100 a second once it is back).
    #[cfg(feature = "outbox")]
    pub fn replay(mut self, replay: Replay) -> TaskClientBuilder {
        self.replay = replay;
        self
    }

    /// The certificate authorities trusted for HTTPS (by default Mozilla's
    /// roots): the platform's store, or only the certificates of a private
    /// authority or a self-signed server.
    #[cfg(feature = "rustls")]
    pub fn tls_roots(mut self, roots: TlsRoots) -> TaskClientBuilder {
        self.tls_roots = roots;
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
    /// `rustls` feature) with a host and a port from 1 to 65535, or that has
    /// user info (credentials: use [`token`](TaskClientBuilder::token)), a
    /// query or a fragment (the error shows none of them, nor does `Debug`);
    /// a token or version
    /// a header cannot carry; a zero timeout or concurrency limit; no tokio
    /// runtime; with `rustls`, a trust store that cannot be loaded; with an
    /// outbox, a file that cannot be opened (held by another live client,
    /// not an outbox, open to other users: the error names it), or a zero
    /// replay interval, concurrency or rate.
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
        if self.concurrency_limit == 0 {
            return Err(Error::config(
                "the concurrency limit must be at least one request",
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

        let origin = crate::origin::origin_key(&base.parse::<Uri>().unwrap_or_default());
        // The token is added to every attempt to the client's own origin,
        // stored reports' replays too (the outbox never writes it), and
        // marked sensitive on the way. The limit sits outside the timeout,
        // so that waiting for a turn does not count against an attempt; the
        // response body holds the turn until it is read or dropped.
        let single = ServiceBuilder::new()
            .layer(SetRequestHeaderLayer::if_not_present(
                AUTHORIZATION,
                Credentials {
                    origin: origin.into(),
                    value: token,
                },
            ))
            .layer(SetSensitiveRequestHeadersLayer::from_shared(Arc::new([
                AUTHORIZATION,
            ])))
            .layer_fn(|attempt| ExchangeLimit::new(attempt, self.concurrency_limit))
            .timeout(self.timeout)
            .service(client);
        // The timeout sits inside the retry layer: a hung attempt is a
        // transient failure, retried like a 502.
        let layer = TerminalRetryLayer::new(self.policy.clone());
        let dispatcher = durable::dispatcher(durable::Sending {
            attempt: single.clone(),
            layer: layer.clone(),
            #[cfg(feature = "outbox")]
            outbox: self.outbox.as_deref(),
            replay: self.replay,
            base: &base,
            token: self.token.as_deref(),
        })?;

        let transport = Transport {
            base,
            headers,
            token: self.token,
            client_version: self.client_version,
            schedule: self.policy.schedule().clone(),
            timeout: self.timeout,
            recovery: self.policy.recovery().cloned(),
            single,
        };
        Ok(TaskClient::new(transport, dispatcher, runtime))
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
        let builder = match &self.tls_roots {
            TlsRoots::Webpki => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(tls_error)?,
            TlsRoots::Native => {
                builder
                    .with_provider_and_native_roots(provider)
                    .map_err(|error| {
                        Error::config(
                            "the platform's certificates cannot be loaded",
                            Some(error.into()),
                        )
                    })?
            }
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
}

impl fmt::Debug for TaskClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("TaskClientBuilder");
        debug
            .field("base_url", &shown_url(&self.base_url))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client_version", &self.client_version)
            .field("policy", &self.policy)
            .field("timeout", &self.timeout)
            .field("concurrency_limit", &self.concurrency_limit);
        #[cfg(feature = "outbox")]
        debug
            .field("outbox", &self.outbox)
            .field("replay", &self.replay);
        debug.finish_non_exhaustive()
    }
}

/// The longest base URL accepted, in bytes.
const MAX_BASE_URL: usize = 2048;

/// `scheme://authority/prefix`, without a trailing slash, from the base URL.
fn base_url(base_url: &str) -> Result<String, Error> {
    let shown = shown_url(base_url);
    let invalid = |reason: &str| Error::config(format!("base URL {shown:?} {reason}"), None);
    if base_url.len() > MAX_BASE_URL {
        return Err(invalid("is longer than 2048 bytes"));
    }
    let uri: Uri = base_url
        .parse()
        .map_err(|_: http::uri::InvalidUri| invalid("is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(invalid("is not absolute (scheme and host)"));
    };
    match scheme {
        "http" => {}
        "https" if cfg!(feature = "rustls") => {}
        "https" => return Err(invalid("needs the `rustls` feature for https")),
        _ => return Err(invalid("is neither http nor https")),
    }
    if has_user_info(&uri) {
        return Err(invalid(
            "carries credentials (user info): pass a token with `token()` instead",
        ));
    }
    if authority.host().is_empty() {
        return Err(invalid("has no host"));
    }
    // `http::Uri` takes any digits for a port, and a bare `:`.
    let port = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, after_ipv6)| after_ipv6)
        .split_once(':')
        .map(|(_, port)| port);
    if let Some(port) = port {
        if !matches!(port.parse::<u16>(), Ok(1..)) {
            return Err(invalid("has a port outside 1 to 65535"));
        }
    }
    // `http::Uri` drops a fragment without a word.
    if uri.query().is_some() || base_url.contains('#') {
        return Err(invalid("has a query or a fragment"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("{scheme}://{authority}{prefix}"))
}

/// `url` as it can be shown in an error or `Debug`: its user info, as far as
/// the last `@` (a password may hold `/`, `?`, `#` or `@`), and its query or
/// fragment (`?token=...`) replaced by `[redacted]`. Where a `?` or `#`
/// comes before that `@`, nothing tells a password from a query: all but
/// the scheme is redacted.
fn shown_url(url: &str) -> String {
    use crate::response::REDACTED;
    let is_scheme = |scheme: &str| {
        scheme
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'))
    };
    let after_scheme = url
        .find("://")
        .filter(|&at| is_scheme(&url[..at]))
        .map_or(0, |at| at + 3);
    let (scheme, rest) = url.split_at(after_scheme);
    let query = rest.find(['?', '#']);
    let (user_info, rest) = match rest.rfind('@') {
        Some(at) if query.is_some_and(|query| query < at) => return format!("{scheme}{REDACTED}"),
        Some(at) => (REDACTED, &rest[at..]),
        None => ("", rest),
    };
    match rest.find(['?', '#']) {
        Some(at) => format!("{scheme}{user_info}{}{REDACTED}", &rest[..=at]),
        None => format!("{scheme}{user_info}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::ErrorKind;
    use super::*;

    #[test]
    fn defaults_are_as_documented() {
        assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(30));
        assert_eq!(DEFAULT_CONCURRENCY_LIMIT, 64);
    }

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
            "http://127.0.0.1:99999",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:0",
            "http://127.0.0.1:",
            "http://:80",
            "http://127.0.0.1/#fragment",
            "http://[::1]:0/",
        ] {
            let error = base_url(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}: {error}");
            assert!(!error.is_transient());
        }
        assert_eq!(base_url("http://[::1]:8080/").unwrap(), "http://[::1]:8080");
        assert_eq!(base_url("http://h:65535").unwrap(), "http://h:65535");
    }

    #[test]
    fn credentials_in_the_base_url_are_refused_and_never_shown() {
        for bad in [
            "http://user:pa55word@127.0.0.1:8080/x",
            "http://user:pa55word@127.0.0.1:99999/x",
            "http://user:pa55word@ho st/x",
        ] {
            let error = base_url(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Config, "{bad:?}: {error}");
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("pa55word"), "{shown}");
        }
        let builder = TaskClientBuilder::new("http://u:pa55word@127.0.0.1".into());
        assert!(!format!("{builder:?}").contains("pa55word"));
    }

    #[test]
    fn user_info_and_queries_are_never_shown() {
        for (url, shown) in [
            ("http://h:80/api", "http://h:80/api"),
            ("http://u:p/w@x@h:80/api", "http://[redacted]@h:80/api"),
            ("http://u:p#w/?@h:80/api", "http://[redacted]"),
            ("http://h:80/api?token=t#f", "http://h:80/api?[redacted]"),
            ("http://h/api#t", "http://h/api#[redacted]"),
            ("http://u:p@h/a?token=t", "http://[redacted]@h/a?[redacted]"),
            ("http://h/api?mail=a@b&token=t", "http://[redacted]"),
            ("u:p://w@h", "[redacted]@h"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
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
