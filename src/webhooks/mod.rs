//! Signed webhooks, as the Standard Webhooks specification (v1.0.0) has them
//! (enable the `webhooks` feature).

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
