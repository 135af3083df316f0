//! Reading what a server said when it refused a request, as untrusted text.
//!
//! A server's error body goes into errors, events, the fallback report sent
//! back to the server and the outbox file. A hostile or broken server can put
//! anything there: the client's own token echoed back (upper-cased, or
//! percent-encoded as in a URL it builds), escape codes that
//! forge a log line, megabytes of text. Everything taken from a response is
//! [`clean`]ed first.

use std::{fmt::Write as _, time::Duration};

use bytes::Buf;
use http::{header::LOCATION, HeaderMap, StatusCode};
use http_body_util::BodyExt;

/// How much text taken from a response is kept, in bytes, after decoding and
/// escaping.
pub(crate) const MAX_TEXT: usize = 4 * 1024;

/// How much of a body is read: more than is kept, so that a secret cut by
/// the end of the read cannot land in the text that is kept.
const MAX_READ: usize = 4 * MAX_TEXT;

/// What a secret is replaced with.
pub(crate) const REDACTED: &str = "[redacted]";

/// The shortest tail of the text that is taken for the start of a secret cut
/// short, and redacted too.
const MIN_SECRET_TAIL: usize = 4;

/// The start of a body, as cleaned text (see [`clean`]); what could be read
/// within `timeout` if the server stalls. Reading it also lets the connection
/// go back to the pool.
pub(crate) async fn body_start<B: http_body::Body>(
    body: B,
    timeout: Duration,
    secrets: &[&str],
) -> String {
    let start = read_start(body, timeout).await;
    clean(String::from_utf8_lossy(&start).trim(), secrets)
}

