//! The shared queue in production, on a real PostgreSQL: an allow-list of
//! origins (two applications on one queue, a record planted for a foreign
//! host), a table locked by another session, rows damaged behind the
//! store's back, paged listings, and notifications that name no queue.

#![cfg(all(feature = "postgres", unix))]

mod outbox_support;
mod postgres_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Full;
use tower::util::MapRequest;
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Durability, Listing, Outbox, Replay},
    test_server::{Reply, TestServer},
    ConfigError,
};

use postgres_support::{connect, http_client, postgres, wait_for, HttpClient, Postgres};

/// The credential each application's service adds to its attempts.
const TOKEN: &str = "Bearer application-token";

/// A request's way through a client that adds a credential.
type AddToken = fn(Request<Full<Bytes>>) -> Request<Full<Bytes>>;

/// A client that adds `TOKEN` to every attempt, as a service holding a
/// credential does.
fn with_token(client: HttpClient) -> MapRequest<HttpClient, AddToken> {
    fn add(mut request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, HeaderValue::from_static(TOKEN));
        request
    }
    MapRequest::new(client, add as AddToken)
}

fn post(url: String, body: &str) -> Request<Bytes> {
    Request::post(url)
        .body(Bytes::from(body.to_owned()))
        .unwrap()
}

/// The most records `pending()` and `quarantined()` return.
const LIST_CAP: usize = 10_000;
/// The most records one page of a listing holds.
const MAX_PAGE: usize = 1_000;

/// Stores `requests` in the queue of `outbox`, in one transaction of the
/// application's own.
async fn enqueue(postgres: &Postgres, outbox: &Outbox, requests: Vec<(String, Request<Bytes>)>) {
    let mut application = postgres.client().await;
    let transaction = application.transaction().await.unwrap();
    for (key, request) in requests {
        outbox.enqueue(&transaction, &key, request).await.unwrap();
    }
    transaction.commit().await.unwrap();
}

/// A database of its own on the test server, for a test that changes the
/// table behind the store's back; its URL.
async fn own_database(postgres: &Postgres, name: &str) -> String {
    let database = format!("{name}_{}", std::process::id());
    let client = postgres.client().await;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let url = postgres.url();
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (server, _) = base.rsplit_once('/').expect("a URL with a database");
    match query.is_empty() {
        true => format!("{server}/{database}"),
        false => format!("{server}/{database}?{query}"),
    }
}

