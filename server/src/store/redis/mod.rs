//! The production hot store, contacts, history and fan-out, on Redis Cluster.
//!
//! # Hot state
//!
//! A user's record is one hash holding a revision and the serialized
//! [`UserRecord`](crate::domain::UserRecord), in the slot of the user's
//! partition (see [`keys`]). `apply` reads both (one `HMGET`), runs the pure
//! [`crate::domain::apply`] in Rust, and writes back with a compare-and-set
//! script that fails if the revision moved; the failure returns the current
//! record, so the retry needs no second read. When what contacts see changed,
//! the same script appends the record to the partition's change log and
//! publishes it on the partition's fan-out channel ([`RedisChangeLog`],
//! [`RedisFanOut`]). The presence rules thus live once, in Rust, and Redis
//! only guards atomicity. A record with no live session expires after
//! [`RedisOptions::idle_record_ttl`]; an empty one is deleted.
//!
//! Records are JSON: a few hundred bytes per user, readable with `redis-cli`,
//! and tolerant of fields added in a later release (serde ignores unknown
//! fields), which a compact positional encoding would not be during a rolling
//! upgrade where two releases share the cluster.
//!
//! # Node leases and reclaim
//!
//! Each node renews one lease key every third of its lease; sessions cost
//! Redis nothing between changes (heartbeats stay in the node's memory). To
//! end the sessions of a node that died, the store keeps a node index: which
//! users hold a session on which node. It is updated by the same script as the
//! record (see [`keys`] for how it shares the user's slot), so it is exact:
//! no write order to get right, no ghost after a crash between two writes.
//! Per node a bitmap of the slots its index uses lets `users_of_node` read
//! only those. A lost node is claimed by one reclaiming store instance at a
//! time (`lost_nodes`), and `forget_node` refuses to forget a node whose index
//! still holds users: it expires the node's lease instead, so another node
//! reclaims them.
//!
//! # Redis commands per operation
//!
//! Measured with `INFO commandstats`; commands a script runs inside Redis
//! are not counted.
//!
//! - change that alters the record (open, status, activity, end): `HMGET` +
//!   `EVALSHA`, the change log's `XADD` and the fan-out's `SPUBLISH` run
//!   inside the script (+1 `EVALSHA` per concurrent writer that won the
//!   race), plus one `SETBIT` the first time this process sees a node get a
//!   session in a slot (then remembered for 5 minutes);
//! - change that alters nothing (e.g. a late close of a replaced connection):
//!   `HMGET`;
//! - heartbeat: none; node lease: one `EVALSHA` per node every lease / 3;
//! - fan-out of a change: inside the change's script, received by every
//!   node; a session open or logout adds one `SPUBLISH` (device taken);
//! - the history projection: per batch of up to 500 changes of a partition,
//!   one `XREADGROUP` and one `XACK`; while idle, one `XREADGROUP` per
//!   partition per second and one `XAUTOCLAIM` per partition every 5 s, and
//!   one `EVALSHA` (membership) per node per second;
//! - `get` of n users: n `HGET`, sent back to back;
//! - every sweep, per node: `HKEYS` + `EVALSHA` looking for lost nodes;
//! - background, per node: one `SPUBLISH` probe per partition every 10 s (see
//!   [`RedisFanOut`]), and at most one pool checkout (a `PING` to every
//!   master) per pooled connection per second.
//!
//! Connections come from a deadpool-redis cluster pool. Each pooled object is
//! a multiplexed, self-healing cluster connection (it follows MOVED/ASK and
//! reconnects after a failover by itself), and deadpool checks an object out
//! with a `PING` to every master. So a checked-out connection is shared by
//! clones for a second before the next checkout instead of paying that on
//! every call: checking out per call made a change 60% slower and cut
//! throughput fourfold on the test cluster.

mod contacts;
mod fanout;
mod history;
mod hot;
pub mod keys;
mod log;
mod scripts;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool_redis::cluster::{Config as PoolSetup, Pool, PoolConfig};
use deadpool_redis::{Runtime, Timeouts};
use parking_lot::Mutex;
use redis::cluster_async::ClusterConnection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use contacts::RedisContactStore;
pub use fanout::RedisFanOut;
pub use history::RedisHistoryStore;
pub use hot::RedisHotStore;
pub use log::RedisChangeLog;

use super::{StoreError, StoreResult};
use crate::hub::Hub;
use keys::Keys;

