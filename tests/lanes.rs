//! A lane per destination: one dead, paused, slow or flooded receiver holds
//! up no other. Each scenario runs on a file (tokio's paused clock) and on a
//! real PostgreSQL (the real clock), against independent loopback
//! receivers; on PostgreSQL, two dispatchers share each destination's state.

mod outbox_support;
mod postgres_support;
mod support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tower_terminal_retry::{
    outbox::{Delivery, Destination, Dispatcher, Outbox, Replay},
    test_server::{RecordedRequest, Reply, TestServer},
    Schedule, TerminalRetryLayer, TerminalRetryPolicy,
};

use outbox_support::{wait_every, Scratch};
use postgres_support::{http_client, postgres, HttpClient, Postgres};
use support::{retry_after_reply, text_reply};

/// Where a scenario keeps its requests.
enum Store<'a> {
    File(&'a Scratch),
    Queue {
        postgres: &'a Postgres,
        queue: String,
    },
}

impl Store<'_> {
    /// The outbox, opened again (a file once no other handle holds it).
    async fn open(&self) -> Outbox {
        match self {
            Store::File(scratch) => {
                for _ in 0..100 {
                    if let Ok(outbox) = Outbox::open(scratch.file()) {
                        return outbox;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("the file stays locked");
            }
            Store::Queue { postgres, queue } => {
                Outbox::connect(postgres.url(), queue).await.unwrap()
            }
        }
    }

    /// Stores `requests`, in order, without sending them: on a file, through
    /// a dispatcher whose every attempt fails at once, closed before its
    /// replay; on PostgreSQL, enqueued in one transaction.
    async fn store_unsent(&self, requests: Vec<(String, String)>) {
        match self {
            Store::File(_) => {
                let outbox = self.open().await;
                let down = tower::service_fn(|_: Request<Full<Bytes>>| async {
                    Err::<Response<Full<Bytes>>, std::io::Error>(std::io::Error::other("down"))
                });
                let dispatcher = Dispatcher::builder(outbox, down)
                    .layer(once())
                    .replay(Replay {
                        interval: Duration::from_secs(3600),
                        ..Replay::default()
                    })
                    .build()
                    .unwrap();
                for (key, url) in requests {
                    assert_eq!(dispatcher.send(key, post(&url)).await, Delivery::Queued);
                }
            }
            Store::Queue { postgres, .. } => {
                let outbox = self.open().await;
                let mut application = postgres.client().await;
                let transaction = application.transaction().await.unwrap();
                for (key, url) in requests {
                    outbox
                        .enqueue(&transaction, &key, post(&url))
                        .await
                        .unwrap();
                }
                transaction.commit().await.unwrap();
            }
        }
    }

    /// A dispatcher on the store, over a loopback client, each request sent
    /// once in the foreground.
    async fn dispatcher(&self, interval: Duration) -> Dispatcher<HttpClient> {
        self.dispatcher_with(interval, None, None).await
    }

    async fn dispatcher_with(
        &self,
        interval: Duration,
        give_up_after: Option<Duration>,
        lease: Option<Duration>,
    ) -> Dispatcher<HttpClient> {
        let mut builder = Dispatcher::builder(self.open().await, http_client())
            .layer(once())
            .replay(Replay {
                interval,
                ..Replay::default()
            })
            .any_origin();
        if let Some(after) = give_up_after {
            builder = builder.give_up_after(after);
        }
        if let Some(lease) = lease {
            builder = builder.lease(lease);
        }
        builder.build().unwrap()
    }
}

fn once() -> TerminalRetryLayer {
    TerminalRetryLayer::new(
        TerminalRetryPolicy::default().with_schedule(Schedule::new([]).unwrap()),
    )
}

fn post(url: &str) -> Request<Bytes> {
    Request::post(url).body(Bytes::from_static(b"{}")).unwrap()
}

/// `count` requests to `server`, keyed `{prefix}{index}`.
fn requests(server: &TestServer, prefix: &str, count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|index| {
            (
                format!("{prefix}{index}"),
                server.url(&format!("/hooks/{prefix}{index}")),
            )
        })
        .collect()
}

/// A receiver answering `status` to everything, after `latency`.
async fn receiver(status: u16, latency: Duration) -> TestServer {
    TestServer::start(move |_| Reply::Delayed {
        after: latency,
        reply: Box::new(Reply::status(status)),
    })
    .await
    .unwrap()
}

