//! Signed webhooks, as the Standard Webhooks specification (v1.0.0) has them
//! (enable the `webhooks` feature).
//!
//! A receiver must know that a request comes from its sender and is not a
//! replay of last week's. The specification's answer, followed by Svix,
//! Hookdeck, Zapier, Twilio, ngrok and others: three headers,
//!
//! - `webhook-id`, the event's id, the same on every attempt, so that the
//!   receiver can deduplicate;
//! - `webhook-timestamp`, the attempt's time in Unix seconds;
//! - `webhook-signature`, a space-separated list of signatures of
//!   `{webhook-id}.{webhook-timestamp}.{body}`: `v1,` and base64 of its
//!   HMAC-SHA256 under a shared secret ([`Key`] `whsec_`), or `v1a,` and
//!   base64 of its ed25519 signature (`whsk_` signs, `whpk_` verifies).
//!   Several keys give several signatures, so that a receiver can move to a
//!   new key while the sender signs with both.
//!
//! [`SignLayer`] signs on the way out, inside the
//! [`TerminalRetryLayer`](crate::TerminalRetryLayer) and under the outbox's
//! dispatcher: each attempt is signed with its own time, so that a retry an
//! hour into the schedule, or a replay after a day's outage, is as fresh as
//! the first attempt; its id is the request's `idempotency-key` (the one the
//! outbox stores and sends with every attempt), so that it is the same on
//! every attempt and after a restart. [`VerifyLayer`] checks on the way in,
//! for servers: it accepts a request when a signature matches one of its
//! keys and the timestamp is within its tolerance (5 minutes by default),
//! answers 401 otherwise, and tells the services behind it the verified
//! [`WebhookId`].
//!
//! The cryptography is RustCrypto's `hmac` and `sha2` (HMAC signatures are
//! checked with the MAC's own constant-time comparison) and `ed25519-dalek`.
//!
//! A signed request, checked in memory:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_terminal_retry::webhooks::{Key, SignLayer, VerifyLayer, WebhookId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let key: Key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse()?;
//!
//! // The receiver: the application behind the verifying layer.
//! let receiver = VerifyLayer::new([key.clone()])?.layer(service_fn(
//!     |request: Request<Full<Bytes>>| async move {
//!         let id = request.extensions().get::<WebhookId>().expect("verified");
//!         assert_eq!(id.as_str(), "order-42-paid");
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
//!     },
//! ));
//! // The sender: signs, then hands the request to the receiver.
//! let sender = SignLayer::new([key])?.layer(receiver.clone());
//!
//! let event = Request::post("/hooks/orders")
//!     .header("idempotency-key", "order-42-paid")
//!     .body(Full::from(r#"{"type":"order.paid","order":42}"#))?;
//! assert_eq!(sender.oneshot(event).await?.status(), StatusCode::OK);
//!
//! // Unsigned, it is refused before the application sees it.
//! let forged = Request::post("/hooks/orders").body(Full::<Bytes>::from("{}"))?;
//! let refused = receiver.oneshot(forged).await?;
//! assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(
//!     refused.headers()["www-authenticate"],
//!     r#"webhook-signature error="missing webhook-id header""#
//! );
//! # Ok(())
//! # }
//! ```
//!
//! The module, by file: `key` (the keys, and what signs and checks a
//! message), `sign` (the sender's layer), `verify` (the receiver's layer)
//! and `verify_future` (its future: the body read, then the inner call).

mod check;
mod key;
mod sign;
mod verify;
mod verify_future;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http::HeaderName;

pub use check::Refusal;
pub use key::{Key, KeyError};
pub use sign::{Sign, SignError, SignFuture, SignLayer};
pub use verify::{Verify, VerifyLayer};
pub use verify_future::VerifyFuture;

/// The `webhook-id` of a request whose signature was verified: a request
/// extension that the verifying layer sets for the services behind it (the
/// idempotency layer takes it as the request's key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WebhookId(String);

impl WebhookId {
    /// The id as the sender sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The event's id, the same on every attempt.
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
/// The attempt's time, in Unix seconds.
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
/// The signatures, space-separated.
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// The longest id, in bytes: the bound the idempotency layer puts on its
/// keys, so that a verified id is always a usable key.
const MAX_ID_LENGTH: usize = 255;

/// Where the layers read the time: the system's clock unless a test, or a
/// process with a clock of its own, gives another.
type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system's clock.
fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

/// `time` in whole Unix seconds; a time before 1970 reads as 0.
fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Whether `id` may be signed and verified: 1 to 255 bytes of visible
/// ASCII, without a `.`, which the specification forbids in ids because it
/// separates the parts of the signed content.
fn is_valid_id(id: &[u8]) -> bool {
    (1..=MAX_ID_LENGTH).contains(&id.len())
        && id
            .iter()
            .all(|&byte| byte.is_ascii_graphic() && byte != b'.')
}
