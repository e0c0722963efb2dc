//! Presence history in `presence_history` (one partition per user, clustered
//! by version, rows expiring after the retention) and the latest presence per
//! user in `presence_current` (kept without a TTL).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt};
use futures::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::{Queries, unavailable};
use crate::domain::{ChosenStatus, HistoryRecord, OfflineReason, VisibleStatus};
use crate::store::{ChoiceRecord, DurableState, HistoryStore, StoreError, StoreResult};

/// Writes in flight at once during one `append`. The driver pipelines them on
/// its connections; the bound keeps one large append from queueing thousands
/// of requests ahead of everyone else's reads.
const WRITES_IN_FLIGHT: usize = 256;

/// Concurrent single-partition reads in one `last`.
const READS_IN_FLIGHT: usize = 32;

/// History and current presence on a CQL store.
///
/// `append` writes each record as its own statement, concurrently, and not
/// in a batch: the records of one call belong to many users (many
/// partitions), where a batch only adds coordinator work, and a batch too
/// large for the server's limit would fail every retry. Each statement is
/// idempotent, so a failed append is safely retried whole.
pub struct ScyllaHistoryStore {
    session: Arc<Session>,
    insert: PreparedStatement,
    upsert_current: PreparedStatement,
    page: PreparedStatement,
    current: PreparedStatement,
    save_choice: PreparedStatement,
}

impl ScyllaHistoryStore {
    /// Prepares the queries of `history.cql` on `session`, in `keyspace`
    /// (whose schema must exist).
    pub async fn prepare(session: Arc<Session>, keyspace: &str) -> anyhow::Result<Self> {
        let queries = Queries::new(session.clone(), keyspace, include_str!("history.cql"))?;
        Ok(ScyllaHistoryStore {
            insert: queries.prepare("insert").await?,
            upsert_current: queries.prepare("upsert_current").await?,
            page: queries.prepare("page").await?,
            current: queries.prepare("current").await?,
            save_choice: queries.prepare("save_choice").await?,
            session,
        })
    }

    async fn insert(&self, record: &HistoryRecord) -> StoreResult<()> {
        let values = (
            &record.user_id,
            to_bigint(record.version),
            record.at_ms,
            status_name(record.status),
            record.offline_reason.map(reason_name),
            &record.custom_message,
        );
        self.session
            .execute_unpaged(&self.insert, values)
            .await
            .map_err(unavailable("history append"))?;
        Ok(())
    }

    /// Upserts the user's current presence with the record's version as the
    /// write timestamp: see `schema.cql` for why that makes the newest
    /// version win without a read or a lightweight transaction.
    async fn upsert_current(&self, record: &HistoryRecord, now_ms: i64) -> StoreResult<()> {
        let version = to_bigint(record.version);
        let values = (
            &record.user_id,
            status_name(record.status),
            &record.custom_message,
            record.at_ms,
            version,
            record.offline_reason.map(reason_name),
            now_ms,
            version,
        );
        self.session
            .execute_unpaged(&self.upsert_current, values)
            .await
            .map_err(unavailable("current presence upsert"))?;
        Ok(())
    }

    /// Writes the choice alone, with its stamp as the write timestamp: the
    /// newest choice wins, and the visible state is left as it is.
    async fn save_choice(&self, choice: &ChoiceRecord) -> StoreResult<()> {
        let at = to_bigint(choice.at_us);
        let values = (
            &choice.user_id,
            chosen_name(choice.chosen),
            &choice.custom_message,
            at,
            at,
        );
        self.session
            .execute_unpaged(&self.save_choice, values)
            .await
            .map_err(unavailable("choice save"))?;
        Ok(())
    }

