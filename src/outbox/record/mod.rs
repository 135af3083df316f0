//! A stored request: [`Entry`], the [`Tag`] its sender labels it with, and
//! its encoding on disk.
//!
//! An entry is a plain record: its public fields are read, never set, by the
//! outbox's users. Every change to a stored entry goes through the methods
//! here, which the store calls.

#[cfg(feature = "outbox")]
mod format;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{
    header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION},
    HeaderMap, HeaderName, HeaderValue, Method, Request, Uri,
};

/// Headers that carry credentials, never written to disk (with any header
/// marked sensitive): the sending stack adds them to each attempt.
const SECRET_HEADERS: [HeaderName; 3] = [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE];

/// The longest tag, in bytes.
const MAX_TAG_BYTES: usize = 64;

/// A short label a sender gives a request, so that it knows after a restart
/// what a stored request is (a route, a kind of report) without parsing it.
///
/// Attach it as a request extension before [`Dispatcher::send`]; it is
/// stored with the request and given back as [`Entry::tag`]. A tag over 64
/// bytes, or with a control character, is refused with the request
/// ([`Durability::Refused`]).
///
/// [`Dispatcher::send`]: super::Dispatcher::send
/// [`Durability::Refused`]: super::Durability::Refused
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// A tag reading `label`.
    pub fn new(label: impl Into<String>) -> Tag {
        Tag(label.into())
    }

    /// The tag of `request`, if it carries one; an error saying why it is
    /// refused if it is not a valid tag.
    pub(super) fn of<B>(request: &Request<B>) -> Result<Option<String>, String> {
        let Some(Tag(label)) = request.extensions().get::<Tag>() else {
            return Ok(None);
        };
        if label.len() > MAX_TAG_BYTES {
            return Err(format!(
                "not sent: its tag is {} bytes long, over the {MAX_TAG_BYTES} a tag may take",
                label.len()
            ));
        }
        if label.chars().any(char::is_control) {
            return Err("not sent: its tag holds a control character".into());
        }
        Ok(Some(label.clone()))
    }
}

/// A request kept in the [`Outbox`](super::Outbox), with what is known of its
/// delivery so far.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The key it is stored under: one entry per key at a time.
    pub key: String,
    /// The request's method.
    pub method: Method,
    /// The request's URI.
    pub uri: Uri,
    /// The request's body.
    pub body: Bytes,
    /// The `Idempotency-Key` it is sent with, the same on every attempt,
    /// replay and restart.
    pub idempotency_key: String,
    /// The [`Tag`] its sender gave it, if any.
    pub tag: Option<String>,
    /// When it was first stored.
    pub stored_at: SystemTime,
    /// Attempts made so far, across restarts.
    pub attempts: u32,
    /// How the last attempt failed, if one did.
    pub last_failure: Option<String>,
    /// Whether the server refused it for good, with nothing to fall back to:
    /// it is kept, not retried.
    pub quarantined: bool,
    /// Its position in the store: the order it was first stored.
    pub(super) seq: u64,
    /// Its headers, but the sensitive ones.
    pub(super) headers: HeaderMap,
}

