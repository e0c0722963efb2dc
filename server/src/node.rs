//! One server node: the presence operations the API exposes, on top of the
//! backends. It owns the leases of the sessions connected to it, applies every
//! change through the hot store, records it in the history and fans it out.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::api::error::ApiError;
use crate::auth::Caller;
use crate::config::Config;
use crate::degraded::{self, Degraded, Popped};
use crate::domain::{
    Activity, Applied, ChosenStatus, HistoryRecord, Limits, Mutation, OfflineReason, Platform,
    Session, Shown, TransitionError, UserRecord, View, Viewer,
};
use crate::hub::{DeviceTaken, Hub};
use crate::leases::{Expired, Leases, SessionKey, StreamEnd, StreamEnded};
use crate::metrics;
use crate::quota::{QuotaLimits, Quotas, StreamKind, StreamSlot};
use crate::store::{
    BusEvent, ChangeLog, ChoiceRecord, ContactStore, DurableState, FanOut, HistoryStore, HotStore,
    StoreError, StoreResult, choice_stamp,
};

/// The longest GetHistory waits for the history projection to write the
/// user's latest change (normally milliseconds).
const HISTORY_CATCH_UP: Duration = Duration::from_secs(2);

/// How often that wait looks again.
const HISTORY_POLL: Duration = Duration::from_millis(25);
/// The backends a node runs on.
pub struct Backends {
    pub hot: Arc<dyn HotStore>,
    pub contacts: Arc<dyn ContactStore>,
    pub history: Arc<dyn HistoryStore>,
    pub fanout: Arc<dyn FanOut>,
    /// Written by `hot.apply` itself; the node reads it only to serve the
    /// change feed.
    pub log: Arc<dyn ChangeLog>,
    pub hub: Arc<Hub>,
}

/// What a device sends to open its session.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    pub device_id: String,
    pub platform: Platform,
    pub activity: Activity,
    pub status: Option<(ChosenStatus, String)>,
}

/// A change carried by a heartbeat.
#[derive(Clone, Debug, Default)]
pub struct BeatChange {
    pub activity: Option<Activity>,
    pub status: Option<(ChosenStatus, String)>,
}

/// Pauses between attempts to refill watchers after a fan-out gap.
const REFILL_RETRY_FIRST: Duration = Duration::from_millis(100);
const REFILL_RETRY_MAX: Duration = Duration::from_secs(2);

/// Sessions of a lost node ended per batch, and at once.
const RECLAIM_BATCH: usize = 256;
const RECLAIM_CONCURRENCY: usize = 32;

pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub backends: Backends,
    leases: Leases,
    next_conn_id: AtomicU64,
    draining: watch::Sender<bool>,
    /// Per-user bounds: open streams, visible changes.
    pub quotas: Arc<Quotas>,
    /// Devices taken over or logged out through any node, from the fan-out;
    /// taken by the maintenance loop.
    devices_taken: Mutex<Option<tokio::sync::mpsc::Receiver<DeviceTaken>>>,
    /// How this node's own lease in the hot store stands.
    lease: Mutex<LeaseHold>,
    /// The hot store no longer knew this node when it renewed its lease: the
    /// sessions it holds are to be re-asserted.
    hot_lost_sessions: AtomicBool,
    /// Changes taken while the hot store was unreachable, waiting to be
    /// replayed into it (see [`crate::degraded`]).
    degraded: Degraded,
}

/// What a node knows of its own lease in the hot store.
#[derive(Default)]
struct LeaseHold {
    /// Since when the lease has been held without a gap or a failed
    /// renewal; `None` while in doubt.
    held_since: Option<Instant>,
    /// When the last renewal that found the lease held was sent.
    renewed_at: Option<Instant>,
}

impl LeaseHold {
    /// Whether the hot store has kept this node's lease for a whole node
    /// lease and still does, as of a renewal sent moments ago: only then did
    /// every live node have the time to renew its own, so that a missing
    /// lease means a lost node. A renewal still in flight (the store hangs
    /// in a failover) proves nothing.
    fn proves_others_lost(&self, node_lease: Duration) -> bool {
        self.held_since
            .is_some_and(|since| since.elapsed() >= node_lease)
            && self
                .renewed_at
                .is_some_and(|at| at.elapsed() < node_lease * 2 / 3)
    }
}

/// The rounds of a periodic duty until a stop flag is raised. A round in
/// progress is never cut short: a sweep stopped half-way could drop a lease
/// without ending its session.
struct Rounds {
    ticks: tokio::time::Interval,
    stop: watch::Receiver<bool>,
}

impl Rounds {
    fn new(period: Duration, stop: watch::Receiver<bool>) -> Rounds {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Rounds { ticks, stop }
    }

    /// Waits for the next round; false once the flag is raised.
    async fn next(&mut self) -> bool {
        tokio::select! {
            biased;
            () = raised(self.stop.clone()) => false,
            _ = self.ticks.tick() => true,
        }
    }
}

