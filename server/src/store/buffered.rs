//! History writes off the hot path: [`BufferedHistory`] acknowledges an append
//! as soon as the records are in a bounded in-memory buffer, and a background
//! writer moves them to the real store in batches, retrying with backoff while
//! that store fails. The promise: a change that was acknowledged is never lost
//! because the database was briefly away.
//!
//! When the buffer is full (a long outage at a high change rate), new appends
//! are **refused**, with an error to the caller, a `tracing::error!` line and
//! a counter; records already buffered are never dropped. Dropping the oldest
//! instead would silently break the promise for changes that were already
//! acknowledged, while a refusal is visible where it happens: the change itself
//! still takes effect (hot store, fan-out), only its history row is missing,
//! and the caller logs that.
//!
//! Users' choices ([`ChoiceRecord`]) take the same way: held (the newest per
//! user), counted against the same capacity, written in batches and retried.
//!
//! Reads merge the buffer in: `page`, `last` and `durable` see records and
//! choices not yet written, so a user reads their own changes right away,
//! also while the writer is catching up after an outage. While the inner
//! store is down, `page` fails (a page without the stored records would be
//! silently incomplete), `last` answers from the buffer alone when it holds a
//! record for every user asked for, and `durable` when it holds a record and
//! a choice for every user asked for.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use super::{ChoiceRecord, DurableState, HistoryStore, StoreError, StoreResult};
use crate::domain::HistoryRecord;

/// Counter of history records refused because the buffer was full.
pub const REFUSED_METRIC: &str = "presence_history_refused_total";

/// How the buffer behaves; [`Default`] gives the documented defaults.
#[derive(Clone, Debug)]
pub struct BufferConfig {
    /// Most records held (waiting and being written). At 100 changes/s a
    /// 100,000-record buffer rides out a 15-minute outage; a record costs a
    /// few hundred bytes, so a full buffer is tens of MB. Default 100,000.
    pub capacity: usize,
    /// Most records per write to the inner store. Default 500.
    pub batch_size: usize,
    /// How long a record may wait for a batch to fill before it is written
    /// anyway. Default 50 ms.
    pub flush_interval: Duration,
    /// First wait after a failed write; doubles up to `max_backoff`.
    /// Default 100 ms.
    pub min_backoff: Duration,
    /// Longest wait between retries: also the longest the writer may take to
    /// notice that the store is back. Default 2 s.
    pub max_backoff: Duration,
    /// Limit on one write attempt, in case the inner store has no timeout of
    /// its own; the attempt is then retried like a failed one. Default 30 s.
    pub write_timeout: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            capacity: 100_000,
            batch_size: 500,
            flush_interval: Duration::from_millis(50),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// [`BufferedHistory::flush`] ran out of time with records still buffered.
#[derive(Debug, thiserror::Error)]
#[error("{left} history records are still buffered")]
pub struct Unflushed {
    /// Records still held when the time ran out.
    pub left: usize,
}

/// A [`HistoryStore`] that buffers appends in memory and writes them to an
/// inner store in the background. Works over any store; meant for a remote
/// one (Scylla), whose latency and outages must not reach the hot path.
pub struct BufferedHistory {
    shared: Arc<Shared>,
}

/// What the writer task and the handle share.
struct Shared {
    inner: Arc<dyn HistoryStore>,
    config: BufferConfig,
    /// parking_lot Mutex, not Tokio's: nothing async runs while it is held;
    /// each critical section is a few map and queue operations.
    state: Mutex<State>,
    /// Wakes the writer: the first record arrived, a batch filled up, a
    /// flush was asked for, or the handle was dropped. A permit is stored
    /// when the writer is busy, so no wake-up is lost.
    wake: Notify,
    /// The number of records held; `flush` waits for it to reach zero.
    depth: watch::Sender<usize>,
    /// Records refused because the buffer was full, since start.
    refused: AtomicU64,
    /// Records written to the inner store, since start.
    written: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Every record held, waiting or being written, by user and version:
    /// what reads merge in, and how a re-append of a held record is spotted.
    held: HashMap<String, BTreeMap<u64, HistoryRecord>>,
    /// The newest choice held per user, waiting or being written: what
    /// reads merge in. Only the newest matters: the store keeps the newest.
    choices: HashMap<String, HeldChoice>,
    /// How many records `held` holds, plus how many choices `choices` holds.
    count: usize,
    /// Keys of the records the writer has not taken yet, oldest first.
    waiting: VecDeque<(String, u64)>,
    /// Users whose held choice the writer has not taken yet, oldest first.
    choices_waiting: VecDeque<String>,
    /// Set by `flush` (and on drop) so the writer does not wait for a batch
    /// to fill; cleared once nothing waits.
    urgent: bool,
    closed: bool,
    /// Rate limit of the "buffer full" error line.
    last_refusal_log: Option<Instant>,
    refused_since_log: u64,
}

/// A choice in the buffer.
struct HeldChoice {
    choice: ChoiceRecord,
    /// In `choices_waiting`, not taken by the writer yet.
    waiting: bool,
}

/// What the writer writes at once.
#[derive(Default)]
struct Batch {
    records: Vec<HistoryRecord>,
    choices: Vec<ChoiceRecord>,
}

impl State {
    fn holds(&self, record: &HistoryRecord) -> bool {
        self.held
            .get(&record.user_id)
            .is_some_and(|versions| versions.contains_key(&record.version))
    }

