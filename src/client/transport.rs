//! One call of a task route: the request the client makes, sent through its
//! stack, and the answer sorted into success or [`Error`].

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use tower::{timeout::Timeout, ServiceExt};
use tower_http::{
    sensitive_headers::SetSensitiveRequestHeaders,
    set_header::{MakeHeaderValue, SetRequestHeader},
};

use super::{error::Error, limit::ExchangeLimit, route::Action, tls::Connector};
use crate::{
    classify::{Classify, DefaultClassifier, Outcome},
    Recovery, Schedule,
};

/// One attempt: hyper-util's client under a timeout, waiting its turn under
/// the concurrency limit (held by the response body), with the token for the
/// client's own origin.
pub(super) type Attempt = SetRequestHeader<
    SetSensitiveRequestHeaders<ExchangeLimit<Timeout<Client<Connector, Full<Bytes>>>>>,
    Credentials,
>;

/// The `Authorization` value, for requests to the client's own origin only:
/// a stored report, or a redirect target, elsewhere never gets the token.
#[derive(Clone)]
pub(super) struct Credentials {
    /// [`origin_key`](crate::origin::origin_key) of the base URL.
    pub(super) origin: Arc<str>,
    pub(super) value: Option<HeaderValue>,
}

impl<B> MakeHeaderValue<Request<B>> for Credentials {
    fn make_header_value(&mut self, request: &Request<B>) -> Option<HeaderValue> {
        let value = self.value.as_ref()?;
        crate::origin::is_origin(request.uri(), &self.origin).then(|| value.clone())
    }
}

/// How the client reaches its server: the base URL, the headers and the
/// stack of one attempt (the terminal routes go through the client's
/// dispatcher, over this stack).
pub(super) struct Transport {
    /// `scheme://authority/prefix`, no trailing slash.
    pub(super) base: String,
    /// Sent with every request (the token is added per attempt).
    pub(super) headers: HeaderMap,
    /// Kept to redact it from whatever the server sends back.
    pub(super) token: Option<String>,
    pub(super) client_version: Option<String>,
    pub(super) schedule: Schedule,
    pub(super) timeout: Duration,
    /// Told of every success; releases parked terminal reports.
    pub(super) recovery: Option<Recovery>,
    /// The routes tried once.
    pub(super) single: Attempt,
}

impl Transport {
    /// `POST {base}{path}` with the client's headers and `body`.
    pub(super) fn request(&self, path: &str, body: Bytes) -> Result<Request<Bytes>, Error> {
        let mut request = Request::post(format!("{}{path}", self.base))
            .body(body)
            .map_err(|error| {
                Error::config(
                    format!("no request can be made for {path}"),
                    Some(error.into()),
                )
            })?;
        *request.headers_mut() = self.headers.clone();
        Ok(request)
    }

    /// Sends `body` to `route` once, and sorts its result with the
    /// classifier the retry layer uses.
    pub(super) async fn send_once(
        &self,
        route: Action,
        task_id: &str,
        body: Bytes,
    ) -> Result<(), Error> {
        super::route::check_task_id(task_id)?;
        let path = route.path(task_id);
        let request = self.request(&path, body)?.map(Full::new);
        // Kept only for the recovery signal.
        let uri = self.recovery.as_ref().map(|_| request.uri().clone());

        let result = self.single.clone().oneshot(request).await;
        let outcome = DefaultClassifier.classify(&result);
        if let (Outcome::Success, Some(recovery), Some(uri)) = (outcome, &self.recovery, &uri) {
            // The terminal layer tells it itself; the routes tried once do not.
            recovery.observe(uri);
        }
        let response = result
            .map_err(|source| Error::transport(Method::POST, path.clone(), source, outcome))?;
        let status = response.status();
        if outcome == Outcome::Success {
            // Read, so the connection goes back to the pool; never shown.
            crate::response::read_start(response.into_body(), self.timeout).await;
            return Ok(());
        }
        let secrets = self.secrets();
        let redirect = crate::response::redirect_note(status, response.headers());
        let body = crate::response::body_start(response.into_body(), self.timeout, &secrets).await;
        // A redirect says where it points (cleaned too: a hostile server may
        // echo the token there) instead of its body.
        let body = redirect.map_or(body, |note| crate::response::clean(&note, &secrets));
        Err(Error::rejected(Method::POST, path, status, body, outcome))
    }

    /// What never leaves the client in text taken from a response.
    pub(super) fn secrets(&self) -> Vec<&str> {
        self.token.as_deref().into_iter().collect()
    }
}
