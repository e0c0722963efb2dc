//! [`CachedContacts`]: contacts durable in ScyllaDB, cached in Redis
//! (cache-aside).
//!
//! Contacts are read on every WatchContacts snapshot and every presence or
//! history query (who may see whom), and change rarely, through internal
//! services. So reads go to Redis first, and to the durable store when Redis
//! misses or is unreachable; a miss is refilled in the background. Writes go to
//! the durable store first (it enforces `max_contacts`), then the cached lists
//! of every user the call touched are deleted (links are mutual: adding `b`
//! to `a` changes both lists). The cache is never updated in place, only
//! deleted, so it can only ever lag, never invent a link.
//!
//! # Staleness
//!
//! - A refill that read the durable store just before a write, and lands
//!   just after that write's delete, would bring the old list back. On the
//!   node that made the write this cannot happen: a refill is dropped if any
//!   write started on the node since its durable read began, and its `SET`
//!   goes on the connection right after that check, ahead of the `DEL` of any
//!   write that starts later. Against writes
//!   made on other nodes, every write deletes again [`SECOND_DELETE_AFTER`]
//!   later, and a refill is only written if its durable read started less
//!   than half that ago.
//! - A delete that fails (Redis unreachable) leaves the user "doubtful": this
//!   node reads that user from the durable store and retries the delete every
//!   [`RETRY_EVERY`] until it succeeds. Other nodes may read the stale list
//!   until then, at most [`CACHE_TTL`] (every entry expires).
//!
//! # Keys
//!
//! One string per user, `presence:{u:<user>}:contacts-cache`, holding the
//! sorted list as JSON: `SET NX PX` refills it atomically without a script,
//! and a missing key is a miss (a set could not tell "no contacts" from "not
//! cached"). It shares the user's hash tag, like every key of the user.
//!
//! The cache has its own cluster connection rather than the hot store's pool:
//! a few connections more per node, and a cache call never waits behind the
//! hot store's five-second deadline. Its calls have a short one
//! ([`CACHE_TIMEOUT`]): a cache slower than the durable store is no cache.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;

use super::redis::keys;
use super::{ContactStore, StoreError, StoreResult};

/// How long a cached list lives: the bound on staleness when a delete was
/// lost.
pub const CACHE_TTL: Duration = Duration::from_secs(600);

/// The longest one cache call may take before the durable store answers
/// instead.
pub const CACHE_TIMEOUT: Duration = Duration::from_millis(500);

/// When a write deletes the touched lists a second time.
pub const SECOND_DELETE_AFTER: Duration = Duration::from_secs(1);

/// How often failed deletes are retried, and how long after a failed call
/// the cache is left alone (reads go straight to the durable store).
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Most users remembered as doubtful. Past it the cache is bypassed on this
/// node for [`CACHE_TTL`], by which time every stale entry has expired.
const DOUBTFUL_MAX: usize = 10_000;

/// The key of a user's cached contact list.
pub fn cache_key(user_id: &str) -> String {
    keys::contacts_cache(user_id)
}

pub struct CachedContacts {
    inner: Arc<Inner>,
}

struct Inner {
    durable: Arc<dyn ContactStore>,
    cache: Cache,
    /// Users whose cached list may be stale: a delete failed. parking_lot
    /// Mutex: held for set operations only.
    doubtful: Mutex<HashSet<String>>,
    /// Set when too many users were doubtful: the cache is not read on this
    /// node before then.
    bypass_until: Mutex<Option<Instant>>,
    /// One retry task at a time.
    retrying: AtomicBool,
    /// Counts the writes started on this node: a refill whose durable read
    /// began before one may hold a list that write changed.
    writes: AtomicU64,
}

/// The Redis side: one lazily opened cluster connection.
struct Cache {
    client: ClusterClient,
    /// The open connection (multiplexed: cloned per call), or when to try
    /// opening one again. parking_lot Mutex: held only to clone or replace.
    conn: Mutex<Conn>,
}

enum Conn {
    Open(ClusterConnection),
    Closed { retry_at: Option<Instant> },
}

