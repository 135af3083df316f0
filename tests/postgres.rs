//! The outbox on a real PostgreSQL, in one process: the same semantics as
//! the redb outbox (write-ahead, a stable idempotency key, the first request
//! per key standing, fallback, quarantine, requeue, discard, no secret
//! stored), `enqueue` in the caller's transaction, and the throwaway server
//! the tests run on. The tests across processes are in `postgres_crash.rs`.

#![cfg(all(feature = "postgres", unix))]

mod outbox_support;
mod postgres_support;
mod support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION},
    HeaderValue, Request, StatusCode,
};
use tower_terminal_retry::{
    outbox::{
        Delivery, Dispatcher, DispatcherBuilder, Durability, Outbox, Replay, IDEMPOTENCY_KEY,
    },
    test_server::{Reply, TestServer},
    ConfigError,
};

use postgres_support::{
    connect, emptied, http_client, postgres, postgres_alone, wait_for, HttpClient,
};

/// A secret that must never reach the database.
const SECRET: &str = "s3cret-never-stored";

/// A dispatcher on `outbox`: short lease and replay interval, for tests.
fn builder(outbox: Outbox) -> DispatcherBuilder<HttpClient> {
    Dispatcher::builder(outbox, http_client())
        .any_origin()
        .lease(Duration::from_secs(1))
        .replay(Replay {
            interval: Duration::from_millis(200),
            ..Replay::default()
        })
}

fn post(server: &TestServer, path: &str, body: &str) -> Request<Bytes> {
    Request::post(server.url(path))
        .body(Bytes::from(body.to_owned()))
        .unwrap()
}

