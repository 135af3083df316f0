//! The store for one process: keys in memory, bounded in entries and bytes,
//! expiring.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{Begin, Claim, Fingerprint, KeptResponse, Store, StoreError, StoreFuture};
use crate::{sync::lock, ConfigError};

/// The default bound on keys held at once.
const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// The default bound on the bytes held: keys and kept responses.
const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// What one entry costs beyond its key and kept response: the map's slot,
/// the expiry index's node, the bookkeeping.
const ENTRY_OVERHEAD: usize = 192;
/// The most expired entries one operation removes: a burst of expiries is
/// spread over the requests that follow, not paid by one.
const PURGE_PER_CALL: usize = 64;

/// Keys in memory, for a server of one process: bounded, expiring, and
/// shared by clones (clone it to keep a handle on its
/// [`evictions`](MemoryStore::evictions) after giving it to the layer).
///
/// - **Bounded.** At most `max_entries` keys and `max_bytes` bytes (keys,
///   kept bodies and headers, and a fixed overhead per key) are held; by
///   default 100,000 keys and 64 MiB. A new key that does not fit evicts the
///   finished keys whose retention ends first (the oldest), and each
///   eviction is counted by [`evictions`](MemoryStore::evictions): a
///   flood of distinct keys costs the oldest their replay, never memory
///   without limit. A key still running is never evicted (its repeat would
///   run the handler twice): when only running keys are left, a new key is
///   refused ([`StoreError::Full`], a 503 from the layer).
/// - **Expiring.** Finished keys are indexed by when their retention ends:
///   each operation removes the expired ones from the front of that index
///   (a few at a time), never scanning the whole store.
/// - **For one process.** Replicas behind a load balancer each have their
///   own: use `PostgresStore` (feature `postgres`) to share keys.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    /// The keys, shared with the expiry index and the claims.
    entries: HashMap<Arc<str>, Entry>,
    /// Finished entries by the end of their retention, then their serial
    /// number: the front expires, and is evicted, first.
    expiry: BTreeMap<(Instant, u64), Arc<str>>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Numbers claims and finished entries.
    serial: u64,
    evictions: u64,
}

struct Entry {
    fingerprint: Fingerprint,
    state: State,
    bytes: usize,
}

enum State {
    Running {
        token: u64,
    },
    Finished {
        /// Boxed: an entry stays small in the map, whatever it keeps.
        response: Option<Box<KeptResponse>>,
        /// The entry's place in the expiry index.
        expires: (Instant, u64),
    },
}

