//! Checking a signed request: its three headers, its timestamp against the
//! receiver's clock, and its signatures against the keys. What the
//! verifying layer and its future apply, and [`VerifyLayer::verify`](super::VerifyLayer::verify)
//! for a server that is not a tower one.

use std::{fmt, time::Duration};

use base64::Engine;
use http::{header::WWW_AUTHENTICATE, HeaderMap, HeaderValue, Response, StatusCode};
use tower::BoxError;

use super::{
    is_valid_id,
    key::{Candidate, Checker, Content, Key, V1A_LENGTH, V1_LENGTH},
    unix_seconds, Clock, WebhookId, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};

/// The most signatures a header may list: enough for a rotation across both
/// schemes, few enough that a forged list costs little to refuse.
const MAX_SIGNATURES: usize = 8;
/// The longest timestamp, in digits: any 19 digits fit in a `u64`.
const MAX_TIMESTAMP_DIGITS: usize = 19;

/// What every clone of the layer and its services shares.
#[derive(Clone)]
pub(super) struct Verifier {
    pub(super) keys: Vec<Key>,
    pub(super) tolerance: Duration,
    pub(super) body_limit: usize,
    pub(super) clock: Clock,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyLayer")
            .field("keys", &self.keys)
            .field("tolerance", &self.tolerance)
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

/// What the headers say, checked: the body is all that is left to check.
#[derive(Debug)]
pub(super) struct Claim {
    id: String,
    timestamp: String,
    candidates: Vec<Candidate>,
}

impl Verifier {
    /// Checks the headers, in the order of the [module docs](self).
    pub(super) fn read_headers(&self, headers: &HeaderMap) -> Result<Claim, Refusal> {
        let id = single(headers, Header::Id)?;
        let timestamp = single(headers, Header::Timestamp)?;
        let signatures = single(headers, Header::Signature)?;
        if !is_valid_id(id.as_bytes()) {
            return Err(Refusal(Kind::InvalidId));
        }
        let digits = timestamp.as_bytes();
        if digits.is_empty()
            || digits.len() > MAX_TIMESTAMP_DIGITS
            || !digits.iter().all(u8::is_ascii_digit)
        {
            return Err(Refusal(Kind::InvalidTimestamp));
        }
        let timestamp = timestamp.to_str().expect("checked: digits");
        let then: u64 = timestamp.parse().expect("checked: at most 19 digits");
        let now = unix_seconds((self.clock)());
        let apart = Duration::from_secs(now.abs_diff(then));
        if apart > self.tolerance {
            return Err(Refusal(match then < now {
                true => Kind::TooOld,
                false => Kind::TooNew,
            }));
        }
        Ok(Claim {
            id: id.to_str().expect("checked: visible ASCII").to_owned(),
            timestamp: timestamp.to_owned(),
            candidates: candidates(signatures.as_bytes())?,
        })
    }

    /// Checks the signatures of `claim` against `body`.
    pub(super) fn check(&self, claim: Claim, body: &[u8]) -> Result<WebhookId, Refusal> {
        let content = Content {
            id: &claim.id,
            timestamp: &claim.timestamp,
            body,
        };
        let checker = Checker::new(&self.keys, content, &claim.candidates);
        match claim.candidates.iter().any(|c| checker.matches(c)) {
            true => Ok(WebhookId(claim.id)),
            false => Err(Refusal(Kind::NoMatch)),
        }
    }
}

/// The three headers a signed request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    Id,
    Timestamp,
    Signature,
}

/// The one value of `header`.
fn single(headers: &HeaderMap, header: Header) -> Result<&HeaderValue, Refusal> {
    let name = match header {
        Header::Id => WEBHOOK_ID,
        Header::Timestamp => WEBHOOK_TIMESTAMP,
        Header::Signature => WEBHOOK_SIGNATURE,
    };
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(Refusal(Kind::Missing(header)))?;
    match values.next() {
        None => Ok(value),
        Some(_) => Err(Refusal(Kind::Repeated(header))),
    }
}

