//! Building a [`TaskClient`]: the builder's settings, each checked here so
//! that no request meets a bad one, and the assembly of the client's stack.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    header::{AUTHORIZATION, CONTENT_TYPE},
    HeaderMap, HeaderName, HeaderValue, Uri,
};
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::ServiceBuilder;
use tower_http::{
    sensitive_headers::SetSensitiveRequestHeadersLayer, set_header::SetRequestHeaderLayer,
};

#[cfg(feature = "rustls")]
use super::tls::TlsRoots;
use super::{
    base_url::{base_url, shown_url},
    durable,
    error::Error,
    limit::ExchangeLimit,
    task_client::TaskClient,
    tls,
    transport::{Credentials, Transport},
};
use crate::{outbox::Replay, Recovery, TerminalRetryLayer, TerminalRetryPolicy};

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
        #[cfg(feature = "rustls")]
        let connector = tls::connector(&self.tls_roots)?;
        #[cfg(not(feature = "rustls"))]
        let connector = tls::connector()?;
        let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_as_documented() {
        assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(30));
        assert_eq!(DEFAULT_CONCURRENCY_LIMIT, 64);
    }

    #[test]
    fn debug_never_shows_the_base_urls_credentials() {
        let builder = TaskClientBuilder::new("http://u:pa55word@127.0.0.1".into());
        assert!(!format!("{builder:?}").contains("pa55word"));
    }
}
