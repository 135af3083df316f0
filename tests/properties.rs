//! Property tests: the `Retry-After` parser, the status rule and the policy,
//! whatever the status and header bytes.

use std::time::{Duration, SystemTime};

use http::{header::RETRY_AFTER, HeaderName, HeaderValue, Request, Response, StatusCode};
use proptest::{collection::vec, prelude::*};
use tower::retry::Policy;
use tower_terminal_retry::{
    classify_status, parse_retry_after, Classify, DefaultClassifier, Outcome, Schedule,
    TerminalRetryPolicy,
};

/// The cap on a server-given delay that `RetryAfter::default()` documents:
/// five minutes.
const DEFAULT_CAP: Duration = Duration::from_secs(5 * 60);

/// The rule, stated apart from the crate: 2xx a success; 5xx and above,
/// 408 and 429 transient; everything else (1xx, 3xx, the rest of 4xx)
/// permanent.
fn expected_outcome(code: u16) -> Outcome {
    if (200..300).contains(&code) {
        Outcome::Success
    } else if code >= 500 || code == 408 || code == 429 {
        Outcome::Transient
    } else {
        Outcome::Permanent
    }
}

/// Any byte a header value accepts: tab, visible ASCII and space, and
/// every byte from 0x80 (obs-text).
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff]
}

/// Header values: arbitrary bytes, or shapes close to what the parser
/// understands, so both of its paths are exercised.
fn retry_after_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        vec(header_byte(), 0..48).prop_map(|bytes| HeaderValue::from_bytes(&bytes).unwrap()),
        "[ \t]{0,2}[+-]?[0-9]{0,24}(\\.[0-9]{1,3})?[ \t]{0,2}"
            .prop_map(|text| HeaderValue::from_str(&text).unwrap()),
        "(Mon|Tue|Wed|Thu|Fri|Sat|Sun|Foo), [0-9]{1,2} (Jan|Feb|Nov|Dec|Xyz) [0-9]{1,5} [0-9]{2}:[0-9]{2}:[0-9]{2} (GMT|UTC)"
            .prop_map(|text| HeaderValue::from_str(&text).unwrap()),
        (0u64..4_000_000_000).prop_map(|secs| {
            let date = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            HeaderValue::from_str(&httpdate::fmt_http_date(date)).unwrap()
        }),
    ]
}