impl Entry {
    /// A new entry for `request` under `key`, with `tag`: its sensitive
    /// headers, `Authorization`, `Proxy-Authorization` and `Cookie` are left
    /// out, and it gets a fresh idempotency key.
    pub(super) fn new(key: String, request: &Request<Bytes>, tag: Option<String>) -> Entry {
        let mut headers = HeaderMap::new();
        for (name, value) in request.headers() {
            if value.is_sensitive()
                || SECRET_HEADERS.contains(name)
                || name == super::IDEMPOTENCY_KEY
            {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        Entry {
            seq: 0,
            key,
            quarantined: false,
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers,
            body: request.body().clone(),
            idempotency_key: uuid::Uuid::new_v4().to_string(),
            tag,
            stored_at: SystemTime::now(),
            attempts: 0,
            last_failure: None,
        }
    }

    /// What stands for a stored record that cannot be decoded (damaged on
    /// disk, or written by another version): quarantined, under the key
    /// `damaged-<seq>`, with no request in it.
    pub(super) fn damaged(seq: u64) -> Entry {
        Entry {
            seq,
            key: damaged_key(seq),
            quarantined: true,
            method: Method::default(),
            uri: Uri::default(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            idempotency_key: String::new(),
            tag: None,
            stored_at: UNIX_EPOCH,
            attempts: 0,
            last_failure: Some(DAMAGED.into()),
        }
    }

    /// The request to send: the stored one with its `Idempotency-Key`
    /// (sensitive headers are the sending stack's to add).
    pub fn request(&self) -> Request<Bytes> {
        let mut request = Request::new(self.body.clone());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        self.keyed(request)
    }

    /// `request` (this entry's, as its sender gave it) with this entry's
    /// `Idempotency-Key`.
    pub(super) fn keyed(&self, mut request: Request<Bytes>) -> Request<Bytes> {
        if let Ok(value) = HeaderValue::from_str(&self.idempotency_key) {
            request.headers_mut().insert(super::IDEMPOTENCY_KEY, value);
        }
        request
    }

    /// The entry as stored under `seq`.
    pub(super) fn stored_as(self, seq: u64) -> Entry {
        Entry { seq, ..self }
    }

    /// The entry for `fallback`, sent in place of this one: same key,
    /// position and age, a fresh idempotency key, and the fallback's own tag
    /// or else this one's.
    pub(super) fn replaced_by(&self, fallback: &Request<Bytes>, tag: Option<String>) -> Entry {
        let next = Entry::new(self.key.clone(), fallback, tag.or_else(|| self.tag.clone()));
        Entry {
            seq: self.seq,
            stored_at: self.stored_at,
            ..next
        }
    }

    /// Counts `attempts` more failed attempts, the last failing with
    /// `failure`.
    pub(super) fn failed(&mut self, attempts: u32, failure: &str) {
        self.attempts = self.attempts.saturating_add(attempts);
        self.last_failure = Some(failure.to_owned());
    }

    /// Moves it to quarantine, refused with `failure`.
    pub(super) fn quarantine(&mut self, failure: &str) {
        self.quarantined = true;
        self.last_failure = Some(failure.to_owned());
    }

    /// Moves it back from quarantine.
    pub(super) fn requeue(&mut self) {
        self.quarantined = false;
    }
}

impl std::fmt::Debug for Entry {
    // Header values and the body stay out: they may hold personal data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_len", &self.body.len())
            .field("idempotency_key", &self.idempotency_key)
            .field("tag", &self.tag)
            .field("stored_at", &self.stored_at)
            .field("attempts", &self.attempts)
            .field("last_failure", &self.last_failure)
            .field("quarantined", &self.quarantined)
            .finish()
    }
}

/// The last failure of a record that cannot be decoded.
const DAMAGED: &str = "damaged: the stored record cannot be decoded";

/// The key a record that cannot be decoded is listed under.
pub(super) fn damaged_key(seq: u64) -> String {
    format!("damaged-{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_fresh_version_4_uuids() {
        let request = Request::new(Bytes::new());
        let keys: std::collections::HashSet<String> = (0..1000)
            .map(|_| Entry::new("k".into(), &request, None).idempotency_key)
            .collect();
        assert_eq!(keys.len(), 1000);
        for key in &keys {
            assert_eq!(key.len(), 36);
            assert_eq!(&key[14..15], "4", "{key}");
            assert!(matches!(&key[19..20], "8" | "9" | "a" | "b"), "{key}");
        }
    }

    #[test]
    fn tags_over_64_bytes_or_with_control_characters_are_refused() {
        let tagged = |label: &str| {
            let mut request = Request::new(());
            request.extensions_mut().insert(Tag::new(label));
            Tag::of(&request)
        };
        assert_eq!(Tag::of(&Request::new(())), Ok(None));
        assert_eq!(tagged("complete"), Ok(Some("complete".into())));
        assert_eq!(tagged(&"x".repeat(64)), Ok(Some("x".repeat(64))));
        assert!(tagged(&"x".repeat(65)).unwrap_err().contains("65 bytes"));
        assert!(tagged("a\nb").unwrap_err().contains("control character"));
    }
}