/// Sends `count` requests to `server` while the store does not answer:
/// each is delivered without the store, after one store wait at most.
async fn delivered_without_the_store(
    dispatcher: &Dispatcher<HttpClient>,
    server: &TestServer,
    name: &str,
    count: usize,
    store_wait: Duration,
) {
    let started = Instant::now();
    for n in 0..count {
        let mut dispatch = dispatcher.send(format!("{name}-{n}"), post(server.url("/r"), "r"));
        match dispatch.stored().await {
            Durability::NotStored(error) => {
                assert!(
                    error.to_string().contains("did not answer within"),
                    "{error}"
                )
            }
            other => panic!("{name}: stored while the store does not answer: {other:?}"),
        }
        assert_eq!(dispatch.await, Delivery::Delivered);
    }
    let elapsed = started.elapsed();
    let bound = store_wait * count as u32 + Duration::from_secs(3);
    assert!(elapsed < bound, "{name}: {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_on_a_shared_queue_must_be_told_where_its_requests_may_go() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let outbox = connect(&postgres, &postgres.queue("no-origin")).await;
    let error = Dispatcher::builder(outbox.clone(), http_client())
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidSetting { .. }));
    let message = error.to_string();
    assert!(
        message.contains("`origin`") && message.contains("`any_origin`"),
        "{message}"
    );

    let both = Dispatcher::builder(outbox.clone(), http_client())
        .origin(&"http://127.0.0.1:1".parse().unwrap())
        .any_origin()
        .build()
        .unwrap_err();
    assert!(both.to_string().contains("any_origin"), "{both}");

    // Either one is enough.
    Dispatcher::builder(outbox.clone(), http_client())
        .any_origin()
        .build()
        .unwrap();
    Dispatcher::builder(outbox, http_client())
        .origin(&"http://127.0.0.1:1".parse().unwrap())
        .origin(&"http://127.0.0.1:2".parse().unwrap())
        .build()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_applications_on_one_queue_deliver_their_own_and_a_planted_record_is_never_sent() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("two-applications");
    let billing = TestServer::start(|_| Reply::status(200)).await.unwrap();
    let mail = TestServer::start(|_| Reply::status(200)).await.unwrap();
    let stranger = TestServer::start(|_| Reply::status(200)).await.unwrap();
    let application = |server: &TestServer, outbox: Outbox| {
        Dispatcher::builder(outbox, with_token(http_client()))
            .origin(&server.url("/").parse().unwrap())
            .lease(Duration::from_secs(1))
            .replay(Replay {
                interval: Duration::from_millis(200),
                ..Replay::default()
            })
            .build()
            .unwrap()
    };
    let billing_sender = application(&billing, connect(&postgres, &queue).await);
    let _mail_sender = application(&mail, connect(&postgres, &queue).await);

    let mut requests = Vec::new();
    for n in 0..10 {
        requests.push((
            format!("bill-{n}"),
            post(billing.url(&format!("/bills/{n}")), "bill"),
        ));
        requests.push((
            format!("mail-{n}"),
            post(mail.url(&format!("/mails/{n}")), "mail"),
        ));
    }
    // A co-tenant plants a record for its own host.
    requests.push((
        "planted".into(),
        post(stranger.url("/steal"), "give me your token"),
    ));
    enqueue(&postgres, billing_sender.outbox().unwrap(), requests).await;

    let delivered = wait_for(Duration::from_secs(20), || {
        billing.requests().len() >= 10 && mail.requests().len() >= 10
    })
    .await;
    assert!(
        delivered,
        "billing got {}, mail got {}",
        billing.requests().len(),
        mail.requests().len()
    );
    // Each application's records went to its own server, with its token.
    assert!(billing
        .requests()
        .iter()
        .all(|request| request.uri.path().starts_with("/bills/")));
    assert!(mail
        .requests()
        .iter()
        .all(|request| request.uri.path().starts_with("/mails/")));
    // Neither touched the other's records, nor the planted one: nothing is
    // quarantined, and the planted record waits, unclaimed, for a
    // dispatcher that serves its origin.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        stranger.requests().is_empty(),
        "the planted record was sent"
    );
    assert!(billing_sender
        .outbox()
        .unwrap()
        .quarantined()
        .unwrap()
        .is_empty());
    let pending = billing_sender.outbox().unwrap().pending().unwrap();
    let keys: Vec<&str> = pending.iter().map(|entry| entry.key.as_str()).collect();
    assert_eq!(keys, ["planted"]);
    assert_eq!(pending[0].attempts, 0);

    // A send to a host outside the list is refused, neither stored nor sent.
    let mut refused = billing_sender.send("elsewhere", post(stranger.url("/x"), "x"));
    assert_eq!(refused.stored().await, Durability::Refused);
    assert!(matches!(
        refused.await,
        Delivery::Undelivered {
            transient: false,
            ..
        }
    ));
    assert!(stranger.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_by_another_session_does_not_hold_deliveries_up() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("locked");
    let server = TestServer::start(|_| Reply::status(200)).await.unwrap();
    let store_wait = Duration::from_millis(300);
    let dispatcher = Dispatcher::builder(connect(&postgres, &queue).await, http_client())
        .origin(&server.url("/").parse().unwrap())
        .store_wait(store_wait)
        .build()
        .unwrap();
    // Another session holds a SHARE lock (a plain CREATE INDEX takes one):
    // every insert waits for it.
    let mut other = postgres.client().await;
    let holding = other.transaction().await.unwrap();
    holding
        .batch_execute("LOCK TABLE terminal_retry_outbox IN SHARE MODE")
        .await
        .unwrap();

    // Five deliveries, each after one store wait at most: not held up.
    delivered_without_the_store(&dispatcher, &server, "locked", 5, store_wait).await;
    assert_eq!(server.requests().len(), 5);

    // Once the lock is gone, the inserts that landed late are removed, not
    // replayed: each request reached the server once.
    holding.rollback().await.unwrap();
    let outbox = dispatcher.outbox().unwrap().clone();
    let mut emptied = false;
    for _ in 0..100 {
        if outbox
            .list(&Listing::default())
            .await
            .unwrap()
            .entries
            .is_empty()
        {
            emptied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(emptied, "{:?}", outbox.pending());
    assert_eq!(server.requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_damaged_behind_the_stores_back_are_quarantined_with_their_reason_and_the_replay_goes_on(
) {
    let Some(postgres) = postgres().await else {
        return;
    };
    let url = own_database(&postgres, "damaged_rows").await;
    let server = TestServer::start(|_| Reply::status(200)).await.unwrap();
    let outbox = Outbox::connect(&url, "damaged").await.unwrap();
    let (database, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // A NULL where the schema has none, and a row of garbage.
    database
        .batch_execute(
            "ALTER TABLE terminal_retry_outbox ALTER COLUMN record DROP NOT NULL;
             INSERT INTO terminal_retry_outbox (queue, key, record) VALUES ('damaged', 'null', NULL);
             INSERT INTO terminal_retry_outbox (queue, key, record)
                 VALUES ('damaged', 'garbage', '\\xdeadbeef00ff'::bytea);",
        )
        .await
        .unwrap();
    let mut application = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(application.1);
    let transaction = application.0.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "good", post(server.url("/good"), "good"))
        .await
        .unwrap();
    transaction.commit().await.unwrap();

    let dispatcher = Dispatcher::builder(outbox.clone(), http_client())
        .origin(&server.url("/").parse().unwrap())
        .replay(Replay {
            interval: Duration::from_millis(200),
            ..Replay::default()
        })
        .build()
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || server.requests().len() == 1).await);
    let quarantined = || async {
        let page = outbox
            .list(&Listing {
                quarantined: true,
                ..Listing::default()
            })
            .await
            .unwrap();
        page.entries
            .into_iter()
            .map(|entry| entry.last_failure.unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = quarantined().await;
        if reasons.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|reason| reason.contains("`record`")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("cannot be decoded")),
        "{reasons:?}"
    );

    // A column of another type: the rows are quarantined, saying which
    // column, and the replay lives on to deliver once it is mended.
    database
        .batch_execute("ALTER TABLE terminal_retry_outbox ALTER COLUMN attempts TYPE integer")
        .await
        .unwrap();
    let transaction = application.0.transaction().await.unwrap();
    outbox
        .enqueue(&transaction, "after", post(server.url("/after"), "after"))
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    let mut found = false;
    for _ in 0..100 {
        if quarantined()
            .await
            .iter()
            .any(|reason| reason.contains("`attempts`"))
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(found, "{:?}", quarantined().await);
    database
        .batch_execute("ALTER TABLE terminal_retry_outbox ALTER COLUMN attempts TYPE bigint")
        .await
        .unwrap();
    assert!(outbox.requeue("after").await.unwrap());
    assert!(wait_for(Duration::from_secs(10), || server.requests().len() == 2).await);
    assert_eq!(server.requests()[1].uri.path(), "/after");
    drop(dispatcher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_is_read_a_page_at_a_time_without_bodies_unless_asked() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let outbox = connect(&postgres, &postgres.queue("listing")).await;
    let requests = (0..LIST_CAP + 50)
        .map(|n| {
            (
                format!("r{n:05}"),
                post(format!("http://127.0.0.1:9/r/{n}"), "a body"),
            )
        })
        .collect();
    enqueue(&postgres, &outbox, requests).await;

    // The convenience stops at its cap.
    assert_eq!(outbox.pending().unwrap().len(), LIST_CAP);

    let mut listing = Listing {
        limit: 4_000,
        ..Listing::default()
    };
    let first = outbox.list(&listing).await.unwrap();
    assert_eq!(first.entries.len(), MAX_PAGE, "capped at MAX_PAGE");
    assert!(first.entries.iter().all(|entry| entry.body.is_empty()));
    assert_eq!(first.entries[0].key, "r00000");
    let mut seen = first.entries.len();
    listing.after = first.next;
    listing.bodies = true;
    loop {
        let page = outbox.list(&listing).await.unwrap();
        assert!(page.entries.iter().all(|entry| entry.body == "a body"));
        seen += page.entries.len();
        match page.next {
            Some(next) => listing.after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, LIST_CAP + 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_name_no_queue_and_carry_nothing() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("quiet-channel");
    let outbox = connect(&postgres, &queue).await;
    // An eavesdropper listening on the channel every queue used to share.
    let (listener, mut connection) = tokio_postgres::connect(postgres.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (notes, mut heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(note)) = message {
                let _ = notes.send((note.channel().to_owned(), note.payload().to_owned()));
            }
        }
    });
    listener
        .batch_execute("LISTEN terminal_retry_outbox")
        .await
        .unwrap();
    enqueue(
        &postgres,
        &outbox,
        vec![("k".into(), post("http://127.0.0.1:9/x".into(), "x"))],
    )
    .await;
    let overheard = tokio::time::timeout(Duration::from_millis(500), heard.recv()).await;
    assert!(overheard.is_err(), "overheard {overheard:?}");
    // The queue's own channel is a digest of its name: one who knows the
    // name may listen, one who listens learns no name, and the payload is
    // empty.
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(queue.as_bytes());
    let hex: String = digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let channel = format!("terminal_retry_outbox_{hex}");
    let listening = postgres
        .client()
        .await
        .query(
            "SELECT query FROM pg_stat_activity WHERE query LIKE 'LISTEN terminal_retry_outbox_%'",
            &[],
        )
        .await
        .unwrap();
    let statements: Vec<String> = listening.iter().map(|row| row.get(0)).collect();
    assert!(
        statements.contains(&format!("LISTEN {channel}")),
        "{statements:?}"
    );
    assert!(statements
        .iter()
        .all(|statement| !statement.contains(&queue)));
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .unwrap();
    enqueue(
        &postgres,
        &outbox,
        vec![("k2".into(), post("http://127.0.0.1:9/x".into(), "x"))],
    )
    .await;
    let (heard_on, payload) = tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .expect("a notification on the queue's channel")
        .unwrap();
    assert_eq!(heard_on, channel);
    assert_eq!(payload, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_freezes_does_not_hold_deliveries_up() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let proxy = postgres.freezing_proxy().await;
    let queue = postgres.queue("frozen");
    let server = TestServer::start(|_| Reply::status(200)).await.unwrap();
    let store_wait = Duration::from_millis(300);
    let outbox = Outbox::connect(proxy.url(), &queue).await.unwrap();
    let dispatcher = Dispatcher::builder(outbox, http_client())
        .origin(&server.url("/").parse().unwrap())
        .store_wait(store_wait)
        .build()
        .unwrap();
    let mut before = dispatcher.send("before", post(server.url("/r"), "r"));
    assert_eq!(before.stored().await, Durability::Stored);
    assert_eq!(before.await, Delivery::Delivered);

    // The database stops answering, without closing anything.
    proxy.freeze();
    delivered_without_the_store(&dispatcher, &server, "frozen", 3, store_wait).await;
    assert_eq!(server.requests().len(), 4);

    // Once it answers again, requests are stored again.
    proxy.thaw();
    let mut stored = false;
    for n in 0..50 {
        let mut dispatch = dispatcher.send(format!("thawed-{n}"), post(server.url("/r"), "r"));
        let durability = dispatch.stored().await;
        assert_eq!(dispatch.await, Delivery::Delivered);
        if durability == Durability::Stored {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stored, "never stored again after the thaw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_notifications_costs_at_most_a_scan_per_replay_interval() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let proxy = postgres.freezing_proxy().await;
    let queue = postgres.queue("flood");
    let outbox = Outbox::connect(proxy.url(), &queue).await.unwrap();
    let dispatcher = Dispatcher::builder(outbox, http_client())
        .any_origin()
        .build()
        .unwrap();
    // Idle: the replay found nothing stored and waits.
    tokio::time::sleep(Duration::from_millis(500)).await;

    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(queue.as_bytes());
    let hex: String = digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let channel = format!("terminal_retry_outbox_{hex}");
    let flooder = postgres.client().await;
    let before = proxy.bytes_to_server();
    // 20,000 notifications, distinct (PostgreSQL folds equal ones in one
    // transaction), in 20 transactions over about two seconds.
    for round in 0..20 {
        flooder
            .execute(
                "SELECT pg_notify($1, $2 || n::text) FROM generate_series(1, 1000) AS n",
                &[&channel, &round.to_string()],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_cost = proxy.bytes_to_server() - before;
    // One scan is a statement of about a hundred bytes; the poll (every
    // 5 s at most) may add one. A scan per wake costs several kilobytes
    // here (5.9 kB measured with the deafness taken out).
    assert!(
        flood_cost < 1_500,
        "the flood cost {flood_cost} bytes of statements"
    );
    drop(dispatcher);
}