impl MemoryStore {
    /// A store of at most 100,000 keys and 64 MiB.
    pub fn new() -> MemoryStore {
        MemoryStore::bounded(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    }

    /// A store of at most `max_entries` keys and `max_bytes` bytes (keys,
    /// kept responses, and about 200 bytes of overhead per key).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidSetting`] when either bound is zero.
    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Result<MemoryStore, ConfigError> {
        if max_entries == 0 || max_bytes == 0 {
            return Err(ConfigError::InvalidSetting {
                reason: "a memory store's bounds on entries and bytes must be at least 1",
            });
        }
        Ok(MemoryStore::bounded(max_entries, max_bytes))
    }

    fn bounded(max_entries: usize, max_bytes: usize) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                expiry: BTreeMap::new(),
                bytes: 0,
                max_entries,
                max_bytes,
                serial: 0,
                evictions: 0,
            })),
        }
    }

    /// How many finished keys were evicted before their retention ended, to
    /// make room for newer ones, since the store was made. A repeat of an
    /// evicted key runs the handler again: if this grows, raise the bounds
    /// or share a `PostgresStore`.
    pub fn evictions(&self) -> u64 {
        lock(&self.inner).evictions
    }

    /// The keys held now, running or finished (expired ones not yet removed
    /// included).
    pub fn len(&self) -> usize {
        lock(&self.inner).entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes held now, as counted against the bound.
    pub fn bytes(&self) -> usize {
        lock(&self.inner).bytes
    }

    fn begin_now(&self, key: &str, fingerprint: Fingerprint) -> Result<Begin, StoreError> {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        inner.purge(now);
        let found = inner.entries.get(key).map(|entry| match &entry.state {
            State::Running { .. } => Some(Begin::Running {
                fingerprint: entry.fingerprint,
            }),
            State::Finished { response, expires } if expires.0 > now => Some(Begin::Finished {
                fingerprint: entry.fingerprint,
                response: response.as_deref().cloned(),
            }),
            // Expired, and not yet purged: absent.
            State::Finished { .. } => None,
        });
        match found {
            Some(Some(begin)) => return Ok(begin),
            Some(None) => inner.remove(key),
            None => {}
        }
        let bytes = key.len() + ENTRY_OVERHEAD;
        if !inner.make_room(1, bytes, now) {
            return Err(StoreError::Full);
        }
        inner.serial += 1;
        let token = inner.serial;
        inner.bytes += bytes;
        let entry = Entry {
            fingerprint,
            state: State::Running { token },
            bytes,
        };
        let key: Arc<str> = key.into();
        inner.entries.insert(key.clone(), entry);
        Ok(Begin::Claimed(Claim::new(key, token)))
    }

    fn finish_now(&self, claim: &Claim, response: Option<KeptResponse>, retention: Duration) {
        let mut inner = lock(&self.inner);
        if !inner.holds(claim) {
            return;
        }
        let now = Instant::now();
        let key_bytes = claim.key().len() + ENTRY_OVERHEAD;
        let response_bytes = response
            .as_ref()
            .map_or(0, |kept| kept.body().len() + kept.header_bytes());
        // The entry's own bytes are counted already; the response's must
        // fit beside the others, or it is not kept.
        let response = match inner.make_room(0, response_bytes, now) {
            true => response,
            false => None,
        };
        let kept_bytes = response.as_ref().map_or(0, |_| response_bytes);
        inner.serial += 1;
        let expires = (now + retention, inner.serial);
        inner.bytes += kept_bytes;
        inner.expiry.insert(expires, claim.shared_key().clone());
        if let Some(entry) = inner.entries.get_mut(claim.key()) {
            entry.state = State::Finished {
                response: response.map(Box::new),
                expires,
            };
            entry.bytes = key_bytes + kept_bytes;
        }
    }

    fn release_now(&self, claim: &Claim) {
        let mut inner = lock(&self.inner);
        if inner.holds(claim) {
            inner.remove(claim.key());
        }
    }
}

impl Inner {
    /// Whether `claim` is the current claim of its key.
    fn holds(&self, claim: &Claim) -> bool {
        matches!(
            self.entries.get(claim.key()),
            Some(Entry { state: State::Running { token }, .. }) if *token == claim.token()
        )
    }

    /// Removes up to [`PURGE_PER_CALL`] expired entries, from the front of
    /// the expiry index.
    fn purge(&mut self, now: Instant) {
        for _ in 0..PURGE_PER_CALL {
            match self.expiry.first_key_value() {
                Some((&(at, _), _)) if at <= now => {
                    if let Some((_, key)) = self.expiry.pop_first() {
                        self.forget(&key);
                    }
                }
                _ => return,
            }
        }
    }

    /// Evicts finished entries, oldest first, until `entries` more entries
    /// and `bytes` more bytes fit; `false` if they cannot.
    fn make_room(&mut self, entries: usize, bytes: usize, now: Instant) -> bool {
        if bytes > self.max_bytes {
            return false;
        }
        while self.entries.len() + entries > self.max_entries || self.bytes + bytes > self.max_bytes
        {
            let Some(((at, _), key)) = self.expiry.pop_first() else {
                return false;
            };
            if at > now {
                self.evictions += 1;
            }
            self.forget(&key);
        }
        true
    }

    /// Removes the entry of `key`, from the expiry index too.
    fn remove(&mut self, key: &str) {
        if let Some(Entry {
            state: State::Finished { expires, .. },
            ..
        }) = self.entries.get(key)
        {
            let expires = *expires;
            self.expiry.remove(&expires);
        }
        self.forget(key);
    }

    /// Removes the entry of `key` from the map (its expiry index node is
    /// gone already) and its bytes from the count.
    fn forget(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= entry.bytes;
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl fmt::Debug for MemoryStore {
    // Counts only: the keys and responses are the clients' data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("MemoryStore")
            .field("entries", &inner.entries.len())
            .field("bytes", &inner.bytes)
            .field("max_entries", &inner.max_entries)
            .field("max_bytes", &inner.max_bytes)
            .field("evictions", &inner.evictions)
            .finish()
    }
}

// Every operation runs under the lock when called, so that a release asked
// from a destructor happens at once, with or without a runtime to poll it.
impl Store for MemoryStore {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        _retention: Duration,
    ) -> StoreFuture<Begin> {
        StoreFuture::ready(self.begin_now(key, fingerprint))
    }