    /// Records and choices the writer has not taken yet.
    fn waiting(&self) -> usize {
        self.waiting.len() + self.choices_waiting.len()
    }
}

impl BufferedHistory {
    /// Wraps `inner` and starts the writer task (on the current Tokio
    /// runtime). The task ends once the handle is dropped and everything
    /// held was written.
    pub fn start(inner: Arc<dyn HistoryStore>, config: BufferConfig) -> Arc<Self> {
        let shared = Arc::new(Shared {
            inner,
            config,
            state: Mutex::default(),
            wake: Notify::new(),
            depth: watch::channel(0).0,
            refused: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        tokio::spawn(writer(shared.clone()));
        Arc::new(BufferedHistory { shared })
    }

    /// Records held: waiting or being written.
    pub fn depth(&self) -> usize {
        *self.shared.depth.borrow()
    }

    /// Records refused since start because the buffer was full.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Records written to the inner store since start.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Writes everything held now, without waiting for batches to fill, and
    /// waits until it is written or `timeout` passed. For shutdown: call it
    /// after the last change, before the process exits.
    pub async fn flush(&self, timeout: Duration) -> Result<(), Unflushed> {
        self.shared.state.lock().urgent = true;
        self.shared.wake.notify_one();
        let mut depth = self.shared.depth.subscribe();
        let written = tokio::time::timeout(timeout, depth.wait_for(|held| *held == 0)).await;
        if written.is_ok() {
            return Ok(());
        }
        let left = self.depth();
        tracing::error!(
            left,
            timeout_ms = timeout.as_millis() as u64,
            "history flush timed out: these records are lost if the process exits now"
        );
        Err(Unflushed { left })
    }
}

impl Drop for BufferedHistory {
    /// The writer finishes what is held (retrying while the store fails), then
    /// ends. A process about to exit should `flush` first: it cannot wait here.
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        state.closed = true;
        state.urgent = true;
        drop(state);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    /// Counts and logs `n` records or choices refused because the buffer is
    /// full, and returns the error for the caller.
    fn refuse(&self, state: &mut State, n: usize) -> StoreError {
        self.refused.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!(REFUSED_METRIC).increment(n as u64);
        state.refused_since_log += n as u64;
        let log_due = state
            .last_refusal_log
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
        if log_due {
            tracing::error!(
                refused = state.refused_since_log,
                refused_total = self.refused.load(Ordering::Relaxed),
                capacity = self.config.capacity,
                "history buffer full: refusing new history records until the store catches up"
            );
            state.last_refusal_log = Some(Instant::now());
            state.refused_since_log = 0;
        }
        StoreError::Unavailable(format!(
            "history buffer full ({} records)",
            self.config.capacity
        ))
    }

    fn publish_depth(&self, count: usize) {
        self.depth.send_replace(count);
        crate::metrics::history_buffered(count);
    }

    /// Takes up to a batch of waiting records, and up to a batch of waiting
    /// choices, cloned: they stay held (visible to reads, deduplicating
    /// re-appends) until they are written.
    fn take_batch(&self) -> Batch {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let n = state.waiting.len().min(self.config.batch_size);
        let mut batch = Batch {
            records: Vec::with_capacity(n),
            choices: Vec::new(),
        };
        for _ in 0..n {
            let Some((user_id, version)) = state.waiting.pop_front() else {
                break;
            };
            if let Some(record) = state.held.get(&user_id).and_then(|v| v.get(&version)) {
                batch.records.push(record.clone());
            }
        }
        let n = state.choices_waiting.len().min(self.config.batch_size);
        for _ in 0..n {
            let Some(user_id) = state.choices_waiting.pop_front() else {
                break;
            };
            if let Some(held) = state.choices.get_mut(&user_id) {
                held.waiting = false;
                batch.choices.push(held.choice.clone());
            }
        }
        if state.waiting() == 0 {
            state.urgent = state.closed;
        }
        batch
    }

    /// Forgets the records and choices of a written batch; a choice replaced
    /// by a newer one meanwhile stays, waiting for its own write.
    fn written(&self, batch: &Batch) {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        for choice in &batch.choices {
            let done = state
                .choices
                .get(&choice.user_id)
                .is_some_and(|held| !held.waiting && held.choice.at_us == choice.at_us);
            if done {
                state.choices.remove(&choice.user_id);
                state.count -= 1;
            }
        }
        for record in &batch.records {
            if let Some(versions) = state.held.get_mut(&record.user_id) {
                if versions.remove(&record.version).is_some() {
                    state.count -= 1;
                }
                if versions.is_empty() {
                    state.held.remove(&record.user_id);
                }
            }
        }
        let count = state.count;
        drop(guard);
        self.written
            .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        self.publish_depth(count);
    }

    /// Writes the batch's records, then its choices.
    async fn write_once(&self, batch: &Batch) -> StoreResult<()> {
        if !batch.records.is_empty() {
            self.inner.append(&batch.records).await?;
        }
        if !batch.choices.is_empty() {
            self.inner.save_choices(&batch.choices).await?;
        }
        Ok(())
    }

    /// Writes `batch` to the inner store, retrying with backoff until it is
    /// stored. Appends and choices are idempotent (same user and version, or
    /// the same choice, stored once), so a batch that failed half-way is
    /// simply written again whole.
    async fn write(&self, batch: &Batch) {
        let mut backoff = self.config.min_backoff;
        let mut failures = 0u32;
        let mut first_failure = None;
        loop {
            let attempt = tokio::time::timeout(self.config.write_timeout, self.write_once(batch));
            let error = match attempt.await {
                Ok(Ok(())) => break,
                Ok(Err(error)) => error,
                Err(_) => StoreError::Unavailable(format!(
                    "history write timed out after {:?}",
                    self.config.write_timeout
                )),
            };
            failures += 1;
            first_failure.get_or_insert_with(Instant::now);
            crate::metrics::backend_error("history");
            // First failure and then about every 30 s: an outage of minutes
            // should not write thousands of lines.
            if failures == 1 || failures.is_multiple_of(15) {
                tracing::warn!(
                    %error,
                    failures,
                    batch = batch.records.len() + batch.choices.len(),
                    buffered = *self.depth.borrow(),
                    "history write failed; the records stay buffered and are retried"
                );
            }
            // Up to a quarter of jitter, so that the nodes of a cluster do
            // not retry in lockstep when the database comes back.
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.25);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
        if let Some(since) = first_failure {
            tracing::info!(
                failures,
                outage_ms = since.elapsed().as_millis() as u64,
                buffered = *self.depth.borrow(),
                "history store answers again; writing the buffered records"
            );
        }
        self.written(batch);
    }
}

/// The writer task: waits for records, lingers up to the flush interval for a
/// batch to fill, writes, and repeats. One batch at a time: the inner store
/// parallelises within a batch, and a single writer keeps the retry logic and
/// the ordering of batches simple.
async fn writer(shared: Arc<Shared>) {
    loop {
        let (waiting, urgent, closed) = {
            let state = shared.state.lock();
            (state.waiting(), state.urgent, state.closed)
        };
        if waiting == 0 {
            if closed {
                return;
            }
            shared.wake.notified().await;
            continue;
        }
        if waiting < shared.config.batch_size && !urgent {
            // Woken early when the batch fills or a flush is asked for.
            let _ =
                tokio::time::timeout(shared.config.flush_interval, shared.wake.notified()).await;
        }
        let batch = shared.take_batch();
        if !batch.records.is_empty() || !batch.choices.is_empty() {
            shared.write(&batch).await;
        }
    }
}

#[async_trait]
impl HistoryStore for BufferedHistory {
    /// Buffers the records and returns at once. Refuses the whole call with
    /// [`StoreError::Unavailable`] if the buffer cannot hold all of it; what
    /// is already buffered stays.
    async fn append(&self, records: &[HistoryRecord]) -> StoreResult<()> {
        let shared = &self.shared;
        let mut state = shared.state.lock();
        let mut new: Vec<&HistoryRecord> = records.iter().filter(|r| !state.holds(r)).collect();
        new.sort_by(|a, b| (&a.user_id, a.version).cmp(&(&b.user_id, b.version)));
        new.dedup_by(|a, b| a.user_id == b.user_id && a.version == b.version);
        if new.is_empty() {
            return Ok(());
        }
        if state.count + new.len() > shared.config.capacity {
            return Err(shared.refuse(&mut state, new.len()));
        }
        let was_empty = state.waiting() == 0;
        // Keep arrival order in the queue (the sort above only deduplicated):
        // the oldest changes are written first.
        for record in records {
            let versions = state.held.entry(record.user_id.clone()).or_default();
            if versions.contains_key(&record.version) {
                continue;
            }
            versions.insert(record.version, record.clone());
            state.count += 1;
            state
                .waiting
                .push_back((record.user_id.clone(), record.version));
        }
        let (count, waiting) = (state.count, state.waiting());
        drop(state);
        shared.publish_depth(count);
        if was_empty || waiting >= shared.config.batch_size {
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// Holds the choices and returns at once; refuses the whole call if the
    /// buffer cannot hold them. A choice older than one held for the same
    /// user is already superseded, and dropped.
    async fn save_choices(&self, choices: &[ChoiceRecord]) -> StoreResult<()> {
        let shared = &self.shared;
        let mut guard = shared.state.lock();
        let state = &mut *guard;
        let mut new_users: Vec<&str> = choices
            .iter()
            .filter(|c| !state.choices.contains_key(&c.user_id))
            .map(|c| c.user_id.as_str())
            .collect();
        new_users.sort_unstable();
        new_users.dedup();
        if state.count + new_users.len() > shared.config.capacity {
            return Err(shared.refuse(state, choices.len()));
        }
        let was_empty = state.waiting() == 0;
        for choice in choices {
            match state.choices.get_mut(&choice.user_id) {
                Some(held) if held.choice.at_us >= choice.at_us => {}
                Some(held) => {
                    held.choice = choice.clone();
                    // Taken by the writer already: the newer one is written
                    // after it.
                    if !held.waiting {
                        held.waiting = true;
                        state.choices_waiting.push_back(choice.user_id.clone());
                    }
                }
                None => {
                    state.choices.insert(
                        choice.user_id.clone(),
                        HeldChoice {
                            choice: choice.clone(),
                            waiting: true,
                        },
                    );
                    state.count += 1;
                    state.choices_waiting.push_back(choice.user_id.clone());
                }
            }
        }
        let (count, waiting) = (state.count, state.waiting());
        drop(guard);
        shared.publish_depth(count);
        if was_empty || waiting >= shared.config.batch_size {
            shared.wake.notify_one();
        }
        Ok(())
    }

    async fn durable(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>> {
        let buffered: Vec<DurableState> = {
            let state = self.shared.state.lock();
            user_ids
                .iter()
                .map(|id| DurableState {
                    last: state
                        .held
                        .get(id)
                        .and_then(|versions| versions.last_key_value())
                        .map(|(_, record)| record.clone()),
                    choice: state.choices.get(id).map(|held| held.choice.clone()),
                })
                .collect()
        };
        let stored = match self.shared.inner.durable(user_ids).await {
            Ok(stored) => stored,
            // Every user asked for has a buffered record and choice, newer
            // than what the store holds: the answer does not need the store.
            Err(_)
                if buffered
                    .iter()
                    .all(|b| b.last.is_some() && b.choice.is_some()) =>
            {
                return Ok(buffered);
            }
            Err(error) => return Err(error),
        };
        Ok(stored
            .into_iter()
            .zip(buffered)
            .map(|(stored, buffered)| DurableState {
                last: newest(stored.last, buffered.last, |r| r.version),
                choice: newest(stored.choice, buffered.choice, |c| c.at_us),
            })
            .collect())
    }

    async fn page(
        &self,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        after_version: u64,
        limit: usize,
    ) -> StoreResult<Vec<HistoryRecord>> {
        // The buffer is read before the store: a record written (and dropped
        // from the buffer) in between is then found in the store. The other
        // order could miss it in both.
        let buffered: Vec<HistoryRecord> = {
            let state = self.shared.state.lock();
            state.held.get(user_id).map_or_else(Vec::new, |versions| {
                versions
                    .range((Bound::Excluded(after_version), Bound::Unbounded))
                    .map(|(_, record)| record)
                    .filter(|r| r.at_ms >= from_ms && r.at_ms <= to_ms)
                    .take(limit)
                    .cloned()
                    .collect()
            })
        };
        let stored = self
            .shared
            .inner
            .page(user_id, from_ms, to_ms, after_version, limit)
            .await?;
        if buffered.is_empty() {
            return Ok(stored);
        }
        Ok(merge(stored, buffered, limit))
    }

    async fn last(&self, user_ids: &[String]) -> StoreResult<Vec<Option<HistoryRecord>>> {
        let buffered: Vec<Option<HistoryRecord>> = {
            let state = self.shared.state.lock();
            user_ids
                .iter()
                .map(|id| {
                    state
                        .held
                        .get(id)
                        .and_then(|versions| versions.last_key_value())
                        .map(|(_, record)| record.clone())
                })
                .collect()
        };
        let stored = match self.shared.inner.last(user_ids).await {
            Ok(stored) => stored,
            // Every user asked for has a buffered record, newer than what the
            // store holds: the answer does not need the store.
            Err(_) if buffered.iter().all(Option::is_some) => return Ok(buffered),
            Err(error) => return Err(error),
        };
        Ok(stored
            .into_iter()
            .zip(buffered)
            .map(|(stored, buffered)| newest(stored, buffered, |r| r.version))
            .collect())
    }
}

/// The newer of two, by `order`; the buffered one on a tie.
fn newest<T>(stored: Option<T>, buffered: Option<T>, order: impl Fn(&T) -> u64) -> Option<T> {
    match (stored, buffered) {
        (Some(s), Some(b)) => Some(if order(&b) >= order(&s) { b } else { s }),
        (s, b) => s.or(b),
    }
}

/// Merges two lists sorted by version into one, without duplicates, cut at
/// `limit`. `stored` holds the store's first `limit` matches and `buffered`
/// every buffered match, so the result is the first `limit` of both.
fn merge(
    stored: Vec<HistoryRecord>,
    buffered: Vec<HistoryRecord>,
    limit: usize,
) -> Vec<HistoryRecord> {
    let mut merged = Vec::with_capacity((stored.len() + buffered.len()).min(limit));
    let mut stored = stored.into_iter().peekable();
    let mut buffered = buffered.into_iter().peekable();
    while merged.len() < limit {
        let next = match (stored.peek(), buffered.peek()) {
            (Some(s), Some(b)) if s.version == b.version => {
                buffered.next();
                stored.next()
            }
            (Some(s), Some(b)) if s.version < b.version => stored.next(),
            (Some(_), Some(_)) | (None, Some(_)) => buffered.next(),
            (Some(_), None) => stored.next(),
            (None, None) => None,
        };
        match next {
            Some(record) => merged.push(record),
            None => break,
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::domain::{ChosenStatus, VisibleStatus};
    use crate::store::embedded::EmbeddedHistoryStore;

    /// An embedded store that can be taken down: every call fails while down.
    struct Flaky {
        store: EmbeddedHistoryStore,
        down: AtomicBool,
        appends: AtomicU64,
    }

    impl Flaky {
        fn new() -> Arc<Self> {
            Arc::new(Flaky {
                store: EmbeddedHistoryStore::new(Duration::from_secs(24 * 3600)),
                down: AtomicBool::new(false),
                appends: AtomicU64::new(0),
            })
        }

        fn check(&self) -> StoreResult<()> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down for the test".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl HistoryStore for Flaky {
        async fn append(&self, records: &[HistoryRecord]) -> StoreResult<()> {
            self.check()?;
            self.appends.fetch_add(1, Ordering::SeqCst);
            self.store.append(records).await
        }

        async fn page(
            &self,
            user_id: &str,
            from_ms: i64,
            to_ms: i64,
            after_version: u64,
            limit: usize,
        ) -> StoreResult<Vec<HistoryRecord>> {
            self.check()?;
            self.store
                .page(user_id, from_ms, to_ms, after_version, limit)
                .await
        }

        async fn last(&self, user_ids: &[String]) -> StoreResult<Vec<Option<HistoryRecord>>> {
            self.check()?;
            self.store.last(user_ids).await
        }

        async fn save_choices(&self, choices: &[ChoiceRecord]) -> StoreResult<()> {
            self.check()?;
            self.store.save_choices(choices).await
        }

        async fn durable(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>> {
            self.check()?;
            self.store.durable(user_ids).await
        }
    }

    fn choice(user: &str, chosen: ChosenStatus, at_us: u64) -> ChoiceRecord {
        ChoiceRecord {
            user_id: user.to_owned(),
            chosen,
            custom_message: String::new(),
            at_us,
        }
    }

    fn record(user: &str, version: u64) -> HistoryRecord {
        HistoryRecord {
            user_id: user.to_owned(),
            at_ms: 1_000 + version as i64,
            status: VisibleStatus::Online,
            custom_message: String::new(),
            offline_reason: None,
            version,
        }
    }

    fn quick() -> BufferConfig {
        BufferConfig {
            capacity: 10,
            batch_size: 4,
            flush_interval: Duration::from_millis(10),
            min_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            write_timeout: Duration::from_secs(5),
        }
    }

    async fn stored(inner: &Flaky, user: &str) -> Vec<u64> {
        let page = inner.store.page(user, 0, i64::MAX, 0, 1000).await.unwrap();
        page.into_iter().map(|r| r.version).collect()
    }

    #[tokio::test]
    async fn appends_reach_the_store_in_batches() {
        let inner = Flaky::new();
        let buffer = BufferedHistory::start(inner.clone(), quick());
        for v in 1..=8 {
            buffer.append(&[record("u", v)]).await.unwrap();
        }
        buffer.flush(Duration::from_secs(5)).await.unwrap();
        assert_eq!(stored(&inner, "u").await, (1..=8).collect::<Vec<_>>());
        assert_eq!(buffer.written(), 8);
        assert!(
            inner.appends.load(Ordering::SeqCst) <= 4,
            "batched, not one write each"
        );
    }

    #[tokio::test]
    async fn acknowledged_records_survive_an_outage() {
        let inner = Flaky::new();
        let buffer = BufferedHistory::start(inner.clone(), quick());
        inner.down.store(true, Ordering::SeqCst);
        for v in 1..=6 {
            buffer.append(&[record("u", v)]).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(buffer.depth(), 6, "kept while the store is down");
        assert!(buffer.flush(Duration::from_millis(50)).await.is_err());
        inner.down.store(false, Ordering::SeqCst);
        buffer.flush(Duration::from_secs(5)).await.unwrap();
        assert_eq!(stored(&inner, "u").await, (1..=6).collect::<Vec<_>>());
        assert_eq!(buffer.refused(), 0);
    }

    #[tokio::test]
    async fn a_full_buffer_refuses_new_records_and_keeps_the_old() {
        let inner = Flaky::new();
        let buffer = BufferedHistory::start(inner.clone(), quick());
        inner.down.store(true, Ordering::SeqCst);
        for v in 1..=10 {
            buffer.append(&[record("u", v)]).await.unwrap();
        }
        let refused = buffer.append(&[record("u", 11)]).await;
        assert!(matches!(refused, Err(StoreError::Unavailable(_))));
        assert_eq!(buffer.refused(), 1);
        // A record already held is not new: appending it again is fine.
        buffer.append(&[record("u", 3)]).await.unwrap();
        inner.down.store(false, Ordering::SeqCst);
        buffer.flush(Duration::from_secs(5)).await.unwrap();
        assert_eq!(stored(&inner, "u").await, (1..=10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn reads_see_records_not_yet_written() {
        let inner = Flaky::new();
        inner
            .store
            .append(&[record("u", 1), record("u", 3)])
            .await
            .unwrap();
        let buffer = BufferedHistory::start(inner.clone(), quick());
        inner.down.store(true, Ordering::SeqCst);
        buffer
            .append(&[record("u", 2), record("u", 4), record("u", 3)])
            .await
            .unwrap();
        // Store down: a page would be incomplete, so it fails; `last` can
        // answer from the buffer.
        assert!(buffer.page("u", 0, i64::MAX, 0, 10).await.is_err());
        let last = buffer.last(&["u".to_owned()]).await.unwrap();
        assert_eq!(last[0].as_ref().map(|r| r.version), Some(4));
        assert!(buffer.last(&["u".into(), "other".into()]).await.is_err());

        // Store up, writer stuck behind: reads merge both, in version order.
        inner.down.store(false, Ordering::SeqCst);
        let page = buffer.page("u", 0, i64::MAX, 0, 10).await.unwrap();
        let versions: Vec<u64> = page.iter().map(|r| r.version).collect();
        assert_eq!(versions, [1, 2, 3, 4]);
        let page = buffer.page("u", 0, i64::MAX, 1, 2).await.unwrap();
        assert_eq!(page.iter().map(|r| r.version).collect::<Vec<_>>(), [2, 3]);
        let window = buffer.page("u", 1_002, 1_003, 0, 10).await.unwrap();
        assert_eq!(window.iter().map(|r| r.version).collect::<Vec<_>>(), [2, 3]);
        let last = buffer.last(&["u".into(), "other".into()]).await.unwrap();
        assert_eq!(last[0].as_ref().map(|r| r.version), Some(4));
        assert_eq!(last[1], None);
    }

    #[tokio::test]
    async fn choices_survive_an_outage_and_the_newest_wins() {
        let inner = Flaky::new();
        let buffer = BufferedHistory::start(inner.clone(), quick());
        inner.down.store(true, Ordering::SeqCst);
        let (hidden, busy) = (
            choice("u", ChosenStatus::Invisible, 20),
            choice("u", ChosenStatus::Busy, 10),
        );
        buffer
            .save_choices(std::slice::from_ref(&hidden))
            .await
            .unwrap();
        // Late, older: superseded.
        buffer.save_choices(&[busy]).await.unwrap();
        buffer.append(&[record("u", 4)]).await.unwrap();
        assert_eq!(buffer.depth(), 2);
        // Store down: the buffer holds both parts of u's durable state.
        let durable = buffer.durable(&["u".to_owned()]).await.unwrap();
        assert_eq!(durable[0].choice.as_ref(), Some(&hidden));
        assert_eq!(durable[0].last.as_ref().map(|r| r.version), Some(4));
        buffer
            .save_choices(&[choice("v", ChosenStatus::Busy, 5)])
            .await
            .unwrap();
        assert!(
            buffer.durable(&["v".to_owned()]).await.is_err(),
            "v's visible state is unknown: no guess"
        );
        inner.down.store(false, Ordering::SeqCst);
        buffer.flush(Duration::from_secs(5)).await.unwrap();
        let stored = inner
            .store
            .durable(&["u".into(), "v".into()])
            .await
            .unwrap();
        assert_eq!(stored[0].choice.as_ref(), Some(&hidden));
        assert_eq!(
            stored[1].choice.as_ref().map(|c| c.chosen),
            Some(ChosenStatus::Busy)
        );
        assert_eq!(stored[1].last, None);
    }

    #[tokio::test]
    async fn writer_ends_after_the_handle_is_dropped_and_all_is_written() {
        let inner = Flaky::new();
        let buffer = BufferedHistory::start(inner.clone(), quick());
        buffer.append(&[record("u", 1)]).await.unwrap();
        let shared = Arc::downgrade(&buffer.shared);
        drop(buffer);
        tokio::time::timeout(Duration::from_secs(5), async {
            while shared.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the writer task ends");
        assert_eq!(stored(&inner, "u").await, [1]);
    }
}
