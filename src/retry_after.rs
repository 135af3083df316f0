//! Honouring the server's `Retry-After` on 429, 503 and 409.
//!
//! When a 429 (Too Many Requests), 503 (Service Unavailable) or 409 (Conflict:
//! an idempotent server's "still running") carries a `Retry-After` header, the server's delay replaces the schedule's delay for
//! that retry, shorter or longer, but never longer than a cap (by default
//! five minutes). The number of attempts does not change.
//!
//! Both forms of the header are understood: delay-seconds (`120`) and an
//! HTTP-date (`Wed, 21 Oct 2026 07:28:00 GMT`). A value that is malformed,
//! negative, fractional, too large for a `u64`, or a date not in the future
//! is ignored and the schedule's delay is used.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use http::HeaderValue;
//! use tower_terminal_retry::{parse_retry_after, RetryAfter};
//!
//! let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
//! assert_eq!(parse_retry_after(&HeaderValue::from_static("120"), now), Some(Duration::from_secs(120)));
//! assert_eq!(parse_retry_after(&HeaderValue::from_static("-1"), now), None);
//! assert_eq!(parse_retry_after(&HeaderValue::from_static("1.5"), now), None);
//! let date = HeaderValue::from_static("Tue, 14 Nov 2023 22:13:27 GMT"); // now + 7 s
//! assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(7)));
//!
//! // A layer that waits for the server at most 30 s, or one that ignores it.
//! let patient = RetryAfter::honor_up_to(Duration::from_secs(30))?;
//! let deaf = RetryAfter::ignore();
//! # let _ = (patient, deaf);
//! # Ok::<(), tower_terminal_retry::ConfigError>(())
//! ```

use std::time::{Duration, SystemTime};

use http::{header::RETRY_AFTER, HeaderMap, HeaderValue, StatusCode};

use crate::{error::ConfigError, schedule::check_delay};

/// The default cap on a server-given delay: five minutes.
pub(crate) const DEFAULT_CAP: Duration = Duration::from_secs(5 * 60);

/// Whether, and up to how long, the server's `Retry-After` is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter {
    cap: Option<Duration>,
}

impl RetryAfter {
    /// Honour `Retry-After` on 429, 503 and 409, clamping the delay to `cap`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DelayTooLong`] when `cap` is over
    /// 24 hours.
    pub fn honor_up_to(cap: Duration) -> Result<RetryAfter, ConfigError> {
        Ok(RetryAfter {
            cap: Some(check_delay(cap)?),
        })
    }

    /// Ignore `Retry-After`: the schedule alone sets the delays.
    pub fn ignore() -> RetryAfter {
        RetryAfter { cap: None }
    }