/// The well-formed signatures of a known version in `header`; other ones
/// are skipped, as the specification lets later versions be added beside
/// these. More than [`MAX_SIGNATURES`] entries is a refusal.
fn candidates(header: &[u8]) -> Result<Vec<Candidate>, Refusal> {
    let mut candidates = Vec::new();
    let entries = header
        .split(|&byte| byte == b' ')
        .filter(|entry| !entry.is_empty());
    for (count, entry) in entries.enumerate() {
        if count == MAX_SIGNATURES {
            return Err(Refusal(Kind::TooManySignatures));
        }
        candidates.extend(candidate(entry));
    }
    match candidates.is_empty() {
        true => Err(Refusal(Kind::NoKnownSignature)),
        false => Ok(candidates),
    }
}

/// One entry, `v1,` or `v1a,` and the standard base64 of a signature of the
/// right length.
fn candidate(entry: &[u8]) -> Option<Candidate> {
    let comma = entry.iter().position(|&byte| byte == b',')?;
    let (version, encoded) = (&entry[..comma], &entry[comma + 1..]);
    let length = match version {
        b"v1" => V1_LENGTH,
        b"v1a" => V1A_LENGTH,
        _ => return None,
    };
    // Checked before decoding: a long entry is not decoded at all.
    if encoded.len() != length.div_ceil(3) * 4 {
        return None;
    }
    // Room for what the decoder may write before it checks the padding: 3
    // bytes per 4 characters.
    let mut decoded = [0u8; V1A_LENGTH.div_ceil(3) * 3];
    let written = base64::engine::general_purpose::STANDARD
        .decode_slice(encoded, &mut decoded)
        .ok()?;
    let decoded = &decoded[..written];
    match version {
        b"v1" => Some(Candidate::V1(decoded.try_into().ok()?)),
        _ => Some(Candidate::V1a(Box::new(decoded.try_into().ok()?))),
    }
}

/// Why a request was refused: its [`status`](Refusal::status), and a short
/// reason (its `Display`), which holds no secret and no signature.
///
/// [`VerifyLayer`](super::VerifyLayer) answers with the status, and the reason in
/// `WWW-Authenticate` on a 401; [`VerifyLayer::verify`](super::VerifyLayer::verify) returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Missing(Header),
    Repeated(Header),
    InvalidId,
    InvalidTimestamp,
    TooOld,
    TooNew,
    TooManySignatures,
    NoKnownSignature,
    NoMatch,
    TooLarge,
    UnreadableBody,
}

impl Refusal {
    /// A body over the limit.
    pub(super) fn too_large() -> Refusal {
        Refusal(Kind::TooLarge)
    }

    /// A body that could not be read: over the limit, or failed.
    pub(super) fn unread(error: &BoxError) -> Refusal {
        match error.is::<http_body_util::LengthLimitError>() {
            true => Refusal(Kind::TooLarge),
            false => Refusal(Kind::UnreadableBody),
        }
    }