/// The first bytes of a body, at most what is read of one; what could be
/// read within `timeout`. A success's body is read so, and dropped unread as
/// text: the connection goes back to the pool.
pub(crate) async fn read_start<B: http_body::Body>(body: B, timeout: Duration) -> Vec<u8> {
    let mut body = std::pin::pin!(body);
    let mut start = Vec::new();
    let read = async {
        while start.len() < MAX_READ {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() && start.len() < MAX_READ {
                            let chunk = data.chunk();
                            let take = chunk.len().min(MAX_READ - start.len());
                            start.extend_from_slice(&chunk[..take]);
                            data.advance(take);
                        }
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    // A body cut short by the timeout or an error is still worth showing.
    let _ = tokio::time::timeout(timeout, read).await;
    start
}

/// Text from a server made safe to show, store and send back: each of
/// `secrets` (and a tail that starts one, cut short) replaced by
/// `[redacted]`, however it is written (see [`redact`]), control characters
/// escaped (`\n`, `\u{1b}`), the whole at most [`MAX_TEXT`] bytes, cut on a
/// character boundary.
pub(crate) fn clean(text: &str, secrets: &[&str]) -> String {
    let redacted = redact(text, secrets);
    let mut cleaned = String::with_capacity(redacted.len().min(MAX_TEXT));
    for character in redacted.chars() {
        let start = cleaned.len();
        if character.is_control() {
            // Writing to a String cannot fail.
            let _ = write!(cleaned, "{}", character.escape_default());
        } else {
            cleaned.push(character);
        }
        if cleaned.len() > MAX_TEXT {
            // Never half an escape or half a character.
            cleaned.truncate(start);
            break;
        }
    }
    cleaned
}

/// `text` with each of `secrets` replaced by `[redacted]`, as it is or as a
/// server may echo it: in any ASCII case, and each byte either as it is or
/// percent-encoded (hex digits of either case, encoded once or more: `%2F`,
/// `%2f`, `%252F`), a space also as form-encoding's `+`. A secret cut short
/// by the end of the text, from [`MIN_SECRET_TAIL`] bytes on, is redacted
/// too.
fn redact(text: &str, secrets: &[&str]) -> String {
    let secrets: Vec<&[u8]> = secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .map(|secret| secret.as_bytes())
        .collect();
    if secrets.is_empty() {
        return text.to_owned();
    }
    // The bytes a secret can start with, however written: the rest of the
    // text is copied without a search.
    let mut starts = [false; 256];
    starts[usize::from(b'%')] = true;
    for secret in &secrets {
        let first = secret[0];
        starts[usize::from(first.to_ascii_lowercase())] = true;
        starts[usize::from(first.to_ascii_uppercase())] = true;
        starts[usize::from(b'+')] |= first == b' ';
    }
    let text = text.as_bytes();
    let mut ends = Ends::default();
    let mut redacted = Vec::with_capacity(text.len());
    // `text` before `copied` is in `redacted`, as it is or redacted.
    let mut copied = 0;
    let mut at = 0;
    while let Some(skip) = text[at..]
        .iter()
        .position(|&byte| starts[usize::from(byte)])
    {
        at += skip;
        let found = secrets
            .iter()
            .filter_map(|secret| ends.secret_at(text, at, secret))
            .max();
        match found {
            Some(end) => {
                redacted.extend_from_slice(&text[copied..at]);
                redacted.extend_from_slice(REDACTED.as_bytes());
                (at, copied) = (end, end);
            }
            None => at += 1,
        }
    }
    redacted.extend_from_slice(&text[copied..]);
    // A match starts and ends on character boundaries (a secret is UTF-8,
    // and an escape is ASCII), so this is UTF-8 whole; lossy all the same,
    // never a panic.
    String::from_utf8(redacted)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// Where the bytes of a secret read so far can end in the text: few places,
/// as a byte is written in at most a handful of ways. Kept from one search
/// to the next, to spare an allocation at each place of the text.
#[derive(Default)]
struct Ends {
    read: Vec<usize>,
    next: Vec<usize>,
}

impl Ends {
    /// Where `secret`, written as [`redact`] says, ends if it starts at
    /// `start` of `text`, the longest way; the end of the text if the text
    /// ends inside it, past [`MIN_SECRET_TAIL`] of its bytes.
    fn secret_at(&mut self, text: &[u8], start: usize, secret: &[u8]) -> Option<usize> {
        let Ends { read, next } = self;
        read.clear();
        read.push(start);
        for (count, &byte) in secret.iter().enumerate() {
            next.clear();
            for &end in read.iter() {
                each_written_byte(text, end, |decoded, after| {
                    if decoded.eq_ignore_ascii_case(&byte) && !next.contains(&after) {
                        next.push(after);
                    }
                });
            }
            if next.is_empty() {
                let cut_short =
                    count >= MIN_SECRET_TAIL && read.iter().any(|&end| is_cut_escape(&text[end..]));
                return cut_short.then_some(text.len());
            }
            std::mem::swap(read, next);
        }
        read.iter().copied().max()
    }
}

/// Each way a byte can be written at `at` of `text`, handed to `way` as the
/// byte it stands for and where it ends: the byte itself; `+` for a space
/// too; and a percent-escape, `%2F`, and the escape of its `%` (`%252F`) as
/// often as it is escaped again.
fn each_written_byte(text: &[u8], at: usize, mut way: impl FnMut(u8, usize)) {
    let Some(&byte) = text.get(at) else {
        return;
    };
    way(byte, at + 1);
    if byte == b'+' {
        way(b' ', at + 1);
    }
    if byte == b'%' {
        let mut at = at + 1;
        while let Some(decoded) = text.get(at..at + 2).and_then(hex_byte) {
            at += 2;
            way(decoded, at);
            if decoded != b'%' {
                break;
            }
        }
    }
}

/// Two hex digits of either case, `2F` or `2f`, as the byte they stand for.
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let digit = |digit: u8| char::from(digit).to_digit(16);
    match digits {
        &[high, low] => u8::try_from(digit(high)? * 16 + digit(low)?).ok(),
        _ => None,
    }
}

/// Whether `rest` is empty, or the start of a percent-escape that the end
/// of the text cut: `%`, `%2`, `%25`, `%252`...
fn is_cut_escape(rest: &[u8]) -> bool {
    let Some(mut digits) = rest.strip_prefix(b"%") else {
        return rest.is_empty();
    };
    while let Some(after) = digits.strip_prefix(b"25") {
        digits = after;
    }
    digits.len() <= 1 && digits.iter().all(u8::is_ascii_hexdigit)
}

/// For a redirect, what to tell the caller: where the server points, and
/// that the request is not sent there. `None` for any other status.
pub(crate) fn redirect_note(status: StatusCode, headers: &HeaderMap) -> Option<String> {
    if !status.is_redirection() {
        return None;
    }
    let location = headers
        .get(LOCATION)
        .map(|value| clean(&String::from_utf8_lossy(value.as_bytes()), &[]));
    Some(match location {
        Some(location) => {
            format!("redirect to {location:?} not followed: set the final URL instead")
        }
        None => "redirect not followed: set the final URL instead".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_even_cut_short() {
        let cleaned = clean("got Bearer s3cr3t-token and s3cr3t-to", &["s3cr3t-token"]);
        assert_eq!(cleaned, "got Bearer [redacted] and [redacted]");
        assert_eq!(clean("abc", &[""]), "abc");
    }

    /// A token with reserved characters and a space, in every form a server
    /// may echo it: the whole text is the token, redacted.
    #[test]
    fn secrets_are_redacted_in_any_ascii_case_and_percent_encoded() {
        let token = "Tok/4f+2c=9a 7e";
        for echoed in [
            "Tok/4f+2c=9a 7e",
            "TOK/4F+2C=9A 7E",
            "tok/4f+2c=9a 7e",
            // Percent-encoded, hex digits in either case.
            "Tok%2F4f%2B2c%3D9a%207e",
            "Tok%2f4f%2b2c%3d9a%207e",
            "%54%6F%6B%2F%34%66%2B%32%63%3D%39%61%20%37%65",
            // Form-encoded: a space as `+`.
            "Tok%2F4f%2B2c%3D9a+7e",
            // Encoded twice, as in a URL carried in another's query.
            "Tok%252F4f%252B2c%253D9a%25207e",
            // Partly, and upper-cased after encoding.
            "TOK/4F%2B2C=9A%207E",
        ] {
            let text = format!("got <{echoed}> back");
            assert_eq!(clean(&text, &[token]), "got <[redacted]> back", "{echoed}");
        }
    }

    #[test]
    fn a_secret_cut_short_is_redacted_encoded_too() {
        let token = "s3cr3t/token";
        assert_eq!(clean("got S3CR3T%2Ft", &[token]), "got [redacted]");
        assert_eq!(clean("got s3cr3t%2", &[token]), "got [redacted]");
        assert_eq!(clean("got s3cr3t%25", &[token]), "got [redacted]");
        assert_eq!(clean("got s3c", &[token]), "got s3c");
    }

    #[test]
    fn text_like_an_escape_that_is_no_secret_stays() {
        let text = "100% of %zz, %2F and %2525 s3cr3t-x";
        assert_eq!(clean(text, &["s3cr3t/"]), text);
        assert_eq!(clean("a%25b", &["%b"]), "a[redacted]");
        assert_eq!(clean("a%b", &["%b"]), "a[redacted]");
    }

    #[test]
    fn every_secret_is_redacted() {
        let cleaned = clean("one S3CR3T, two P%41SS", &["s3cr3t", "pass"]);
        assert_eq!(cleaned, "one [redacted], two [redacted]");
    }

    /// `secret` written as `ways` say, one way a character: as it is,
    /// upper- or lower-cased, percent-encoded with upper- or lower-case hex
    /// digits, encoded twice, or form-encoded.
    fn written(secret: &str, ways: &[u8]) -> String {
        let mut written = String::new();
        for (character, way) in secret.chars().zip(ways.iter().cycle()) {
            match way {
                0 => written.push(character.to_ascii_uppercase()),
                1 => written.push(character.to_ascii_lowercase()),
                _ => {
                    let mut bytes = [0; 4];
                    for &byte in character.encode_utf8(&mut bytes).as_bytes() {
                        let _ = match way {
                            2 => write!(written, "%{byte:02X}"),
                            3 => write!(written, "%{byte:02x}"),
                            4 => write!(written, "%25{byte:02X}"),
                            _ if byte == b' ' => write!(written, "+"),
                            _ => write!(written, "%{byte:02X}"),
                        };
                    }
                }
            }
        }
        written
    }

    proptest::proptest! {
        #[test]
        fn a_secret_never_survives_however_it_is_written(
            secret in "[A-Za-z0-9 ._~!$&'()*+,;=:@/?#%é-]{5,24}",
            ways in proptest::collection::vec(0u8..6, 1..24),
            before in "[ -~]{0,12}",
            after in "[ -~]{0,12}",
        ) {
            // The marker itself is no leak.
            proptest::prop_assume!(!REDACTED.contains(&secret.to_ascii_lowercase()));
            let written = written(&secret, &ways);
            let cleaned = clean(&format!("{before}{written}{after}"), &[&secret]);
            let cleaned = cleaned.to_ascii_lowercase();
            proptest::prop_assert!(!cleaned.contains(&written.to_ascii_lowercase()), "{}", cleaned);
            proptest::prop_assert!(!cleaned.contains(&secret.to_ascii_lowercase()), "{}", cleaned);
            proptest::prop_assert!(cleaned.contains(REDACTED), "{}", cleaned);
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        let cleaned = clean("line\nINFO forged\u{1b}[31m\0", &[]);
        assert_eq!(cleaned, "line\\nINFO forged\\u{1b}[31m\\u{0}");
        assert!(!cleaned.chars().any(char::is_control));
    }

    #[test]
    fn text_is_capped_after_decoding_and_escaping() {
        let wide = "é".repeat(MAX_TEXT);
        let cleaned = clean(&wide, &[]);
        assert!(cleaned.len() <= MAX_TEXT);
        assert!(cleaned.len() >= MAX_TEXT - 1);
        let escapes = "\u{1}".repeat(MAX_TEXT);
        let cleaned = clean(&escapes, &[]);
        assert!(cleaned.len() <= MAX_TEXT);
        assert!(cleaned.ends_with("\\u{1}"));
    }

    #[test]
    fn only_redirects_get_a_note() {
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, http::HeaderValue::from_static("https://a.test/x"));
        let note = redirect_note(StatusCode::MOVED_PERMANENTLY, &headers).unwrap();
        assert!(note.contains("https://a.test/x"), "{note}");
        assert!(note.contains("final URL"), "{note}");
        assert_eq!(redirect_note(StatusCode::NOT_FOUND, &headers), None);
    }
}
