//! A stored request, and its encoding on disk.
//!
//! The encoding is length-prefixed binary, versioned by its first byte.
//! Decoding never panics and allocates no more than the record's size: a
//! record it cannot read is an error. Encoding refuses a field too long for
//! its length prefix rather than truncating it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{
    header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION},
    HeaderMap, HeaderName, HeaderValue, Method, Request, Uri,
};

/// The first byte of every record: the encoding's version.
const VERSION: u8 = 1;

/// The fewest bytes a header takes in a record: two length prefixes and a
/// name of one byte. Bounds a stored header count by the bytes that follow.
const MIN_HEADER_BYTES: usize = 9;

/// Headers that carry credentials, never written to disk (with any header
/// marked sensitive): the sending stack adds them to each attempt.
const SECRET_HEADERS: [HeaderName; 3] = [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE];

/// A field of a record too long for its length prefix (over 4 GiB): the
/// record cannot be stored. Names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooLarge(pub(super) &'static str);

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
    /// A new entry for `request` under `key`: its sensitive headers,
    /// `Authorization`, `Proxy-Authorization` and `Cookie` are left out, and
    /// it gets a fresh idempotency key.
    pub(super) fn new(key: String, request: &Request<Bytes>, idempotency_key: String) -> Entry {
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
            idempotency_key,
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
            stored_at: UNIX_EPOCH,
            attempts: 0,
            last_failure: Some(DAMAGED.into()),
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

    /// The record on disk (without its sequence number, which is its key in
    /// the store).
    pub(super) fn encode(&self) -> Result<Vec<u8>, TooLarge> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.push(VERSION);
        put_bytes(&mut out, "key", self.key.as_bytes())?;
        out.push(u8::from(self.quarantined));
        put_bytes(&mut out, "method", self.method.as_str().as_bytes())?;
        put_bytes(&mut out, "uri", self.uri.to_string().as_bytes())?;
        put_u32(&mut out, prefix("header count", self.headers.len())?);
        for (name, value) in &self.headers {
            put_bytes(&mut out, "header name", name.as_str().as_bytes())?;
            put_bytes(&mut out, "header value", value.as_bytes())?;
        }
        put_bytes(&mut out, "body", &self.body)?;
        put_bytes(&mut out, "idempotency key", self.idempotency_key.as_bytes())?;
        let millis = self
            .stored_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        out.extend_from_slice(&u64::try_from(millis).unwrap_or(u64::MAX).to_le_bytes());
        put_u32(&mut out, self.attempts);
        match &self.last_failure {
            Some(failure) => {
                out.push(1);
                put_bytes(&mut out, "last failure", failure.as_bytes())?;
            }
            None => out.push(0),
        }
        Ok(out)
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
        let count = usize::try_from(reader.u32()?).ok()?;
        // A count the rest of the record cannot hold is damage, refused
        // before any header is read; so are more names than a `HeaderMap`
        // holds (which no encoding of one has).
        if count > reader.0.len() / MIN_HEADER_BYTES {
            return None;
        }
        let mut headers = HeaderMap::new();
        for _ in 0..count {
            let name = HeaderName::from_bytes(reader.bytes()?).ok()?;
            let value = HeaderValue::from_bytes(reader.bytes()?).ok()?;
            headers.try_append(name, value).ok()?;
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

/// The last failure of a record that cannot be decoded.
const DAMAGED: &str = "damaged: the stored record cannot be decoded";

/// The key a record that cannot be decoded is listed under.
pub(super) fn damaged_key(seq: u64) -> String {
    format!("damaged-{seq}")
}

/// The length prefix of `field`, `len` long: an error past `u32::MAX`.
fn prefix(field: &'static str, len: usize) -> Result<u32, TooLarge> {
    u32::try_from(len).map_err(|_| TooLarge(field))
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: &'static str, bytes: &[u8]) -> Result<(), TooLarge> {
    put_u32(out, prefix(field, bytes.len())?);
    out.extend_from_slice(bytes);
    Ok(())
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
        let encoded = entry.encode().unwrap();
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
        let encoded = entry().encode().unwrap();
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

    #[test]
    fn proxy_credentials_and_cookies_are_never_stored() {
        let request = Request::post("http://127.0.0.1:9/hook")
            .header(PROXY_AUTHORIZATION, "Basic cHJveHk6c2VjcmV0")
            .header(COOKIE, "session=s3cret")
            .header("x-kept", "yes")
            .body(Bytes::new())
            .unwrap();
        let entry = Entry::new("k".into(), &request, "idem".into());
        assert!(entry.headers.get(PROXY_AUTHORIZATION).is_none());
        assert!(entry.headers.get(COOKIE).is_none());
        assert_eq!(entry.headers["x-kept"], "yes");
        let text = String::from_utf8_lossy(&entry.encode().unwrap()).into_owned();
        assert!(!text.contains("cHJveHk6c2VjcmV0") && !text.contains("s3cret"));
    }

    #[test]
    fn a_field_past_four_gib_is_an_error_not_a_truncated_length() {
        let past = usize::try_from(u64::from(u32::MAX) + 1).unwrap();
        assert_eq!(prefix("body", past), Err(TooLarge("body")));
        assert_eq!(prefix("body", u32::MAX as usize), Ok(u32::MAX));
    }

    /// Where the header count of `entry`'s encoding is.
    fn header_count_at(entry: &Entry) -> usize {
        let uri = entry.uri.to_string();
        1 + 4 + entry.key.len() + 1 + 4 + entry.method.as_str().len() + 4 + uri.len()
    }

    /// `entry` encoded with `count` headers in place of its own, each with
    /// an empty value, all named `name` or (if `None`) each its own name.
    fn with_headers(entry: &Entry, count: u32, name: Option<&str>) -> Vec<u8> {
        let bare = Entry {
            headers: HeaderMap::new(),
            ..entry.clone()
        }
        .encode()
        .unwrap();
        let at = header_count_at(entry);
        let mut out = bare[..at].to_vec();
        put_u32(&mut out, count);
        for index in 0..count {
            let own = format!("x{index}");
            let name = name.unwrap_or(&own);
            put_bytes(&mut out, "header name", name.as_bytes()).unwrap();
            put_bytes(&mut out, "header value", b"").unwrap();
        }
        out.extend_from_slice(&bare[at + 4..]);
        out
    }

    #[test]
    fn more_headers_than_a_header_map_holds_are_refused_not_panicked_on() {
        let entry = entry();
        let fits = Entry::decode(1, &with_headers(&entry, 1 << 14, None)).unwrap();
        assert_eq!(fits.headers.len(), 1 << 14);
        // Values of one name are not bounded by the map: what it holds, a
        // record holds.
        let one_name = Entry::decode(1, &with_headers(&entry, 40_000, Some("x"))).unwrap();
        assert_eq!(one_name.headers.get_all("x").iter().count(), 40_000);
        let again = Entry::decode(1, &one_name.encode().unwrap());
        assert_eq!(again, Some(one_name));
        for count in [(1 << 15) + 1, 40_000] {
            let record = with_headers(&entry, count, None);
            assert!(Entry::decode(1, &record).is_none(), "{count}");
        }
        // A count the record cannot hold, with nothing after it.
        let mut huge = entry.encode().unwrap();
        let at = header_count_at(&entry);
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Entry::decode(1, &huge).is_none());
    }

    /// xorshift64*: deterministic, so that a failing case can be replayed.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound.max(1) as u64) as usize
        }
    }

    /// A damaged copy of `valid`, whose header count is at `count_at`.
    fn mutate(random: &mut Random, valid: &[u8], count_at: usize) -> Vec<u8> {
        let mut bytes = valid.to_vec();
        match random.below(6) {
            0 => {
                for _ in 0..=random.below(8) {
                    let bit = random.below(bytes.len() * 8);
                    bytes[bit / 8] ^= 1 << (bit % 8);
                }
            }
            1 => bytes.truncate(random.below(bytes.len())),
            2 => {
                // A length (or any four bytes) set to something huge.
                let huge = [
                    u32::MAX,
                    1 << 31,
                    (1 << 16) + random.below(1 << 16) as u32,
                    (valid.len() + 1 + random.below(16)) as u32,
                    random.next() as u32,
                ];
                let value = huge[random.below(huge.len())];
                let at = random.below(bytes.len() - 3);
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            3 => {
                let count = (1u32 << 16) + random.below(1 << 20) as u32;
                bytes[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
            }
            4 => {
                bytes = (0..random.below(300))
                    .map(|_| random.next() as u8)
                    .collect();
                if random.below(2) == 0 && !bytes.is_empty() {
                    bytes[0] = VERSION;
                }
            }
            _ => {
                let from = random.below(bytes.len());
                let len = random.below(bytes.len() - from);
                let chunk = bytes[from..from + len].to_vec();
                let at = random.below(bytes.len());
                bytes.splice(at..at, chunk);
            }
        }
        bytes
    }

    /// `OUTBOX_FUZZ_CASES` inputs, a million unless told: every one decodes
    /// to a record or to nothing, never a panic, and what decodes encodes
    /// back to the same record.
    #[test]
    fn the_decoder_survives_a_million_damaged_records() {
        let cases: u64 = std::env::var("OUTBOX_FUZZ_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(1_000_000);
        let full = entry();
        let bare = Entry {
            headers: HeaderMap::new(),
            last_failure: None,
            ..full.clone()
        };
        let bases: Vec<(Vec<u8>, usize)> = [&full, &bare]
            .into_iter()
            .map(|entry| (entry.encode().unwrap(), header_count_at(entry)))
            .collect();
        // More header names than a `HeaderMap` holds, all there: a base for
        // one case in ten thousand, as it is large and slow to refuse.
        let crowded = (
            with_headers(&bare, (1 << 15) + 8, None),
            header_count_at(&bare),
        );
        let seed = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let mut random = Random(u64::from(seed) | 1);
        let mut decoded = 0u64;
        for case in 0..cases {
            let (valid, count_at) = match random.below(10_000) {
                0 => &crowded,
                _ => &bases[random.below(bases.len())],
            };
            let bytes = mutate(&mut random, valid, *count_at);
            if let Some(entry) = Entry::decode(case, &bytes) {
                decoded += 1;
                let again = Entry::decode(case, &entry.encode().unwrap());
                assert_eq!(again.as_ref(), Some(&entry), "seed {seed}, case {case}");
            }
        }
        // Some damage (a flipped bit in a body) still reads as a record.
        assert!(cases < 1000 || decoded > 0, "seed {seed}");
    }
}