/// When each request arrived, from the first.
fn arrivals(requests: &[RecordedRequest]) -> Vec<Duration> {
    let Some(first) = requests.first() else {
        return Vec::new();
    };
    requests
        .iter()
        .map(|request| request.at - first.at)
        .collect()
}

/// The pending records of `outbox` to `server`.
fn pending_to(outbox: &Outbox, server: &TestServer) -> usize {
    let port = server.addr().port();
    outbox
        .pending()
        .unwrap()
        .iter()
        .filter(|entry| entry.uri.port_u16() == Some(port))
        .count()
}

/// Waits on tokio's clock, 10 ms at a time, until `done` or `limit`.
async fn wait_for(limit: Duration, done: impl FnMut() -> bool) -> bool {
    wait_every(Duration::from_millis(10), limit, done).await
}

/// A dead destination first in the store does not delay another: it gets
/// one probe at a time, and the other is served meanwhile; again after a
/// restart, with more requests for the healthy one stored behind the dead
/// one's.
async fn a_dead_destination_first_does_not_delay_another(store: Store<'_>) {
    let dead = receiver(502, Duration::from_millis(100)).await;
    let healthy = receiver(200, Duration::ZERO).await;
    store.store_unsent(requests(&dead, "dead-", 20)).await;
    store.store_unsent(requests(&healthy, "ok-", 5)).await;

    let dispatcher = store.dispatcher(Duration::from_secs(10)).await;
    let outbox = dispatcher.outbox().unwrap().clone();
    let start = Instant::now();
    assert!(wait_for(Duration::from_secs(3), || healthy.requests().len() == 5).await);
    assert!(start.elapsed() < Duration::from_secs(3));
    // Each probe takes 100 ms at the server: none starts before the last
    // ended, and only a few went in the meantime.
    let probes = arrivals(&dead.requests());
    assert!(!probes.is_empty() && probes.len() <= 4, "{probes:?}");
    assert!(probes
        .windows(2)
        .all(|pair| pair[1] - pair[0] >= Duration::from_millis(100)));
    assert!(
        wait_for(Duration::from_secs(3), || pending_to(&outbox, &healthy)
            == 0)
        .await
    );
    assert_eq!(pending_to(&outbox, &dead), 20);
    drop((dispatcher, outbox));

    // After a restart, the healthy destination's new requests behind the
    // dead one's go at once too.
    store.store_unsent(requests(&healthy, "later-", 5)).await;
    let dispatcher = store.dispatcher(Duration::from_secs(10)).await;
    assert!(wait_for(Duration::from_secs(3), || healthy.requests().len() == 10).await);
    let outbox = dispatcher.outbox().unwrap();
    assert!(wait_for(Duration::from_secs(3), || pending_to(outbox, &healthy) == 0).await);
    assert_eq!(pending_to(outbox, &dead), 20);
}

/// A destination's `Retry-After` pauses it alone.
async fn a_pause_holds_its_destination_alone(store: Store<'_>) {
    let paused = TestServer::start(|_| retry_after_reply(503, "4"))
        .await
        .unwrap();
    let healthy = receiver(200, Duration::ZERO).await;
    store.store_unsent(requests(&paused, "paused-", 10)).await;
    store.store_unsent(requests(&healthy, "ok-", 10)).await;

    let dispatcher = store.dispatcher(Duration::from_secs(1)).await;
    assert!(wait_for(Duration::from_secs(2), || healthy.requests().len() == 10).await);
    // The paused one had its one request; nothing more within its pause,
    // though its probe interval is a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        paused.requests().len(),
        1,
        "{:?}",
        arrivals(&paused.requests())
    );
    assert!(wait_for(Duration::from_secs(3), || paused.requests().len() >= 2).await);
    let resumed = arrivals(&paused.requests())[1];
    assert!(resumed >= Duration::from_secs(4), "{resumed:?}");
    drop(dispatcher);
}

