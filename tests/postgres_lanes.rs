//! Destinations on a real PostgreSQL, through the public API: what
//! `Outbox::destinations` reports of each origin with stored requests, the
//! same from every outbox on the queue. (The store's own operations for the
//! lanes of the replay, crate-private, are tested beside them.)

#![cfg(all(feature = "postgres", unix))]

mod outbox_support;
mod postgres_support;
mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Uri};
use tower_terminal_retry::{
    outbox::{Delivery, Dispatcher, Replay},
    test_server::TestServer,
};

use postgres_support::{connect, http_client, postgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_list_each_origin_with_its_counts_and_the_state_every_outbox_shares() {
    let Some(postgres) = postgres().await else {
        return;
    };
    let queue = postgres.queue("destinations");
    let one = connect(&postgres, &queue).await;
    let other = connect(&postgres, &queue).await;
    assert!(one.destinations().await.unwrap().is_empty());

    // Refused for good by one receiver: quarantined.
    let refusing = TestServer::start(|_| support::text_reply(422, "unprocessable"))
        .await
        .unwrap();
    let refusing_origin = format!("http://{}", refusing.addr());
    let dispatcher = Dispatcher::builder(one.clone(), http_client())
        .origin(&refusing_origin.parse::<Uri>().unwrap())
        .replay(Replay {
            interval: Duration::from_millis(200),
            ..Replay::default()
        })
        .build()
        .unwrap();
    for key in ["refused-1", "refused-2"] {
        let request = Request::post(refusing.url(&format!("/hooks/{key}")))
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        assert_eq!(dispatcher.send(key, request).await, Delivery::Quarantined);
    }
    // Pending for another, which no dispatcher here serves: three of them.
    let waiting = "http://waiting.example:8080";
    let mut application = postgres.client().await;
    let transaction = application.transaction().await.unwrap();
    for n in 0..3 {
        let request = Request::post(format!("{waiting}/hooks/{n}"))
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        one.enqueue(&transaction, &format!("waiting-{n}"), request)
            .await
            .unwrap();
    }
    transaction.commit().await.unwrap();
    // Its state, as a dispatcher elsewhere found it: down for a minute,
    // paused for another.
    application
        .execute(
            "INSERT INTO terminal_retry_outbox_destination
                 (queue, origin, down_since, paused_until, probe_at, probe_delay_ms, last_failure)
             VALUES ($1, $2, now() - interval '1 minute', now() + interval '1 minute',
                     now() + interval '1 second', 1000, '503 Service Unavailable')",
            &[&queue, &waiting],
        )
        .await
        .unwrap();

    let listed = one.destinations().await.unwrap();
    assert_eq!(other.destinations().await.unwrap(), listed);
    let origins: Vec<&str> = listed.iter().map(|d| d.origin.as_str()).collect();
    assert_eq!(origins, [waiting, refusing_origin.as_str()]);
    let (down, refused) = (&listed[0], &listed[1]);
    assert_eq!((down.pending, down.quarantined), (3, 0));
    let now = SystemTime::now();
    let since = down.down_since.unwrap();
    assert!(since < now - Duration::from_secs(50) && since > now - Duration::from_secs(70));
    let until = down.paused_until.unwrap();
    assert!(until > now + Duration::from_secs(50) && until < now + Duration::from_secs(70));
    assert_eq!(
        down.last_failure.as_deref(),
        Some("503 Service Unavailable")
    );
    assert_eq!((refused.pending, refused.quarantined), (0, 2));
    assert_eq!(refused.down_since, None);

    // Requeued and discarded, the counts follow; with nothing stored, an
    // origin is not listed.
    assert!(other.requeue("refused-1").await.unwrap());
    assert!(other.discard("refused-2").await.unwrap());
    for n in 0..3 {
        assert!(other.discard(&format!("waiting-{n}")).await.unwrap());
    }
    let listed = one.destinations().await.unwrap();
    assert!(listed.len() <= 1, "{listed:?}");
    if let Some(refused) = listed.first() {
        // Not delivered again yet: the 422 quarantines it once more.
        assert_eq!(refused.origin, refusing_origin);
        assert_eq!(refused.pending + refused.quarantined, 1);
    }
}