impl CachedContacts {
    /// Caches `durable` in the Redis Cluster at `urls`. Connects lazily: an
    /// unreachable cluster only means reads go to the durable store.
    pub fn new(durable: Arc<dyn ContactStore>, urls: &[String]) -> StoreResult<Self> {
        let client = ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(CACHE_TIMEOUT)
            .response_timeout(CACHE_TIMEOUT)
            .build()
            .map_err(|error| StoreError::Unavailable(format!("redis contacts cache: {error}")))?;
        Ok(CachedContacts {
            inner: Arc::new(Inner {
                durable,
                cache: Cache {
                    client,
                    conn: Mutex::new(Conn::Closed { retry_at: None }),
                },
                doubtful: Mutex::default(),
                bypass_until: Mutex::default(),
                retrying: AtomicBool::new(false),
                writes: AtomicU64::new(0),
            }),
        })
    }
}

impl Cache {
    async fn conn(&self) -> Result<ClusterConnection, String> {
        match &*self.conn.lock() {
            Conn::Open(conn) => return Ok(conn.clone()),
            Conn::Closed { retry_at: Some(at) } if Instant::now() < *at => {
                return Err("redis contacts cache unreachable, retrying shortly".into());
            }
            Conn::Closed { .. } => {}
        }
        match tokio::time::timeout(CACHE_TIMEOUT * 2, self.client.get_async_connection()).await {
            Ok(Ok(conn)) => {
                *self.conn.lock() = Conn::Open(conn.clone());
                Ok(conn)
            }
            Ok(Err(error)) => Err(self.failed(format!("redis contacts cache: {error}"))),
            Err(_) => Err(self.failed("redis contacts cache: connecting timed out".into())),
        }
    }

    /// A call failed: drop the connection (the cluster may have restarted
    /// with new node ids) and leave the cache alone for a moment.
    fn failed(&self, cause: String) -> String {
        *self.conn.lock() = Conn::Closed {
            retry_at: Some(Instant::now() + RETRY_EVERY),
        };
        cause
    }

    async fn call<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, String> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(CACHE_TIMEOUT, command.query_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(self.failed(format!("redis contacts cache: {error}"))),
            Err(_) => Err(self.failed(format!(
                "redis contacts cache: call took longer than {CACHE_TIMEOUT:?}"
            ))),
        }
    }

    /// The cached list, `None` on a miss (or an entry this release cannot
    /// read, which the next refill replaces once it expires or is deleted).
    async fn get(&self, user_id: &str) -> Result<Option<Vec<String>>, String> {
        let mut get = redis::cmd("GET");
        get.arg(cache_key(user_id));
        let Some(bytes) = self.call::<Option<Vec<u8>>>(get).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Stores the list unless an entry exists (a newer refill won).
    async fn fill(&self, user_id: &str, contacts: &[String]) -> Result<(), String> {
        let body = serde_json::to_vec(contacts).map_err(|error| error.to_string())?;
        let mut set = redis::cmd("SET");
        set.arg(cache_key(user_id))
            .arg(body)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(CACHE_TTL.as_millis()).unwrap_or(u64::MAX));
        self.call::<redis::Value>(set).await.map(drop)
    }

    async fn delete(&self, user_id: &str) -> Result<(), String> {
        let mut del = redis::cmd("DEL");
        del.arg(cache_key(user_id));
        self.call::<redis::Value>(del).await.map(drop)
    }
}

impl Inner {
    fn cache_usable(&self, user_id: &str) -> bool {
        let bypassed = self
            .bypass_until
            .lock()
            .is_some_and(|until| Instant::now() < until);
        !bypassed && !self.doubtful.lock().contains(user_id)
    }

    /// Deletes the cached lists of `users`; those that fail become doubtful.
    async fn invalidate(self: &Arc<Self>, users: &[String]) {
        let deletes = users.iter().map(|user_id| async move {
            self.cache
                .delete(user_id)
                .await
                .err()
                .map(|cause| (user_id, cause))
        });
        let failed: Vec<(&String, String)> = futures::future::join_all(deletes)
            .await
            .into_iter()
            .flatten()
            .collect();
        if failed.is_empty() {
            return;
        }
        crate::metrics::backend_error("contacts_cache");
        tracing::warn!(
            users = failed.len(),
            cause = %failed[0].1,
            "deleting cached contact lists failed, reading them from the durable store until a retry succeeds"
        );
        {
            let mut doubtful = self.doubtful.lock();
            if doubtful.len() + failed.len() > DOUBTFUL_MAX {
                doubtful.clear();
                *self.bypass_until.lock() = Some(Instant::now() + CACHE_TTL);
                tracing::warn!(
                    "too many doubtful cached contact lists, bypassing the cache until they expired"
                );
                return;
            }
            doubtful.extend(failed.into_iter().map(|(user_id, _)| user_id.clone()));
        }
        self.start_retrying();
    }