    async fn current(&self, user_id: &str) -> StoreResult<DurableState> {
        type Row = (
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let row = self
            .session
            .execute_unpaged(&self.current, (user_id,))
            .await
            .map_err(unavailable("current presence read"))?
            .into_rows_result()
            .map_err(unavailable("current presence read"))?
            .maybe_first_row::<Row>()
            .map_err(unavailable("current presence read"))?;
        let Some((status, custom_message, last_seen, version, reason, chosen, message, at)) = row
        else {
            return Ok(DurableState::default());
        };
        // A row with only a choice: the user was never visible.
        let last = match (status, version) {
            (Some(status), Some(version)) => Some(HistoryRecord {
                user_id: user_id.to_owned(),
                at_ms: last_seen.unwrap_or(0),
                status: parse_status(&status)?,
                custom_message: custom_message.unwrap_or_default(),
                offline_reason: reason.as_deref().map(parse_reason).transpose()?,
                version: from_bigint(version),
            }),
            _ => None,
        };
        let choice = match (chosen, at) {
            (Some(chosen), Some(at)) => Some(ChoiceRecord {
                user_id: user_id.to_owned(),
                chosen: parse_chosen(&chosen)?,
                custom_message: message.unwrap_or_default(),
                at_us: from_bigint(at),
            }),
            _ => None,
        };
        Ok(DurableState { last, choice })
    }
}

#[async_trait]
impl HistoryStore for ScyllaHistoryStore {
    async fn append(&self, records: &[HistoryRecord]) -> StoreResult<()> {
        // Only each user's newest record can win in presence_current, so the
        // older ones are not written there at all.
        let mut newest: HashMap<&str, &HistoryRecord> = HashMap::new();
        for record in records {
            let held = newest.entry(&record.user_id).or_insert(record);
            if record.version > held.version {
                *held = record;
            }
        }
        let now_ms = crate::node::now_ms();
        // Boxed and collected first: a lazily mapped stream of borrowing
        // futures trips the compiler's Send check under async_trait.
        let writes: Vec<BoxFuture<'_, StoreResult<()>>> = records
            .iter()
            .map(|record| self.insert(record).boxed())
            .chain(
                newest
                    .into_values()
                    .map(|record| self.upsert_current(record, now_ms).boxed()),
            )
            .collect();
        stream::iter(writes)
            .buffer_unordered(WRITES_IN_FLIGHT)
            .try_collect::<()>()
            .await
    }

    async fn page(
        &self,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        after_version: u64,
        limit: usize,
    ) -> StoreResult<Vec<HistoryRecord>> {
        type Row = (i64, i64, Option<String>, Option<String>, Option<String>);
        if limit == 0 || from_ms > to_ms {
            return Ok(Vec::new());
        }
        let values = (
            user_id,
            to_bigint(after_version),
            from_ms,
            to_ms,
            i32::try_from(limit).unwrap_or(i32::MAX),
        );
        // Unpaged: LIMIT bounds the rows returned, and the server pages its
        // own scan of the partition while filtering.
        let result = self
            .session
            .execute_unpaged(&self.page, values)
            .await
            .map_err(unavailable("history page"))?
            .into_rows_result()
            .map_err(unavailable("history page"))?;
        let rows = result.rows::<Row>().map_err(unavailable("history page"))?;
        let mut records = Vec::with_capacity(result.rows_num());
        for row in rows {
            let (version, at_ms, status, reason, custom_message) =
                row.map_err(unavailable("history page"))?;
            records.push(HistoryRecord {
                user_id: user_id.to_owned(),
                at_ms,
                status: parse_status(status.as_deref().unwrap_or_default())?,
                custom_message: custom_message.unwrap_or_default(),
                offline_reason: reason.as_deref().map(parse_reason).transpose()?,
                version: from_bigint(version),
            });
        }
        Ok(records)
    }

    /// The visible part of [`HistoryStore::durable`].
    async fn last(&self, user_ids: &[String]) -> StoreResult<Vec<Option<HistoryRecord>>> {
        let states = self.durable(user_ids).await?;
        Ok(states.into_iter().map(|state| state.last).collect())
    }

    async fn save_choices(&self, choices: &[ChoiceRecord]) -> StoreResult<()> {
        let writes: Vec<BoxFuture<'_, StoreResult<()>>> = choices
            .iter()
            .map(|choice| self.save_choice(choice).boxed())
            .collect();
        stream::iter(writes)
            .buffer_unordered(WRITES_IN_FLIGHT)
            .try_collect::<()>()
            .await
    }

