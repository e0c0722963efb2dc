//! [`RedisHotStore`]: user records, node leases and the node index. The design
//! is in the [parent module](super)'s doc.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{ErrorKind, RedisResult, ServerErrorKind, Value};

use super::fanout::{PRESENCE, frame};
use super::scripts::{CAS_RECORD, FORGET_NODE, LOST_NODES, RENEW_NODE};
use super::{Error, Redis, RedisOptions, ReplicaWait, decode, encode, keys, millis};
use crate::domain::{self, Applied, Limits, Mutation, TransitionError, UserRecord};
use crate::metrics;
use crate::store::{HotStore, StoreResult};

/// Compare-and-set attempts of one `apply` before it gives up. Each losing
/// attempt means another writer of the same user won, so this only runs out
/// under pathological contention on one user.
const MAX_ATTEMPTS: u32 = 32;

/// How long this instance trusts its memory of the slots it marked in a
/// node's slot bitmap. Marking again later is idempotent, and it repairs a
/// mark that a failover lost (replication is asynchronous).
const MARKS_TRUSTED_FOR: Duration = Duration::from_secs(300);

/// How many node index sets `users_of_node` reads at once.
const INDEX_READS_IN_FLIGHT: usize = 64;

/// The hot store on Redis Cluster.
pub struct RedisHotStore {
    redis: Arc<Redis>,
    /// Names this store instance in reclaim claims.
    instance_id: String,
    idle_record_ttl_ms: u64,
    claim_ttl_ms: u64,
    log_retention_ms: u64,
    replica_wait: Option<ReplicaWait>,
    /// The nodes this instance renewed at least once: finding one of them
    /// gone from the store later means the store lost it.
    registered: Mutex<HashSet<String>>,
    /// Per node, the slots this instance has marked in the node's slot bitmap,
    /// so that a session opening costs no `SETBIT` once its slot is marked.
    /// std-style Mutex: held for a lookup or an insert.
    marked: Mutex<HashMap<String, MarkedSlots>>,
}

struct MarkedSlots {
    since: Instant,
    bits: Vec<u64>,
}

impl MarkedSlots {
    fn new() -> Self {
        MarkedSlots {
            since: Instant::now(),
            bits: vec![0; usize::from(keys::SLOTS) / 64],
        }
    }

    fn has(&self, slot: u16) -> bool {
        self.bits[usize::from(slot / 64)] & (1 << (slot % 64)) != 0
    }

    fn set(&mut self, slot: u16) {
        self.bits[usize::from(slot / 64)] |= 1 << (slot % 64);
    }
}

impl RedisHotStore {
    pub(super) fn new(redis: Arc<Redis>, options: &RedisOptions) -> Self {
        RedisHotStore {
            redis,
            instance_id: format!("{:016x}", rand::random::<u64>()),
            idle_record_ttl_ms: millis(options.idle_record_ttl).max(1),
            claim_ttl_ms: millis(options.reclaim_claim_ttl).max(1),
            log_retention_ms: millis(options.log_retention),
            replica_wait: options.replica_wait,
            registered: Mutex::default(),
            marked: Mutex::default(),
        }
    }

    /// Makes sure `slot` is marked in the slot bitmap of each of `nodes`,
    /// before the index of that slot may get them: `users_of_node` reads only
    /// marked slots, so marking after would leave a window for a ghost.
    async fn mark_slot(
        &self,
        conn: &mut ClusterConnection,
        nodes: &BTreeSet<&str>,
        slot: u16,
    ) -> Result<(), Error> {
        let missing: Vec<&str> = {
            let mut marked = self.marked.lock();
            nodes
                .iter()
                .copied()
                .filter(|node| {
                    let slots = marked
                        .entry((*node).to_owned())
                        .or_insert_with(MarkedSlots::new);
                    if slots.since.elapsed() > MARKS_TRUSTED_FOR {
                        *slots = MarkedSlots::new();
                    }
                    !slots.has(slot)
                })
                .collect()
        };
        for node in missing {
            redis::cmd("SETBIT")
                .arg(keys::node_slots(node))
                .arg(slot)
                .arg(1)
                .query_async::<()>(conn)
                .await?;
            if let Some(slots) = self.marked.lock().get_mut(node) {
                slots.set(slot);
            }
        }
        Ok(())
    }