/// With 600 pending for one destination and 10 for another, the 10 go out
/// before the 600 have had a tenth of theirs.
async fn destinations_are_served_in_turn(store: Store<'_>) {
    let flooded = receiver(200, Duration::ZERO).await;
    let other = receiver(200, Duration::ZERO).await;
    store.store_unsent(requests(&flooded, "flood-", 600)).await;
    store.store_unsent(requests(&other, "other-", 10)).await;

    let dispatcher = store.dispatcher(Duration::from_secs(10)).await;
    assert!(wait_for(Duration::from_secs(10), || other.requests().len() == 10).await);
    let last = other.requests()[9].at;
    let before = flooded
        .requests()
        .iter()
        .filter(|request| request.at <= last)
        .count();
    assert!(
        before < 60,
        "{before} of the 600 went before the other's 10"
    );
    // And the flood is still paced, all of it delivered.
    assert!(wait_for(Duration::from_secs(20), || flooded.requests().len() == 600).await);
    let outbox = dispatcher.outbox().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || outbox
            .pending()
            .unwrap()
            .is_empty())
        .await
    );
}

/// A receiver that takes 8 s to answer holds at most its share of the
/// replay's slots: another is served meanwhile.
async fn a_slow_receiver_holds_up_no_other(store: Store<'_>) {
    let slow = receiver(200, Duration::from_secs(8)).await;
    let fast = receiver(200, Duration::ZERO).await;
    store.store_unsent(requests(&slow, "slow-", 40)).await;
    store.store_unsent(requests(&fast, "fast-", 10)).await;

    let dispatcher = store.dispatcher(Duration::from_secs(10)).await;
    let start = Instant::now();
    assert!(wait_for(Duration::from_secs(2), || fast.requests().len() == 10).await);
    assert!(start.elapsed() < Duration::from_secs(2));
    // One first; once it answers (at 8 s), half the replay's 16 slots, not
    // more, until those answer (at 16 s).
    assert_eq!(slow.requests().len(), 1);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(slow.requests().len(), 1 + 8);
    drop(dispatcher);
}

/// A destination down longer than `give_up_after` has its requests
/// quarantined; `requeue` brings them back.
async fn a_destination_down_too_long_is_given_up_on(store: Store<'_>) {
    let up = Arc::new(AtomicBool::new(false));
    let answer = up.clone();
    let dead = TestServer::start(move |_| match answer.load(Ordering::SeqCst) {
        true => Reply::status(200),
        false => text_reply(502, "down for maintenance"),
    })
    .await
    .unwrap();
    let healthy = receiver(200, Duration::ZERO).await;
    store.store_unsent(requests(&dead, "dead-", 10)).await;
    store.store_unsent(requests(&healthy, "ok-", 3)).await;

    let dispatcher = store
        .dispatcher_with(Duration::from_secs(1), Some(Duration::from_secs(3)), None)
        .await;
    let outbox = dispatcher.outbox().unwrap().clone();
    let given_up = || outbox.quarantined().unwrap().len() == 10;
    assert!(wait_for(Duration::from_secs(10), given_up).await);
    assert!(outbox.pending().unwrap().is_empty());
    assert_eq!(healthy.requests().len(), 3);
    for entry in outbox.quarantined().unwrap() {
        let failure = entry.last_failure.unwrap();
        assert!(failure.contains("given up"), "{failure}");
    }

    up.store(true, Ordering::SeqCst);
    for index in 0..10 {
        assert!(outbox.requeue(&format!("dead-{index}")).await.unwrap());
    }
    assert!(
        wait_for(Duration::from_secs(10), || outbox
            .pending()
            .unwrap()
            .is_empty())
        .await
    );
    assert!(outbox.quarantined().unwrap().is_empty());
    drop(dispatcher);
}

