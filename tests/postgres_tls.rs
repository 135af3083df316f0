//! Connecting the shared outbox to its database: TLS as `sslmode` and
//! `sslrootcert` ask, against a real PostgreSQL started with `ssl=on` and a
//! certificate from a test CA (it takes TCP connections over TLS only, so a
//! connection it takes was encrypted); connecting bounded as a whole;
//! statements and lock waits bounded on the session; and the freezing proxy
//! the tests of a database that stops answering use.

#![cfg(all(feature = "postgres", unix))]

mod outbox_support;
mod postgres_support;

use std::{
    error::Error,
    time::{Duration, Instant},
};

use tokio_postgres::error::SqlState;
use tower_terminal_retry::outbox::{Outbox, OutboxError};

use postgres_support::{postgres, postgres_alone, postgres_tls};

/// The outbox of a queue named after `test`, at `url`.
async fn connect(url: &str, test: &str) -> Result<Outbox, OutboxError> {
    Outbox::connect(url, &format!("{test}-{}", std::process::id())).await
}

/// The error of a connection expected to fail, as shown.
async fn refused(url: &str) -> String {
    match connect(url, "refused").await {
        Ok(_) => panic!("connected to {url}"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_by_a_name_and_an_address_the_certificate_carries() {
    let Some(server) = postgres_tls() else {
        return;
    };
    let roots = format!("sslmode=verify-full&sslrootcert={}", server.ca_file());
    for host in ["localhost", "127.0.0.1"] {
        let url = server.url(host, &roots);
        let outbox = connect(&url, "verify-full").await.unwrap();
        assert!(outbox.pending().unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_as_not_trusted() {
    let Some(server) = postgres_tls() else {
        return;
    };
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = server.url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", server.other_ca_file()),
        );
        let error = refused(&url).await;
        assert!(
            error.contains("TLS to the server failed: certificate not trusted"),
            "{error}"
        );
        assert!(error.contains(server.other_ca_file()), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_the_certificate_does_not_carry_is_refused_by_verify_full_not_verify_ca() {
    let Some(server) = postgres_tls() else {
        return;
    };
    let url = |mode: &str| {
        server.url(
            "db.terminal-retry.test",
            &format!(
                "hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}",
                server.ca_file()
            ),
        )
    };
    let error = refused(&url("verify-full")).await;
    assert!(
        error.contains("TLS to the server failed: host name mismatch"),
        "{error}"
    );
    assert!(error.contains("db.terminal-retry.test"), "{error}");
    connect(&url("verify-ca"), "verify-ca").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_and_prefer_encrypt_without_checking_unless_given_roots() {
    let Some(server) = postgres_tls() else {
        return;
    };
    // The server takes TCP connections over TLS only: these used TLS.
    for parameters in ["sslmode=require", "sslmode=prefer", ""] {
        let url = server.url("127.0.0.1", parameters);
        connect(&url, "unchecked").await.unwrap();
    }
    let error = refused(&server.url("127.0.0.1", "sslmode=disable")).await;
    assert!(!error.contains("TLS"), "{error}");
    assert!(error.contains("no encryption"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_is_refused() {
    let Some(postgres) = postgres().await else {
        return;
    };
    for mode in ["require", "verify-ca", "verify-full"] {
        let error = refused(&postgres.url_with(&format!("sslmode={mode}"))).await;
        assert!(
            error.contains(&format!(
                "TLS to the server failed: the server does not offer TLS, which sslmode={mode} requires"
            )),
            "{error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_and_disable_connect_to_a_server_without_tls() {
    let Some(postgres) = postgres().await else {
        return;
    };
    for mode in ["prefer", "disable"] {
        let url = postgres.url_with(&format!("sslmode={mode}"));
        connect(&url, mode).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_server_that_never_answers_fails_within_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Takes connections and holds them, never answering.
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = format!("postgres://sender:p%23ss%2Fw%3Frd@127.0.0.1:{port}/app?connect_timeout=1");
    let started = Instant::now();
    let connecting = connect(&url, "silent");
    let outcome = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("Outbox::connect gave up within its bound");
    let error = outcome.err().unwrap().to_string();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        error.contains("login within 1 s (connect_timeout)"),
        "{error}"
    );
    assert!(
        !error.contains("p%23ss") && !error.contains("p#ss"),
        "{error}"
    );
    holding.abort();
}

/// The SQL state under `error`, from PostgreSQL.
fn sql_state(error: &OutboxError) -> Option<&SqlState> {
    error
        .source()?
        .downcast_ref::<tokio_postgres::Error>()?
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_and_lock_timeout_are_set_on_the_session() {
    // A lock on the whole table stops the other tests' statements.
    let Some(postgres) = postgres_alone().await else {
        return;
    };
    let statements = connect(
        &postgres.url_with("statement_timeout=300ms&lock_timeout=0"),
        "statement-timeout",
    )
    .await
    .unwrap();
    let locks = connect(
        &postgres.url_with("statement_timeout=0&lock_timeout=300ms"),
        "lock-timeout",
    )
    .await
    .unwrap();
    let holder = postgres.client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE terminal_retry_outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Well within the defaults (5 s, 2 s), were they in force instead.
    let error = listing_within(&statements, Duration::from_millis(1500)).await;
    assert_eq!(
        sql_state(&error),
        Some(&SqlState::QUERY_CANCELED),
        "{error}"
    );
    let error = listing_within(&locks, Duration::from_millis(1500)).await;
    assert_eq!(
        sql_state(&error),
        Some(&SqlState::LOCK_NOT_AVAILABLE),
        "{error}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(statements.pending().unwrap().is_empty());
}

/// The error of `outbox.pending()`, which must fail within `limit`. Run
/// apart: a listing that waits on the lock would otherwise hold the test
/// (and the lock's holder) for ever.
async fn listing_within(outbox: &Outbox, limit: Duration) -> OutboxError {
    let outbox = outbox.clone();
    let listing = tokio::task::spawn_blocking(move || outbox.pending());
    match tokio::time::timeout(limit, listing).await {
        Ok(listed) => listed.unwrap().unwrap_err(),
        Err(_) => panic!("the listing still waits after {limit:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_freezing_proxy_holds_every_byte_while_frozen_and_closes_nothing() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let proxy = postgres.freezing_proxy().await;
    let (client, connection) = tokio_postgres::connect(proxy.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(proxy.connections(), 1);
    client.simple_query("SELECT 1").await.unwrap();
    proxy.freeze();
    assert!(proxy.is_frozen());
    let frozen = tokio::time::timeout(Duration::from_millis(300), client.simple_query("SELECT 2"));
    assert!(
        frozen.await.is_err(),
        "a query answered through a frozen proxy"
    );
    assert!(!client.is_closed());
    proxy.thaw();
    let rows = client.query_one("SELECT 3", &[]).await.unwrap();
    assert_eq!(rows.get::<_, i32>(0), 3);
}
