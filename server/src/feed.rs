//! Consumer groups over the change log: members, partition assignment,
//! batches, acknowledgements and redelivery, on any [`ChangeLog`]. The API's
//! `ChangeFeed.Consume` streams and the built-in history projection are both
//! members of groups run here.
//!
//! A member signs of life every third of [`FeedConfig::member_ttl`]; every
//! member computes the same assignment from the sorted list of live members
//! (partition `p` goes to member `p mod n`), so partitions move when members
//! come and go without any coordinator. A member reads each partition it owns
//! one batch at a time: the next batch is read only once the previous one is
//! acknowledged, which keeps each user's changes in order and is the
//! backpressure (a slow consumer holds back only its own partitions, never
//! presence itself, which never waits on the log's readers). A batch read
//! and never acknowledged stays pending in the log; the partition's owner
//! claims pending changes idle for longer than the ack timeout and delivers
//! them again (at least once; consumers drop a change whose version they
//! have seen).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::domain::HistoryRecord;
use crate::metrics;
use crate::store::{ChangeLog, GroupStart, HistoryStore, LoggedChange, Offset, StoreError};

/// The built-in group that writes history and the durable latest state.
pub const PROJECTION_GROUP: &str = "_history";

/// How long one read waits for new changes before the reader checks whether
/// it still owns its partition.
const READ_WAIT: Duration = Duration::from_secs(1);

/// A failed log call is retried after this long.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How often a reader that gained a partition looks whether what a previous
/// owner left pending can be claimed (or was acknowledged) yet.
const PENDING_POLL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct FeedConfig {
    /// A member that shows no sign of life for this long leaves its group.
    pub member_ttl: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            member_ttl: Duration::from_secs(3),
        }
    }
}

/// What a member asks for.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    pub group: String,
    pub member: String,
    /// Where the group starts if it is new.
    pub start: GroupStart,
    pub max_batch: usize,
    /// Changes pending this long are taken from whoever read them.
    pub ack_timeout: Duration,
}

/// What a member receives.
#[derive(Debug)]
pub enum Delivery {
    /// The partitions this member now reads, out of `partitions`, shared
    /// with `members` members.
    Assigned {
        owned: Vec<u16>,
        members: usize,
        partitions: u16,
    },
    Batch(Batch),
}

#[derive(Debug)]
pub struct Batch {
    /// Acknowledge the batch by this id.
    pub id: u64,
    pub partition: u16,
    pub changes: Vec<LoggedChange>,
}

pub struct Feed {
    log: Arc<dyn ChangeLog>,
    config: FeedConfig,
    batch_ids: AtomicU64,
}

/// A running member: dropping the receiver of its deliveries makes it leave
/// its group.
pub struct Member {
    pub deliveries: mpsc::Receiver<Delivery>,
    acks: mpsc::Sender<u64>,
    /// Resolves once the member left its group.
    left: JoinHandle<()>,
}

impl Member {
    /// Acknowledges batch `id`; an unknown id (already acknowledged, or
    /// from a partition this member lost) is ignored.
    pub async fn ack(&self, id: u64) {
        let _ = self.acks.send(id).await;
    }

    /// A handle for acknowledging from another task.
    pub fn acker(&self) -> mpsc::Sender<u64> {
        self.acks.clone()
    }

    /// Leaves the group and waits until the log was told.
    pub async fn leave(self) {
        let Member {
            deliveries, left, ..
        } = self;
        drop(deliveries);
        let _ = left.await;
    }
}

/// Batches delivered and not acknowledged, by id.
type Unacked = Arc<Mutex<HashMap<u64, (u16, Vec<Offset>, oneshot::Sender<()>)>>>;

impl Feed {
    pub fn new(log: Arc<dyn ChangeLog>, config: FeedConfig) -> Arc<Self> {
        Arc::new(Feed {
            log,
            config,
            batch_ids: AtomicU64::new(1),
        })
    }

    pub fn log(&self) -> &Arc<dyn ChangeLog> {
        &self.log
    }