/// `give_up_after` counts from a destination's first failure, across a
/// restart: a dispatcher started again five seconds into eight gives up
/// about three seconds later, not eight. On the real clock, as a restart
/// takes: what a file keeps is the wall-clock time it went down.
async fn give_up_after_counts_across_a_restart(store: Store<'_>) {
    const GIVE_UP_AFTER: Duration = Duration::from_secs(8);
    let dead = receiver(502, Duration::ZERO).await;
    store.store_unsent(requests(&dead, "dead-", 3)).await;

    let first = store
        .dispatcher_with(Duration::from_secs(1), Some(GIVE_UP_AFTER), None)
        .await;
    let outbox = first.outbox().unwrap().clone();
    let mut down_since = None;
    for _ in 0..100 {
        let destinations = outbox.destinations().await.unwrap();
        down_since = destinations
            .iter()
            .find_map(|destination| destination.down_since);
        if down_since.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let down_since = down_since.expect("the destination went down");
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(outbox.quarantined().unwrap().is_empty(), "not given up yet");
    drop((first, outbox));

    let second = store
        .dispatcher_with(Duration::from_secs(1), Some(GIVE_UP_AFTER), None)
        .await;
    let restarted = Instant::now();
    let outbox = second.outbox().unwrap().clone();
    let destinations = outbox.destinations().await.unwrap();
    assert_eq!(destinations[0].down_since, Some(down_since));
    let given_up = || outbox.quarantined().unwrap().len() == 3;
    assert!(wait_for(Duration::from_secs(15), given_up).await);
    let after_restart = restarted.elapsed();
    let after_down = down_at.elapsed();
    assert!(
        after_restart < Duration::from_secs(6) && after_down >= GIVE_UP_AFTER,
        "given up {after_restart:?} after the restart, {after_down:?} after it went down"
    );
}

/// The replay rate bounds each destination, not the queue: 20 healthy
/// destinations, 50 requests each, go out in about the time one
/// destination's 50 take at 100 a second.
async fn each_destination_has_its_own_pace(store: Store<'_>) {
    let mut receivers = Vec::new();
    for index in 0..20 {
        let receiver = receiver(200, Duration::ZERO).await;
        store
            .store_unsent(requests(&receiver, &format!("d{index}-"), 50))
            .await;
        receivers.push(receiver);
    }
    let dispatcher = store.dispatcher(Duration::from_secs(10)).await;
    let start = Instant::now();
    let all = || {
        receivers
            .iter()
            .all(|receiver| receiver.requests().len() == 50)
    };
    assert!(wait_for(Duration::from_secs(5), all).await);
    // 1,000 requests: 10 s at one pace for the queue, 0.5 s at one per
    // destination (give or take the first, tried alone).
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    for receiver in &receivers {
        let arrived = arrivals(&receiver.requests());
        // Each at its pace: 49 gaps of 10 ms at least, but the tick's slack.
        assert!(
            arrived[49] >= Duration::from_millis(450),
            "{:?}",
            arrived[49]
        );
    }
    drop(dispatcher);
}

/// `destinations()` tells which receiver is broken: down since when and
/// why, paused until when, or up, with its counts.
async fn destinations_report_each_state(store: Store<'_>) {
    let dead = TestServer::start(|_| text_reply(502, "upstream is gone"))
        .await
        .unwrap();
    let paused = TestServer::start(|_| retry_after_reply(429, "240"))
        .await
        .unwrap();
    let refusing = TestServer::start(|request| match request.uri.path() {
        "/hooks/refused-0" => Reply::status(422),
        _ => Reply::status(200),
    })
    .await
    .unwrap();
    store.store_unsent(requests(&dead, "dead-", 3)).await;
    store.store_unsent(requests(&paused, "paused-", 2)).await;
    store.store_unsent(requests(&refusing, "refused-", 2)).await;

    let dispatcher = store.dispatcher(Duration::from_secs(30)).await;
    let outbox = dispatcher.outbox().unwrap();
    let settled = || {
        !dead.requests().is_empty()
            && !paused.requests().is_empty()
            && refusing.requests().len() == 2
            && outbox.quarantined().unwrap().len() == 1
    };
    assert!(wait_for(Duration::from_secs(5), settled).await);
    let started = SystemTime::now();
    let listed = outbox.destinations().await.unwrap();
    let find = |server: &TestServer| -> Destination {
        let origin = format!("http://{}", server.addr());
        listed
            .iter()
            .find(|destination| destination.origin == origin)
            .cloned()
            .unwrap_or_else(|| panic!("{origin} not in {listed:#?}"))
    };
    let down = find(&dead);
    assert_eq!((down.pending, down.quarantined), (3, 0));
    assert!(down.down_since.is_some_and(|since| since <= started));
    let failure = down.last_failure.unwrap();
    assert!(
        failure.contains("502") && failure.contains("upstream is gone"),
        "{failure}"
    );
    let asleep = find(&paused);
    assert_eq!(asleep.pending, 2);
    let until = asleep.paused_until.unwrap();
    assert!(until > started + Duration::from_secs(200), "{until:?}");
    let up = find(&refusing);
    assert_eq!((up.pending, up.quarantined), (0, 1));
    assert_eq!(up.down_since, None);
    assert_eq!(listed[0].origin, down.origin, "the most pending first");
    drop(dispatcher);
}

/// Each scenario as two tests: on a file, on tokio's paused clock; and on a
/// queue of its own of the test PostgreSQL, on the real clock.
macro_rules! on_a_file_and_on_postgres {
    ($($name:ident => $scenario:ident,)*) => {
        mod file {
            use super::*;
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    let scratch = Scratch::new(concat!("lanes-", stringify!($name)));
                    $scenario(Store::File(&scratch)).await;
                }
            )*
        }

        mod shared {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(postgres) = postgres().await else {
                        return;
                    };
                    let queue = postgres.queue(concat!("lanes-", stringify!($name)));
                    $scenario(Store::Queue {
                        postgres: &postgres,
                        queue,
                    })
                    .await;
                }
            )*
        }
    };
}

