//! The peer stacks: the callback sent through one of the two reqwest stacks a
//! user picks today, each retrying transient failures up to five times.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::common::{callback_body, callback_headers, CALLBACK_PATH};

/// The callback through one of the reqwest stacks.
pub struct ReqwestCallback {
    client: ReqwestClient,
    url: String,
    headers: HeaderMap,
    body: Bytes,
}

enum ReqwestClient {
    /// reqwest's own retry module (no backoff between attempts).
    Builtin(reqwest::Client),
    /// reqwest-middleware with reqwest-retry's transient-retry middleware
    /// (an exponential backoff).
    Middleware(reqwest_middleware::ClientWithMiddleware),
}

impl ReqwestCallback {
    /// The callback to `base` (`http://host:port`) through reqwest's own
    /// retry module, classifying as this crate does: 5xx, 408, 429 and
    /// errors are retried. Call it inside a runtime.
    pub fn builtin_retry(base: &str) -> ReqwestCallback {
        let policy = reqwest::retry::for_host("127.0.0.1")
            .max_retries_per_request(5)
            .classify_fn(|attempt| match attempt.status() {
                Some(status)
                    if status.is_server_error()
                        || status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS =>
                {
                    attempt.retryable()
                }
                None => attempt.retryable(),
                Some(_) => attempt.success(),
            });
        let client = reqwest::Client::builder()
            .retry(policy)
            .build()
            .expect("a reqwest client");
        ReqwestCallback::new(base, ReqwestClient::Builtin(client))
    }

    /// The callback to `base` through reqwest-middleware and reqwest-retry
    /// (five retries on an exponential backoff, its usual setup). Call it
    /// inside a runtime.
    pub fn middleware_retry(base: &str) -> ReqwestCallback {
        let policy =
            reqwest_retry::policies::ExponentialBackoff::builder().build_with_max_retries(5);
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(reqwest_retry::RetryTransientMiddleware::new_with_policy(
                policy,
            ))
            .build();
        ReqwestCallback::new(base, ReqwestClient::Middleware(client))
    }

    fn new(base: &str, client: ReqwestClient) -> ReqwestCallback {
        ReqwestCallback {
            client,
            url: format!("{base}{CALLBACK_PATH}"),
            headers: callback_headers(),
            body: callback_body(),
        }
    }

    /// Sends the callback and reads the whole answer; panics unless it is a 200.
    pub async fn send(&self) {
        let (headers, body) = (self.headers.clone(), self.body.clone());
        let response = match &self.client {
            ReqwestClient::Builtin(client) => client
                .post(&self.url)
                .headers(headers)
                .body(body)
                .send()
                .await
                .expect("a response"),
            ReqwestClient::Middleware(client) => client
                .post(&self.url)
                .headers(headers)
                .body(body)
                .send()
                .await
                .expect("a response"),
        };
        assert_eq!(response.status(), StatusCode::OK);
        response.bytes().await.expect("a body");
    }
}