    /// The server's delay for a response of this status and these headers,
    /// as seen at `now`, clamped to the cap; `None` when the schedule's
    /// delay applies (another status, no header, a value
    /// [`parse_retry_after`] refuses, or `Retry-After` ignored). The rule the
    /// policy follows, public for a sender of its own (the outbox pauses a
    /// destination by it).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::{header::RETRY_AFTER, HeaderMap, HeaderValue, StatusCode};
    /// use tower_terminal_retry::RetryAfter;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert(RETRY_AFTER, HeaderValue::from_static("600"));
    /// let capped = RetryAfter::honor_up_to(Duration::from_secs(60))?;
    /// let now = SystemTime::now();
    /// assert_eq!(capped.delay(StatusCode::TOO_MANY_REQUESTS, &headers, now), Some(Duration::from_secs(60)));
    /// // A 500 is not asked to wait.
    /// assert_eq!(capped.delay(StatusCode::INTERNAL_SERVER_ERROR, &headers, now), None);
    /// assert_eq!(RetryAfter::ignore().delay(StatusCode::TOO_MANY_REQUESTS, &headers, now), None);
    /// # Ok::<(), tower_terminal_retry::ConfigError>(())
    /// ```
    pub fn delay(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<Duration> {
        let cap = self.cap?;
        let honoured = [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::CONFLICT,
        ];
        if !honoured.contains(&status) {
            return None;
        }
        let delay = parse_retry_after(headers.get(RETRY_AFTER)?, now)?;
        Some(delay.min(cap))
    }
}

impl Default for RetryAfter {
    /// Honour `Retry-After` up to five minutes.
    fn default() -> Self {
        RetryAfter {
            cap: Some(DEFAULT_CAP),
        }
    }
}

/// Parses a `Retry-After` value as seen at `now`: delay-seconds, or the time
/// from `now` to an HTTP-date.
///
/// Returns `None`, never panics, for anything else: no digits, a sign, a
/// fraction, a number too large for a `u64`, bytes that are not text, a date
/// that cannot be parsed, or a date at or before `now`.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim_matches([' ', '\t']);
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        return text.parse::<u64>().ok().map(Duration::from_secs);
    }
    let date = httpdate::parse_http_date(text).ok()?;
    date.duration_since(now)
        .ok()
        .filter(|delay| !delay.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn parse(value: &'static str) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_static(value), at(1_700_000_000))
    }

    #[test]
    fn delay_seconds() {
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 120\t"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse("18446744073709551615"),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn malformed_values_fall_back() {
        for value in [
            "",
            " ",
            "-1",
            "+5",
            "1.5",
            "1e3",
            "5 s",
            "18446744073709551616",
            "99999999999999999999999",
            "soon",
            "Tue, 14 Nov 2023 25:14:20 GMT",
        ] {
            assert_eq!(parse(value), None, "{value:?}");
        }
        let opaque = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert_eq!(parse_retry_after(&opaque, at(0)), None);
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let now = at(1_700_000_000); // Tue, 14 Nov 2023 22:13:20 GMT
        for value in [
            "Tue, 14 Nov 2023 22:13:50 GMT",
            "Tuesday, 14-Nov-23 22:13:50 GMT",
            "Tue Nov 14 22:13:50 2023",
        ] {
            let value = HeaderValue::from_static(value);
            assert_eq!(
                parse_retry_after(&value, now),
                Some(Duration::from_secs(30)),
                "{value:?}"
            );
        }
    }

    #[test]
    fn past_or_present_dates_fall_back() {
        assert_eq!(parse("Tue, 14 Nov 2023 22:13:20 GMT"), None);
        assert_eq!(parse("Tue, 14 Nov 2023 22:13:19 GMT"), None);
        assert_eq!(parse("Thu, 01 Jan 1970 00:00:00 GMT"), None);
    }

    #[test]
    fn only_429_503_and_409_are_honoured_and_clamped() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("600"));
        let now = at(0);
        let policy = RetryAfter::default();
        assert_eq!(
            policy.delay(StatusCode::TOO_MANY_REQUESTS, &headers, now),
            Some(DEFAULT_CAP)
        );
        assert_eq!(
            policy.delay(StatusCode::SERVICE_UNAVAILABLE, &headers, now),
            Some(DEFAULT_CAP)
        );
        assert_eq!(
            policy.delay(StatusCode::CONFLICT, &headers, now),
            Some(DEFAULT_CAP)
        );
        for status in [StatusCode::BAD_GATEWAY, StatusCode::INTERNAL_SERVER_ERROR] {
            assert_eq!(policy.delay(status, &headers, now), None);
        }
        assert_eq!(
            RetryAfter::ignore().delay(StatusCode::TOO_MANY_REQUESTS, &headers, now),
            None
        );
        let short = RetryAfter::honor_up_to(Duration::from_secs(10)).unwrap();
        assert_eq!(
            short.delay(StatusCode::TOO_MANY_REQUESTS, &headers, now),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn cap_over_a_day_is_an_error() {
        assert!(RetryAfter::honor_up_to(Duration::from_secs(86_401)).is_err());
        assert_eq!(RetryAfter::default().cap, Some(DEFAULT_CAP));
        assert_eq!(RetryAfter::ignore().cap, None);
    }
}