on_a_file_and_on_postgres! {
    a_dead_destination_first_in_the_store_does_not_delay_another =>
        a_dead_destination_first_does_not_delay_another,
    one_destinations_retry_after_pauses_it_alone => a_pause_holds_its_destination_alone,
    six_hundred_pending_for_one_do_not_hold_up_ten_for_another => destinations_are_served_in_turn,
    a_receiver_answering_in_eight_seconds_does_not_hold_up_another =>
        a_slow_receiver_holds_up_no_other,
    give_up_after_quarantines_and_requeue_brings_back =>
        a_destination_down_too_long_is_given_up_on,
    destinations_reports_each_state => destinations_report_each_state,
    twenty_healthy_destinations_get_twenty_times_the_rate_of_one =>
        each_destination_has_its_own_pace,
}

/// Restarts take real time: these run on the real clock, on both stores.
mod restart {
    use super::*;

    #[tokio::test]
    async fn give_up_after_counts_across_a_restart_on_a_file() {
        let scratch = Scratch::new("lanes-give-up-across-a-restart");
        give_up_after_counts_across_a_restart(Store::File(&scratch)).await;
    }

    #[tokio::test]
    async fn give_up_after_counts_across_a_restart_on_postgres() {
        let Some(postgres) = postgres().await else {
            return;
        };
        let queue = postgres.queue("lanes-give-up-across-a-restart");
        give_up_after_counts_across_a_restart(Store::Queue {
            postgres: &postgres,
            queue,
        })
        .await;
    }
}

/// Two dispatchers on one queue of the test PostgreSQL.
mod two_dispatchers {
    use super::*;

    /// Two dispatchers on one queue, the second started once the receiver
    /// is known to be down: it takes `answer_in` to say so each time, and
    /// none of its probes starts before the last one ended, whichever
    /// dispatcher sent it.
    async fn probes_of_two_dispatchers_never_overlap(
        queue: &str,
        answer_in: Duration,
        lease: Option<Duration>,
        at_least: usize,
    ) {
        let Some(postgres) = postgres().await else {
            return;
        };
        let store = Store::Queue {
            postgres: &postgres,
            queue: postgres.queue(queue),
        };
        let dead = receiver(502, answer_in).await;
        store.store_unsent(requests(&dead, "dead-", 10)).await;
        let interval = Duration::from_secs(1);
        let first = store.dispatcher_with(interval, None, lease).await;
        assert!(wait_for(Duration::from_secs(5), || !dead.requests().is_empty()).await);
        tokio::time::sleep(answer_in + Duration::from_millis(300)).await;
        let second = store.dispatcher_with(interval, None, lease).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let probes = arrivals(&dead.requests());
        assert!(probes.len() >= at_least, "{probes:?}");
        for pair in probes.windows(2) {
            assert!(pair[1] - pair[0] >= answer_in, "{probes:?}");
        }
        drop((first, second));
    }

    /// Two dispatchers on one queue: a destination that is down gets one
    /// probe at a time across both.
    #[tokio::test]
    async fn two_dispatchers_send_one_probe_at_a_time_to_a_down_destination() {
        probes_of_two_dispatchers_never_overlap(
            "lanes-two-probe",
            Duration::from_millis(300),
            None,
            4,
        )
        .await;
    }

