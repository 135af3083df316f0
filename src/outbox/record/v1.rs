//! The first record format, read only to migrate a file written in it: a
//! version byte 1, then length-prefixed fields (little-endian `u32`
//! lengths).

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use super::Entry;

/// The fewest bytes a header takes in a record: two length prefixes and a
/// name of one byte. Bounds a stored header count by the bytes that follow.
const MIN_HEADER_BYTES: usize = 9;

/// Reads a record of the first format; `None` for anything else.
pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Option<Entry> {
    let mut reader = Reader(bytes);
    if reader.byte()? != 1 {
        return None;
    }
    let key = reader.text()?;
    let quarantined = reader.byte()? != 0;
    let method = Method::from_bytes(reader.bytes()?).ok()?;
    let uri = Uri::try_from(reader.bytes()?).ok()?;
    let count = usize::try_from(reader.u32()?).ok()?;
    // A count the rest of the record cannot hold is damage, refused before
    // any header is read.
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
        tag: None,
        stored_at,
        attempts,
        last_failure,
    })
}

/// A record of the first format, built field by field: what a file an
/// older version wrote holds.
#[cfg(test)]
pub(crate) fn record(key: &str, uri: &str, body: &[u8], attempts: u32) -> Vec<u8> {
    let mut out = vec![1];
    let put = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_le_bytes());
        out.extend_from_slice(bytes);
    };
    put(&mut out, key.as_bytes());
    out.push(0);
    put(&mut out, b"POST");
    put(&mut out, uri.as_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    put(&mut out, b"content-type");
    put(&mut out, b"application/json");
    put(&mut out, body);
    put(&mut out, b"idem-1");
    out.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
    out.extend_from_slice(&attempts.to_le_bytes());
    out.push(1);
    put(&mut out, b"POST /hook returned 502");
    out
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
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_format_record_is_read_field_by_field() {
        let bytes = record("k1", "http://127.0.0.1:9/hook", b"{}", 3);
        let entry = decode(7, &bytes).unwrap();
        assert_eq!(entry.key, "k1");
        assert_eq!(entry.uri, "http://127.0.0.1:9/hook");
        assert_eq!(entry.headers["content-type"], "application/json");
        assert_eq!(entry.attempts, 3);
        assert_eq!(entry.idempotency_key, "idem-1");
        assert_eq!(entry.tag, None);
        assert_eq!(
            entry.last_failure.as_deref(),
            Some("POST /hook returned 502")
        );
        for len in 0..bytes.len() {
            assert!(decode(7, &bytes[..len]).is_none(), "cut at {len}");
        }
    }
}