/// How the Redis backends connect and behave. [`RedisOptions::new`] gives the
/// defaults documented on each field.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Seed URLs of the cluster (`redis://host:port`); any reachable one is
    /// enough to discover the others.
    pub urls: Vec<String>,
    /// How long history is kept (the history key's expiry, too).
    pub history_retention: Duration,
    /// How many partitions the users, their change log and the fan-out are
    /// spread over. Every node of a deployment must use the same count;
    /// the first node to start records it. Default: 16.
    pub partitions: u16,
    /// How long the change log keeps a change. Default: the history
    /// retention.
    pub log_retention: Duration,
    /// Cluster connections in the pool. Each is multiplexed, so a few carry
    /// any concurrency. Default: 4.
    pub pool_size: usize,
    /// The most one store call may take, retries and redirects included,
    /// before it fails as unavailable. Default: 5 s, enough to ride out a
    /// master failover with the test cluster's 2 s node timeout.
    pub op_timeout: Duration,
    /// How long the record of a user with no live session is kept after its
    /// last change (it holds `last_seen`). Default: 30 days.
    pub idle_record_ttl: Duration,
    /// How long a claim to reclaim a lost node lasts if its claimant stops
    /// renewing it (by looking for lost nodes). Default: 15 s.
    pub reclaim_claim_ttl: Duration,
    /// Whether a visible change waits for replicas before it is
    /// acknowledged. Default: no (replication is asynchronous).
    pub replica_wait: Option<ReplicaWait>,
}

/// A visible change is acknowledged once `replicas` replicas of its master
/// hold it (Redis `WAIT`), so that a master failover does not lose it: the
/// failover promotes the replica that is furthest ahead. Past `timeout` (a
/// replica down or lagging) the change is acknowledged anyway and counted
/// ([`crate::metrics::UNREPLICATED`]): a lost replica must not stop
/// presence.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaWait {
    pub replicas: u32,
    pub timeout: Duration,
}

impl RedisOptions {
    pub fn new(urls: &[String], history_retention: Duration) -> Self {
        RedisOptions {
            urls: urls.to_vec(),
            history_retention,
            partitions: 16,
            log_retention: history_retention,
            pool_size: 4,
            op_timeout: Duration::from_secs(5),
            idle_record_ttl: Duration::from_secs(30 * 24 * 3600),
            reclaim_claim_ttl: Duration::from_secs(15),
            replica_wait: None,
        }
    }
}

/// The Redis backends of one node, sharing one connection pool.
pub struct RedisBackends {
    pub hot: Arc<RedisHotStore>,
    pub contacts: Arc<RedisContactStore>,
    pub history: Arc<RedisHistoryStore>,
    pub fanout: Arc<RedisFanOut>,
    pub log: Arc<RedisChangeLog>,
    /// The task that keeps this node subscribed to the fan-out channels and
    /// hands what arrives to the hub. It ends once `fanout` is dropped.
    pub subscriber: JoinHandle<()>,
}

/// Connects to the cluster with default options; see [`connect_with`].
pub async fn connect(
    urls: &[String],
    hub: Arc<Hub>,
    history_retention: Duration,
) -> StoreResult<RedisBackends> {
    connect_with(RedisOptions::new(urls, history_retention), hub).await
}

/// Connects to the cluster and subscribes this node's `hub` to the fan-out.
/// Fails, naming the cause, if the cluster cannot be reached or does not
/// serve every slot within `op_timeout`.
pub async fn connect_with(options: RedisOptions, hub: Arc<Hub>) -> StoreResult<RedisBackends> {
    if options.urls.is_empty() {
        return Err(StoreError::Unavailable(
            "no redis cluster seed url given".into(),
        ));
    }
    let redis = Arc::new(Redis::new(&options)?);
    let ping = async {
        let mut conn = redis.conn().await?;
        // Routed to every master: each must answer.
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(Error::from)
    };
    let reached = match tokio::time::timeout(options.op_timeout, ping).await {
        Ok(reached) => reached,
        Err(_) => Err(Error::Timeout(options.op_timeout)),
    };
    if let Err(error) = reached {
        return Err(StoreError::Unavailable(format!(
            "redis cluster at {} unreachable: {error}",
            options.urls.join(",")
        )));
    }
    check_partitions(&redis, options.op_timeout).await?;
    let wakeups: Arc<Vec<Notify>> = Arc::new(
        (0..redis.keys.partitions())
            .map(|_| Notify::new())
            .collect(),
    );
    let (fanout, subscriber) =
        RedisFanOut::start(redis.clone(), &options, hub, wakeups.clone()).await?;
    Ok(RedisBackends {
        hot: Arc::new(RedisHotStore::new(redis.clone(), &options)),
        log: Arc::new(RedisChangeLog::new(redis.clone(), wakeups)),
        contacts: Arc::new(RedisContactStore::new(redis.clone())),
        history: Arc::new(RedisHistoryStore::new(redis, &options)),
        fanout,
        subscriber,
    })
}