    /// A probe that takes longer than the lease (2.5 s against 1 s) stays
    /// the only one: its holder renews it while it is in flight.
    #[tokio::test]
    async fn a_probe_slower_than_the_lease_stays_the_only_one() {
        let lease = Some(Duration::from_secs(1));
        probes_of_two_dispatchers_never_overlap(
            "lanes-two-slow-probe",
            Duration::from_millis(2500),
            lease,
            3,
        )
        .await;
    }

    /// A dispatcher dropped while its probe is under way gives the probe
    /// back, though its outbox lives on (renewing what it holds): the other
    /// dispatcher probes within a read of the store, not never.
    #[tokio::test]
    async fn a_dispatcher_dropped_mid_probe_gives_its_probe_back() {
        let Some(postgres) = postgres().await else {
            return;
        };
        let store = Store::Queue {
            postgres: &postgres,
            queue: postgres.queue("lanes-two-dropped"),
        };
        let slow = receiver(502, Duration::from_secs(3)).await;
        store.store_unsent(requests(&slow, "slow-", 10)).await;
        let (interval, lease) = (Duration::from_secs(1), Some(Duration::from_secs(1)));
        let first = store.dispatcher_with(interval, None, lease).await;
        // Its first request fails at 3 s: down. The second is its probe.
        assert!(wait_for(Duration::from_secs(10), || slow.requests().len() >= 2).await);
        let kept = first.outbox().unwrap().clone();
        drop(first);
        let second = store.dispatcher_with(interval, None, lease).await;
        let before = slow.requests().len();
        let probed = wait_for(Duration::from_secs(5), || slow.requests().len() > before).await;
        assert!(probed, "{:?}", arrivals(&slow.requests()));
        drop((kept, second));
    }

    /// A pause one dispatcher was given is kept by the other.
    #[tokio::test]
    async fn a_pause_given_to_one_dispatcher_is_kept_by_the_other() {
        let Some(postgres) = postgres().await else {
            return;
        };
        let store = Store::Queue {
            postgres: &postgres,
            queue: postgres.queue("lanes-two-pause"),
        };
        let paused = TestServer::scripted([retry_after_reply(503, "4")])
            .await
            .unwrap();
        store.store_unsent(requests(&paused, "paused-", 5)).await;
        let first = store.dispatcher(Duration::from_secs(1)).await;
        assert!(wait_for(Duration::from_secs(5), || !paused.requests().is_empty()).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = store.dispatcher(Duration::from_secs(1)).await;
        assert!(wait_for(Duration::from_secs(10), || paused.requests().len() == 5 + 1).await);
        let arrived = arrivals(&paused.requests());
        // Nothing from either within the pause.
        assert!(arrived[1] >= Duration::from_secs(4), "{arrived:?}");
        drop((first, second));
    }

    /// 2,000 requests enqueued for 20 healthy destinations are delivered
    /// within 10 s by two dispatchers with the default settings.
    #[tokio::test]
    async fn two_thousand_requests_for_twenty_destinations_go_within_ten_seconds() {
        let Some(postgres) = postgres().await else {
            return;
        };
        let store = Store::Queue {
            postgres: &postgres,
            queue: postgres.queue("lanes-two-thousand"),
        };
        let first = Dispatcher::builder(store.open().await, http_client())
            .any_origin()
            .build()
            .unwrap();
        let second = Dispatcher::builder(store.open().await, http_client())
            .any_origin()
            .build()
            .unwrap();
        let mut receivers = Vec::new();
        let mut all = Vec::new();
        for index in 0..20 {
            let receiver = receiver(200, Duration::ZERO).await;
            all.extend(requests(&receiver, &format!("d{index}-"), 100));
            receivers.push(receiver);
        }
        let start = Instant::now();
        store.store_unsent(all).await;
        let delivered = || receivers.iter().map(|r| r.requests().len()).sum::<usize>() >= 2_000;
        assert!(wait_for(Duration::from_secs(10), delivered).await);
        let outbox = first.outbox().unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || outbox
                .pending()
                .unwrap()
                .is_empty())
            .await
        );
        let total: usize = receivers.iter().map(|r| r.requests().len()).sum();
        assert_eq!(total, 2_000, "each once");
        eprintln!("2,000 for 20 destinations in {:?}", start.elapsed());
        drop((first, second));
    }
}
