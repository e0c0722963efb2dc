//! [`RedisHistoryStore`]: one sorted set per user, scored by version, members
//! the JSON records, pruned to the retention on every append and expiring
//! whole when the user's presence stops changing; and one small hash per user
//! with their latest choice, kept without expiry. For a deployment without
//! ScyllaDB; with it, Scylla holds the durable history.
//!
//! Scores are doubles, exact for integers up to 2^53; versions are
//! microseconds since 1970 (about 2^51 today), so they stay exact for
//! another two centuries.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::scripts::{CHOICE_SAVE, HISTORY_APPEND};
use super::{Error, Redis, RedisOptions, decode, encode, keys, millis};
use crate::domain::HistoryRecord;
use crate::store::{ChoiceRecord, DurableState, HistoryStore, StoreResult};

/// Records read per round trip while paging.
const PAGE_CHUNK: usize = 256;

pub struct RedisHistoryStore {
    redis: Arc<Redis>,
    retention_ms: u64,
}

impl RedisHistoryStore {
    pub(super) fn new(redis: Arc<Redis>, options: &RedisOptions) -> Self {
        RedisHistoryStore {
            redis,
            retention_ms: millis(options.history_retention).max(1),
        }
    }

    async fn append_user(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
        user_id: &str,
        records: &[&HistoryRecord],
    ) -> Result<(), Error> {
        let newest = records.iter().map(|r| r.at_ms).max().unwrap_or(0);
        let horizon = newest.saturating_sub(i64::try_from(self.retention_ms).unwrap_or(i64::MAX));
        let mut append = HISTORY_APPEND.prepare_invoke();
        append
            .key(keys::history(user_id))
            .arg(self.retention_ms)
            .arg(horizon);
        for record in records {
            append
                .arg(record.version)
                .arg(encode("history record", record)?);
        }
        append.invoke_async::<()>(conn).await?;
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for RedisHistoryStore {
    async fn append(&self, records: &[HistoryRecord]) -> StoreResult<()> {
        let mut by_user: BTreeMap<&str, Vec<&HistoryRecord>> = BTreeMap::new();
        for record in records {
            by_user.entry(&record.user_id).or_default().push(record);
        }
        self.redis
            .per_user(&by_user, |mut conn, (user_id, records)| async move {
                self.append_user(&mut conn, user_id, records).await
            })
            .await?;
        Ok(())
    }

    async fn page(
        &self,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        after_version: u64,
        limit: usize,
    ) -> StoreResult<Vec<HistoryRecord>> {
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                let key = keys::history(user_id);
                let mut page = Vec::new();
                let mut offset = 0;
                // Versions order the records; at_ms (the window) follows them
                // closely but not strictly across nodes' clocks, so the window
                // is a filter over the version-ordered scan, not a range.
                while page.len() < limit {
                    let chunk: Vec<Vec<u8>> = redis::cmd("ZRANGEBYSCORE")
                        .arg(&key)
                        .arg(format!("({after_version}"))
                        .arg("+inf")
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(PAGE_CHUNK)
                        .query_async(&mut conn)
                        .await?;
                    for member in &chunk {
                        let record: HistoryRecord = decode("history record", member)?;
                        if record.at_ms >= from_ms && record.at_ms <= to_ms {
                            page.push(record);
                            if page.len() == limit {
                                break;
                            }
                        }
                    }
                    if chunk.len() < PAGE_CHUNK {
                        break;
                    }
                    offset += PAGE_CHUNK;
                }
                Ok(page)
            })
            .await
    }

    async fn last(&self, user_ids: &[String]) -> StoreResult<Vec<Option<HistoryRecord>>> {
        self.redis
            .per_user(user_ids, |mut conn, user_id| async move {
                newest_record(&mut conn, user_id).await
            })
            .await
    }

    async fn save_choices(&self, choices: &[ChoiceRecord]) -> StoreResult<()> {
        self.redis
            .per_user(choices, |mut conn, choice| async move {
                CHOICE_SAVE
                    .key(keys::choice(&choice.user_id))
                    .arg(choice.at_us)
                    .arg(encode("choice", choice)?)
                    .invoke_async::<i64>(&mut conn)
                    .await?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn durable(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>> {
        self.redis
            .per_user(user_ids, |mut conn, user_id| async move {
                let last = newest_record(&mut conn, user_id).await?;
                let choice: Option<Vec<u8>> = redis::cmd("HGET")
                    .arg(keys::choice(user_id))
                    .arg("d")
                    .query_async(&mut conn)
                    .await?;
                let choice = choice.map(|choice| decode("choice", &choice)).transpose()?;
                Ok(DurableState { last, choice })
            })
            .await
    }
}

async fn newest_record(
    conn: &mut redis::cluster_async::ClusterConnection,
    user_id: &str,
) -> Result<Option<HistoryRecord>, Error> {
    let newest: Vec<Vec<u8>> = redis::cmd("ZRANGE")
        .arg(keys::history(user_id))
        .arg(-1)
        .arg(-1)
        .query_async(conn)
        .await?;
    newest
        .first()
        .map(|member| decode("history record", member))
        .transpose()
}