    /// Reads `presence_current`, which has no TTL: the answer outlives the
    /// history's retention.
    async fn durable(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>> {
        // One single-partition read per user, concurrently, in order: a
        // multi-partition `IN` would make one coordinator gather them all.
        let reads: Vec<BoxFuture<'_, StoreResult<DurableState>>> = user_ids
            .iter()
            .map(|user_id| self.current(user_id).boxed())
            .collect();
        stream::iter(reads)
            .buffered(READS_IN_FLIGHT)
            .try_collect()
            .await
    }
}

/// Versions are u64 in the domain and bigint (i64) in CQL. Real versions are
/// microsecond clock values, far below i64::MAX; saturating keeps the order
/// for anything larger rather than wrapping to negative.
fn to_bigint(version: u64) -> i64 {
    i64::try_from(version).unwrap_or(i64::MAX)
}

fn from_bigint(version: i64) -> u64 {
    u64::try_from(version).unwrap_or(0)
}

/// Statuses and reasons are stored as readable names, so the tables make
/// sense in cqlsh and survive reordering of the Rust enums.
fn status_name(status: VisibleStatus) -> &'static str {
    match status {
        VisibleStatus::Offline => "offline",
        VisibleStatus::Online => "online",
        VisibleStatus::Idle => "idle",
        VisibleStatus::Busy => "busy",
    }
}

fn parse_status(name: &str) -> StoreResult<VisibleStatus> {
    Ok(match name {
        "offline" => VisibleStatus::Offline,
        "online" => VisibleStatus::Online,
        "idle" => VisibleStatus::Idle,
        "busy" => VisibleStatus::Busy,
        other => {
            return Err(StoreError::Unavailable(format!(
                "scylla: unknown status {other:?} in a stored row"
            )));
        }
    })
}

fn chosen_name(chosen: ChosenStatus) -> &'static str {
    match chosen {
        ChosenStatus::Online => "online",
        ChosenStatus::Busy => "busy",
        ChosenStatus::Invisible => "invisible",
    }
}

fn parse_chosen(name: &str) -> StoreResult<ChosenStatus> {
    Ok(match name {
        "online" => ChosenStatus::Online,
        "busy" => ChosenStatus::Busy,
        "invisible" => ChosenStatus::Invisible,
        other => {
            return Err(StoreError::Unavailable(format!(
                "scylla: unknown chosen status {other:?} in a stored row"
            )));
        }
    })
}

fn reason_name(reason: OfflineReason) -> &'static str {
    match reason {
        OfflineReason::Logout => "logout",
        OfflineReason::ConnectionClosed => "connection_closed",
        OfflineReason::LeaseExpired => "lease_expired",
        OfflineReason::NodeLost => "node_lost",
        OfflineReason::Invisible => "invisible",
    }
}

fn parse_reason(name: &str) -> StoreResult<OfflineReason> {
    Ok(match name {
        "logout" => OfflineReason::Logout,
        "connection_closed" => OfflineReason::ConnectionClosed,
        "lease_expired" => OfflineReason::LeaseExpired,
        "node_lost" => OfflineReason::NodeLost,
        "invisible" => OfflineReason::Invisible,
        other => {
            return Err(StoreError::Unavailable(format!(
                "scylla: unknown offline reason {other:?} in a stored row"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in [
            VisibleStatus::Offline,
            VisibleStatus::Online,
            VisibleStatus::Idle,
            VisibleStatus::Busy,
        ] {
            assert_eq!(parse_status(status_name(status)).unwrap(), status);
        }
        for reason in [
            OfflineReason::Logout,
            OfflineReason::ConnectionClosed,
            OfflineReason::LeaseExpired,
            OfflineReason::NodeLost,
            OfflineReason::Invisible,
        ] {
            assert_eq!(parse_reason(reason_name(reason)).unwrap(), reason);
        }
        assert!(parse_status("away").is_err());
        for chosen in [
            ChosenStatus::Online,
            ChosenStatus::Busy,
            ChosenStatus::Invisible,
        ] {
            assert_eq!(parse_chosen(chosen_name(chosen)).unwrap(), chosen);
        }
        assert!(parse_chosen("away").is_err());
    }

    #[test]
    fn versions_keep_their_order_in_bigint() {
        assert_eq!(to_bigint(7), 7);
        assert_eq!(to_bigint(u64::MAX), i64::MAX);
        assert_eq!(from_bigint(-1), 0);
    }
}