/// Any moment from 1970 to 2096.
fn any_now() -> impl Strategy<Value = SystemTime> {
    (0u64..4_000_000_000).prop_map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

proptest! {
    #[test]
    fn parse_retry_after_never_panics_and_returns_only_what_the_header_says(
        value in retry_after_value(),
        now in any_now(),
    ) {
        let parsed = parse_retry_after(&value, now);
        if let Some(delay) = parsed {
            // Delay-seconds, or a date strictly after `now`: nothing else.
            let text = value.to_str().unwrap().trim_matches([' ', '\t']);
            match text.parse::<u64>() {
                Ok(secs) if text.bytes().all(|byte| byte.is_ascii_digit()) => {
                    prop_assert_eq!(delay, Duration::from_secs(secs));
                }
                _ => {
                    let date = httpdate::parse_http_date(text).expect("a date, if not digits");
                    prop_assert!(!delay.is_zero());
                    prop_assert_eq!(date.duration_since(now).unwrap(), delay);
                }
            }
        }
    }

    #[test]
    fn digit_strings_parse_as_u64_seconds(
        digits in "[0-9]{1,25}",
        before in "[ \t]{0,2}",
        after in "[ \t]{0,2}",
        now in any_now(),
    ) {
        let value = HeaderValue::from_str(&format!("{before}{digits}{after}")).unwrap();
        let expected = digits.parse::<u64>().ok().map(Duration::from_secs);
        prop_assert_eq!(parse_retry_after(&value, now), expected);
    }

    #[test]
    fn signed_or_fractional_numbers_never_parse(
        number in "[+-][0-9]{1,10}|[0-9]{0,5}\\.[0-9]{1,5}|[0-9]{1,5}[eE][0-9]{1,3}",
        now in any_now(),
    ) {
        let value = HeaderValue::from_str(&number).unwrap();
        prop_assert_eq!(parse_retry_after(&value, now), None);
    }

    #[test]
    fn every_status_classifies_by_the_rule(code in 100u16..=999) {
        let status = StatusCode::from_u16(code).unwrap();
        prop_assert_eq!(classify_status(status), expected_outcome(code));
        let response = Ok::<_, std::io::Error>(Response::builder().status(status).body(()).unwrap());
        prop_assert_eq!(DefaultClassifier.classify(&response), expected_outcome(code));
    }

    #[test]
    fn the_policy_never_panics_and_sleeps_as_the_rule_says(
        code in 100u16..=999,
        retry_after in proptest::option::of(retry_after_value()),
        extra in vec(("x-[a-z]{1,8}", vec(header_byte(), 0..32)), 0..4),
        delays in vec(0u64..100_000, 0..6),
        numbered in any::<bool>(),
    ) {
        // The policy hands back a tokio sleep, which needs a runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let _entered = runtime.enter();

        let schedule = Schedule::new(delays.iter().copied().map(Duration::from_millis)).unwrap();
        let attempt_header = HeaderName::from_static("x-retry-attempt");
        let mut policy = TerminalRetryPolicy::default().with_schedule(schedule.clone());
        if numbered {
            policy = policy.with_attempt_header(attempt_header.clone());
        }
        let mut response = Response::builder().status(code).body(()).unwrap();
        for (name, bytes) in &extra {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            response.headers_mut().append(name, HeaderValue::from_bytes(bytes).unwrap());
        }
        if let Some(value) = &retry_after {
            response.headers_mut().insert(RETRY_AFTER, value.clone());
        }
        let mut request = Request::post("/cb").body(()).unwrap();
        let honoured = retry_after
            .as_ref()
            .filter(|_| code == 429 || code == 503 || code == 409)
            .and_then(|value| parse_retry_after(value, SystemTime::now()));

        // A 409 with `Retry-After`, whatever its value, is an idempotent
        // server's "the first request with this key still runs": transient.
        let still_running = code == 409 && retry_after.is_some();
        let transient = expected_outcome(code) == Outcome::Transient || still_running;
        let mut attempts = 0;
        loop {
            attempts += 1;
            prop_assert!(attempts <= schedule.delays().len() + 1, "retried past the schedule");
            let mut result: Result<Response<()>, std::io::Error> = Ok(response.clone());
            let Some(sleep) = policy.retry(&mut request, &mut result) else { break };
            prop_assert!(transient, "retried a {}", code);
            // The paused clock jumps to the end of the wait.
            let slept_from = tokio::time::Instant::now();
            runtime.block_on(sleep);
            let delay = slept_from.elapsed();
            let scheduled = schedule.delays()[attempts - 1];
            match honoured {
                // A date is read again at each retry, so it may have moved
                // by a second.
                Some(server) => prop_assert!(
                    delay <= server.min(DEFAULT_CAP)
                        && delay + Duration::from_secs(1) >= server.min(DEFAULT_CAP),
                    "slept {:?} for a server's {:?}", delay, server
                ),
                None => prop_assert_eq!(delay, scheduled),
            }
            if numbered {
                let expected = HeaderValue::from(attempts + 1);
                prop_assert_eq!(request.headers().get(&attempt_header), Some(&expected));
            } else {
                prop_assert!(request.headers().is_empty());
            }
            // The response stays what the server sent.
            let returned = result.unwrap();
            prop_assert_eq!(returned.headers(), response.headers());
        }
        let expected_attempts = if transient { schedule.delays().len() + 1 } else { 1 };
        prop_assert_eq!(attempts, expected_attempts);
    }
}
