//! [`RedisChangeLog`]: the change log as one Redis stream per partition.
//!
//! The compare-and-set script appends each visible change to its partition's
//! stream (`XADD` with a `MINID` trim to the retention) in the same step as it
//! writes the record, so the log holds every change exactly once per version
//! and in version order per user. Consumer groups are Redis stream groups,
//! one per partition stream; membership (which member reads which
//! partitions) is a small hash per group with a deadline per member.
//!
//! Reads never block a Redis connection (`BLOCK` would stall the multiplexed
//! connection every other call shares): a reader that finds nothing waits
//! for the fan-out to carry a message on its partition's channel, which the
//! same script publishes, and reads again; and at least every
//! [`POLL_EVERY`], in case the wake-up was lost with a channel.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::scripts::FEED_JOIN;
use super::{Error, Redis, decode, millis};
use crate::store::{ChangeLog, GroupStart, LoggedChange, Offset, StoreResult};

/// The longest a waiting reader goes without reading its stream again.
const POLL_EVERY: Duration = Duration::from_secs(1);

pub struct RedisChangeLog {
    redis: Arc<Redis>,
    /// Per partition, woken by the fan-out on every message of its channel.
    wakeups: Arc<Vec<Notify>>,
}

impl RedisChangeLog {
    pub(super) fn new(redis: Arc<Redis>, wakeups: Arc<Vec<Notify>>) -> Self {
        RedisChangeLog { redis, wakeups }
    }

    /// Runs `read` until it finds something or `wait` passes.
    async fn wait_for<F, Fut>(
        &self,
        partition: u16,
        wait: Duration,
        read: F,
    ) -> StoreResult<Vec<LoggedChange>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Vec<LoggedChange>, Error>>,
    {
        let deadline = Instant::now() + wait;
        let wakeup = &self.wakeups[usize::from(partition) % self.wakeups.len()];
        loop {
            let woken = wakeup.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let found = self.redis.run(read()).await?;
            let now = Instant::now();
            if !found.is_empty() || now >= deadline {
                return Ok(found);
            }
            let _ = tokio::time::timeout_at(deadline.min(now + POLL_EVERY), woken).await;
        }
    }

    /// Creates `group` on one partition's stream (and the stream, if the
    /// partition never had a change); an existing group is left as it is.
    async fn create_on(&self, group: &str, partition: u16, start: &str) -> Result<(), Error> {
        let mut conn = self.redis.conn().await?;
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.redis.keys.log(partition))
            .arg(group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }
}

/// The id Redis starts a new group at.
fn start_id(start: GroupStart) -> String {
    match start {
        GroupStart::Latest => "$".to_owned(),
        GroupStart::Oldest => "0".to_owned(),
        GroupStart::At(ms) => Offset::before(ms).to_string(),
    }
}

fn changes(partition: u16, entries: Vec<StreamId>) -> Result<Vec<LoggedChange>, Error> {
    entries
        .into_iter()
        .map(|entry| {
            let field = |name: &str| match entry.map.get(name) {
                Some(Value::BulkString(bytes)) => Ok(bytes.as_slice()),
                _ => Err(Error::Malformed(format!(
                    "log entry {} of partition {partition} lacks field {name}",
                    entry.id
                ))),
            };
            Ok(LoggedChange {
                partition,
                offset: entry.id.parse().map_err(Error::Malformed)?,
                user_id: String::from_utf8_lossy(field("u")?).into_owned(),
                record: decode("logged record", field("d")?)?,
            })
        })
        .collect()
}

fn read_reply(partition: u16, reply: Option<StreamReadReply>) -> Result<Vec<LoggedChange>, Error> {
    let entries = reply
        .into_iter()
        .flat_map(|reply| reply.keys)
        .flat_map(|key| key.ids)
        .collect();
    changes(partition, entries)
}

#[async_trait]
impl ChangeLog for RedisChangeLog {
    fn partitions(&self) -> u16 {
        self.redis.keys.partitions()
    }

