//! The idempotency layer on a real PostgreSQL: replicas sharing one table,
//! what a row holds (the headers that describe the content, never a
//! cookie), leases that free the keys of a replica killed mid-request,
//! bounded statements, expired rows deleted, damaged rows refused.

#![cfg(all(feature = "idempotency", feature = "postgres", unix))]

mod outbox_support;
mod postgres_support;

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt};
use tower_terminal_retry::idempotency::{
    Begin, Fingerprint, IdempotencyLayer, PostgresStore, Store,
};

use postgres_support::{postgres, wait_for, Postgres};

type Body = Full<Bytes>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A table of its own for the test `name`, in this process.
fn table(name: &str) -> String {
    format!("{name}_{}", std::process::id())
}

async fn store(postgres: &Postgres, table: &str) -> PostgresStore {
    PostgresStore::connect(postgres.url(), table)
        .await
        .expect("a store")
}

/// A handler that counts its calls; its first call waits for `hold` when
/// one is given, and `status` says what it answers.
#[derive(Clone)]
struct Handler {
    calls: Arc<AtomicUsize>,
    hold: Option<Arc<Notify>>,
    status: u16,
}

impl Handler {
    fn new(status: u16) -> Handler {
        Handler {
            calls: Arc::default(),
            hold: None,
            status,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Body>> for Handler {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Response<Body>, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let (hold, status) = (self.hold.clone(), self.status);
        Box::pin(async move {
            if let (1, Some(hold)) = (call, hold) {
                hold.notified().await;
            }
            Ok(Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::LOCATION, "/orders/7")
                .header(header::SET_COOKIE, "session=s3cret")
                .body(Body::from(format!(r#"{{"call":{call}}}"#)))
                .unwrap())
        })
    }
}

fn order(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from(r#"{"amount":42}"#))
        .unwrap()
}

async fn send<S>(service: &S, request: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    service.clone().oneshot(request).await.expect("a response")
}

async fn body(response: Response<Body>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

fn replayed(response: &Response<Body>) -> bool {
    response.headers().get("idempotent-replayed").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_table_run_a_key_once_and_replay_it_from_either() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("replicas");
    let handler = Handler::new(201);
    let first = IdempotencyLayer::new(store(&postgres, &table).await).layer(handler.clone());
    let second = IdempotencyLayer::new(store(&postgres, &table).await).layer(handler.clone());

    let response = send(&first, order("k1")).await;
    assert!(!replayed(&response));
    assert_eq!(response.headers()[header::SET_COOKIE], "session=s3cret");
    assert_eq!(body(response).await, r#"{"call":1}"#);
    for replica in [&second, &first] {
        let repeat = send(replica, order("k1")).await;
        assert!(replayed(&repeat));
        assert_eq!(repeat.status(), StatusCode::CREATED);
        assert_eq!(repeat.headers()[header::LOCATION], "/orders/7");
        assert!(repeat.headers().get(header::SET_COOKIE).is_none());
        assert_eq!(body(repeat).await, r#"{"call":1}"#);
    }
    let other = Request::post("/orders")
        .header("idempotency-key", "k1")
        .body(Body::from(r#"{"amount":43}"#))
        .unwrap();
    let mismatch = send(&second, other).await;
    assert_eq!(mismatch.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(handler.calls(), 1);

    // While the first runs on one replica, the other answers 409.
    let mut held = Handler::new(201);
    let hold = Arc::new(Notify::new());
    held.hold = Some(hold.clone());
    let first = IdempotencyLayer::new(store(&postgres, &table).await).layer(held.clone());
    let second = IdempotencyLayer::new(store(&postgres, &table).await).layer(held.clone());
    let running = tokio::spawn({
        let first = first.clone();
        async move { send(&first, order("k2")).await }
    });
    assert!(wait_for(Duration::from_secs(5), || held.calls() == 1).await);
    let conflict = send(&second, order("k2")).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert_eq!(conflict.headers()[header::RETRY_AFTER], "1");
    hold.notify_one();
    assert_eq!(running.await.unwrap().status(), StatusCode::CREATED);
    assert!(replayed(&send(&second, order("k2")).await));
    assert_eq!(held.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_answers_free_the_key_on_every_replica() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("transient");
    let handler = Handler::new(503);
    let first = IdempotencyLayer::new(store(&postgres, &table).await).layer(handler.clone());
    let second = IdempotencyLayer::new(store(&postgres, &table).await).layer(handler.clone());
    assert_eq!(send(&first, order("k")).await.status(), 503);
    let retry = send(&second, order("k")).await;
    assert!(!replayed(&retry));
    assert_eq!(handler.calls(), 2);
    let rows = postgres
        .client()
        .await
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, 0, "nothing kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_holds_the_headers_that_describe_the_content_never_a_cookie() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("stored");
    let service = IdempotencyLayer::new(store(&postgres, &table).await).layer(Handler::new(201));
    send(&service, order("k")).await;
    let row = postgres
        .client()
        .await
        .query_one(
            &format!(
                "SELECT key, state, status, header_names, body, holder, octet_length(fingerprint) \
                 FROM \"{table}\""
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "k");
    assert_eq!(row.get::<_, &str>(1), "finished");
    assert_eq!(row.get::<_, i16>(2), 201);
    assert_eq!(
        row.get::<_, Vec<String>>(3),
        ["content-type", "location"],
        "no set-cookie"
    );
    assert_eq!(row.get::<_, &[u8]>(4), br#"{"call":1}"#);
    assert_eq!(
        row.get::<_, Option<&str>>(5),
        None,
        "no holder once finished"
    );
    assert_eq!(row.get::<_, i32>(6), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_request_frees_its_keys_at_its_lease() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("leases");
    let lease = Duration::from_secs(1);
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let retention = Duration::from_secs(3600);
    let survivor = store(&postgres, &table).await.lease(lease).unwrap();
    let doomed = store(&postgres, &table).await.lease(lease).unwrap();

    // The doomed replica claims the key as a request starts, and renews
    // its lease while it lives: past the lease, the key is still its own.
    let claimed = doomed.begin("k", fingerprint, retention).await.unwrap();
    assert!(matches!(claimed, Begin::Claimed(_)));
    tokio::time::sleep(lease + lease / 2).await;
    let begun = survivor.begin("k", fingerprint, retention).await.unwrap();
    assert!(matches!(begun, Begin::Running { .. }), "{begun:?}");

    // Killed: no release, no more renewals. Within the lease and one
    // renewal tick, the key is free again.
    drop(doomed);
    let killed = tokio::time::Instant::now();
    let freed = loop {
        match survivor.begin("k", fingerprint, retention).await.unwrap() {
            Begin::Claimed(claim) => break claim,
            Begin::Running { .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(
            killed.elapsed() < lease * 3,
            "the lease did not free the key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        killed.elapsed() <= lease + lease / 2,
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(freed.key(), "k");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_mid_handler_frees_its_key() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("dropped");
    let mut handler = Handler::new(201);
    handler.hold = Some(Arc::new(Notify::new()));
    let service = IdempotencyLayer::new(store(&postgres, &table).await).layer(handler.clone());
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), send(&service, order("k"))).await;
    assert!(abandoned.is_err());
    assert_eq!(handler.calls(), 1);
    // Freed by a task of the runtime: the repeat runs the handler.
    let mut rerun = None;
    for _ in 0..50 {
        let response = send(&service, order("k")).await;
        if response.status() != StatusCode::CONFLICT {
            rerun = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rerun = rerun.expect("the key freed within a second");
    assert!(!replayed(&rerun));
    assert_eq!(body(rerun).await, r#"{"call":2}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_held_up_past_its_bound_answers_503_and_runs_nothing() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("bounded");
    let handler = Handler::new(201);
    let store = store(&postgres, &table)
        .await
        .timeout(Duration::from_millis(200))
        .unwrap();
    let service = IdempotencyLayer::new(store).layer(handler.clone());
    send(&service, order("k")).await;

    // Another session locks the table (a migration, say): every statement
    // of the store waits for it.
    let mut locker = postgres.client().await;
    let transaction = locker.transaction().await.unwrap();
    transaction
        .batch_execute(&format!("LOCK TABLE \"{table}\" IN ACCESS EXCLUSIVE MODE"))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let held_up = send(&service, order("k")).await;
    assert_eq!(held_up.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(held_up.headers()[header::RETRY_AFTER], "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    transaction.rollback().await.unwrap();

    let after = send(&service, order("k")).await;
    assert!(replayed(&after));
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_deleted_and_their_keys_run_again() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("expiry");
    let handler = Handler::new(200);
    let layer = IdempotencyLayer::new(store(&postgres, &table).await)
        .retention(Duration::from_millis(200))
        .unwrap();
    let service = layer.layer(handler.clone());
    for key in ["a", "b", "c"] {
        send(&service, order(key)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An expired key is free at once, deleted or not.
    assert!(!replayed(&send(&service, order("a")).await));
    assert_eq!(handler.calls(), 4);

    // A store's upkeep deletes expired rows: its first pass comes a third
    // of a lease after it connects.
    let count = || async {
        let client = postgres.client().await;
        let sql = format!("SELECT count(*) FROM \"{table}\" WHERE key IN ('b', 'c')");
        client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0)
    };
    assert_eq!(count().await, 2);
    let _upkeep = store(&postgres, &table)
        .await
        .lease(Duration::from_secs(1))
        .unwrap();
    let mut remaining = 2;
    for _ in 0..100 {
        remaining = count().await;
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(remaining, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_row_answers_500_and_runs_nothing() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let table = table("damaged");
    let handler = Handler::new(200);
    let service = IdempotencyLayer::new(store(&postgres, &table).await).layer(handler.clone());
    send(&service, order("status")).await;
    send(&service, order("fingerprint")).await;
    let client = postgres.client().await;
    for damage in [
        format!("UPDATE \"{table}\" SET status = 1000 WHERE key = 'status'"),
        format!("UPDATE \"{table}\" SET fingerprint = '\\x00' WHERE key = 'fingerprint'"),
    ] {
        client.execute(&damage, &[]).await.unwrap();
    }
    for key in ["status", "fingerprint"] {
        let response = send(&service, order(key)).await;
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{key}"
        );
    }
    assert_eq!(handler.calls(), 2);
}