    fn finish(
        &self,
        claim: &Claim,
        response: Option<KeptResponse>,
        retention: Duration,
    ) -> StoreFuture<()> {
        self.finish_now(claim, response, retention);
        StoreFuture::ready(Ok(()))
    }

    fn release(&self, claim: &Claim) -> StoreFuture<()> {
        self.release_now(claim);
        StoreFuture::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn fingerprint(byte: u8) -> Fingerprint {
        Fingerprint::from_bytes([byte; 32])
    }

    fn kept(body: &'static str) -> KeptResponse {
        KeptResponse::new(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(body.as_bytes()),
        )
    }

    fn claim(store: &MemoryStore, key: &str) -> Claim {
        match store.begin_now(key, fingerprint(1)) {
            Ok(Begin::Claimed(claim)) => claim,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_key_is_claimed_once_then_running_then_finished() {
        let store = MemoryStore::new();
        let first = claim(&store, "k");
        assert!(matches!(
            store.begin_now("k", fingerprint(2)),
            Ok(Begin::Running { fingerprint: f }) if f == fingerprint(1)
        ));
        store.finish_now(&first, Some(kept("done")), DAY);
        match store.begin_now("k", fingerprint(1)) {
            Ok(Begin::Finished {
                fingerprint: f,
                response: Some(response),
            }) => {
                assert_eq!(f, fingerprint(1));
                assert_eq!(response.body(), "done");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stale_claim_changes_nothing() {
        let store = MemoryStore::new();
        let first = claim(&store, "k");
        store.release_now(&first);
        let second = claim(&store, "k");
        assert_ne!(first, second);
        // The first claim's holder comes back late: neither call touches
        // the second's entry.
        store.finish_now(&first, Some(kept("stale")), DAY);
        store.release_now(&first);
        assert!(matches!(
            store.begin_now("k", fingerprint(1)),
            Ok(Begin::Running { .. })
        ));
        store.finish_now(&second, None, DAY);
        assert!(matches!(
            store.begin_now("k", fingerprint(1)),
            Ok(Begin::Finished { response: None, .. })
        ));
    }

    #[test]
    fn bytes_are_counted_in_and_out() {
        let store = MemoryStore::new();
        let first = claim(&store, "key");
        assert_eq!(store.bytes(), 3 + ENTRY_OVERHEAD);
        store.finish_now(&first, Some(kept("12345")), DAY);
        assert_eq!(store.bytes(), 3 + ENTRY_OVERHEAD + 5);
        let other = claim(&store, "other");
        store.release_now(&other);
        assert_eq!(store.bytes(), 3 + ENTRY_OVERHEAD + 5);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_response_larger_than_the_whole_store_is_marked_not_kept() {
        let store = MemoryStore::with_limits(10, ENTRY_OVERHEAD + 10).unwrap();
        let first = claim(&store, "k");
        store.finish_now(&first, Some(kept("more than ten bytes")), DAY);
        assert!(matches!(
            store.begin_now("k", fingerprint(1)),
            Ok(Begin::Finished { response: None, .. })
        ));
        assert_eq!(store.bytes(), 1 + ENTRY_OVERHEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_keys_go_from_the_front_of_the_index_a_few_per_operation() {
        let store = MemoryStore::new();
        for n in 0..100 {
            let claim = claim(&store, &format!("old-{n}"));
            store.finish_now(&claim, None, Duration::from_secs(1));
        }
        let recent = claim(&store, "recent");
        store.finish_now(&recent, None, DAY);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Each operation removes at most its share of the expired, so that
        // no request pays for a whole store's expiry; an expired key asked
        // for before its turn is absent all the same.
        claim(&store, "old-99");
        assert_eq!(store.len(), 101 - PURGE_PER_CALL);
        claim(&store, "new");
        // "recent", "old-99" claimed anew, "new".
        assert_eq!(store.len(), 3);
        assert_eq!(store.evictions(), 0, "expiry is not eviction");
    }

    #[test]
    fn zero_bounds_are_refused() {
        assert!(MemoryStore::with_limits(0, 1).is_err());
        assert!(MemoryStore::with_limits(1, 0).is_err());
    }

    #[test]
    fn the_debug_output_shows_counts_not_keys() {
        let store = MemoryStore::new();
        claim(&store, "secret-key");
        let debug = format!("{store:?}");
        assert!(debug.contains("entries: 1"), "{debug}");
        assert!(!debug.contains("secret-key"), "{debug}");
    }
}
