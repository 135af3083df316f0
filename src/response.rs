//! Reading what a server said when it refused a request, as untrusted text.
//!
//! A server's error body goes into errors, events, the fallback report sent
//! back to the server and the outbox file. A hostile or broken server can put
//! anything there: the client's own token echoed back, escape codes that
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
/// `[redacted]`, control characters escaped (`\n`, `\u{1b}`), the whole at
/// most [`MAX_TEXT`] bytes, cut on a character boundary.
pub(crate) fn clean(text: &str, secrets: &[&str]) -> String {
    let mut redacted = text.to_owned();
    for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
        if redacted.contains(secret) {
            redacted = redacted.replace(secret, REDACTED);
        }
        // A secret cut by the end of the text still gives most of it away.
        let tail = (MIN_SECRET_TAIL..secret.len())
            .rev()
            .filter(|&len| secret.is_char_boundary(len))
            .find(|&len| redacted.ends_with(&secret[..len]));
        if let Some(len) = tail {
            redacted.truncate(redacted.len() - len);
            redacted.push_str(REDACTED);
        }
    }
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