    /// Joins a group. Fails if the log cannot create the group.
    pub async fn join(self: &Arc<Self>, options: MemberOptions) -> Result<Member, StoreError> {
        self.log.create_group(&options.group, options.start).await?;
        let (deliver, deliveries) = mpsc::channel(16);
        let (acks, acked) = mpsc::channel(64);
        let left = tokio::spawn(self.clone().run_member(options, deliver, acked));
        Ok(Member {
            deliveries,
            acks,
            left,
        })
    }

    async fn run_member(
        self: Arc<Self>,
        options: MemberOptions,
        deliver: mpsc::Sender<Delivery>,
        mut acked: mpsc::Receiver<u64>,
    ) {
        let options = Arc::new(options);
        let unacked: Unacked = Arc::default();
        let mut readers: HashMap<u16, JoinHandle<()>> = HashMap::new();
        let mut owned: Option<BTreeSet<u16>> = None;
        let mut renew = tokio::time::interval(self.config.member_ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = deliver.closed() => break,
                ack = acked.recv() => match ack {
                    Some(id) => self.acknowledge(&options.group, &unacked, id).await,
                    None => break,
                },
                _ = renew.tick() => {
                    let members = match self.log.join(&options.group, &options.member, self.config.member_ttl).await {
                        Ok(members) => members,
                        Err(error) => {
                            tracing::warn!(%error, group = options.group, "renewing a feed member failed");
                            continue;
                        }
                    };
                    let now_owned = assignment(&members, &options.member, self.log.partitions());
                    if owned.as_ref() == Some(&now_owned) {
                        continue;
                    }
                    readers.retain(|partition, reader| {
                        let keep = now_owned.contains(partition);
                        if !keep {
                            reader.abort();
                        }
                        keep
                    });
                    for partition in &now_owned {
                        readers.entry(*partition).or_insert_with(|| {
                            tokio::spawn(self.clone().read_partition(
                                options.clone(),
                                *partition,
                                deliver.clone(),
                                unacked.clone(),
                            ))
                        });
                    }
                    let assigned = Delivery::Assigned {
                        owned: now_owned.iter().copied().collect(),
                        members: members.len(),
                        partitions: self.log.partitions(),
                    };
                    owned = Some(now_owned);
                    if deliver.send(assigned).await.is_err() {
                        break;
                    }
                }
            }
        }
        for reader in readers.values() {
            reader.abort();
        }
        if let Err(error) = self.log.leave(&options.group, &options.member).await {
            tracing::warn!(%error, group = options.group, "leaving a feed group failed");
        }
    }

    async fn acknowledge(&self, group: &str, unacked: &Unacked, id: u64) {
        let Some((partition, offsets, done)) = unacked.lock().remove(&id) else {
            return;
        };
        // A failed acknowledgement leaves the changes pending: they come
        // again after the ack timeout, which at-least-once allows.
        if let Err(error) = self.log.ack(group, partition, &offsets).await {
            tracing::warn!(%error, group, partition, "acknowledging a feed batch failed");
        }
        let _ = done.send(());
    }

    /// Changes of `partition` pending in the member's group for longer
    /// than its ack timeout, now the member's.
    async fn claim_stale(
        &self,
        options: &MemberOptions,
        partition: u16,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        self.log
            .claim_stale(
                &options.group,
                &options.member,
                partition,
                options.ack_timeout,
                options.max_batch,
            )
            .await
    }

    /// Delivers one partition's changes to a member, one batch at a time.
    /// Changes earlier owners left pending come first: until none is
    /// pending, the reader only claims stale ones (and waits for a batch a
    /// previous owner still holds), so a user's newer changes never overtake
    /// their redelivered older ones.
    async fn read_partition(
        self: Arc<Self>,
        options: Arc<MemberOptions>,
        partition: u16,
        deliver: mpsc::Sender<Delivery>,
        unacked: Unacked,
    ) {
        let (group, member) = (&options.group, &options.member);
        let mut draining = true;
        let mut next_claim = Instant::now();
        loop {
            let read = if draining {
                match self.log.pending(group, partition).await {
                    Ok(0) => {
                        draining = false;
                        next_claim = Instant::now() + options.ack_timeout / 2;
                        continue;
                    }
                    Ok(_) => self.claim_stale(&options, partition).await,
                    Err(error) => Err(error),
                }
            } else if Instant::now() >= next_claim {
                next_claim = Instant::now() + options.ack_timeout / 2;
                self.claim_stale(&options, partition).await
            } else {
                let wait = READ_WAIT.min(options.ack_timeout / 2);
                self.log
                    .read_group(group, member, partition, options.max_batch, wait)
                    .await
            };
            let changes = match read {
                Ok(changes) => changes,
                Err(error) => {
                    tracing::warn!(%error, group, partition, "reading the change log failed");
                    // A read that timed out may still have run: what it
                    // read is pending for this member, and must come before
                    // anything newer.
                    draining = true;
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            if changes.is_empty() {
                if draining {
                    // Pending with a live owner, or not idle long enough yet.
                    tokio::time::sleep(PENDING_POLL.min(options.ack_timeout / 4)).await;
                }
                continue;
            }
            let id = self.batch_ids.fetch_add(1, Ordering::Relaxed);
            let (done, acked) = oneshot::channel();
            let offsets = changes.iter().map(|c| c.offset).collect();
            unacked.lock().insert(id, (partition, offsets, done));
            let batch = Batch {
                id,
                partition,
                changes,
            };
            if deliver.send(Delivery::Batch(batch)).await.is_err() {
                return;
            }
            if acked.await.is_err() {
                return;
            }
        }
    }
}

/// The partitions `member` owns: partition `p` goes to the `p mod n`-th of
/// the sorted live members. A member not (yet) in the list owns none.
pub fn assignment(members: &[String], member: &str, partitions: u16) -> BTreeSet<u16> {
    let Some(index) = members.iter().position(|m| m == member) else {
        return BTreeSet::new();
    };
    (0..partitions)
        .filter(|p| usize::from(*p) % members.len() == index)
        .collect()
}

/// Runs this node's member of the history projection until `stop` is
/// raised: every change of the log becomes a history row and the durable
/// latest state in `history`, written before it is acknowledged, so a crash
/// or an outage of the history store loses nothing (the log keeps it
/// meanwhile) and no acknowledged row waits in memory. On `stop` the member
/// leaves its group, so the other nodes' members take its partitions at
/// once rather than after [`FeedConfig::member_ttl`].
pub async fn run_projection(
    feed: Arc<Feed>,
    history: Arc<dyn HistoryStore>,
    node_id: String,
    mut stop: watch::Receiver<bool>,
) {
    let options = MemberOptions {
        group: PROJECTION_GROUP.to_owned(),
        member: node_id,
        start: GroupStart::Oldest,
        max_batch: 500,
        // Only a member that died with a batch in hand leaves one pending;
        // the partition's next owner writes it again after this.
        ack_timeout: Duration::from_secs(10),
    };
    let mut member = loop {
        match feed.join(options.clone()).await {
            Ok(member) => break member,
            Err(error) => {
                tracing::warn!(%error, "joining the history projection failed, retrying");
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    };
    loop {
        let delivery = tokio::select! {
            delivery = member.deliveries.recv() => delivery,
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let batch = match delivery {
            Some(Delivery::Batch(batch)) => batch,
            Some(Delivery::Assigned { .. }) => continue,
            None => break,
        };
        let rows: Vec<HistoryRecord> = batch
            .changes
            .iter()
            .map(|change| {
                let shown = &change.record.shown;
                HistoryRecord::of(&change.user_id, shown, shown.last_seen_ms)
            })
            .collect();
        let mut delay = RETRY_AFTER;
        while let Err(error) = history.append(&rows).await {
            metrics::backend_error("history");
            tracing::warn!(%error, rows = rows.len(), "projecting changes to the history failed, retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        if let Some(oldest) = batch.changes.first() {
            let now = u64::try_from(crate::node::now_ms()).unwrap_or(0);
            metrics::projection_lag(Duration::from_millis(now.saturating_sub(oldest.offset.ms)));
        }
        member.ack(batch.id).await;
    }
    member.leave().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_shared_out_among_members() {
        let members: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut seen = BTreeSet::new();
        for member in &members {
            let owned = assignment(&members, member, 16);
            assert!((5..=6).contains(&owned.len()));
            assert!(seen.is_disjoint(&owned));
            seen.extend(owned);
        }
        assert_eq!(seen.len(), 16);
        assert!(assignment(&members, "stranger", 16).is_empty());
    }
}
