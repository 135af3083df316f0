//! One callback through a flaky server: the layer rides out a burst of 502s,
//! a dropped connection and a 503 with `Retry-After`, then gets its 200.
//!
//! Run with `cargo run --example flaky_server`. The schedule is scaled down
//! (250 ms doubling) so the run takes about two seconds.

use std::time::Duration;

use bytes::Bytes;
use http::{header::RETRY_AFTER, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_terminal_retry::{
    test_server::{Reply, TestServer},
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let start = Instant::now();
    let script = [
        text(502, "upstream hiccup"),
        text(502, "upstream hiccup"),
        Reply::Close,
        Reply::Respond(
            Response::builder()
                .status(503)
                .header(RETRY_AFTER, "1")
                .body(Full::default())?,
        ),
    ];
    let replies = std::sync::Mutex::new(script.into_iter());
    let server = TestServer::start(move |request| {
        let reply = replies
            .lock()
            .expect("the script lock")
            .next()
            .unwrap_or_else(|| text(200, "recorded"));
        let attempt = request
            .headers
            .get("x-retry-attempt")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("1");
        println!(
            "t={:>5} ms  attempt {attempt}: {} {} -> {}",
            start.elapsed().as_millis(),
            request.method,
            request.uri,
            describe(&reply),
        );
        reply
    })
    .await?;

    let schedule =
        Schedule::exponential(Duration::from_millis(250), 2.0, 5, Duration::from_secs(4))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let service = ServiceBuilder::new()
        .layer(TerminalRetryLayer::new(
            TerminalRetryPolicy::default()
                .with_schedule(schedule)
                .with_attempt_header(http::HeaderName::from_static("x-retry-attempt")),
        ))
        .timeout(Duration::from_secs(2))
        .service(client);

    let request = Request::post(server.url("/api/daemon/tasks/t1/complete"))
        .header("content-type", "application/json")
        .body(Full::from(r#"{"output":"all tests pass"}"#))?;
    let response = service.oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "t={:>5} ms  result: {status} {:?} after {} attempts",
        start.elapsed().as_millis(),
        String::from_utf8_lossy(&body),
        server.requests().len()
    );
    Ok(())
}

fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Respond(response) => match response.headers().get("retry-after") {
            Some(after) => format!("{} (Retry-After: {after:?})", response.status()),
            None => response.status().to_string(),
        },
        Reply::Close => "connection closed, no response".to_owned(),
        Reply::Hang => "no answer".to_owned(),
        Reply::Delayed { after, reply } => format!("after {after:?}: {}", describe(reply)),
    }
}

/// A plain-text reply.
fn text(status: u16, body: &'static str) -> Reply {
    let mut response = Response::new(Full::from(body));
    *response.status_mut() = http::StatusCode::from_u16(status).expect("a valid status");
    Reply::Respond(response)
}