    async fn read(
        &self,
        partition: u16,
        after: Offset,
        count: usize,
        wait: Duration,
    ) -> StoreResult<Vec<LoggedChange>> {
        let key = self.redis.keys.log(partition);
        let after = after.to_string();
        self.wait_for(partition, wait, || async {
            let mut conn = self.redis.conn().await?;
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(count.max(1))
                .arg("STREAMS")
                .arg(&key)
                .arg(&after)
                .query_async(&mut conn)
                .await?;
            read_reply(partition, reply)
        })
        .await
    }

    async fn create_group(&self, group: &str, start: GroupStart) -> StoreResult<()> {
        let start = start_id(start);
        self.redis
            .run(async {
                for partition in 0..self.partitions() {
                    self.create_on(group, partition, &start).await?;
                }
                Ok(())
            })
            .await
    }

    async fn read_group(
        &self,
        group: &str,
        consumer: &str,
        partition: u16,
        count: usize,
        wait: Duration,
    ) -> StoreResult<Vec<LoggedChange>> {
        let key = self.redis.keys.log(partition);
        self.wait_for(partition, wait, || async {
            let read = || async {
                let mut conn = self.redis.conn().await?;
                let reply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count.max(1))
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async::<Option<StreamReadReply>>(&mut conn)
                    .await;
                Ok::<_, Error>(reply)
            };
            let reply = match read().await? {
                // Redis lost the stream (restarted empty, or a failover to
                // a replica that never had the group): the group starts
                // over at what is left.
                Err(error) if error.code() == Some("NOGROUP") => {
                    self.create_on(group, partition, "0").await?;
                    read().await??
                }
                other => other?,
            };
            read_reply(partition, reply)
        })
        .await
    }

    async fn claim_stale(
        &self,
        group: &str,
        consumer: &str,
        partition: u16,
        idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<LoggedChange>> {
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                let claimed = redis::cmd("XAUTOCLAIM")
                    .arg(self.redis.keys.log(partition))
                    .arg(group)
                    .arg(consumer)
                    .arg(millis(idle))
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count.max(1))
                    .query_async::<StreamAutoClaimReply>(&mut conn)
                    .await;
                match claimed {
                    Err(error) if error.code() == Some("NOGROUP") => Ok(Vec::new()),
                    claimed => changes(partition, claimed?.claimed),
                }
            })
            .await
    }

    async fn pending(&self, group: &str, partition: u16) -> StoreResult<usize> {
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                // The summary form: [count, lowest id, highest id, consumers].
                let summary = redis::cmd("XPENDING")
                    .arg(self.redis.keys.log(partition))
                    .arg(group)
                    .query_async::<(usize, Value, Value, Value)>(&mut conn)
                    .await;
                match summary {
                    Err(error) if error.code() == Some("NOGROUP") => Ok(0),
                    summary => Ok(summary?.0),
                }
            })
            .await
    }

    async fn ack(&self, group: &str, partition: u16, offsets: &[Offset]) -> StoreResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                let mut ack = redis::cmd("XACK");
                ack.arg(self.redis.keys.log(partition)).arg(group);
                for offset in offsets {
                    ack.arg(offset.to_string());
                }
                ack.query_async::<()>(&mut conn).await?;
                Ok(())
            })
            .await
    }

    async fn join(&self, group: &str, member: &str, ttl: Duration) -> StoreResult<Vec<String>> {
        let now = u64::try_from(crate::node::now_ms()).unwrap_or(0);
        let mut members: Vec<String> = self
            .redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                Ok(FEED_JOIN
                    .key(super::keys::feed_members(group))
                    .arg(now)
                    .arg(member)
                    .arg(now + millis(ttl).max(1))
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        members.sort_unstable();
        Ok(members)
    }

    async fn leave(&self, group: &str, member: &str) -> StoreResult<()> {
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                redis::cmd("HDEL")
                    .arg(super::keys::feed_members(group))
                    .arg(member)
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            })
            .await
    }
}
