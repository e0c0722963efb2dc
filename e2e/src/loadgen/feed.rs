//! The change feed's consumers: `--consumers` members of one group
//! (`ChangeFeed.Consume`), spread over the nodes, acknowledging every batch;
//! and the ledger that checks they saw every change the churn made.
//!
//! A change is known by the sequence number its custom message carries (the
//! churn's, see [`super::workload::churn`]): its SetStatus reply gives the
//! version it made, and a consumer reads the sequence number and version off
//! the event. So every consumed change is matched on the generator's one
//! clock, and (user, version) pairs need no map: one sequence number is one
//! user's one version.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use presence_proto::v1 as pb;
use presence_proto::v1::change_feed_client::ChangeFeedClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::Channel;

use super::stats::Counters;
use super::workload::{Shared, session_user, stopped};

/// What became of one change.
#[derive(Default)]
struct Entry {
    /// When its SetStatus reply came (clock µs; 0: none, or it failed).
    done_us: AtomicU64,
    version: AtomicU64,
    /// When a consumer first received it (clock µs; 0: never), and the
    /// version the event carried.
    consumed_us: AtomicU64,
    consumed_version: AtomicU64,
    deliveries: AtomicU32,
}

/// Every change of the load window, by sequence number.
pub struct Ledger(Vec<Entry>);

/// The outcome of [`Ledger::check`].
#[derive(Debug, Default)]
pub struct Check {
    /// Acknowledged by SetStatus and never consumed.
    pub missing: u64,
    /// Consumed with another version than SetStatus returned.
    pub mismatched: u64,
    /// Consumed before their SetStatus reply reached the generator.
    pub early: u64,
}

impl Ledger {
    pub fn new(changes: usize) -> Self {
        Ledger((0..changes).map(|_| Entry::default()).collect())
    }

    /// Notes change `seq`'s SetStatus reply.
    pub fn done(&self, seq: usize, at_us: u64, version: u64) {
        if let Some(entry) = self.0.get(seq) {
            entry.version.store(version, Ordering::Relaxed);
            entry.done_us.store(at_us.max(1), Ordering::Relaxed);
        }
    }

    /// Notes a consumed event of change `seq`; false if it was consumed
    /// before (a duplicate) or is not one of ours.
    fn consumed(&self, seq: usize, at_us: u64, version: u64) -> Option<bool> {
        let entry = self.0.get(seq)?;
        if entry.deliveries.fetch_add(1, Ordering::Relaxed) > 0 {
            return Some(false);
        }
        entry.consumed_version.store(version, Ordering::Relaxed);
        entry.consumed_us.store(at_us.max(1), Ordering::Relaxed);
        Some(true)
    }

    /// Changes acknowledged by SetStatus and not consumed yet.
    pub fn unconsumed(&self) -> u64 {
        self.0
            .iter()
            .filter(|e| {
                e.done_us.load(Ordering::Relaxed) > 0 && e.consumed_us.load(Ordering::Relaxed) == 0
            })
            .count() as u64
    }

    /// Once the consumers are done: what is missing, and the lags into
    /// `shared`'s histograms (from when the change was due, and from its
    /// SetStatus reply).
    pub fn check(&self, shared: &Shared) -> Check {
        let mut check = Check::default();
        for (seq, entry) in self.0.iter().enumerate() {
            let done = entry.done_us.load(Ordering::Relaxed);
            let consumed = entry.consumed_us.load(Ordering::Relaxed);
            if consumed == 0 {
                check.missing += u64::from(done > 0);
                continue;
            }
            let due = shared.change_due_us(seq);
            if due > 0 {
                shared.histos.feed.record_us(consumed.saturating_sub(due));
            }
            if done == 0 {
                continue;
            }
            if entry.consumed_version.load(Ordering::Relaxed)
                != entry.version.load(Ordering::Relaxed)
            {
                check.mismatched += 1;
            }
            check.early += u64::from(consumed < done);
            shared
                .histos
                .feed_after_ok
                .record_us(consumed.saturating_sub(done));
        }
        check
    }
}

/// One member of the group: joins through `channel`, counts every event and
/// acknowledges every batch until the generator stops.
pub async fn consumer(shared: Arc<Shared>, index: usize, channel: Channel) {
    let cfg = &shared.cfg;
    let (requests, outbound) = mpsc::channel(64);
    let start = pb::ConsumeRequest {
        request: Some(pb::consume_request::Request::Start(pb::ConsumeStart {
            group: cfg.feed_group.clone(),
            consumer: format!("{}c{index}", cfg.user_prefix),
            start_from: pb::StartPosition::Latest as i32,
            max_batch: cfg.consumer_batch,
            ..Default::default()
        })),
    };
    let _ = requests.send(start).await;
    let mut request = Request::new(ReceiverStream::new(outbound));
    request
        .metadata_mut()
        .insert("authorization", shared.admin_token());
    let failed = |what: String| {
        shared.errors.count(what);
        Counters::add(&shared.counters.consumers_failed, 1);
    };
    let mut inbound = match ChangeFeedClient::new(channel).consume(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return failed(format!("Consume open: {:?}", status.code())),
    };
    let members = (cfg.consumers * cfg.procs) as u32;
    let mut ready = false;
    let stop = stopped(shared.subscribe_stop());
    tokio::pin!(stop);
    let result = loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            _ = &mut stop => return,
        };
        let response = match message {
            Ok(Some(pb::ConsumeResponse {
                response: Some(response),
            })) => response,
            Ok(Some(_)) => continue,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        match response {
            pb::consume_response::Response::Assignment(assignment) => {
                // Members learn of each other within a renewal: the group is
                // settled once one member's view holds them all.
                if !ready && assignment.members == members {
                    ready = true;
                    Counters::add(&shared.counters.consumers_ready, 1);
                }
            }
            pb::consume_response::Response::Batch(batch) => {
                let arrived = shared.clock.now_us();
                Counters::add(&shared.counters.feed_batches, 1);
                for event in &batch.events {
                    record(&shared, event, arrived);
                }
                let ack = pb::ConsumeRequest {
                    request: Some(pb::consume_request::Request::Ack(pb::ConsumeAck {
                        batch_id: batch.batch_id,
                    })),
                };
                if requests.send(ack).await.is_err() {
                    break Ok(());
                }
            }
        }
    };
    if !ready {
        Counters::add(&shared.counters.consumers_failed, 1);
    }
    shared.stream_ended("Consume", result);
}

fn record(shared: &Shared, event: &pb::ChangeEvent, arrived: u64) {
    let counters = &shared.counters;
    Counters::add(&counters.feed_events, 1);
    let Some(presence) = &event.presence else {
        return Counters::add(&counters.feed_other, 1);
    };
    let seq = presence.custom_message.parse::<usize>().ok();
    // The churn changes watched user (seq - 1) mod watched: an event with our
    // sequence number for another user is not ours.
    let ours = seq.filter(|seq| {
        *seq > 0
            && presence.user_id
                == session_user(
                    &shared.cfg.user_prefix,
                    (seq - 1) % shared.cfg.watched_count(),
                )
    });
    match ours.and_then(|seq| shared.feed.consumed(seq, arrived, presence.version)) {
        Some(true) => Counters::add(&counters.feed_matched, 1),
        Some(false) => Counters::add(&counters.feed_duplicates, 1),
        None => Counters::add(&counters.feed_other, 1),
    }
}
