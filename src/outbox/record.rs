//! A stored request, and its encoding on disk.
//!
//! The encoding is length-prefixed binary, versioned by its first byte.
//! Decoding never panics: a record it cannot read is an error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header::AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};

/// The first byte of every record: the encoding's version.
const VERSION: u8 = 1;

/// A request kept in the [`Outbox`](super::Outbox), with what is known of its
/// delivery so far.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub(super) seq: u64,
    pub(super) key: String,
    pub(super) quarantined: bool,
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    pub(super) idempotency_key: String,
    pub(super) stored_at: SystemTime,
    pub(super) attempts: u32,
    pub(super) last_failure: Option<String>,
}

impl Entry {
    /// A new entry for `request` under `key`: its sensitive headers and
    /// `Authorization` are left out, and it gets a fresh idempotency key.
    pub(super) fn new(key: String, request: &Request<Bytes>, idempotency_key: String) -> Entry {
        let mut headers = HeaderMap::new();
        for (name, value) in request.headers() {
            if value.is_sensitive() || name == AUTHORIZATION || name == super::IDEMPOTENCY_KEY {
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
            idempotency_key,
            stored_at: SystemTime::now(),
            attempts: 0,
            last_failure: None,
        }
    }

    /// The key it is stored under: one entry per key at a time.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request's URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request's body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The `Idempotency-Key` it is sent with, the same on every attempt,
    /// replay and restart.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// When it was first stored.
    pub fn stored_at(&self) -> SystemTime {
        self.stored_at
    }

    /// Attempts made so far, across restarts.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How the last attempt failed, if one did.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Whether the server refused it for good, with nothing to fall back to:
    /// it is kept, not retried.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined
    }

    /// The request to send: the stored one with its `Idempotency-Key`
    /// (sensitive headers are the sending stack's to add).
    pub fn request(&self) -> Request<Bytes> {
        let mut request = Request::new(self.body.clone());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        if let Ok(value) = HeaderValue::from_str(&self.idempotency_key) {
            request.headers_mut().insert(super::IDEMPOTENCY_KEY, value);
        }
        request
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.push(VERSION);
        put_bytes(&mut out, self.key.as_bytes());
        out.push(u8::from(self.quarantined));
        put_bytes(&mut out, self.method.as_str().as_bytes());
        put_bytes(&mut out, self.uri.to_string().as_bytes());
        put_u32(&mut out, self.headers.len() as u32);
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        put_bytes(&mut out, &self.body);
        put_bytes(&mut out, self.idempotency_key.as_bytes());
        let millis = self
            .stored_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        out.extend_from_slice(&millis.to_le_bytes());
        put_u32(&mut out, self.attempts);
        match &self.last_failure {
            Some(failure) => {
                out.push(1);
                put_bytes(&mut out, failure.as_bytes());
            }
            None => out.push(0),
        }
        out
    }

    /// Reads a record back; `None` for bytes this version did not write.
    pub(super) fn decode(seq: u64, bytes: &[u8]) -> Option<Entry> {
        let mut reader = Reader(bytes);
        if reader.byte()? != VERSION {
            return None;
        }
        let key = reader.text()?;
        let quarantined = reader.byte()? != 0;
        let method = Method::from_bytes(reader.bytes()?).ok()?;
        let uri = Uri::try_from(reader.bytes()?).ok()?;
        let count = reader.u32()?;
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let name = HeaderName::from_bytes(reader.bytes()?).ok()?;
            let value = HeaderValue::from_bytes(reader.bytes()?).ok()?;
            headers.append(name, value);
        }
        let body = Bytes::copy_from_slice(reader.bytes()?);
        let idempotency_key = reader.text()?;
        let millis = u64::from_le_bytes(reader.take(8)?.try_into().ok()?);
        let stored_at = UNIX_EPOCH.checked_add(Duration::from_millis(millis))?;
        let attempts = reader.u32()?;
        let last_failure = match reader.byte()? {
            0 => None,
            1 => Some(reader.text()?),
            _ => return None,
        };
        reader.0.is_empty().then_some(Entry {
            seq,
            key,
            quarantined,
            method,
            uri,
            headers,
            body,
            idempotency_key,
            stored_at,
            attempts,
            last_failure,
        })
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
            .field("stored_at", &self.stored_at)
            .field("attempts", &self.attempts)
            .field("last_failure", &self.last_failure)
            .field("quarantined", &self.quarantined)
            .finish()
    }
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.0.len() < count {
            return None;
        }
        let (head, tail) = self.0.split_at(count);
        self.0 = tail;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut request = Request::post("http://127.0.0.1:9/hook?x=1")
            .header("content-type", "application/json")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header(AUTHORIZATION, "Bearer secret")
            .body(Bytes::from_static(b"{\"a\":1}"))
            .unwrap();
        let mut sensitive = HeaderValue::from_static("hidden");
        sensitive.set_sensitive(true);
        request.headers_mut().insert("x-api-key", sensitive);
        let mut entry = Entry::new("k1".into(), &request, "idem-1".into());
        entry.seq = 7;
        entry.attempts = 3;
        entry.last_failure = Some("POST /hook returned 502".into());
        entry
    }

    #[test]
    fn records_round_trip_without_secrets() {
        let entry = entry();
        let encoded = entry.encode();
        let decoded = Entry::decode(7, &encoded).unwrap();
        let stored_ms = |at: SystemTime| at.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(stored_ms(decoded.stored_at), stored_ms(entry.stored_at));
        assert_eq!(
            Entry {
                stored_at: entry.stored_at,
                ..decoded
            },
            entry
        );
        assert!(entry.headers.get(AUTHORIZATION).is_none());
        assert!(entry.headers.get("x-api-key").is_none());
        assert_eq!(entry.headers.get_all("x-multi").iter().count(), 2);
        let text = String::from_utf8_lossy(&encoded);
        assert!(!text.contains("secret") && !text.contains("hidden"));
        let request = entry.request();
        assert_eq!(request.headers()[super::super::IDEMPOTENCY_KEY], "idem-1");
    }

    #[test]
    fn damaged_records_are_refused_not_panicked_on() {
        let encoded = entry().encode();
        for len in 0..encoded.len() {
            assert!(Entry::decode(1, &encoded[..len]).is_none(), "cut at {len}");
        }
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(Entry::decode(1, &longer).is_none());
        let mut other_version = encoded;
        other_version[0] = 9;
        assert!(Entry::decode(1, &other_version).is_none());
    }
}
