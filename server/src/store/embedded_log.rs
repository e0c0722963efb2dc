//! [`EmbeddedChangeLog`]: the change log in this process's memory, for the
//! embedded backends. It keeps Redis streams' semantics (offsets, consumer
//! groups, pending changes, claims), so the feed API and its consumers behave
//! the same on one node as on Redis Cluster.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::redis::keys::partition_of;
use super::{ChangeLog, GroupStart, LoggedChange, Offset, StoreResult};
use crate::domain::UserRecord;

pub struct EmbeddedChangeLog {
    retention: Duration,
    /// Most changes each partition keeps, whatever their age: the log lives
    /// in this process's memory.
    partition_capacity: usize,
    partitions: Vec<Partition>,
    /// Per group, each member's deadline.
    members: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

#[derive(Default)]
struct Partition {
    /// std-style Mutex: held for a few queue and map operations.
    state: Mutex<PartitionState>,
    appended: Notify,
}

#[derive(Default)]
struct PartitionState {
    entries: VecDeque<Arc<LoggedChange>>,
    last: Offset,
    groups: HashMap<String, GroupState>,
}

struct GroupState {
    /// The last offset read by any member.
    delivered: Offset,
    /// Read and not acknowledged: by whom, and since when.
    pending: BTreeMap<Offset, (String, Instant)>,
}

impl PartitionState {
    fn after(&self, after: Offset, count: usize) -> Vec<LoggedChange> {
        let start = self.entries.partition_point(|e| e.offset <= after);
        self.entries
            .iter()
            .skip(start)
            .take(count)
            .map(|e| LoggedChange::clone(e))
            .collect()
    }

    fn at(&self, offset: Offset) -> Option<&Arc<LoggedChange>> {
        let at = self.entries.partition_point(|e| e.offset < offset);
        self.entries.get(at).filter(|e| e.offset == offset)
    }
}

impl EmbeddedChangeLog {
    /// A log of `partitions` keeping changes for `retention`, and at most
    /// `capacity` of them (the oldest go first).
    pub fn new(partitions: u16, retention: Duration, capacity: usize) -> Self {
        let partitions = partitions.max(1);
        EmbeddedChangeLog {
            retention,
            partition_capacity: capacity.div_ceil(usize::from(partitions)).max(1),
            partitions: (0..partitions).map(|_| Partition::default()).collect(),
            members: Mutex::default(),
        }
    }

    /// Appends a change of `user_id`, logged at `now_ms`. Called by the
    /// embedded hot store within its write, so changes of one user are
    /// logged in version order.
    pub fn append(&self, user_id: &str, record: &UserRecord, now_ms: i64) {
        let index = partition_of(user_id, self.partitions());
        let partition = &self.partitions[usize::from(index)];
        let now = u64::try_from(now_ms).unwrap_or(0);
        let mut state = partition.state.lock();
        let offset = if now > state.last.ms {
            Offset { ms: now, seq: 0 }
        } else {
            Offset {
                ms: state.last.ms,
                seq: state.last.seq + 1,
            }
        };
        state.last = offset;
        state.entries.push_back(Arc::new(LoggedChange {
            partition: index,
            offset,
            user_id: user_id.to_owned(),
            record: record.clone(),
        }));
        let horizon = now.saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(0));
        while state.entries.len() > self.partition_capacity
            || state.entries.front().is_some_and(|e| e.offset.ms < horizon)
        {
            state.entries.pop_front();
        }
        drop(state);
        partition.appended.notify_waiters();
    }

    fn partition(&self, partition: u16) -> &Partition {
        &self.partitions[usize::from(partition) % self.partitions.len()]
    }

    /// Runs `read` until it finds something or `wait` passes, woken by
    /// appends to the partition.
    async fn wait_for<F>(&self, partition: u16, wait: Duration, mut read: F) -> Vec<LoggedChange>
    where
        F: FnMut(&mut PartitionState) -> Vec<LoggedChange>,
    {
        let partition = self.partition(partition);
        let deadline = Instant::now() + wait;
        loop {
            let appended = partition.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let found = read(&mut partition.state.lock());
            if !found.is_empty() || Instant::now() >= deadline {
                return found;
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Vec::new();
            }
        }
    }
}

#[async_trait]
impl ChangeLog for EmbeddedChangeLog {
    fn partitions(&self) -> u16 {
        u16::try_from(self.partitions.len()).unwrap_or(u16::MAX)
    }

    async fn read(
        &self,
        partition: u16,
        after: Offset,
        count: usize,
        wait: Duration,
    ) -> StoreResult<Vec<LoggedChange>> {
        Ok(self
            .wait_for(partition, wait, |state| state.after(after, count))
            .await)
    }

    async fn create_group(&self, group: &str, start: GroupStart) -> StoreResult<()> {
        for partition in &self.partitions {
            let mut state = partition.state.lock();
            let delivered = match start {
                GroupStart::Latest => state.last,
                GroupStart::Oldest => Offset::default(),
                GroupStart::At(ms) => Offset::before(ms),
            };
            state
                .groups
                .entry(group.to_owned())
                .or_insert_with(|| GroupState {
                    delivered,
                    pending: BTreeMap::new(),
                });
        }
        Ok(())
    }