/// Records this node's partition count if it is the first, and refuses to
/// go on if the deployment's differs: nodes disagreeing on it would look for
/// the same user under different keys.
async fn check_partitions(redis: &Redis, timeout: Duration) -> StoreResult<()> {
    let ours = redis.keys.partitions();
    let recorded: Option<u16> = redis
        .run(async {
            let mut conn = redis.conn().await?;
            let _: Option<String> = redis::cmd("SET")
                .arg(keys::partitions_setting())
                .arg(ours)
                .arg("NX")
                .query_async(&mut conn)
                .await?;
            Ok(redis::cmd("GET")
                .arg(keys::partitions_setting())
                .query_async(&mut conn)
                .await?)
        })
        .await
        .map_err(|error| {
            StoreError::Unavailable(format!(
                "reading the partition count within {timeout:?}: {error}"
            ))
        })?;
    match recorded {
        Some(theirs) if theirs != ours => Err(StoreError::Unavailable(format!(
            "this node was started with --log-partitions {ours}, but the Redis Cluster holds a deployment with {theirs}; every node must use the same count"
        ))),
        _ => Ok(()),
    }
}

/// What can go wrong talking to Redis. Callers see it as
/// [`StoreError::Unavailable`], with this as the message for the logs.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::cluster::PoolError),
    #[error("redis pool setup: {0}")]
    PoolSetup(#[from] deadpool_redis::cluster::CreatePoolError),
    #[error("redis call took longer than {0:?}")]
    Timeout(Duration),
    #[error("undecodable {what} in redis: {error}")]
    Decode {
        what: &'static str,
        error: serde_json::Error,
    },
    #[error("cannot encode {what}: {error}")]
    Encode {
        what: &'static str,
        error: serde_json::Error,
    },
    #[error("user {0} changed concurrently too often, gave up")]
    Contention(String),
    #[error("malformed data in redis: {0}")]
    Malformed(String),
}

impl From<Error> for StoreError {
    fn from(error: Error) -> Self {
        StoreError::Unavailable(error.to_string())
    }
}

/// How long a checked-out connection is reused before the next checkout.
const CHECKOUT_REUSE: Duration = Duration::from_secs(1);

/// The connection pool and the per-call deadline, shared by the four stores.
pub(crate) struct Redis {
    keys: Keys,
    pool: Pool,
    /// One reusable connection per pooled object, with when it was checked
    /// out. std-style Mutex: held only to clone or replace the entry.
    reusable: Vec<Mutex<Option<(Instant, ClusterConnection)>>>,
    next: AtomicUsize,
    op_timeout: Duration,
}

impl Redis {
    fn new(options: &RedisOptions) -> Result<Redis, Error> {
        let size = options.pool_size.max(1);
        let mut setup = PoolSetup::from_urls(options.urls.clone());
        let mut pool = PoolConfig::new(size);
        pool.timeouts = Timeouts {
            wait: Some(options.op_timeout),
            create: Some(options.op_timeout),
            recycle: Some(options.op_timeout),
        };
        setup.pool = Some(pool);
        Ok(Redis {
            keys: Keys::new(options.partitions),
            pool: setup.create_pool(Some(Runtime::Tokio1))?,
            reusable: (0..size).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            op_timeout: options.op_timeout,
        })
    }

    /// A connection for one call. A cluster connection multiplexes any number
    /// of concurrent callers, so the pool's objects are shared rather than
    /// held: each is checked out (deadpool's health check, a PING to every
    /// master) at most once per [`CHECKOUT_REUSE`], and cloned in between.
    /// An object that fails its check is replaced by the pool.
    async fn conn(&self) -> Result<ClusterConnection, Error> {
        let slot = &self.reusable[self.next.fetch_add(1, Ordering::Relaxed) % self.reusable.len()];
        if let Some((since, conn)) = &*slot.lock()
            && since.elapsed() < CHECKOUT_REUSE
        {
            return Ok(conn.clone());
        }
        let object = self.pool.get().await?;
        let conn = ClusterConnection::clone(&object);
        drop(object);
        *slot.lock() = Some((Instant::now(), conn.clone()));
        Ok(conn)
    }

    /// Runs one store call within the deadline, mapping its errors.
    async fn run<T>(&self, call: impl Future<Output = Result<T, Error>>) -> StoreResult<T> {
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(Error::Timeout(self.op_timeout).into()),
        }
    }

    /// Runs `call` once per item (one user's keys each), all at once on one
    /// connection and within one deadline; the results come in the items'
    /// order. Different users live on different slots, so there is no
    /// pipeline to build: concurrent calls on the multiplexed connection go
    /// out back-to-back anyway.
    async fn per_user<I, T, F, Fut>(&self, items: I, call: F) -> StoreResult<Vec<T>>
    where
        I: IntoIterator,
        F: Fn(ClusterConnection, I::Item) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        self.run(async {
            let conn = self.conn().await?;
            futures::future::try_join_all(items.into_iter().map(|item| call(conn.clone(), item)))
                .await
        })
        .await
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|error| Error::Decode { what, error })
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|error| Error::Encode { what, error })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