/// Resolves once the flag is raised (or its sender is gone).
pub async fn raised(mut flag: watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here, not in callers.
    let _ = flag.wait_for(|raised| *raised).await;
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Node {
    pub fn new(config: Config, node_id: String, backends: Backends) -> Arc<Node> {
        let quotas = Quotas::new(QuotaLimits {
            max_heartbeat_streams: config.limits.max_heartbeat_streams_per_user,
            max_watches: config.limits.max_watches_per_user,
            max_feed_streams: config.limits.max_feed_streams_per_user,
            changes_per_second: config.limits.max_user_changes_per_second,
            changes_per_hour: config.limits.max_user_changes_per_hour,
        });
        let devices_taken = Mutex::new(Some(backends.hub.devices_taken()));
        Arc::new(Node {
            devices_taken,
            config,
            node_id,
            backends,
            leases: Leases::default(),
            // Random start: connection ids of a restarted node never match
            // those it handed out before.
            next_conn_id: AtomicU64::new(rand::random::<u64>() >> 1),
            draining: watch::channel(false).0,
            quotas,
            lease: Mutex::default(),
            hot_lost_sessions: AtomicBool::new(false),
            degraded: Degraded::default(),
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_sessions_per_user: self.config.limits.max_sessions_per_user,
        }
    }

    /// Applies a mutation. When what contacts see changes, the hot store
    /// logs it and fans it out in the same step, and the history is written
    /// from the log ([`crate::feed::run_projection`]). While the hot store is
    /// unreachable, and for a user whose changes from then are not replayed
    /// yet, the change goes to this node's own record of the user instead
    /// ([`crate::degraded`]).
    pub async fn mutate(&self, user_id: &str, mutation: Mutation) -> Result<UserRecord, ApiError> {
        // Holding on to a user until their queue is replayed keeps their
        // changes in order: the hot store must not see a new change before
        // the older queued ones.
        if self.degraded.hot_down() || self.degraded.holds(user_id) {
            return self.mutate_degraded(user_id, mutation, now_ms()).await;
        }
        let now = now_ms();
        // Kept for the degraded path: the hot store takes the mutation by value.
        let retry = mutation.clone();
        // A change applies only to a user the hot store knows. One that
        // restarted empty forgot the user's choice, and if no call failed
        // (between two renewals of the node lease) nothing told this node:
        // building on the default choice would show an invisible user
        // online. The durable state goes back first; for a session end too,
        // or the end would change nothing there and the durable store would
        // keep showing the user online.
        let ends = degraded::ends_session(&mutation);
        let mut attempt = if self.durable_outlives_hot() {
            Mutation::IfKnown(Box::new(mutation))
        } else {
            mutation
        };
        let (record, applied) = loop {
            match self.apply_hot(user_id, attempt, now, self.limits()).await {
                Ok(done) => break done,
                // Once restored, what the durable store does not know of the
                // user is the default: the change builds on what is there.
                Err(StoreError::Transition(TransitionError::Forgotten)) => {
                    // Ends are never refused: without the durable state the
                    // end still removes the session.
                    if let Err(error) = self.restore_from_durable(user_id).await
                        && !ends
                    {
                        return Err(error);
                    }
                    self.reassert_user(user_id, now).await;
                    attempt = retry.clone();
                }
                Err(StoreError::Unavailable(cause)) => {
                    metrics::backend_error("hot");
                    self.degraded.hot_failed(&cause);
                    // At the same time: should the write land after all (a
                    // timeout is no proof it did not), it carries the
                    // version this node shows and records.
                    return self.mutate_degraded(user_id, retry, now).await;
                }
                Err(error) => return Err(error.into()),
            }
        };
        if applied.record_changed && degraded::chooses(&retry) {
            self.save_choice(user_id, &record).await;
        }
        if applied.shown_changed {
            metrics::change();
        }
        Ok(record)
    }

    /// A change through the hot store, which logs it and fans it out. What
    /// contacts see changed is remembered for reads from the durable store
    /// until the history projection has surely written it there.
    async fn apply_hot(
        &self,
        user_id: &str,
        mutation: Mutation,
        now: i64,
        limits: Limits,
    ) -> StoreResult<(UserRecord, Applied)> {
        let (record, applied) = self
            .backends
            .hot
            .apply(user_id, mutation, now, limits)
            .await?;
        if applied.shown_changed && self.durable_outlives_hot() {
            self.degraded.made(user_id, &record.shown);
        }
        Ok((record, applied))
    }

    /// What the durable store knows of the users, including the changes
    /// this node made that the history projection may not have written yet.
    async fn durable_states(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>> {
        let mut states = self.backends.history.durable(user_ids).await?;
        self.degraded.add_unprojected(user_ids, &mut states);
        Ok(states)
    }

    /// Puts this node's sessions of a user the hot store forgot back before
    /// a change of the user, which must count them (the session limit, the
    /// derived status). A device whose lock is taken (maybe by the caller)
    /// waits for the re-assertion of all sessions that follows the renewal
    /// of the node lease.
    async fn reassert_user(&self, user_id: &str, now: i64) {
        let mut locked = Vec::new();
        let mut updates = Vec::new();
        for (key, session) in self.leases.sessions_of(user_id) {
            let Some(lock) = self.leases.try_lock(&key) else {
                continue;
            };
            // Ended or replaced since the copy was taken.
            if self
                .leases
                .session(&key)
                .is_none_or(|(held, _)| held.conn_id != session.conn_id)
            {
                continue;
            }
            locked.push(lock);
            let update = Mutation::Update {
                session,
                activity: None,
                status: None,
            };
            updates.push((now, update));
        }
        if updates.is_empty() {
            return;
        }
        // A visible change is logged and published by the hot store itself.
        if let Err(error) = self
            .apply_hot(user_id, Mutation::Replay(updates), now, self.limits())
            .await
        {
            tracing::warn!(%error, user_id, "re-asserting the sessions of a forgotten user failed");
        }
    }

    async fn record_history(&self, user_id: &str, shown: &Shown) {
        let entry = HistoryRecord::of(user_id, shown, shown.last_seen_ms);
        if let Err(error) = self.backends.history.append(&[entry]).await {
            metrics::backend_error("history");
            tracing::error!(%error, user_id, "history append failed");
        }
    }

    /// Saves the user's choice as `record` holds it in the durable store
    /// (through the history buffer: a ScyllaDB outage loses nothing
    /// acknowledged), so that no node ever has to guess it.
    async fn save_choice(&self, user_id: &str, record: &UserRecord) {
        let choice = ChoiceRecord {
            user_id: user_id.to_owned(),
            chosen: record.chosen,
            custom_message: record.custom_message.clone(),
            at_us: choice_stamp(now_ms(), record.shown.version),
        };
        if let Err(error) = self.backends.history.save_choices(&[choice]).await {
            metrics::backend_error("history");
            tracing::error!(%error, user_id, "saving the user's choice failed");
        }
    }

    /// A change while the hot store is unreachable (or while the user still
    /// has changes queued for it): applied to this node's record of the
    /// user, recorded in the history, delivered to this node's watchers
    /// directly (the fan-out runs on the hot store), and queued for the hot
    /// store.
    async fn mutate_degraded(
        &self,
        user_id: &str,
        mutation: Mutation,
        now: i64,
    ) -> Result<UserRecord, ApiError> {
        if !self.degraded.holds(user_id) {
            self.start_holding(user_id, degraded::ends_session(&mutation))
                .await?;
        }
        let chooses = degraded::chooses(&mutation);
        let (record, applied) = self.degraded.apply(user_id, mutation, now, self.limits())?;
        if applied.record_changed && chooses {
            self.save_choice(user_id, &record).await;
        }
        if applied.shown_changed {
            metrics::change();
            self.record_history(user_id, &record.shown).await;
            self.backends.hub.deliver(&BusEvent::Presence {
                user_id: user_id.to_owned(),
                record: record.clone(),
            });
        }
        Ok(record)
    }

    /// Rebuilds the user's record as this node can know it without the hot
    /// store: the durable latest shown state and this node's own sessions of
    /// the user. Fails when the durable store cannot answer either: guessing
    /// the user's choice could show an invisible user online.
    async fn start_holding(&self, user_id: &str, ending_own: bool) -> Result<(), ApiError> {
        let durable = self
            .durable_states(&[user_id.to_owned()])
            .await
            .inspect_err(|_| metrics::backend_error("history"))?
            .pop()
            .unwrap_or_default();
        if self.degraded.needs_sessions() {
            self.degraded.set_sessions(self.leases.sessions());
        }
        self.degraded.hold(user_id, durable, ending_own);
        Ok(())
    }

    /// Replays the changes queued while the hot store was unreachable, user
    /// by user, each user's in order, for at most `budget` (the rest waits
    /// for the next call: this runs in the maintenance loop). Stops if the
    /// hot store fails again.
    async fn replay_degraded(&self, budget: Duration) {
        let users = self.degraded.users();
        if users.is_empty() {
            return;
        }
        let deadline = Instant::now() + budget;
        let mut replayed = 0usize;
        for user_id in &users {
            if Instant::now() >= deadline || self.degraded.hot_down() {
                break;
            }
            if let Err(cause) = self.replay_user(user_id).await {
                metrics::backend_error("hot");
                self.degraded.hot_failed(&cause);
                break;
            }
            replayed += 1;
        }
        tracing::info!(
            replayed,
            left = users.len() - replayed,
            queued = self.degraded.queued(),
            "replayed changes queued while the hot store was unreachable"
        );
    }

    /// Writes one user's queued changes into the hot store as one change,
    /// then tells the other nodes the converged state (they missed the
    /// changes: the fan-out was down; watchers drop it if they hold it
    /// already) and records it in the history unless this node recorded it
    /// already (the hot store merges the sessions other nodes hold, which
    /// this node could not see).
    async fn replay_user(&self, user_id: &str) -> Result<(), String> {
        // A hot store that restarted empty forgot the user: what the durable
        // store knew of them when their record was rebuilt (their choice,
        // version, last seen) goes back first, as the queue builds on it.
        let forgotten = match self.backends.hot.get(&[user_id.to_owned()]).await {
            Ok(records) => records.first().is_none_or(Option::is_none),
            Err(StoreError::Unavailable(cause)) => return Err(cause),
            Err(_) => false,
        };
        if forgotten && let Some(base) = self.degraded.base(user_id) {
            // Writes nothing if another node put the user back meanwhile.
            self.backends
                .hot
                .seed(user_id, &base)
                .await
                .map_err(|error| format!("restoring a forgotten user: {error}"))?;
        }
        let mut converged = None;
        let recorded = loop {
            let changes = self.degraded.queued_changes(user_id);
            let count = changes.len();
            if !changes.is_empty() {
                match self
                    .apply_hot(user_id, Mutation::Replay(changes), now_ms(), self.limits())
                    .await
                {
                    Ok((record, _)) => converged = Some(record),
                    Err(StoreError::Unavailable(cause)) => return Err(cause),
                    Err(error) => {
                        tracing::warn!(%error, user_id, "replaying queued changes failed, dropped");
                    }
                }
            }
            // Changes taken meanwhile were queued behind these: once more.
            if let Popped::Done { recorded } = self.degraded.replayed(user_id, count) {
                break recorded;
            }
        };
        let Some(mut record) = converged else {
            return Ok(());
        };
        if record.shown.version < recorded.version {
            match self
                .apply_hot(
                    user_id,
                    Mutation::NotOlderThan(recorded.clone()),
                    now_ms(),
                    self.limits(),
                )
                .await
            {
                Ok((newer, _)) => record = newer,
                Err(error) => {
                    tracing::warn!(%error, user_id, "keeping the replayed version above the one shown during the outage failed");
                }
            }
        }
        // Whoever made it (this replay, another node, or a write of this
        // node that timed out and landed after all), what contacts see now
        // must be the durable store's latest too, or a read after Redis loses
        // the user again shows an older version. Recording a version twice
        // stores it once.
        if record.shown != recorded {
            self.record_history(user_id, &record.shown).await;
        }
        let event = BusEvent::Presence {
            user_id: user_id.to_owned(),
            record,
        };
        if let Err(error) = self.backends.fanout.publish(event).await {
            metrics::backend_error("fanout");
            tracing::warn!(%error, user_id, "fan-out of a replayed change failed");
        }
        Ok(())
    }

    /// Before re-asserting this node's sessions into a hot store that lost
    /// them: puts back what the durable store knows of their users (their
    /// choice, and what contacts last saw: status, last seen, version,
    /// reason) for users the hot store does not know any more. Without it
    /// they would come back with the default choice (an invisible user
    /// online) and from version 0. Users held by the degraded mode get
    /// theirs in the replay.
    ///
    /// Returns false if it could not read or write them all: the sessions
    /// must then not be re-asserted yet (that would guess the choices), and
    /// the whole catch-up is tried again at the next round.
    async fn restore_forgotten_choices(&self) -> bool {
        let mut users: Vec<String> = self
            .leases
            .sessions()
            .into_iter()
            .map(|(key, _)| key.user_id)
            .filter(|user_id| !self.degraded.holds(user_id))
            .collect();
        users.sort_unstable();
        users.dedup();
        for chunk in users.chunks(self.config.limits.max_batch.max(1)) {
            let forgotten: Vec<String> = match self.backends.hot.get(chunk).await {
                Ok(records) => chunk
                    .iter()
                    .zip(records)
                    .filter(|(_, record)| record.is_none())
                    .map(|(user_id, _)| user_id.clone())
                    .collect(),
                Err(error) => {
                    tracing::warn!(%error, "reading users to restore their choice failed");
                    return false;
                }
            };
            if forgotten.is_empty() {
                continue;
            }
            let states = match self.durable_states(&forgotten).await {
                Ok(states) => states,
                Err(error) => {
                    metrics::backend_error("history");
                    tracing::warn!(%error, "reading the durable state of forgotten users failed, not re-asserting their sessions yet");
                    return false;
                }
            };
            for (user_id, state) in forgotten.iter().zip(states) {
                // This node holds a live session of each: their last shown
                // state stands until the re-assertion that follows (or the
                // end of the session) moves it, so no read sees it go
                // offline and back, or its version go back.
                // Nothing durable: the user never chose, the default holds.
                let Some(record) = degraded::durable_record(state, false) else {
                    continue;
                };
                // Writes nothing where a change reached the hot store first.
                if let Err(error) = self.backends.hot.seed(user_id, &record).await {
                    tracing::warn!(%error, user_id, "restoring a forgotten user failed");
                    return false;
                }
            }
        }
        true
    }

    fn new_session(&self, device_id: String, platform: Platform, activity: Activity) -> Session {
        Session {
            device_id,
            platform,
            activity,
            connected_since_ms: now_ms(),
            conn_id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            node_id: self.node_id.clone(),
        }
    }

    pub fn check_serving(&self) -> Result<(), ApiError> {
        if *self.draining.borrow() {
            return Err(ApiError::Unavailable(
                "this node is draining, reconnect to another".into(),
            ));
        }
        Ok(())
    }

    /// Opens (or reopens) a device's session on a new connection and starts
    /// its lease, ending the stream of any older connection of the device.
    /// Returns the session, the user's record after the open, and what ends
    /// the new stream.
    pub async fn open_session(
        &self,
        caller: &Caller,
        open: OpenRequest,
    ) -> Result<OpenedSession, ApiError> {
        self.check_serving()?;
        self.quotas.admit_change(&caller.user_id)?;
        let key = SessionKey {
            user_id: caller.user_id.clone(),
            device_id: open.device_id.clone(),
        };
        let device = self.leases.lock(&key).await;
        let session = self.new_session(open.device_id, open.platform, open.activity);
        let record = self
            .mutate(
                &caller.user_id,
                Mutation::Open {
                    session: session.clone(),
                    status: open.status,
                },
            )
            .await?;
        let (ended, in_grace) =
            self.leases
                .hold(key.clone(), session.clone(), self.config.lease, true);
        if in_grace {
            metrics::reconnect_in_grace();
        }
        // The lease is settled: the announcement needs no lock.
        drop(device);
        self.announce_device(&key, false).await;
        Ok(OpenedSession {
            key,
            session,
            record,
            ended: ended.expect("a stream lease comes with its end"),
        })
    }

    /// A heartbeat on the stream holding `session`: renews the lease in
    /// memory, and touches the hot store only when something changed. Fails
    /// with ABORTED when the stream no longer holds the session (it was
    /// replaced, logged out or expired): the stream is to end.
    pub async fn beat(
        &self,
        key: &SessionKey,
        session: &mut Session,
        change: BeatChange,
    ) -> Result<(), ApiError> {
        let lost = || ApiError::Aborted("this stream no longer holds the session".into());
        if !self.leases.renew(key, session.conn_id, self.config.lease) {
            return Err(lost());
        }
        // Clients may repeat their activity on every beat (the SDK does):
        // only a different one is a change, so plain beats never reach a
        // backend.
        let activity = change.activity.filter(|a| *a != session.activity);
        if activity.is_none() && change.status.is_none() {
            return Ok(());
        }
        self.quotas.admit_change(&key.user_id)?;
        let _device = self.leases.lock(key).await;
        // Another path may have ended the lease while this one waited.
        if !self.leases.renew(key, session.conn_id, self.config.lease) {
            return Err(lost());
        }
        let mut changed = session.clone();
        if let Some(activity) = activity {
            changed.activity = activity;
        }
        let update = Mutation::Update {
            session: changed.clone(),
            activity,
            status: change.status,
        };
        match self.mutate(&key.user_id, update).await {
            Ok(_) => {}
            // The hot store names a newer connection of the device (taken
            // over through another node): this lease is not the session's.
            Err(ApiError::FailedPrecondition(_)) => {
                self.leases
                    .release(key, Some(session.conn_id), StreamEnd::Replaced);
                return Err(lost());
            }
            Err(error) => return Err(error),
        }
        self.leases.update_session(key, &changed);
        // Kept only once recorded: after a failed change the client's next
        // beat, repeating its activity, still counts as a change.
        *session = changed;
        Ok(())
    }

    /// The stream holding the session closed without Disconnect.
    pub fn connection_closed(&self, key: &SessionKey, conn_id: u64) {
        self.leases.linger(key, conn_id, self.config.grace);
    }

    /// A unary heartbeat: opens the session if this node does not hold it,
    /// renews it otherwise. The session is written to the hot store at least
    /// every half lease even without a change: a device whose calls are
    /// balanced over several nodes moves its session to the node it last
    /// wrote from, before the lease of the node it left runs out there.
    pub async fn touch(
        &self,
        caller: &Caller,
        device_id: String,
        platform: Platform,
        activity: Option<Activity>,
    ) -> Result<(), ApiError> {
        self.check_serving()?;
        let key = SessionKey {
            user_id: caller.user_id.clone(),
            device_id: device_id.clone(),
        };
        let held = self.leases.session(&key);
        let changed_activity = match &held {
            Some((session, _)) => activity.filter(|a| *a != session.activity),
            None => activity,
        };
        if let Some((session, written_at)) = &held
            && changed_activity.is_none()
            && written_at.elapsed() < self.config.lease / 2
            && self.leases.renew(&key, session.conn_id, self.config.lease)
        {
            return Ok(());
        }
        if held.is_none() || changed_activity.is_some() {
            self.quotas.admit_change(&caller.user_id)?;
        }
        let device = self.leases.lock(&key).await;
        let mut session = match self.leases.session(&key) {
            Some((session, _)) => session,
            None => self.new_session(device_id, platform, activity.unwrap_or_default()),
        };
        if let Some(activity) = changed_activity {
            session.activity = activity;
        }
        self.mutate(
            &caller.user_id,
            Mutation::Touch {
                session: session.clone(),
                activity: changed_activity,
            },
        )
        .await?;
        if self.leases.renew(&key, session.conn_id, self.config.lease) {
            self.leases.update_session(&key, &session);
            return Ok(());
        }
        self.leases
            .hold(key.clone(), session, self.config.lease, false);
        drop(device);
        self.announce_device(&key, false).await;
        Ok(())
    }

    /// Tells every node that this one just took `key`'s session (or logged
    /// the device out), so that a node holding a lease of an older
    /// connection of the device ends that stream (see
    /// [`Node::end_taken_device`]).
    async fn announce_device(&self, key: &SessionKey, logged_out: bool) {
        let event = BusEvent::DeviceTaken {
            user_id: key.user_id.clone(),
            device_id: key.device_id.clone(),
            logged_out,
            node_id: self.node_id.clone(),
        };
        if let Err(error) = self.backends.fanout.publish(event).await {
            metrics::backend_error("fanout");
            tracing::debug!(%error, user_id = %key.user_id, "announcing a device takeover failed");
        }
    }

    /// Another node took a device over (or logged it out): if this node
    /// still holds a lease of the device for a connection the hot store no
    /// longer names, that lease is stale. Its stream is ended, so the client,
    /// if it is still there, reconnects instead of beating for a session it
    /// lost (and its lease can never end the new one: it names its own
    /// connection).
    async fn end_taken_device(&self, notice: DeviceTaken) {
        let key = SessionKey {
            user_id: notice.user_id,
            device_id: notice.device_id,
        };
        if notice.node_id == self.node_id || self.leases.session(&key).is_none() {
            return;
        }
        let _device = self.leases.lock(&key).await;
        let Some((held, _)) = self.leases.session(&key) else {
            return;
        };
        let record = match self
            .backends
            .hot
            .get(std::slice::from_ref(&key.user_id))
            .await
        {
            Ok(mut records) => records.pop().flatten().unwrap_or_default(),
            Err(error) => {
                tracing::debug!(%error, user_id = %key.user_id, "checking a device takeover failed");
                return;
            }
        };
        let why = match record.session(&key.device_id) {
            Some(current) if current.conn_id == held.conn_id => return,
            Some(_) => StreamEnd::Replaced,
            // Gone from the hot store: ended only on a logout's word, as a
            // store that lost its data is re-asserted instead.
            None if notice.logged_out => StreamEnd::LoggedOut,
            None => return,
        };
        self.leases.release(&key, Some(held.conn_id), why);
    }

    /// Explicit logout of one device: the session ends at once, and so does
    /// the stream holding it on this node, so that no beat in flight brings
    /// it back.
    pub async fn disconnect(&self, caller: &Caller, device_id: String) -> Result<(), ApiError> {
        let key = SessionKey {
            user_id: caller.user_id.clone(),
            device_id: device_id.clone(),
        };
        let device = self.leases.lock(&key).await;
        self.mutate(
            &caller.user_id,
            Mutation::End {
                device_id,
                conn_id: None,
                reason: OfflineReason::Logout,
            },
        )
        .await?;
        metrics::session_ended(OfflineReason::Logout);
        self.leases.release(&key, None, StreamEnd::LoggedOut);
        drop(device);
        self.announce_device(&key, true).await;
        Ok(())
    }

    pub async fn set_status(
        &self,
        caller: &Caller,
        chosen: ChosenStatus,
        custom_message: String,
    ) -> Result<UserRecord, ApiError> {
        self.quotas.admit_change(&caller.user_id)?;
        self.mutate(
            &caller.user_id,
            Mutation::SetStatus {
                chosen,
                custom_message,
            },
        )
        .await
    }

    /// How `caller` relates to each of `user_ids`.
    pub async fn viewers(
        &self,
        caller: &Caller,
        user_ids: &[String],
    ) -> Result<Vec<Viewer>, ApiError> {
        let contacts = if caller.admin {
            Vec::new()
        } else {
            self.backends.contacts.list(&caller.user_id).await?
        };
        Ok(user_ids
            .iter()
            .map(|id| {
                if *id == caller.user_id {
                    Viewer::Owner
                } else if caller.admin {
                    Viewer::Admin
                } else if contacts.binary_search(id).is_ok() {
                    Viewer::Contact
                } else {
                    Viewer::Stranger
                }
            })
            .collect())
    }

    pub async fn get_presence(
        &self,
        caller: &Caller,
        user_ids: &[String],
    ) -> Result<Vec<View>, ApiError> {
        let viewers = self.viewers(caller, user_ids).await?;
        let records = self.presence_records(user_ids).await?;
        Ok(user_ids
            .iter()
            .zip(records)
            .zip(viewers)
            .map(|((id, record), viewer)| View::of(id, record.as_ref(), viewer))
            .collect())
    }

    /// The records of `user_ids`, in order, for reading: from the hot store;
    /// for users it does not know, and while it is unreachable, from the
    /// durable store's latest record of each (no devices); for users with
    /// changes not replayed into the hot store yet, this node's record.
    pub async fn presence_records(
        &self,
        user_ids: &[String],
    ) -> Result<Vec<Option<UserRecord>>, ApiError> {
        let hot = if self.degraded.hot_down() {
            None
        } else {
            match self.backends.hot.get(user_ids).await {
                Ok(records) => Some(records),
                Err(StoreError::Unavailable(cause)) => {
                    metrics::backend_error("hot");
                    self.degraded.hot_failed(&cause);
                    None
                }
                Err(error) => return Err(error.into()),
            }
        };
        let hot_answered = hot.is_some();
        let mut records = hot.unwrap_or_else(|| vec![None; user_ids.len()]);
        // Until its changes are replayed, a user reads as this node knows
        // them: the hot store has not seen changes this node acknowledged.
        for (user_id, slot) in user_ids.iter().zip(records.iter_mut()) {
            if let Some(held) = self.degraded.record(user_id) {
                *slot = Some(held);
            }
        }
        let missing: Vec<usize> = (0..user_ids.len())
            .filter(|i| records[*i].is_none())
            .collect();
        if missing.is_empty() {
            return Ok(records);
        }
        let ids: Vec<String> = missing.iter().map(|i| user_ids[*i].clone()).collect();
        let states = match self.durable_states(&ids).await {
            Ok(states) => states,
            // The hot store answered: users it does not know read as unknown.
            Err(error) if hot_answered => {
                metrics::backend_error("history");
                tracing::warn!(%error, "reading users unknown to the hot store from the durable store failed");
                return Ok(records);
            }
            Err(error) => {
                metrics::backend_error("history");
                return Err(error.into());
            }
        };
        // Right after an outage nodes are still re-asserting their sessions,
        // so a user the hot store does not know yet may well be online; and
        // a user this node holds a session of is (the hot store restarted
        // empty and the node has not put the session back yet). Showing
        // such a user offline would be undone at the next read during an
        // outage, with an older version.
        let hot_is_current =
            hot_answered && !self.degraded.durable_is_current(self.config.node_lease);
        let mut seeds = Vec::new();
        for (i, state) in missing.iter().zip(states) {
            let no_live_session = hot_is_current && !self.leases.holds_user(&user_ids[*i]);
            records[*i] = degraded::durable_record(state, no_live_session);
            if no_live_session && let Some(record) = &records[*i] {
                seeds.push((user_ids[*i].clone(), record.clone()));
            }
        }
        // Cache-aside: the hot store gets the users it missed back, so the
        // next read does not ask the durable store again.
        if !seeds.is_empty() && self.durable_outlives_hot() {
            let hot = self.backends.hot.clone();
            tokio::spawn(async move {
                for (user_id, record) in seeds {
                    if let Err(error) = hot.seed(&user_id, &record).await {
                        tracing::debug!(%error, user_id, "refilling the hot store failed");
                        return;
                    }
                }
            });
        }
        Ok(records)
    }

    /// Whether the durable store keeps what the hot store can lose: presence
    /// in ScyllaDB behind Redis. (The embedded hot store never loses a user,
    /// and history kept in Redis is lost with it.)
    fn durable_outlives_hot(&self) -> bool {
        !self.config.scylla.is_empty() && !self.config.redis_cluster.is_empty()
    }

    /// Before a change of a user the hot store does not know (it restarted
    /// empty, or the user's record expired; see `Mutation::IfKnown`): puts
    /// back what the durable store knows of the user (their choice, and what
    /// contacts last saw), so that the change builds on the user's choice and
    /// version, and an invisible user does not come back visible. Refuses
    /// (UNAVAILABLE) when the durable store cannot say, rather than guess the
    /// choice: the change must not be applied then. A hot store that fails
    /// here is left to the change that follows, which takes the degraded
    /// path.
    async fn restore_from_durable(&self, user_id: &str) -> Result<(), ApiError> {
        if !self.durable_outlives_hot() || self.degraded.hot_down() {
            return Ok(());
        }
        let ids = [user_id.to_owned()];
        let state = match self.durable_states(&ids).await {
            Ok(states) => states.into_iter().next().unwrap_or_default(),
            Err(error) => {
                metrics::backend_error("history");
                tracing::warn!(%error, user_id, "reading what the hot store lost of a user failed");
                return Err(ApiError::Unavailable(
                    "the user's status cannot be read right now, retry later".into(),
                ));
            }
        };
        // As `presence_records` reads the user: a session this node holds is
        // live, so their last shown state stands (the version does not go
        // back between reads); the session itself comes back with the
        // re-assertion.
        let no_live_session = !self.leases.holds_user(user_id);
        let Some(record) = degraded::durable_record(state, no_live_session) else {
            // Nothing durable: the user never chose, the default holds.
            return Ok(());
        };
        if let Err(error) = self.backends.hot.seed(user_id, &record).await {
            metrics::backend_error("hot");
            tracing::warn!(%error, user_id, "restoring a user the hot store lost failed");
            return Err(ApiError::Unavailable(
                "the user's status cannot be restored right now, retry later".into(),
            ));
        }
        Ok(())
    }

    /// The history of `user_id` as `caller` may see it.
    /// Waits, at most [`HISTORY_CATCH_UP`], until the history holds the
    /// user's current version: the history is written from the change log
    /// a moment after each change (the projection batches), and a user who
    /// just changed their status and reads their history must find it
    /// there. Without the hot store, or when the wait runs out, the history
    /// is read as it is.
    async fn history_caught_up(&self, user_id: &str) {
        let user = [user_id.to_owned()];
        let records = self.backends.hot.get(&user).await;
        let Ok([Some(record)]) = records.as_deref() else {
            return;
        };
        // Versions are the clock in microseconds: only a recent change can
        // still be on its way (an old one may be past the retention).
        let current = record.shown.version;
        let changed_ms_ago = now_ms().saturating_sub(i64::try_from(current / 1000).unwrap_or(0));
        if changed_ms_ago > i64::try_from(HISTORY_CATCH_UP.as_millis() * 30).unwrap_or(0) {
            return;
        }
        let deadline = tokio::time::Instant::now() + HISTORY_CATCH_UP;
        while tokio::time::Instant::now() < deadline {
            match self.backends.history.last(&user).await.as_deref() {
                Ok([last]) if last.as_ref().is_some_and(|l| l.version >= current) => return,
                Ok(_) => tokio::time::sleep(HISTORY_POLL).await,
                Err(_) => return,
            }
        }
    }

    pub async fn history(
        &self,
        caller: &Caller,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        after_version: u64,
        limit: usize,
    ) -> Result<(Vec<HistoryRecord>, Viewer), ApiError> {
        let viewer = self.viewers(caller, &[user_id.to_owned()]).await?[0];
        if viewer == Viewer::Stranger {
            return Err(ApiError::PermissionDenied(
                "only the user, their contacts and admins may read this history".into(),
            ));
        }
        self.history_caught_up(user_id).await;
        let retention_start =
            now_ms() - i64::try_from(self.config.history_retention.as_millis()).unwrap_or(i64::MAX);
        let records = self
            .backends
            .history
            .page(
                user_id,
                from_ms.max(retention_start),
                to_ms,
                after_version,
                limit,
            )
            .await?;
        Ok((records, viewer))
    }

    pub async fn add_contacts(
        &self,
        user_id: &str,
        contact_ids: &[String],
    ) -> Result<u32, ApiError> {
        let added = self
            .backends
            .contacts
            .add(user_id, contact_ids, self.config.limits.max_contacts)
            .await?;
        self.publish_contacts(user_id, contact_ids, true).await;
        Ok(added)
    }

    pub async fn remove_contacts(
        &self,
        user_id: &str,
        contact_ids: &[String],
    ) -> Result<u32, ApiError> {
        let removed = self.backends.contacts.remove(user_id, contact_ids).await?;
        self.publish_contacts(user_id, contact_ids, false).await;
        Ok(removed)
    }

    /// Tells the watchers of both sides of each link. Re-announcing a link
    /// that already existed is harmless: the watcher reloads its state.
    async fn publish_contacts(&self, user_id: &str, contact_ids: &[String], added: bool) {
        let event = |user: &str, others: Vec<String>| {
            let (added, removed) = if added {
                (others, Vec::new())
            } else {
                (Vec::new(), others)
            };
            BusEvent::Contacts {
                user_id: user.to_owned(),
                added,
                removed,
            }
        };
        let mut events = vec![event(user_id, contact_ids.to_vec())];
        events.extend(
            contact_ids
                .iter()
                .filter(|c| c.as_str() != user_id)
                .map(|c| event(c, vec![user_id.to_owned()])),
        );
        for event in events {
            if let Err(error) = self.backends.fanout.publish(event).await {
                tracing::warn!(%error, user_id, "fan-out of a contacts change failed");
            }
        }
    }

    pub async fn list_contacts(&self, user_id: &str) -> Result<Vec<String>, ApiError> {
        Ok(self.backends.contacts.list(user_id).await?)
    }

    /// Counts a new stream of `user_id`, refusing past the per-user limit
    /// of its kind. The returned slot uncounts it when dropped.
    pub fn admit_stream(&self, user_id: &str, kind: StreamKind) -> Result<StreamSlot, ApiError> {
        self.quotas.admit_stream(user_id, kind)
    }

    /// Ends the sessions whose lease ran out. Returns how many. A session
    /// that cannot be ended now keeps its lease and is tried again at the
    /// next sweep: dropping the lease first would leave it online for good.
    pub async fn sweep(&self) -> usize {
        let now = tokio::time::Instant::now();
        let mut ended = 0;
        for lease in self.leases.expired(now) {
            if self.end_expired(&lease, now).await {
                ended += 1;
            }
        }
        self.quotas.prune();
        ended
    }

    async fn end_expired(&self, lease: &Expired, now: tokio::time::Instant) -> bool {
        let _device = self.leases.lock(&lease.key).await;
        // Renewed or taken over while the sweep waited for the device.
        if !self.leases.still_expired(lease, now) {
            return false;
        }
        let mutation = Mutation::End {
            device_id: lease.key.device_id.clone(),
            conn_id: Some(lease.conn_id),
            reason: lease.reason,
        };
        if let Err(error) = self.mutate(&lease.key.user_id, mutation).await {
            tracing::warn!(?error, user_id = %lease.key.user_id, "ending an expired session failed, retrying at the next sweep");
            return false;
        }
        metrics::session_ended(lease.reason);
        self.leases
            .release(&lease.key, Some(lease.conn_id), StreamEnd::Expired);
        true
    }

    /// The node's background duties until `stop` is raised: end expired
    /// sessions, bring the hot store back in step after it lost this node or
    /// was unreachable, end the sessions of nodes that died, and keep the
    /// node's own lease alive. The lease is kept apart from the rest: slow
    /// duties (re-asserting thousands of sessions into a store that just came
    /// back) must never let it run out, or other nodes would take this live
    /// node for lost.
    pub async fn run_maintenance(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let duties = async {
            let mut rounds = Rounds::new(self.config.sweep_interval, stop.clone());
            while rounds.next().await {
                self.sweep().await;
                self.catch_up_hot_store().await;
                self.reclaim_lost_nodes().await;
                let (streams, watched) = self.backends.hub.sizes();
                metrics::node_gauges(self.leases.len(), streams, watched);
            }
        };
        let lease = async {
            let mut rounds = Rounds::new(self.config.node_lease / 3, stop.clone());
            while rounds.next().await {
                self.renew_node_lease().await;
            }
        };
        let devices_taken = async {
            let Some(mut notices) = self.devices_taken.lock().take() else {
                return;
            };
            loop {
                tokio::select! {
                    () = raised(stop.clone()) => return,
                    notice = notices.recv() => match notice {
                        Some(notice) => self.end_taken_device(notice).await,
                        None => return,
                    },
                }
            }
        };
        tokio::join!(duties, lease, devices_taken);
    }

    /// One round of every duty, as the maintenance loops run them: for
    /// tests and tools that drive a node step by step.
    pub async fn maintain_once(&self) {
        self.renew_node_lease().await;
        self.sweep().await;
        self.catch_up_hot_store().await;
        self.reclaim_lost_nodes().await;
    }

    async fn renew_node_lease(&self) {
        let sent = Instant::now();
        match self
            .backends
            .hot
            .renew_node(&self.node_id, self.config.node_lease)
            .await
        {
            Ok(known) => {
                self.degraded.hot_answered();
                let mut lease = self.lease.lock();
                if known {
                    lease.renewed_at = Some(sent);
                } else {
                    *lease = LeaseHold::default();
                    self.hot_lost_sessions.store(true, Ordering::Release);
                }
                // Written at some moment of the call: held since its end at
                // the latest, fresh as of its start at the earliest.
                lease.held_since.get_or_insert_with(Instant::now);
            }
            // The renewal doubles as the probe of an unreachable hot store:
            // the outage was logged once when it began.
            Err(StoreError::Unavailable(cause)) if self.degraded.hot_down() => {
                *self.lease.lock() = LeaseHold::default();
                tracing::debug!(%cause, "renewing the node lease failed, hot store still unreachable");
            }
            Err(error) => {
                *self.lease.lock() = LeaseHold::default();
                if let StoreError::Unavailable(cause) = &error {
                    self.degraded.hot_failed(cause);
                }
                tracing::warn!(%error, "renewing the node lease failed");
            }
        }
    }

    /// Once the hot store answers: gives it back the sessions it lost (with
    /// the choices of their users), then replays what was queued while it
    /// was unreachable.
    async fn catch_up_hot_store(&self) {
        if self.degraded.hot_down() {
            return;
        }
        if self.hot_lost_sessions.load(Ordering::Acquire) {
            // The flag stays up until the users have their durable state
            // back: meanwhile `mutate` restores a user before any change of
            // them, which would otherwise start from the default choice.
            if !self.restore_forgotten_choices().await {
                return;
            }
            self.hot_lost_sessions.store(false, Ordering::Release);
            self.reassert_sessions().await;
        }
        self.replay_degraded(self.config.node_lease / 3).await;
    }

    /// Writes every session this node holds back into the hot store, which
    /// forgot them (it restarted empty, or took this node for dead).
    async fn reassert_sessions(&self) {
        let sessions = self.leases.sessions();
        tracing::info!(
            sessions = sessions.len(),
            "hot store lost this node's sessions, re-asserting them"
        );
        for (key, session) in sessions {
            let _device = self.leases.lock(&key).await;
            // Ended or replaced since the copy was taken.
            if self
                .leases
                .session(&key)
                .is_none_or(|(held, _)| held.conn_id != session.conn_id)
            {
                continue;
            }
            let conn_id = session.conn_id;
            let mutation = Mutation::Update {
                session,
                activity: None,
                status: None,
            };
            match self.mutate(&key.user_id, mutation).await {
                Ok(_) => {}
                // Another node took the device over meanwhile.
                Err(ApiError::FailedPrecondition(_)) => {
                    self.leases
                        .release(&key, Some(conn_id), StreamEnd::Replaced);
                }
                Err(error) => {
                    tracing::warn!(?error, user_id = %key.user_id, "re-asserting a session failed");
                }
            }
        }
    }

    /// Ends the sessions of nodes whose lease ran out, with reason "node lost".
    async fn reclaim_lost_nodes(&self) {
        // Node leases live in the hot store: nothing to find while it is down.
        // And a missing lease proves a node dead only if the store kept ours:
        // after a failover or restart that lost every lease, live nodes need
        // one node lease to renew theirs again.
        let trusted = || self.lease.lock().proves_others_lost(self.config.node_lease);
        if self.degraded.hot_down() || !trusted() {
            return;
        }
        let lost = match self.backends.hot.lost_nodes().await {
            Ok(lost) => lost,
            Err(error) => {
                tracing::warn!(%error, "looking for lost nodes failed");
                return;
            }
        };
        // The search may have waited through a failover that lost every
        // lease: what it found counts only if ours is still known held.
        if !trusted() {
            return;
        }
        for node_id in lost.into_iter().filter(|id| *id != self.node_id) {
            if let Err(error) = self.reclaim_node(&node_id).await {
                tracing::warn!(?error, node_id, "reclaiming a lost node failed");
            }
        }
    }

    /// Ends the sessions a lost node held, in batches, stopping if the node
    /// turns out to be alive after all (slow, not dead: it renewed its lease
    /// and re-asserts its sessions).
    async fn reclaim_node(&self, node_id: &str) -> Result<(), ApiError> {
        let users = self.backends.hot.users_of_node(node_id).await?;
        tracing::warn!(
            node_id,
            users = users.len(),
            "node lost, ending its sessions"
        );
        for batch in users.chunks(RECLAIM_BATCH) {
            if !self
                .backends
                .hot
                .lost_nodes()
                .await?
                .iter()
                .any(|id| id == node_id)
            {
                tracing::info!(node_id, "node is back, reclaim stopped");
                return Ok(());
            }
            self.end_node_sessions(node_id, batch).await?;
        }
        self.backends.hot.forget_node(node_id).await?;
        Ok(())
    }

    async fn end_node_sessions(&self, node_id: &str, users: &[String]) -> Result<(), ApiError> {
        for group in users.chunks(RECLAIM_CONCURRENCY) {
            futures::future::try_join_all(
                group
                    .iter()
                    .map(|user_id| self.end_node_session(node_id, user_id)),
            )
            .await?;
        }
        Ok(())
    }

    async fn end_node_session(&self, node_id: &str, user_id: &str) -> Result<(), ApiError> {
        metrics::session_ended(OfflineReason::NodeLost);
        let mutation = Mutation::EndNode {
            node_id: node_id.to_owned(),
        };
        self.mutate(user_id, mutation).await.map(drop)
    }

    /// Joins the shared hot store before serving: sessions left under this
    /// node's id by an earlier process (a restart with a fixed `--node-id`)
    /// are ended as lost, and the node lease is taken.
    pub async fn join(&self) -> Result<(), ApiError> {
        let stale = self.backends.hot.users_of_node(&self.node_id).await?;
        if !stale.is_empty() {
            tracing::warn!(
                users = stale.len(),
                "ending sessions an earlier process of this node left behind"
            );
            self.end_node_sessions(&self.node_id, &stale).await?;
            self.backends.hot.forget_node(&self.node_id).await?;
        }
        self.backends
            .hot
            .renew_node(&self.node_id, self.config.node_lease)
            .await?;
        Ok(())
    }

    /// Cross-node fan-out lost events: every watched user's current state is
    /// delivered again (watch streams drop what they already sent). A gap
    /// usually comes with a failing Redis, so a refill that cannot read is
    /// retried until it can, or until a newer gap starts a new one.
    pub async fn refill_watchers_after_gaps(self: Arc<Self>, mut gaps: watch::Receiver<u64>) {
        while gaps.changed().await.is_ok() {
            let mut pause = REFILL_RETRY_FIRST;
            while let Err(error) = self.refill_watchers().await {
                tracing::warn!(%error, retry_in = ?pause, "refilling watchers failed");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    changed = gaps.changed() => if changed.is_err() { return },
                }
                pause = (pause * 2).min(REFILL_RETRY_MAX);
            }
        }
    }

    async fn refill_watchers(&self) -> Result<(), StoreError> {
        let users = self.backends.hub.watched_users();
        tracing::info!(users = users.len(), "fan-out had a gap, refilling watchers");
        for chunk in users.chunks(self.config.limits.max_batch.max(1)) {
            let records = self.backends.hot.get(chunk).await?;
            for (user_id, record) in chunk.iter().zip(records) {
                let Some(record) = record else { continue };
                self.backends.hub.deliver(&BusEvent::Presence {
                    user_id: user_id.clone(),
                    record,
                });
            }
        }
        Ok(())
    }

    /// Leaves the shared hot store for good: the node's sessions have ended.
    pub async fn leave(&self) {
        if let Err(error) = self.backends.hot.forget_node(&self.node_id).await {
            tracing::warn!(%error, "forgetting this node failed");
        }
    }

    /// Resolves once the node starts draining.
    pub fn drained(&self) -> impl Future<Output = ()> + Send + use<> {
        raised(self.draining.subscribe())
    }

    /// Starts draining: new sessions and watches are refused, streams are told
    /// to go away, and their sessions linger through the grace period so that
    /// clients reconnecting elsewhere cause no offline flicker.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Waits until every lease on this node ended (handed over or swept), at
    /// most `limit`.
    pub async fn wait_for_leases(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.leases.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(self.config.sweep_interval.min(Duration::from_millis(100))).await;
        }
    }

    pub fn session_count(&self) -> usize {
        self.leases.len()
    }

    /// Every session this node holds a lease for.
    pub fn held_sessions(&self) -> Vec<(SessionKey, Session)> {
        self.leases.sessions()
    }

    /// Whether the hot store has everything this node holds and acknowledged:
    /// it answers, and nothing waits to be re-asserted or replayed. For
    /// tests and tools that check the hot store against the leases.
    pub fn hot_store_in_step(&self) -> bool {
        !self.degraded.hot_down()
            && !self.hot_lost_sessions.load(Ordering::Acquire)
            && self.degraded.users().is_empty()
    }
}

/// A session just opened on a heartbeat stream.
pub struct OpenedSession {
    pub key: SessionKey,
    pub session: Session,
    /// The user's record after the open.
    pub record: UserRecord,
    /// Resolves when the server takes the session from the stream.
    pub ended: StreamEnded,
}