/// A server that hangs while `hanging` holds, then answers 200.
async fn hanging_server(hanging: &Arc<AtomicBool>) -> TestServer {
    let hanging = hanging.clone();
    TestServer::start(move |_| {
        if hanging.load(Ordering::SeqCst) {
            Reply::Hang
        } else {
            Reply::status(200)
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_takes_connections_and_restarts_on_the_same_data() {
    let Some(postgres) = postgres_alone().await else {
        return;
    };
    let client = postgres.client().await;
    let table = format!("harness_{}", std::process::id());
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (n int); INSERT INTO {table} VALUES (7)"
        ))
        .await
        .unwrap();
    if postgres.restart() {
        assert!(client.is_closed() || client.simple_query("SELECT 1").await.is_err());
    }
    let client = postgres.client().await;
    let row = client
        .query_one(&format!("SELECT n FROM {table}"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_stored_before_its_first_attempt_under_a_stable_idempotency_key() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("write-ahead");
    // The first attempt takes a while, then fails; the next succeed.
    let server = TestServer::scripted([Reply::Delayed {
        after: Duration::from_millis(1500),
        reply: Box::new(Reply::status(503)),
    }])
    .await
    .unwrap();
    let dispatcher = builder(connect(&postgres, &queue).await).build().unwrap();
    let mut dispatch = dispatcher.send("order-1", post(&server, "/hooks/order-1", "{}"));
    assert_eq!(dispatch.stored().await, Durability::Stored);
    assert!(wait_for(Duration::from_secs(10), || server.requests().len() == 1).await);
    // The first attempt is in flight: the record is in the database, for
    // any connection to read.
    let observer = connect(&postgres, &queue).await;
    let pending = observer.pending().unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].key, "order-1");
    assert_eq!(observer.pending_count(), 1);
    let stored_key = pending[0].idempotency_key.clone();
    assert_eq!(stored_key.len(), 36, "a UUID: {stored_key}");
    assert_eq!(dispatch.await, Delivery::Delivered);
    assert!(emptied(&observer, Duration::from_secs(10)).await);
    let requests = server.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    for request in requests {
        assert_eq!(request.headers[IDEMPOTENCY_KEY], stored_key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_per_key_stands_whether_sent_or_enqueued() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("first-stands");
    // Slow answers: the first request is in flight while the others come.
    let server = TestServer::start(|_| Reply::Delayed {
        after: Duration::from_secs(2),
        reply: Box::new(Reply::status(200)),
    })
    .await
    .unwrap();
    let dispatcher = builder(connect(&postgres, &queue).await).build().unwrap();
    let outbox = dispatcher.outbox().unwrap().clone();
    let mut first = dispatcher.send("k", post(&server, "/hooks/k", "first"));
    assert_eq!(first.stored().await, Durability::Stored);

    let mut again = dispatcher.send("k", post(&server, "/hooks/k", "second"));
    assert_eq!(again.stored().await, Durability::AlreadyStored);
    assert_eq!(again.await, Delivery::AlreadyStored);

    let mut client = postgres.client().await;
    let transaction = client.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "k", post(&server, "/hooks/k", "third"))
        .await
        .unwrap();
    transaction.commit().await.unwrap();

    let pending = outbox.pending().unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].body, "first");
    assert_eq!(first.await, Delivery::Delivered);
    assert!(emptied(&outbox, Duration::from_secs(10)).await);
    let bodies: Vec<Bytes> = server.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, ["first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueued_request_exists_after_commit_only_with_its_own_idempotency_key() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("enqueue-local");
    let server = TestServer::scripted([]).await.unwrap();
    // No dispatcher: what is enqueued stays, to be read.
    let outbox = connect(&postgres, &queue).await;
    let mut client = postgres.client().await;
    let transaction = client.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "gone", post(&server, "/hooks/gone", "{}"))
        .await
        .unwrap();
    transaction.rollback().await.unwrap();
    let transaction = client.transaction().await.unwrap();
    let mut request = post(&server, "/hooks/kept", "{}");
    request.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer s3cret-never-stored"),
    );
    outbox.enqueue(&transaction, "kept", request).await.unwrap();
    // Not visible before the commit, to another connection.
    assert!(outbox.pending().unwrap().is_empty());
    transaction.commit().await.unwrap();
    let pending = outbox.pending().unwrap();
    let keys: Vec<&str> = pending.iter().map(|entry| entry.key.as_str()).collect();
    assert_eq!(keys, ["kept"]);
    assert_eq!(pending[0].idempotency_key.len(), 36);
    assert!(pending[0].request().headers().get(AUTHORIZATION).is_none());
    assert!(outbox.discard("kept").await.unwrap());
    assert!(outbox.pending().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_replaced_by_its_fallback_in_the_same_transaction() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("fallback");
    let server = TestServer::start(|request| {
        if request.uri.path() == "/hooks/refused" {
            support::text_reply(422, "unprocessable")
        } else {
            Reply::status(200)
        }
    })
    .await
    .unwrap();
    let fallback_url = server.url("/hooks/fallback");
    let dispatcher = builder(connect(&postgres, &queue).await)
        .fallback(move |entry, status, _| {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            let body = format!("instead of {}", entry.key);
            Some(
                Request::post(&fallback_url)
                    .body(Bytes::from(body))
                    .unwrap(),
            )
        })
        .build()
        .unwrap();
    let dispatch = dispatcher.send("event", post(&server, "/hooks/refused", "{}"));
    assert_eq!(dispatch.await, Delivery::FallbackDelivered);
    let requests = server.requests();
    let paths: Vec<&str> = requests.iter().map(|r| r.uri.path()).collect();
    assert_eq!(paths, ["/hooks/refused", "/hooks/fallback"]);
    assert_eq!(requests[1].body, "instead of event");
    assert!(emptied(dispatcher.outbox().unwrap(), Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_quarantined_until_requeued_or_discarded() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("quarantine");
    let accepting = Arc::new(AtomicBool::new(false));
    let accepts = accepting.clone();
    let server = TestServer::start(move |_| {
        if accepts.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            support::text_reply(422, "unprocessable")
        }
    })
    .await
    .unwrap();
    let dispatcher = builder(connect(&postgres, &queue).await).build().unwrap();
    let outbox = dispatcher.outbox().unwrap().clone();
    for key in ["requeued", "discarded"] {
        let dispatch = dispatcher.send(key, post(&server, &format!("/hooks/{key}"), "{}"));
        assert_eq!(dispatch.await, Delivery::Quarantined);
    }
    let quarantined = outbox.quarantined().unwrap();
    let keys: Vec<&str> = quarantined.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["requeued", "discarded"]);
    assert!(quarantined.iter().all(|entry| entry.quarantined));
    assert!(quarantined[0]
        .last_failure
        .as_deref()
        .unwrap()
        .contains("422"));
    assert!(outbox.pending().unwrap().is_empty());
    let attempts = server.requests().len();
    // Not retried while quarantined.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(server.requests().len(), attempts);

    accepting.store(true, Ordering::SeqCst);
    assert!(outbox.discard("discarded").await.unwrap());
    assert!(!outbox.discard("discarded").await.unwrap());
    assert!(outbox.requeue("requeued").await.unwrap());
    assert!(!outbox.requeue("requeued").await.unwrap_or(false));
    assert!(emptied(&outbox, Duration::from_secs(10)).await);
    let last = server.requests().last().unwrap().uri.path().to_owned();
    assert_eq!(last, "/hooks/requeued");
    assert_eq!(server.requests().len(), attempts + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_database() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("secrets");
    let hanging = Arc::new(AtomicBool::new(true));
    let server = hanging_server(&hanging).await;
    // A password in the URL is not shown in the outbox's path (our server's
    // trust authentication ignores it; another's may check it).
    let url = match postgres.data_directory() {
        Some(_) => postgres
            .url()
            .replacen("postgres@", &format!("postgres:{SECRET}@"), 1),
        None => postgres.url().to_owned(),
    };
    let outbox = Outbox::connect(&url, &queue).await.unwrap();
    let path = outbox.path().display().to_string();
    assert!(path.contains(&queue), "{path}");
    assert!(!path.contains(SECRET), "{path}");
    let dispatcher = builder(outbox).build().unwrap();

    let mut request = post(&server, "/hooks/secret", "{}");
    let headers = request.headers_mut();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer s3cret-never-stored"),
    );
    headers.insert(
        PROXY_AUTHORIZATION,
        HeaderValue::from_static("Basic s3cret-never-stored"),
    );
    headers.insert(
        COOKIE,
        HeaderValue::from_static("session=s3cret-never-stored"),
    );
    let mut sensitive = HeaderValue::from_static("s3cret-never-stored");
    sensitive.set_sensitive(true);
    headers.insert("x-api-key", sensitive);
    let mut dispatch = dispatcher.send("secret", request);
    assert_eq!(dispatch.stored().await, Durability::Stored);
    let userinfo = format!("http://user:{SECRET}@{}/hooks/userinfo", server.addr());
    let mut refused = dispatcher.send(
        "userinfo",
        Request::post(userinfo).body(Bytes::new()).unwrap(),
    );
    assert_eq!(refused.stored().await, Durability::Refused);

    let client = postgres.client().await;
    client.batch_execute("CHECKPOINT").await.ok();
    // Every row of every table, as text (bytea as hex).
    let tables = client
        .query(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
             AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap();
    assert!(!tables.is_empty());
    let secret_hex: String = SECRET.bytes().map(|byte| format!("{byte:02x}")).collect();
    let mut rows = 0;
    for table in tables {
        let table: String = table.get(0);
        for row in client
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .unwrap()
        {
            let text: String = row.get(0);
            assert!(
                !text.contains(SECRET) && !text.contains(&secret_hex),
                "{table}: {text}"
            );
            rows += 1;
        }
    }
    assert!(rows > 0);
    // And the bytes on disk, tables and write-ahead log, when the server is ours.
    if let Some(data) = postgres.data_directory() {
        let mut directories = vec![data.join("base"), data.join("pg_wal")];
        let mut files = 0;
        while let Some(directory) = directories.pop() {
            for item in std::fs::read_dir(&directory).unwrap() {
                let path = item.unwrap().path();
                if path.is_dir() {
                    directories.push(path);
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap_or_default();
                let found = bytes
                    .windows(SECRET.len())
                    .any(|window| window == SECRET.as_bytes());
                assert!(!found, "{} holds the secret", path.display());
                files += 1;
            }
        }
        assert!(files > 0);
    }
    hanging.store(false, Ordering::SeqCst);
    drop(dispatch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_lease_is_a_configuration_error() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let outbox = connect(&postgres, &postgres.queue("zero-lease")).await;
    let error = Dispatcher::builder(outbox, http_client())
        .any_origin()
        .lease(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { .. }),
        "{error:?}"
    );
}
