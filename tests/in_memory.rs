//! A dispatcher without a store: the same rules as a stored request (the
//! layer's retries, the fallback), in process only, said by its
//! durability; and a delivery stopped with `Dispatch::abort`.

#![cfg(all(feature = "client", feature = "outbox"))]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Durability},
    test_server::{Reply, TestServer},
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

/// Two retries, 1 s apart.
fn two_retries() -> TerminalRetryLayer {
    TerminalRetryLayer::new(
        TerminalRetryPolicy::default()
            .with_schedule(Schedule::new([Duration::from_secs(1); 2]).unwrap()),
    )
}

fn post(url: String) -> Request<Bytes> {
    Request::post(url).body(Bytes::from_static(b"{}")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn without_a_store_a_request_is_retried_in_memory_under_one_key() {
    let server = TestServer::scripted([Reply::status(502), Reply::status(200)])
        .await
        .unwrap();
    let dispatcher = Dispatcher::in_memory(support::client())
        .layer(two_retries())
        .build()
        .unwrap();
    assert!(dispatcher.outbox().is_none());
    let mut dispatch = dispatcher.send("r1", post(server.url("/hooks/r1")));
    assert_eq!(dispatch.stored().await, Durability::InMemory);
    assert_eq!(dispatch.await, Delivery::Delivered);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let key = &requests[0].headers["idempotency-key"];
    assert!(!key.is_empty());
    assert_eq!(
        &requests[1].headers["idempotency-key"], key,
        "one key on every attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_store_what_would_be_queued_is_undelivered_and_transient() {
    let server = TestServer::start(|_| Reply::status(503)).await.unwrap();
    let dispatcher = Dispatcher::in_memory(support::client())
        .layer(two_retries())
        .build()
        .unwrap();
    match dispatcher.send("r1", post(server.url("/hooks/r1"))).await {
        Delivery::Undelivered {
            transient: true,
            failure,
        } => assert!(failure.contains("503"), "{failure}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_that_fails_transiently_in_memory_says_it_was_the_fallback() {
    // The request is refused for good; its fallback meets a 502 each time.
    let server = TestServer::start(|request| match request.uri.path() {
        "/tasks/t1/complete" => Reply::status(422),
        _ => Reply::status(502),
    })
    .await
    .unwrap();
    let fail_url = server.url("/tasks/t1/fail");
    let dispatcher = Dispatcher::in_memory(support::client())
        .layer(two_retries())
        .fallback(move |_, _, _| Some(post(fail_url.clone())))
        .build()
        .unwrap();
    match dispatcher
        .send("t1", post(server.url("/tasks/t1/complete")))
        .await
    {
        Delivery::FallbackUndelivered {
            transient: true,
            failure,
        } => assert!(failure.contains("502"), "{failure}"),
        other => panic!("{other:?}"),
    }
    let paths: Vec<String> = server
        .requests()
        .iter()
        .map(|request| request.uri.path().to_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "/tasks/t1/complete",
            "/tasks/t1/fail",
            "/tasks/t1/fail",
            "/tasks/t1/fail"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_aborted_delivery_in_memory_sends_nothing_more() {
    let server = TestServer::start(|_| Reply::status(502)).await.unwrap();
    let dispatcher = Dispatcher::in_memory(support::client())
        .layer(two_retries())
        .build()
        .unwrap();
    let dispatch = dispatcher.send("r1", post(server.url("/hooks/r1")));
    // The first attempt fails; the delivery waits out its first retry delay.
    for _ in 0..100 {
        if !server.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.requests().len(), 1);
    dispatch.abort();
    match dispatch.await {
        Delivery::Undelivered {
            transient: true, ..
        } => {}
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(server.requests().len(), 1, "nothing sent after the abort");
}

#[tokio::test(start_paused = true)]
async fn a_wait_for_durability_given_up_can_be_asked_again() {
    // The server hangs: the delivery never ends while the test looks.
    let server = TestServer::start(|_| Reply::Hang).await.unwrap();
    let directory =
        std::env::temp_dir().join(format!("in-memory-ask-again-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    let outbox = tower_terminal_retry::outbox::Outbox::open(directory.join("r.redb")).unwrap();
    let dispatcher = Dispatcher::builder(outbox, support::client())
        .layer(two_retries())
        .build()
        .unwrap();
    let mut dispatch = dispatcher.send("r1", post(server.url("/hooks/r1")));
    // A bound that may end before the store answers; either way, asking
    // again gives the answer rather than a panic.
    let _ = tokio::time::timeout(Duration::ZERO, dispatch.stored()).await;
    assert_eq!(dispatch.stored().await, Durability::Stored);
    assert_eq!(dispatch.stored().await, Durability::Stored);
    dispatch.abort();
    drop(dispatcher);
    let _ = std::fs::remove_dir_all(&directory);
}