    async fn read_group(
        &self,
        group: &str,
        consumer: &str,
        partition: u16,
        count: usize,
        wait: Duration,
    ) -> StoreResult<Vec<LoggedChange>> {
        Ok(self
            .wait_for(partition, wait, |state| {
                let Some(delivered) = state.groups.get(group).map(|g| g.delivered) else {
                    return Vec::new();
                };
                let found = state.after(delivered, count);
                if let (Some(last), Some(group)) = (found.last(), state.groups.get_mut(group)) {
                    group.delivered = last.offset;
                    let now = Instant::now();
                    for change in &found {
                        group
                            .pending
                            .insert(change.offset, (consumer.to_owned(), now));
                    }
                }
                found
            })
            .await)
    }

    async fn claim_stale(
        &self,
        group: &str,
        consumer: &str,
        partition: u16,
        idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<LoggedChange>> {
        let mut state = self.partition(partition).state.lock();
        let Some(pending) = state.groups.get(group).map(|g| g.pending.clone()) else {
            return Ok(Vec::new());
        };
        let now = Instant::now();
        let mut claimed = Vec::new();
        let mut gone = Vec::new();
        for (offset, (_, since)) in pending {
            if claimed.len() == count {
                break;
            }
            if now.duration_since(since) < idle {
                continue;
            }
            match state.at(offset) {
                Some(change) => claimed.push(LoggedChange::clone(change)),
                // Trimmed past the retention: nothing left to deliver.
                None => gone.push(offset),
            }
        }
        if let Some(group) = state.groups.get_mut(group) {
            for offset in gone {
                group.pending.remove(&offset);
            }
            for change in &claimed {
                group
                    .pending
                    .insert(change.offset, (consumer.to_owned(), now));
            }
        }
        Ok(claimed)
    }

    async fn pending(&self, group: &str, partition: u16) -> StoreResult<usize> {
        let state = self.partition(partition).state.lock();
        Ok(state.groups.get(group).map_or(0, |g| g.pending.len()))
    }

    async fn ack(&self, group: &str, partition: u16, offsets: &[Offset]) -> StoreResult<()> {
        let mut state = self.partition(partition).state.lock();
        if let Some(group) = state.groups.get_mut(group) {
            for offset in offsets {
                group.pending.remove(offset);
            }
        }
        Ok(())
    }

    async fn join(&self, group: &str, member: &str, ttl: Duration) -> StoreResult<Vec<String>> {
        let now = Instant::now();
        let mut groups = self.members.lock();
        let members = groups.entry(group.to_owned()).or_default();
        members.insert(member.to_owned(), now + ttl);
        members.retain(|_, deadline| *deadline > now);
        let mut alive: Vec<String> = members.keys().cloned().collect();
        alive.sort_unstable();
        Ok(alive)
    }

    async fn leave(&self, group: &str, member: &str) -> StoreResult<()> {
        if let Some(members) = self.members.lock().get_mut(group) {
            members.remove(member);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(log: &EmbeddedChangeLog, partition: u16) -> Vec<LoggedChange> {
        let state = log.partition(partition).state.lock();
        state.after(Offset::default(), usize::MAX)
    }

    #[test]
    fn the_log_keeps_its_retention_and_capacity() {
        let log = EmbeddedChangeLog::new(1, Duration::from_secs(10), 3);
        let record = UserRecord::default();
        for at in [1_000, 2_000, 3_000, 4_000] {
            log.append("u", &record, at);
        }
        let kept: Vec<u64> = logged(&log, 0).iter().map(|c| c.offset.ms).collect();
        assert_eq!(
            kept,
            [2_000, 3_000, 4_000],
            "the oldest past the capacity went"
        );
        log.append("u", &record, 13_500);
        let kept: Vec<u64> = logged(&log, 0).iter().map(|c| c.offset.ms).collect();
        assert_eq!(kept, [4_000, 13_500], "older than the retention went");
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_gets_each_change_once_and_stale_ones_again() {
        let log = EmbeddedChangeLog::new(1, Duration::from_secs(60), 100);
        let record = UserRecord::default();
        log.append("u", &record, 1_000);
        log.create_group("g", GroupStart::Oldest).await.unwrap();
        log.create_group("late", GroupStart::Latest).await.unwrap();
        log.append("u", &record, 1_000);
        let wait = Duration::from_millis(10);
        let first = log.read_group("g", "a", 0, 10, wait).await.unwrap();
        assert_eq!(first.len(), 2);
        assert!(
            log.read_group("g", "b", 0, 10, wait)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            log.read_group("late", "a", 0, 10, wait)
                .await
                .unwrap()
                .len(),
            1
        );

        let idle = Duration::from_secs(5);
        assert!(
            log.claim_stale("g", "b", 0, idle, 10)
                .await
                .unwrap()
                .is_empty()
        );
        tokio::time::advance(idle).await;
        log.ack("g", 0, &[first[0].offset]).await.unwrap();
        let claimed = log.claim_stale("g", "b", 0, idle, 10).await.unwrap();
        assert_eq!(
            claimed,
            first[1..],
            "only the unacknowledged change comes again"
        );
    }
}
