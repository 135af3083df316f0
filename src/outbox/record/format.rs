//! The record format on disk: a version byte, then the record in
//! [postcard](https://docs.rs/postcard).
//!
//! Postcard because it is serde's compact binary format with a stable,
//! documented wire format: lengths are varints of the full `usize` (never
//! truncated), borrowed strings and bytes are read without copying, and a
//! record that ends early or runs long is an error, never a panic. JSON
//! would spend base64 or escapes on bodies; bincode's wire format is not
//! specified as one to keep files in.
//!
//! The version byte comes first so that a later format is told apart from
//! this one before anything is decoded: a record of another version is
//! never misread as this one.

use std::{
    borrow::Cow,
    time::{Duration, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::{Deserialize, Serialize, Serializer};

use super::Entry;

/// The first byte of every record of this format.
const VERSION: u8 = 2;

/// What is written for an [`Entry`] (its sequence number is its key in the
/// store). Borrows from the entry when writing, from the bytes when reading.
#[derive(Serialize, Deserialize)]
struct Record<'a> {
    key: &'a str,
    quarantined: bool,
    method: &'a str,
    #[serde(borrow)]
    uri: Cow<'a, str>,
    #[serde(borrow)]
    headers: Vec<Header<'a>>,
    #[serde(serialize_with = "as_bytes")]
    body: &'a [u8],
    idempotency_key: &'a str,
    #[serde(borrow)]
    tag: Option<&'a str>,
    stored_at_ms: u64,
    attempts: u32,
    #[serde(borrow)]
    last_failure: Option<&'a str>,
}

#[derive(Serialize, Deserialize)]
struct Header<'a> {
    name: &'a str,
    #[serde(serialize_with = "as_bytes")]
    value: &'a [u8],
}

/// Writes bytes as one byte string (serde writes a slice as a sequence).
fn as_bytes<S: Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

impl Entry {
    /// The record on disk.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let millis = self
            .stored_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let record = Record {
            key: &self.key,
            quarantined: self.quarantined,
            method: self.method.as_str(),
            uri: Cow::Owned(self.uri.to_string()),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.as_str(),
                    value: value.as_bytes(),
                })
                .collect(),
            body: &self.body,
            idempotency_key: &self.idempotency_key,
            tag: self.tag.as_deref(),
            stored_at_ms: u64::try_from(millis).unwrap_or(u64::MAX),
            attempts: self.attempts,
            last_failure: self.last_failure.as_deref(),
        };
        postcard::to_extend(&record, vec![VERSION])
    }

    /// Reads a record back; `None` for bytes this format did not write.
    pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Option<Entry> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION {
            return None;
        }
        let (record, rest) = postcard::take_from_bytes::<Record<'_>>(rest).ok()?;
        if !rest.is_empty() {
            return None;
        }
        let mut headers = HeaderMap::new();
        for header in &record.headers {
            let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
            let value = HeaderValue::from_bytes(header.value).ok()?;
            // More names than a `HeaderMap` holds: no encoding of one has
            // them.
            headers.try_append(name, value).ok()?;
        }
        Some(Entry {
            seq,
            key: record.key.to_owned(),
            quarantined: record.quarantined,
            method: Method::from_bytes(record.method.as_bytes()).ok()?,
            uri: Uri::try_from(record.uri.as_ref()).ok()?,
            headers,
            body: Bytes::copy_from_slice(record.body),
            idempotency_key: record.idempotency_key.to_owned(),
            tag: record.tag.map(str::to_owned),
            stored_at: UNIX_EPOCH.checked_add(Duration::from_millis(record.stored_at_ms))?,
            attempts: record.attempts,
            last_failure: record.last_failure.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{
        header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION},
        Request,
    };
    use std::time::SystemTime;

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
        let mut entry = Entry::new("k1".into(), &request, Some("complete".into())).stored_as(7);
        entry.failed(3, "POST /hook returned 502");
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
        assert_eq!(
            request.headers()[crate::outbox::IDEMPOTENCY_KEY],
            entry.idempotency_key.as_str()
        );
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
        let entry = Entry::new("k".into(), &request, None);
        assert!(entry.headers.get(PROXY_AUTHORIZATION).is_none());
        assert!(entry.headers.get(COOKIE).is_none());
        assert_eq!(entry.headers["x-kept"], "yes");
        let text = String::from_utf8_lossy(&entry.encode().unwrap()).into_owned();
        assert!(!text.contains("cHJveHk6c2VjcmV0") && !text.contains("s3cret"));
    }

    #[test]
    fn lengths_are_varints_of_the_full_length_not_truncated() {
        // A length past `u32::MAX` as postcard writes it: a five-byte varint
        // whose value a 32-bit prefix would have cut to zero.
        let past = u64::from(u32::MAX) + 1;
        let written = postcard::to_stdvec(&past).unwrap();
        assert_eq!(postcard::from_bytes::<u64>(&written).unwrap(), past);
        assert_eq!(written.len(), 5);
    }

    /// `entry` encoded with `count` headers in place of its own, each with
    /// an empty value, all named `name` or (if `None`) each its own name.
    fn with_headers(entry: &Entry, count: u32, name: Option<&str>) -> Vec<u8> {
        let mut crowded = entry.clone();
        crowded.headers = HeaderMap::new();
        let names: Vec<String> = (0..count)
            .map(|index| name.map_or_else(|| format!("x{index}"), str::to_owned))
            .collect();
        let bare = crowded.encode().unwrap();
        let (mut record, _) = postcard::take_from_bytes::<Record<'_>>(&bare[1..]).unwrap();
        record.headers = names
            .iter()
            .map(|name| Header { name, value: b"" })
            .collect();
        postcard::to_extend(&record, vec![VERSION]).unwrap()
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
        // A header count the record cannot hold, with nothing after it.
        let mut huge = with_headers(&entry, 0, None);
        let at = header_count_at(&entry);
        huge.splice(at..=at, postcard::to_stdvec(&u64::MAX).unwrap());
        assert!(Entry::decode(1, &huge).is_none());
    }

    /// Where the header count of `entry`'s encoding is: after the version
    /// byte and the fields before the headers, which postcard writes one
    /// after the other.
    fn header_count_at(entry: &Entry) -> usize {
        let before = (
            &entry.key,
            entry.quarantined,
            entry.method.as_str(),
            entry.uri.to_string(),
        );
        1 + postcard::to_stdvec(&before).unwrap().len()
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

    /// A damaged copy of `valid`, whose header count (one byte) is at
    /// `count_at`.
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
                // A length (or any byte) set to something huge.
                let huge = [
                    u64::MAX,
                    1 << 31,
                    (1 << 16) + random.below(1 << 16) as u64,
                    (valid.len() + 1 + random.below(16)) as u64,
                    random.next(),
                ];
                let value = huge[random.below(huge.len())];
                let at = random.below(bytes.len());
                bytes.splice(at..=at, postcard::to_stdvec(&value).unwrap());
            }
            3 => {
                let count = (1u64 << 16) + random.below(1 << 20) as u64;
                let varint = postcard::to_stdvec(&count).unwrap();
                bytes.splice(count_at..=count_at, varint);
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
        let mut bare = full.clone();
        bare.headers = HeaderMap::new();
        bare.last_failure = None;
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
        let seed = SystemTime::now()
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
