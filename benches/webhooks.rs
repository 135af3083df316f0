//! Signed webhooks in memory: what `SignLayer` adds to a 1 KiB POST on its
//! way out, and what `VerifyLayer` costs to let it in, beside the retry
//! layer's own happy path (see `overhead.rs`) and the bare service. HMAC
//! (`v1`) and ed25519 (`v1a`) alike.

mod common;

use std::{
    hint::black_box,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::Request;
use http_body_util::Full;
use tower::Layer;
use tower_terminal_retry::{
    webhooks::{Key, SignLayer, VerifyLayer},
    TerminalRetryLayer,
};

use common::{answer_200, call_now, callback_headers, side_by_side};

const HMAC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// An ed25519 signing key (a seed of 32 bytes of 42).
const ED25519: &str = "whsk_KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// Both layers read this fixed time, so that a request signed once stays
/// within the receiver's tolerance however long the bench runs.
fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A POST of 1 KiB of JSON with the callback's headers and an idempotency key.
fn request() -> Request<Full<Bytes>> {
    let filler = "x".repeat(1024 - r#"{"data":""}"#.len());
    let body = Bytes::from(format!(r#"{{"data":"{filler}"}}"#));
    assert_eq!(body.len(), 1024);
    let mut request = Request::post("http://127.0.0.1:8080/hooks/orders")
        .body(Full::new(body))
        .expect("a valid request");
    *request.headers_mut() = callback_headers();
    request.headers_mut().insert(
        "idempotency-key",
        "9b2e4d1a-4c8e-4b6f-a5d8-e1c0f937f3c9".parse().unwrap(),
    );
    request
}

fn key(text: &str) -> Key {
    text.parse().expect("a valid key")
}

fn signer(text: &str) -> SignLayer {
    SignLayer::new([key(text)])
        .expect("a signing key")
        .clock(at)
}

fn verifier(text: &str) -> VerifyLayer {
    VerifyLayer::new([key(text)]).expect("a key").clock(at)
}

/// `request` as `text` signs it.
fn signed(text: &str) -> Request<Full<Bytes>> {
    let capture = tower::service_fn(|request: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(request))
    });
    call_now(&mut signer(text).layer(capture), request())
}

/// The contenders, by name, each a call on a fresh clone of its request.
struct Contenders {
    template: Request<Full<Bytes>>,
    signed_hmac: Request<Full<Bytes>>,
    signed_ed25519: Request<Full<Bytes>>,
}

impl Contenders {
    const NAMES: [&'static str; 7] = [
        "bare",
        "layer_default",
        "sign_hmac",
        "layer_over_sign_hmac",
        "verify_hmac",
        "sign_ed25519",
        "verify_ed25519",
    ];

    fn new() -> Contenders {
        Contenders {
            template: request(),
            signed_hmac: signed(HMAC),
            signed_ed25519: signed(ED25519),
        }
    }

    /// The request contender `index` takes.
    fn input(&self, index: usize) -> &Request<Full<Bytes>> {
        match index {
            4 => &self.signed_hmac,
            6 => &self.signed_ed25519,
            _ => &self.template,
        }
    }
}

/// Makes `calls` calls of contender `index`, its requests cloned before the
/// clock starts; the time they took.
fn time(contenders: &Contenders, index: usize, calls: usize) -> Duration {
    let requests: Vec<_> = (0..calls)
        .map(|_| contenders.input(index).clone())
        .collect();
    let mut bare = answer_200();
    let mut layer = TerminalRetryLayer::default().layer(answer_200());
    let mut sign_hmac = signer(HMAC).layer(answer_200());
    let mut layer_over_sign = TerminalRetryLayer::default().layer(signer(HMAC).layer(answer_200()));
    let mut verify_hmac = verifier(HMAC).layer(answer_200());
    let mut sign_ed25519 = signer(ED25519).layer(answer_200());
    let mut verify_ed25519 = verifier(ED25519).layer(answer_200());
    let mut responses = Vec::with_capacity(calls);
    let start = Instant::now();
    for request in requests {
        responses.push(match index {
            0 => call_now(&mut bare, request),
            1 => call_now(&mut layer, request),
            2 => call_now(&mut sign_hmac, request),
            3 => call_now(&mut layer_over_sign, request),
            4 => call_now(&mut verify_hmac, request),
            5 => call_now(&mut sign_ed25519, request),
            _ => call_now(&mut verify_ed25519, request),
        });
    }
    let elapsed = start.elapsed();
    assert!(responses.iter().all(|response| response.status() == 200));
    elapsed
}

fn in_memory(c: &mut Criterion) {
    let contenders = Contenders::new();
    let mut group = c.benchmark_group("webhooks_1kib");
    for (index, name) in Contenders::NAMES.into_iter().enumerate() {
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| time(&contenders, index, iterations as usize))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: `cargo bench` has 10 minutes on 2 cores for every target.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

/// The contenders in alternation, for ratios that the machine's drifting
/// load does not skew.
fn webhooks_side_by_side() {
    let contenders = Contenders::new();
    side_by_side(
        "signed webhooks in memory, 1 KiB body",
        40,
        &Contenders::NAMES,
        1,
        |index| {
            // ed25519 is slow: fewer calls keep a round short.
            let calls = if index >= 5 { 500 } else { 5_000 };
            black_box(time(&contenders, index, calls)) / calls as u32
        },
    );
}

criterion_group! {
    name = benches;
    config = config();
    targets = in_memory
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    webhooks_side_by_side();
}