    /// Retries the deletes of doubtful users until none is left.
    fn start_retrying(self: &Arc<Self>) {
        if self.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner: Weak<Inner> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                let Some(this) = inner.upgrade() else { return };
                let users: Vec<String> = this.doubtful.lock().iter().cloned().collect();
                for user_id in users {
                    if this.cache.delete(&user_id).await.is_err() {
                        break;
                    }
                    this.doubtful.lock().remove(&user_id);
                }
                if this.doubtful.lock().is_empty() {
                    this.retrying.store(false, Ordering::Release);
                    // A user may have turned doubtful after the check above
                    // but before the flag was cleared.
                    if this.doubtful.lock().is_empty() || this.retrying.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
            }
        });
    }

    /// A write touched the lists of `users`: delete them now and once more a
    /// little later (see the module doc).
    async fn written(self: &Arc<Self>, users: Vec<String>) {
        self.invalidate(&users).await;
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(SECOND_DELETE_AFTER).await;
            if let Some(this) = inner.upgrade() {
                this.invalidate(&users).await;
            }
        });
    }
}

/// Every user whose list a call on `user_id` and `contact_ids` may change.
fn touched(user_id: &str, contact_ids: &[String]) -> Vec<String> {
    let mut users: Vec<String> = contact_ids.to_vec();
    users.push(user_id.to_owned());
    users.sort_unstable();
    users.dedup();
    users
}

#[async_trait]
impl ContactStore for CachedContacts {
    async fn add(
        &self,
        user_id: &str,
        contact_ids: &[String],
        max_contacts: usize,
    ) -> StoreResult<u32> {
        self.inner.writes.fetch_add(1, Ordering::AcqRel);
        let added = self
            .inner
            .durable
            .add(user_id, contact_ids, max_contacts)
            .await;
        // Refused for the limit: the durable store wrote nothing. Any other
        // outcome may have written something (a failed batch may be
        // half-applied): delete on doubt.
        if !matches!(added, Err(StoreError::TooManyContacts(_))) {
            self.inner.written(touched(user_id, contact_ids)).await;
        }
        added
    }

    async fn remove(&self, user_id: &str, contact_ids: &[String]) -> StoreResult<u32> {
        self.inner.writes.fetch_add(1, Ordering::AcqRel);
        let removed = self.inner.durable.remove(user_id, contact_ids).await;
        self.inner.written(touched(user_id, contact_ids)).await;
        removed
    }

    async fn list(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let inner = &self.inner;
        if !inner.cache_usable(user_id) {
            return inner.durable.list(user_id).await;
        }
        let missed = match inner.cache.get(user_id).await {
            Ok(Some(contacts)) => return Ok(contacts),
            Ok(None) => true,
            Err(cause) => {
                crate::metrics::backend_error("contacts_cache");
                tracing::debug!(%cause, "contacts cache unavailable, reading the durable store");
                false
            }
        };
        let started = Instant::now();
        let writes = inner.writes.load(Ordering::Acquire);
        let contacts = inner.durable.list(user_id).await?;
        if missed {
            let inner = inner.clone();
            let user_id = user_id.to_owned();
            let refill = contacts.clone();
            tokio::spawn(async move {
                // A write on this node since the read began, or a read slow
                // enough to predate a write elsewhere whose second delete
                // already ran: the list may be stale, not worth caching.
                if inner.writes.load(Ordering::Acquire) != writes
                    || started.elapsed() >= SECOND_DELETE_AFTER / 2
                {
                    return;
                }
                if let Err(cause) = inner.cache.fill(&user_id, &refill).await {
                    tracing::debug!(%cause, "refilling a cached contact list failed");
                }
            });
        }
        Ok(contacts)
    }
}