    /// The status a server answers with: 401 when the signature does not
    /// verify, 413 for a body over the limit, 400 for one that could not be
    /// read.
    pub fn status(&self) -> StatusCode {
        match self.0 {
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::UnreadableBody => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The short reason.
    fn reason(&self) -> &'static str {
        match self.0 {
            Kind::Missing(Header::Id) => "missing webhook-id header",
            Kind::Missing(Header::Timestamp) => "missing webhook-timestamp header",
            Kind::Missing(Header::Signature) => "missing webhook-signature header",
            Kind::Repeated(Header::Id) => "more than one webhook-id header",
            Kind::Repeated(Header::Timestamp) => "more than one webhook-timestamp header",
            Kind::Repeated(Header::Signature) => "more than one webhook-signature header",
            Kind::InvalidId => "invalid webhook-id",
            Kind::InvalidTimestamp => "invalid webhook-timestamp",
            Kind::TooOld => "webhook-timestamp too old",
            Kind::TooNew => "webhook-timestamp too new",
            Kind::TooManySignatures => "too many signatures",
            Kind::NoKnownSignature => "no signature of a known version",
            Kind::NoMatch => "no matching signature",
            Kind::TooLarge => "body over the limit",
            Kind::UnreadableBody => "body could not be read",
        }
    }

    /// The answer to the request, with an empty body.
    pub(super) fn response<B: Default>(&self) -> Response<B> {
        tracing::debug!(reason = self.reason(), "webhook refused");
        let mut response = Response::new(B::default());
        *response.status_mut() = self.status();
        if self.status() == StatusCode::UNAUTHORIZED {
            let challenge = format!(r#"webhook-signature error="{}""#, self.reason());
            let challenge = HeaderValue::try_from(challenge).expect("the reasons are ASCII");
            response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use std::{future::Future, time::UNIX_EPOCH};

    use std::{
        task::{Context, Poll},
        time::SystemTime,
    };

    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use tower::Layer;

    use super::*;
    use crate::webhooks::{SignLayer, VerifyLayer};

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const NOW: u64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    /// The specification's vector: `ID` at `NOW` with `BODY`, under `SECRET`.
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn at(seconds: u64) -> impl Fn() -> SystemTime + Send + Sync + 'static {
        move || UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn layer() -> VerifyLayer {
        VerifyLayer::new([SECRET.parse().unwrap()])
            .unwrap()
            .clock(at(NOW))
    }

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            (WEBHOOK_ID, id),
            (WEBHOOK_TIMESTAMP, timestamp),
            (WEBHOOK_SIGNATURE, signature),
        ] {
            headers.insert(name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn refusal(headers: &HeaderMap, body: &[u8]) -> String {
        layer().verify(headers, body).unwrap_err().to_string()
    }

    #[test]
    fn the_specifications_vector_verifies_and_gives_its_id() {
        let id = layer()
            .verify(&headers(ID, "1614265330", SIGNATURE), BODY)
            .unwrap();
        assert_eq!(id.as_str(), ID);
    }

    #[test]
    fn the_tolerance_holds_both_ways_to_the_second() {
        let tolerance = 300;
        for (timestamp, outcome) in [
            (NOW - tolerance, None),
            (NOW + tolerance, None),
            (NOW - tolerance - 1, Some("webhook-timestamp too old")),
            (NOW + tolerance + 1, Some("webhook-timestamp too new")),
        ] {
            // Signed at `timestamp`, checked at `NOW`.
            let signer = SignLayer::new([SECRET.parse().unwrap()])
                .unwrap()
                .clock(at(timestamp));
            let signed = signed_by(&signer, BODY);
            let result = layer().verify(&signed, BODY);
            assert_eq!(
                result.as_ref().err().map(ToString::to_string).as_deref(),
                outcome,
                "{timestamp}"
            );
        }
        // A tolerance of its own.
        let narrow = layer().tolerance(Duration::from_secs(10));
        let signer = SignLayer::new([SECRET.parse().unwrap()])
            .unwrap()
            .clock(at(NOW - 11));
        let refused = narrow.verify(&signed_by(&signer, BODY), BODY);
        assert_eq!(
            refused.unwrap_err().to_string(),
            "webhook-timestamp too old"
        );
    }

    /// The headers `signer` sets on a request of `body` with the id `ID`.
    fn signed_by(signer: &SignLayer, body: &'static [u8]) -> HeaderMap {
        use tower::ServiceExt;
        let capture = tower::service_fn(|request: Request<Full<Bytes>>| async move {
            Ok::<_, std::convert::Infallible>(request.headers().clone())
        });
        let request = Request::post("/")
            .header("idempotency-key", ID)
            .body(Full::from(body))
            .unwrap();
        let future = signer.layer(capture).oneshot(request);
        let mut context = Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(future).poll(&mut context) {
            Poll::Ready(Ok(headers)) => headers,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_timestamp_is_whole_seconds_in_at_most_19_digits() {
        for timestamp in [
            "",
            "+1614265330",
            "-1614265330",
            "1614265330.0",
            " 1614265330",
            "1e9",
            "99999999999999999999",
        ] {
            let mut headers = headers(ID, "1", SIGNATURE);
            headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from_str(timestamp).unwrap());
            assert_eq!(
                refusal(&headers, BODY),
                "invalid webhook-timestamp",
                "{timestamp:?}"
            );
        }
        // 19 digits parse, and are far in the future.
        let headers = headers(ID, "9999999999999999999", SIGNATURE);
        assert_eq!(refusal(&headers, BODY), "webhook-timestamp too new");
    }

    #[test]
    fn an_id_is_1_to_255_visible_ascii_characters_without_a_dot() {
        for id in ["", "msg.1", "msg 1", &"x".repeat(256)] {
            let headers = headers(id, "1614265330", SIGNATURE);
            assert_eq!(refusal(&headers, BODY), "invalid webhook-id", "{id:?}");
        }
        let mut non_ascii = headers(ID, "1614265330", SIGNATURE);
        non_ascii.insert(
            WEBHOOK_ID,
            HeaderValue::from_bytes("msg_é".as_bytes()).unwrap(),
        );
        assert_eq!(refusal(&non_ascii, BODY), "invalid webhook-id");
        // 255 is the longest: it gets as far as the signature.
        let long = headers(&"x".repeat(255), "1614265330", SIGNATURE);
        assert_eq!(refusal(&long, BODY), "no matching signature");
    }

    #[test]
    fn eight_signatures_are_read_and_a_ninth_is_refused_unread() {
        let other = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        let eight = [other; 7].join(" ") + " " + SIGNATURE;
        assert!(layer()
            .verify(&headers(ID, "1614265330", &eight), BODY)
            .is_ok());
        let nine = format!("{other} {eight}");
        assert_eq!(
            refusal(&headers(ID, "1614265330", &nine), BODY),
            "too many signatures"
        );
        // Spaces between entries are not entries.
        let spaced = format!("  {other}   {SIGNATURE}  ");
        assert!(layer()
            .verify(&headers(ID, "1614265330", &spaced), BODY)
            .is_ok());
    }

    #[test]
    fn only_well_formed_signatures_of_a_known_version_are_candidates() {
        let tag = SIGNATURE.strip_prefix("v1,").unwrap();
        let unpadded = tag.trim_end_matches('=');
        for (entry, is_candidate) in [
            (SIGNATURE.to_owned(), true),
            (format!("v1a,{tag}"), false),
            (format!("v2,{tag}"), false),
            (format!("V1,{tag}"), false),
            (format!("v1,{unpadded}"), false),
            (format!("v1,{tag}{tag}"), false),
            (format!("v1;{tag}"), false),
            ("v1,".to_owned(), false),
            ("v1".to_owned(), false),
            (",".to_owned(), false),
            (format!("v1,{}", "!".repeat(44)), false),
        ] {
            assert_eq!(
                candidate(entry.as_bytes()).is_some(),
                is_candidate,
                "{entry}"
            );
        }
        let v1a = format!("v1a,{}", "A".repeat(86) + "==");
        assert!(matches!(candidate(v1a.as_bytes()), Some(Candidate::V1a(_))));
    }

    #[test]
    fn a_body_over_the_limit_is_refused_with_413() {
        let small = layer().body_limit(BODY.len() - 1);
        let refused = small
            .verify(&headers(ID, "1614265330", SIGNATURE), BODY)
            .unwrap_err();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let exact = layer().body_limit(BODY.len());
        assert!(exact
            .verify(&headers(ID, "1614265330", SIGNATURE), BODY)
            .is_ok());
    }

    #[test]
    fn a_refusal_answers_its_status_and_reason_only() {
        let refused: Response<()> = refusal_of(&headers(ID, "1614265330", "v1,")).response();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            refused.headers()[WWW_AUTHENTICATE],
            r#"webhook-signature error="no signature of a known version""#
        );
        let too_large: Response<()> = Refusal::too_large().response();
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(too_large.headers().is_empty());
    }

    fn refusal_of(headers: &HeaderMap) -> Refusal {
        layer().verify(headers, BODY).unwrap_err()
    }
}