    /// Reads the record, applies the mutation and writes the result back,
    /// again on what a concurrent writer wrote until no writer overtakes it.
    /// A mutation the rules refuse comes back as the inner error, unwritten.
    async fn compare_and_set(
        &self,
        user_id: &str,
        mutation: Mutation,
        now_ms: i64,
        limits: Limits,
    ) -> Result<Result<(UserRecord, Applied), TransitionError>, Error> {
        let keys = &self.redis.keys;
        let key = keys.user(user_id);
        let slot = keys.user_slot(user_id);
        let partition = keys.partition_of(user_id);
        let mut conn = self.redis.conn().await?;
        let (revision, stored): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("r")
            .arg("d")
            .query_async(&mut conn)
            .await?;
        let mut revision = revision.unwrap_or(0);
        let mut stored = stored.unwrap_or_default();
        for attempt in 0..MAX_ATTEMPTS {
            let before: UserRecord = if stored.is_empty() {
                UserRecord::default()
            } else {
                decode("user record", &stored)?
            };
            let mut record = before.clone();
            let (applied, steps) =
                match domain::apply_stepwise(&mut record, mutation.clone(), now_ms, limits) {
                    Ok(done) => done,
                    Err(refused) => return Ok(Err(refused)),
                };
            let nodes = nodes_of(&record);
            self.mark_slot(&mut conn, &nodes, slot).await?;
            if !applied.record_changed {
                return Ok(Ok((record, applied)));
            }
            let data = if record.is_empty() {
                Vec::new()
            } else {
                encode("user record", &record)?
            };
            let ttl_ms = if record.sessions.is_empty() {
                self.idle_record_ttl_ms
            } else {
                0
            };
            let node_indexes: Vec<String> = nodes
                .iter()
                .chain(nodes_of(&before).difference(&nodes))
                .map(|node| keys::node_index(slot, node))
                .collect();
            let log_horizon = u64::try_from(now_ms)
                .unwrap_or(0)
                .saturating_sub(self.log_retention_ms);
            let mut cas = redis::cmd("EVALSHA");
            cas.arg(CAS_RECORD.get_hash())
                .arg(2 + node_indexes.len())
                .arg(&key)
                .arg(keys.log(partition))
                .arg(&node_indexes)
                .arg(revision)
                .arg(data)
                .arg(user_id)
                .arg(nodes.len())
                .arg(ttl_ms)
                .arg(if applied.shown_changed { "1" } else { "0" })
                .arg(keys.bus_channel(partition))
                .arg(frame(PRESENCE, user_id, b""))
                .arg(log_horizon);
            for step in &steps {
                cas.arg(encode("user record", step)?);
            }
            let wait = self.replica_wait.filter(|_| applied.shown_changed);
            let (written, current_revision, current) =
                write_record(&mut conn, cas, slot, wait).await?;
            if written == 1 {
                return Ok(Ok((record, applied)));
            }
            // Another writer won: retry on what it wrote, which the script
            // returned. Spread repeated losers a little so they stop colliding.
            revision = current_revision;
            stored = current;
            if attempt > 0 {
                let pause = rand::random_range(0..=u64::from(attempt).min(10));
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        Err(Error::Contention(user_id.to_owned()))
    }

    /// The users in the node index of `node_id`, from the slots its bitmap marks.
    async fn indexed_users(&self, node_id: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.redis.conn().await?;
        let bitmap: Option<Vec<u8>> = redis::cmd("GET")
            .arg(keys::node_slots(node_id))
            .query_async(&mut conn)
            .await?;
        let slots = marked_slots(&bitmap.unwrap_or_default());
        let sets: Vec<Vec<String>> = futures::stream::iter(slots)
            .map(|slot| {
                let mut conn = conn.clone();
                async move {
                    redis::cmd("SMEMBERS")
                        .arg(keys::node_index(slot, node_id))
                        .query_async::<Vec<String>>(&mut conn)
                        .await
                }
            })
            .buffer_unordered(INDEX_READS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut users: Vec<String> = sets.into_iter().flatten().collect();
        users.sort_unstable();
        users.dedup();
        Ok(users)
    }
}

/// Runs `cas`, the EVALSHA of [`CAS_RECORD`], loading the script where the
/// master lacks it (a new master after a failover, or a restarted one). With
/// `wait`, the script and a `WAIT` go to the slot's master in one pipeline,
/// on one connection: `WAIT` counts the writes of its own connection. Should
/// the master fail meanwhile, the client sends both again to the one that
/// took over, where the change is then applied again, or found applied
/// already (the revision moved), before it is acknowledged.
async fn write_record(
    conn: &mut ClusterConnection,
    cas: redis::Cmd,
    slot: u16,
    wait: Option<ReplicaWait>,
) -> Result<(i64, u64, Vec<u8>), Error> {
    let mut loaded = false;
    loop {
        let written = match wait {
            None => cas.query_async(conn).await,
            Some(wait) => write_and_wait(conn, cas.clone(), slot, wait).await,
        };
        match written {
            Err(error)
                if !loaded && error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
            {
                CAS_RECORD.load_async(conn).await?;
                loaded = true;
            }
            written => return Ok(written?),
        }
    }
}

async fn write_and_wait(
    conn: &mut ClusterConnection,
    cas: redis::Cmd,
    slot: u16,
    wait: ReplicaWait,
) -> RedisResult<(i64, u64, Vec<u8>)> {
    let mut pipe = redis::pipe();
    pipe.add_command(cas)
        .cmd("WAIT")
        .arg(wait.replicas)
        .arg(millis(wait.timeout).max(1));
    let master = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
    let replies = conn.route_pipeline(pipe, 0, 2, master).await?;
    let Ok([written, replicas]) = <[Value; 2]>::try_from(replies) else {
        return Err((ErrorKind::UnexpectedReturnType, "a reply per command").into());
    };
    let written = redis::from_redis_value(written.extract_error()?)?;
    let replicas: u32 = redis::from_redis_value(replicas.extract_error()?)?;
    if replicas < wait.replicas {
        metrics::unreplicated();
        tracing::debug!(
            slot,
            replicas,
            "a change acknowledged before enough replicas held it"
        );
    }
    Ok(written)
}

/// The nodes holding the record's sessions.
fn nodes_of(record: &UserRecord) -> BTreeSet<&str> {
    record.sessions.iter().map(|s| s.node_id.as_str()).collect()
}

/// The slots set in a Redis bitmap (bit 0 is the high bit of the first byte).
fn marked_slots(bitmap: &[u8]) -> Vec<u16> {
    bitmap
        .iter()
        .enumerate()
        .flat_map(|(byte, bits)| {
            (0..8u16)
                .filter(move |bit| bits & (0x80 >> bit) != 0)
                .map(move |bit| byte as u16 * 8 + bit)
        })
        .filter(|slot| *slot < keys::SLOTS)
        .collect()
}

#[async_trait]
impl HotStore for RedisHotStore {
    async fn apply(
        &self,
        user_id: &str,
        mutation: Mutation,
        now_ms: i64,
        limits: Limits,
    ) -> StoreResult<(UserRecord, Applied)> {
        let outcome = self
            .redis
            .run(self.compare_and_set(user_id, mutation, now_ms, limits))
            .await?;
        Ok(outcome?)
    }

    async fn get(&self, user_ids: &[String]) -> StoreResult<Vec<Option<UserRecord>>> {
        self.redis
            .per_user(user_ids, |mut conn, user_id| async move {
                let data: Option<Vec<u8>> = redis::cmd("HGET")
                    .arg(self.redis.keys.user(user_id))
                    .arg("d")
                    .query_async(&mut conn)
                    .await?;
                data.map(|bytes| decode("user record", &bytes)).transpose()
            })
            .await
    }

    async fn seed(&self, user_id: &str, record: &UserRecord) -> StoreResult<bool> {
        // The compare-and-set against revision 0 writes only a missing record.
        // A seeded record has no sessions, so no node index is involved, and
        // it is no change: nothing is logged or published.
        let data = encode("user record", record)?;
        let keys = &self.redis.keys;
        let partition = keys.partition_of(user_id);
        let (written, _, _): (i64, u64, Vec<u8>) = self
            .redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                Ok(CAS_RECORD
                    .key(keys.user(user_id))
                    .key(keys.log(partition))
                    .arg(0)
                    .arg(data)
                    .arg(user_id)
                    .arg(0)
                    .arg(self.idle_record_ttl_ms)
                    .arg("0")
                    .arg(keys.bus_channel(partition))
                    .arg("")
                    .arg(0)
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok(written == 1)
    }

    async fn renew_node(&self, node_id: &str, ttl: Duration) -> StoreResult<bool> {
        let registered_before = self.registered.lock().contains(node_id);
        let known: i64 = self
            .redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                Ok(RENEW_NODE
                    .key(keys::node_registry())
                    .key(keys::node_lease(node_id))
                    .key(keys::node_claim(node_id))
                    .arg(node_id)
                    .arg(millis(ttl).max(1))
                    .arg(if registered_before { "1" } else { "0" })
                    .arg(crate::node::now_ms())
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        self.registered.lock().insert(node_id.to_owned());
        let mut marked = self.marked.lock();
        if known == 0 {
            // The store lost what this instance marked for the node, too.
            marked.remove(node_id);
        }
        // Node ids are new on every restart by default: drop the marks of
        // nodes not seen for a while (those in use are marked again anyway).
        marked.retain(|_, slots| slots.since.elapsed() <= MARKS_TRUSTED_FOR);
        Ok(known == 1)
    }

    async fn lost_nodes(&self) -> StoreResult<Vec<String>> {
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                let nodes: Vec<String> = redis::cmd("HKEYS")
                    .arg(keys::node_registry())
                    .query_async(&mut conn)
                    .await?;
                if nodes.is_empty() {
                    return Ok(Vec::new());
                }
                let mut find = LOST_NODES.prepare_invoke();
                for node in &nodes {
                    find.key(keys::node_lease(node));
                }
                for node in &nodes {
                    find.key(keys::node_claim(node));
                }
                find.arg(&self.instance_id).arg(self.claim_ttl_ms);
                let positions: Vec<usize> = find.invoke_async(&mut conn).await?;
                Ok(positions
                    .into_iter()
                    .filter_map(|at| nodes.get(at.wrapping_sub(1)).cloned())
                    .collect())
            })
            .await
    }

    async fn users_of_node(&self, node_id: &str) -> StoreResult<Vec<String>> {
        self.redis.run(self.indexed_users(node_id)).await
    }

    async fn forget_node(&self, node_id: &str) -> StoreResult<()> {
        self.redis
            .run(async {
                let remaining = self.indexed_users(node_id).await?;
                let mut conn = self.redis.conn().await?;
                if !remaining.is_empty() {
                    // Sessions were added after the caller listed them (the
                    // node was slow, not dead), or a leaving node still had
                    // some: end the lease so that a live node reclaims them.
                    tracing::warn!(
                        node_id,
                        users = remaining.len(),
                        "node still has sessions; leaving it to be reclaimed"
                    );
                    redis::cmd("DEL")
                        .arg(keys::node_lease(node_id))
                        .query_async::<()>(&mut conn)
                        .await?;
                    return Ok(());
                }
                FORGET_NODE
                    .key(keys::node_registry())
                    .key(keys::node_lease(node_id))
                    .key(keys::node_claim(node_id))
                    .key(keys::node_slots(node_id))
                    .arg(node_id)
                    .invoke_async::<()>(&mut conn)
                    .await?;
                self.registered.lock().remove(node_id);
                self.marked.lock().remove(node_id);
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_are_slots() {
        assert_eq!(marked_slots(&[0x80]), vec![0]);
        assert_eq!(marked_slots(&[0x01, 0x40]), vec![7, 9]);
        assert!(marked_slots(&[]).is_empty());
    }
}
