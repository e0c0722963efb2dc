//! What a node does while the hot store (Redis Cluster) cannot be reached.
//!
//! **Reads** come from the durable store's state per user
//! ([`HistoryStore::durable`](crate::store::HistoryStore::durable): the latest
//! shown state and the user's choice), turned into a record with no devices
//! by [`durable_record`] (see `Node::presence_records`).
//!
//! **Changes** are still taken. At a user's first change of the outage the node
//! rebuilds the user's record from what it knows ([`rebuild`]): the durable
//! latest shown state and choice, and this node's own sessions of that user.
//! The choice is never guessed: every accepted change of it is saved in the
//! durable store (also one contacts cannot see, like going invisible while
//! offline), and a user the durable store cannot answer for is refused
//! (`UNAVAILABLE`). From then on
//! every change of the user is applied to that record by the same
//! [`domain::apply`] the hot stores run. A change contacts see is recorded in
//! the history (through the buffered durable store) and delivered to this
//! node's own watchers; the fan-out runs on the hot store, so watchers on other
//! nodes get it when the hot store is back.
//!
//! Every change is also **queued**, in order per user, and replayed into the
//! hot store once it answers again. Until a user's queue is replayed, that
//! user's new changes join the queue (and the local record) instead of going to
//! the hot store, so the hot store sees them in the order they were made.
//!
//! The queue is bounded ([`QUEUE_CAPACITY`] changes over all users). Past it,
//! new changes are refused (`UNAVAILABLE`, counted in [`REFUSED_METRIC`],
//! logged), except the end of a session: refusing that would leave a ghost in
//! the hot store once it is back, and ends are bounded anyway by the sessions
//! the node holds, since opens are refused. Accepting changes we then drop
//! would break the promise that the hot store converges; refusing is visible
//! where it happens.
//!
//! What a node cannot know while the hot store is down: the sessions of the
//! same user on other nodes. A user seen online in the durable store who has
//! no session on this node gets a **stand-in session** (device id `""`, which
//! no client can use), so that a status change made here keeps the user
//! visible instead of turning them offline. A user with sessions here is
//! derived from those alone until the replay merges both nodes' sessions in
//! the hot store. The stand-in never leaves this module: every record handed
//! out has it removed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::domain::{
    self, Activity, Applied, ChosenStatus, HistoryRecord, Limits, Mutation, OfflineReason,
    Platform, Session, Shown, UserRecord, VisibleStatus,
};
use crate::leases::SessionKey;
use crate::store::{DurableState, StoreError, StoreResult};

/// Most changes queued for the hot store, over all users. At 100 changes/s
/// this rides out a 15-minute outage (as the history buffer does); a change
/// costs a few hundred bytes.
pub const QUEUE_CAPACITY: usize = 100_000;

/// Gauge: changes waiting to be replayed into the hot store.
pub const QUEUED_METRIC: &str = "presence_degraded_queued_changes";

/// Counter: changes refused because the queue was full.
pub const REFUSED_METRIC: &str = "presence_degraded_refused_total";

/// Device id of the stand-in session; ids from clients are never empty.
const STAND_IN_DEVICE: &str = "";

/// How often at most the "queue full" error is logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);

/// How long this node remembers a change it made through the hot store, for
/// reads from the durable store (see [`Degraded::made`]): far above the
/// history projection's usual lag (milliseconds), above its lag after a
/// node holding partitions of it died (its members expire in seconds).
const UNPROJECTED_WINDOW: Duration = Duration::from_secs(30);

/// Most changes remembered for [`UNPROJECTED_WINDOW`]; past it the oldest
/// are forgotten early. At 1,000 changes/s a node remembers all 30 s.
const UNPROJECTED_CAPACITY: usize = 100_000;

/// The node's degraded-mode state. parking_lot Mutex, not Tokio's: nothing
/// async runs while it is held; each critical section is a few map and queue
/// operations plus one `domain::apply`.
pub struct Degraded {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The hot store is taken for down: set when a call to it fails, cleared
    /// when the node lease renews. While set, changes go to the local records
    /// without trying the hot store (each try could wait for its timeout).
    hot_down: bool,
    /// When the hot store last came back after being down.
    recovered_at: Option<Instant>,
    /// Users with changes the hot store has not seen yet.
    users: HashMap<String, Held>,
    /// Changes queued, over all users.
    queued: usize,
    /// This node's sessions per user, copied from the leases when the first
    /// record of an outage is rebuilt. Every later change of a session goes
    /// through a change of its user, which rebuilds that user first, so the
    /// copy plus the changes is exact. Cleared when the hot store is back.
    sessions: Option<HashMap<String, Vec<Session>>>,
    refused_since_log: u64,
    last_refusal_log: Option<Instant>,
    /// The latest shown state of each user this node changed through the
    /// hot store lately.
    unprojected: HashMap<String, Shown>,
    /// The same changes oldest first, to forget them in order.
    unprojected_order: VecDeque<(Instant, String, u64)>,
}

/// One user whose changes the hot store has not seen yet.
struct Held {
    /// The record as this node knows it (may hold the stand-in session).
    record: UserRecord,
    /// The user as the durable store knew them when the record was rebuilt
    /// (no sessions, see [`durable_record`]): seeded into the hot store before
    /// the replay if it lost the user meanwhile (restarted empty), so the
    /// replay builds on the user's choice and version.
    base: Option<UserRecord>,
    /// Changes not in the hot store yet, oldest first, with when they were
    /// taken (Unix ms).
    queue: VecDeque<(i64, Mutation)>,
    /// What contacts last saw of the user through this node: the shown
    /// state recorded in the history during the outage (or the durable one
    /// the record was rebuilt from).
    recorded: Shown,
}

/// What the replay of a user's last queued change reports.
pub enum Popped {
    /// More changes of the user are queued.
    More,
    /// The queue is empty and the user is no longer held. `recorded` is what
    /// contacts last saw through this node, to compare with the hot store's
    /// converged state.
    Done { recorded: Shown },
}

impl Default for Degraded {
    fn default() -> Self {
        Degraded::new(QUEUE_CAPACITY)
    }
}

impl Degraded {
    pub fn new(capacity: usize) -> Self {
        Degraded {
            capacity,
            state: Mutex::default(),
        }
    }

    pub fn hot_down(&self) -> bool {
        self.state.lock().hot_down
    }

    /// A call to the hot store failed: until it answers again, changes go to
    /// the local records.
    pub fn hot_failed(&self, cause: &str) {
        let mut state = self.state.lock();
        if state.hot_down {
            return;
        }
        state.hot_down = true;
        // This outage copies the leases afresh at its first rebuild.
        state.sessions = None;
        drop(state);
        tracing::warn!(
            %cause,
            "hot store unreachable: reading presence from the durable store, queueing changes"
        );
    }

    /// The hot store answered (the node lease renewed).
    pub fn hot_answered(&self) {
        let mut state = self.state.lock();
        if !state.hot_down {
            return;
        }
        state.hot_down = false;
        state.recovered_at = Some(Instant::now());
        state.sessions = None;
        let (users, queued) = (state.users.len(), state.queued);
        drop(state);
        tracing::info!(
            users,
            queued,
            "hot store answers again, replaying queued changes"
        );
    }

    /// Whether the durable store's latest records are as current as the hot
    /// store's: while the hot store is down, and for `window` after it came
    /// back (nodes are still re-asserting their sessions into it then).
    pub fn durable_is_current(&self, window: Duration) -> bool {
        let state = self.state.lock();
        state.hot_down || state.recovered_at.is_some_and(|at| at.elapsed() < window)
    }

    /// Whether `user_id` has changes the hot store has not seen yet.
    pub fn holds(&self, user_id: &str) -> bool {
        self.state.lock().users.contains_key(user_id)
    }

    /// The record this node holds for `user_id`, without the stand-in.
    pub fn record(&self, user_id: &str) -> Option<UserRecord> {
        let state = self.state.lock();
        state
            .users
            .get(user_id)
            .map(|held| without_stand_in(&held.record))
    }

    /// Whether the leases must be copied before a record is rebuilt.
    pub fn needs_sessions(&self) -> bool {
        self.state.lock().sessions.is_none()
    }

    /// Keeps a copy of this node's sessions, unless one is kept already.
    pub fn set_sessions(&self, sessions: Vec<(SessionKey, Session)>) {
        let mut state = self.state.lock();
        if state.sessions.is_some() {
            return;
        }
        let mut by_user: HashMap<String, Vec<Session>> = HashMap::new();
        for (key, session) in sessions {
            by_user.entry(key.user_id).or_default().push(session);
        }
        state.sessions = Some(by_user);
    }

    /// Starts holding `user_id`, with the record [`rebuild`] makes from the
    /// durable `last` record and this node's sessions of the user (taken from
    /// the copy), unless a concurrent change of the same user did first: its
    /// record holds those sessions already, and maybe a newer change. One
    /// step under the lock, so two first changes cannot split the sessions.
    pub fn hold(&self, user_id: &str, durable: DurableState, ending_own: bool) {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.users.contains_key(user_id) {
            return;
        }
        let sessions = state
            .sessions
            .as_mut()
            .and_then(|sessions| sessions.remove(user_id))
            .unwrap_or_default();
        // With a session here the user is live: their durable shown state
        // stands, as in the rebuilt record, so that the queue replayed on it
        // moves it as it moved the rebuilt one (same versions).
        let base = durable_record(durable.clone(), sessions.is_empty());
        let record = rebuild(durable, sessions, ending_own);
        state.users.insert(
            user_id.to_owned(),
            Held {
                base,
                recorded: record.shown.clone(),
                record,
                queue: VecDeque::new(),
            },
        );
    }

    /// Applies a change to the held record of `user_id` and queues it for the
    /// hot store. Returns the record after it (without the stand-in).
    pub fn apply(
        &self,
        user_id: &str,
        mutation: Mutation,
        now_ms: i64,
        limits: Limits,
    ) -> StoreResult<(UserRecord, Applied)> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let Some(held) = state.users.get_mut(user_id) else {
            // Unreachable in practice: the caller holds the user first.
            return Err(StoreError::Unavailable(
                "degraded mode lost track of the user".into(),
            ));
        };
        if state.queued >= self.capacity && !ends_session(&mutation) {
            state.refused_since_log += 1;
            metrics::counter!(REFUSED_METRIC).increment(1);
            let log_due = state
                .last_refusal_log
                .is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY);
            if log_due {
                let refused = std::mem::take(&mut state.refused_since_log);
                state.last_refusal_log = Some(Instant::now());
                tracing::error!(
                    refused,
                    capacity = self.capacity,
                    "degraded-mode queue full: refusing changes until the hot store is back"
                );
            }
            return Err(StoreError::Unavailable(
                "degraded-mode queue is full".into(),
            ));
        }
        let applied = domain::apply(&mut held.record, mutation.clone(), now_ms, limits)?;
        if applied.shown_changed {
            held.recorded = held.record.shown.clone();
        }
        // Clients repeat themselves (the SDK sends its activity with every
        // beat): one copy of a change replays the same as many.
        if held.queue.back().is_none_or(|(_, last)| *last != mutation) {
            held.queue.push_back((now_ms, mutation));
            state.queued += 1;
            metrics::gauge!(QUEUED_METRIC).set(state.queued as f64);
        }
        Ok((without_stand_in(&held.record), applied))
    }

    /// The users held, for the replay.
    pub fn users(&self) -> Vec<String> {
        self.state.lock().users.keys().cloned().collect()
    }

    /// What the durable store knew of `user_id` when its record was
    /// rebuilt, as a record to seed a hot store that lost the user; `None`
    /// if it knew nothing (the user starts from the defaults).
    pub fn base(&self, user_id: &str) -> Option<UserRecord> {
        let state = self.state.lock();
        state.users.get(user_id).and_then(|held| held.base.clone())
    }

    /// The changes of `user_id` not in the hot store yet, oldest first, with
    /// when they were taken.
    pub fn queued_changes(&self, user_id: &str) -> Vec<(i64, Mutation)> {
        let state = self.state.lock();
        state
            .users
            .get(user_id)
            .map(|held| held.queue.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The oldest `count` changes of `user_id` are in the hot store now.
    pub fn replayed(&self, user_id: &str, count: usize) -> Popped {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let Some(held) = state.users.get_mut(user_id) else {
            return Popped::Done {
                recorded: Shown::default(),
            };
        };
        let count = count.min(held.queue.len());
        held.queue.drain(..count);
        state.queued -= count;
        metrics::gauge!(QUEUED_METRIC).set(state.queued as f64);
        if !held.queue.is_empty() {
            return Popped::More;
        }
        let recorded = held.recorded.clone();
        state.users.remove(user_id);
        Popped::Done { recorded }
    }

    /// Changes queued over all users.
    pub fn queued(&self) -> usize {
        self.state.lock().queued
    }

    /// This node just changed what contacts see of `user_id` through the
    /// hot store. The durable store learns it from the history projection,
    /// a moment later; should the hot store become unreachable before that,
    /// reads from the durable store must still see it, or a user's version
    /// goes back (or an online user reads as unknown). Remembered for
    /// [`UNPROJECTED_WINDOW`] while the hot store answers; while it does
    /// not, the projection cannot run, so nothing is forgotten by age.
    pub fn made(&self, user_id: &str, shown: &Shown) {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let now = Instant::now();
        while let Some((at, user, version)) = state.unprojected_order.front() {
            let expired = !state.hot_down && now.duration_since(*at) > UNPROJECTED_WINDOW;
            if !expired && state.unprojected_order.len() < UNPROJECTED_CAPACITY {
                break;
            }
            if state
                .unprojected
                .get(user)
                .is_some_and(|shown| shown.version == *version)
            {
                state.unprojected.remove(user);
            }
            state.unprojected_order.pop_front();
        }
        let newer = state
            .unprojected
            .get(user_id)
            .is_none_or(|known| known.version < shown.version);
        if newer {
            state.unprojected.insert(user_id.to_owned(), shown.clone());
            state
                .unprojected_order
                .push_back((now, user_id.to_owned(), shown.version));
        }
    }

    /// Brings what the durable store answered for `user_ids` up to the
    /// changes this node made lately ([`Degraded::made`]) where those are
    /// newer.
    pub fn add_unprojected(&self, user_ids: &[String], states: &mut [DurableState]) {
        let state = self.state.lock();
        if state.unprojected.is_empty() {
            return;
        }
        for (user_id, durable) in user_ids.iter().zip(states) {
            let Some(shown) = state.unprojected.get(user_id) else {
                continue;
            };
            if durable
                .last
                .as_ref()
                .is_none_or(|last| last.version < shown.version)
            {
                durable.last = Some(HistoryRecord::of(user_id, shown, shown.last_seen_ms));
            }
        }
    }
}

/// Whether the change ends a session (of this node: sessions are ended by
/// the node holding them, or by one reclaiming a lost node).
pub fn ends_session(mutation: &Mutation) -> bool {
    matches!(mutation, Mutation::End { .. } | Mutation::EndNode { .. })
}

/// Whether the change carries a choice (status and custom message): one a
/// node saves in the durable store once accepted.
pub fn chooses(mutation: &Mutation) -> bool {
    match mutation {
        Mutation::SetStatus { .. } => true,
        Mutation::Open { status, .. } | Mutation::Update { status, .. } => status.is_some(),
        Mutation::Replay(changes) => changes.iter().any(|(_, change)| chooses(change)),
        Mutation::IfKnown(change) => chooses(change),
        Mutation::NotOlderThan(_) => false,
        Mutation::Touch { .. } | Mutation::End { .. } | Mutation::EndNode { .. } => false,
    }
}

fn without_stand_in(record: &UserRecord) -> UserRecord {
    let mut record = record.clone();
    record.sessions.retain(|s| s.device_id != STAND_IN_DEVICE);
    record
}

/// What a user chose, from the durable store: the saved choice; for a user
/// without one, what their visible state tells (a choice made before
/// choices were saved); for a user never seen either, the default, which is
/// then no guess: every choice since is saved.
pub fn choice_of(durable: &DurableState) -> (ChosenStatus, String) {
    match (&durable.choice, &durable.last) {
        (Some(choice), _) => (choice.chosen, choice.custom_message.clone()),
        (None, Some(last)) => infer_choice(last),
        (None, None) => (ChosenStatus::Online, String::new()),
    }
}

/// What a user had chosen, as far as their visible state tells: busy shows,
/// invisible shows as the offline reason, the custom message shows unless
/// the user is offline. Online (the default) otherwise.
fn infer_choice(last: &HistoryRecord) -> (ChosenStatus, String) {
    match (last.status, last.offline_reason) {
        (VisibleStatus::Busy, _) => (ChosenStatus::Busy, last.custom_message.clone()),
        (VisibleStatus::Offline, Some(OfflineReason::Invisible)) => {
            (ChosenStatus::Invisible, String::new())
        }
        (VisibleStatus::Offline, _) => (ChosenStatus::Online, String::new()),
        (VisibleStatus::Online | VisibleStatus::Idle, _) => {
            (ChosenStatus::Online, last.custom_message.clone())
        }
    }
}

fn shown_of(last: &HistoryRecord) -> Shown {
    Shown {
        status: last.status,
        custom_message: last.custom_message.clone(),
        // History records are taken at the moment of the change, which is
        // when `last_seen` moves.
        last_seen_ms: last.at_ms,
        version: last.version,
        offline_reason: last.offline_reason,
    }
}

/// A user's record from the durable store: no devices, the durable shown
/// state (status, last seen, version, reason) and choice. `None` if the store
/// knows nothing of the user.
///
/// `no_live_session` says the hot store answered and does not know the user:
/// it holds every live session, so a user it does not know has none, whatever
/// the durable store last saw (the node that held them was lost while the
/// hot store was away, and the hot store restarted empty). Such a user reads
/// as offline, "node lost", one version above the durable record, rather than
/// as a ghost. The same record seeds a hot store that lost the user, unless
/// the seeding node holds a session of them (then it is live).
pub fn durable_record(durable: DurableState, no_live_session: bool) -> Option<UserRecord> {
    let (chosen, custom_message) = choice_of(&durable);
    let Some(last) = durable.last else {
        // Never visible: only the choice to carry over.
        return durable.choice.is_some().then(|| UserRecord {
            chosen,
            custom_message,
            ..UserRecord::default()
        });
    };
    let mut shown = shown_of(&last);
    if no_live_session && shown.status != VisibleStatus::Offline {
        shown = Shown {
            status: VisibleStatus::Offline,
            custom_message: String::new(),
            last_seen_ms: shown.last_seen_ms,
            version: shown.version + 1,
            offline_reason: Some(OfflineReason::NodeLost),
        };
    }
    Some(UserRecord {
        sessions: Vec::new(),
        chosen,
        custom_message,
        shown,
    })
}

/// Rebuilds a user's record at the first change of an outage: the durable
/// latest shown state and choice, this node's own sessions of the user, and,
/// if the user is visible without any session here, the stand-in session for
/// their sessions elsewhere. `ending_own` says the change is the end of a
/// session of this node, whose lease is already gone (sweep and logout drop
/// it first): the user did have a session here, so no stand-in.
pub fn rebuild(durable: DurableState, sessions: Vec<Session>, ending_own: bool) -> UserRecord {
    let (chosen, custom_message) = choice_of(&durable);
    let Some(last) = durable.last else {
        // Never seen visible: the choice and the sessions.
        return UserRecord {
            sessions,
            chosen,
            custom_message,
            ..UserRecord::default()
        };
    };
    let mut record = UserRecord {
        sessions,
        chosen,
        custom_message,
        shown: shown_of(&last),
    };
    if record.sessions.is_empty() && !ending_own && last.status != VisibleStatus::Offline {
        record.sessions.push(Session {
            device_id: STAND_IN_DEVICE.to_owned(),
            platform: Platform::Unspecified,
            activity: if last.status == VisibleStatus::Idle {
                Activity::Idle
            } else {
                Activity::Active
            },
            connected_since_ms: last.at_ms,
            conn_id: 0,
            node_id: String::new(),
        });
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_sessions_per_user: 4,
    };

    fn last(status: VisibleStatus, reason: Option<OfflineReason>, message: &str) -> HistoryRecord {
        HistoryRecord {
            user_id: "bob".into(),
            at_ms: 1_000,
            status,
            custom_message: message.into(),
            offline_reason: reason,
            version: 1_000_000,
        }
    }

    /// The durable state of a user seen last as `last`, with no saved choice.
    fn seen(last: HistoryRecord) -> DurableState {
        DurableState {
            last: Some(last),
            choice: None,
        }
    }

    fn chose(chosen: ChosenStatus, message: &str) -> crate::store::ChoiceRecord {
        crate::store::ChoiceRecord {
            user_id: "bob".into(),
            chosen,
            custom_message: message.into(),
            at_us: 900_000,
        }
    }

    fn key(user: &str, device: &str) -> SessionKey {
        SessionKey {
            user_id: user.into(),
            device_id: device.into(),
        }
    }

    fn session(device: &str, conn_id: u64) -> Session {
        Session {
            device_id: device.into(),
            platform: Platform::Desktop,
            activity: Activity::Active,
            connected_since_ms: 500,
            conn_id,
            node_id: "n1".into(),
        }
    }

    #[test]
    fn the_choice_is_inferred_from_what_contacts_saw() {
        let busy = last(VisibleStatus::Busy, None, "meeting");
        assert_eq!(infer_choice(&busy), (ChosenStatus::Busy, "meeting".into()));
        let hidden = last(VisibleStatus::Offline, Some(OfflineReason::Invisible), "");
        assert_eq!(
            infer_choice(&hidden),
            (ChosenStatus::Invisible, String::new())
        );
        let idle = last(VisibleStatus::Idle, None, "afk");
        assert_eq!(infer_choice(&idle), (ChosenStatus::Online, "afk".into()));
        let gone = last(VisibleStatus::Offline, Some(OfflineReason::Logout), "");
        assert_eq!(infer_choice(&gone), (ChosenStatus::Online, String::new()));
    }

    #[test]
    fn the_saved_choice_wins_over_what_contacts_saw_and_over_the_default() {
        // Went invisible while offline: contacts saw nothing change.
        let gone = last(VisibleStatus::Offline, Some(OfflineReason::Logout), "");
        let hidden = DurableState {
            last: Some(gone),
            choice: Some(chose(ChosenStatus::Invisible, "")),
        };
        assert_eq!(choice_of(&hidden), (ChosenStatus::Invisible, String::new()));
        // Invisible from the start: never seen at all.
        let never_seen = DurableState {
            last: None,
            choice: Some(chose(ChosenStatus::Invisible, "")),
        };
        let mut record = rebuild(never_seen.clone(), vec![session("phone", 7)], false);
        assert_eq!(record.chosen, ChosenStatus::Invisible);
        let open = Mutation::Open {
            session: session("laptop", 8),
            status: None,
        };
        let applied = domain::apply(&mut record, open, 2_000, LIMITS).unwrap();
        assert!(!applied.shown_changed, "an invisible user is never shown");
        assert_eq!(record.shown.status, VisibleStatus::Offline);
        let seeded = durable_record(never_seen, true).unwrap();
        assert_eq!(seeded.chosen, ChosenStatus::Invisible);
        assert_eq!(seeded.shown, Shown::default());
        // A user the store knows nothing of chose nothing since choices are
        // saved: the default is no guess, and there is nothing to seed.
        assert_eq!(durable_record(DurableState::default(), true), None);
        let fresh = rebuild(DurableState::default(), Vec::new(), false);
        assert_eq!(fresh, UserRecord::default());
    }

    #[test]
    fn every_change_carrying_a_choice_is_one_to_save() {
        let status = Some((ChosenStatus::Invisible, String::new()));
        let set = Mutation::SetStatus {
            chosen: ChosenStatus::Online,
            custom_message: String::new(),
        };
        let open = |status| Mutation::Open {
            session: session("phone", 7),
            status,
        };
        let beat = |status| Mutation::Update {
            session: session("phone", 7),
            activity: Some(Activity::Idle),
            status,
        };
        assert!(chooses(&set));
        assert!(chooses(&open(status.clone())) && !chooses(&open(None)));
        assert!(chooses(&beat(status.clone())) && !chooses(&beat(None)));
        assert!(chooses(&Mutation::Replay(vec![(1, beat(None)), (2, set)])));
        assert!(!chooses(&Mutation::Replay(vec![(1, beat(None))])));
        let touch = Mutation::Touch {
            session: session("phone", 7),
            activity: None,
        };
        assert!(!chooses(&touch));
    }

    #[test]
    fn a_status_change_on_a_node_without_the_users_sessions_keeps_them_visible() {
        let mut record = rebuild(
            seen(last(VisibleStatus::Online, None, "")),
            Vec::new(),
            false,
        );
        let busy = Mutation::SetStatus {
            chosen: ChosenStatus::Busy,
            custom_message: String::new(),
        };
        let applied = domain::apply(&mut record, busy, 2_000, LIMITS).unwrap();
        assert!(applied.shown_changed);
        assert_eq!(record.shown.status, VisibleStatus::Busy);
        assert!(record.shown.version > 1_000_000, "versions never go back");
    }

    #[test]
    fn the_last_own_session_ending_takes_the_user_offline() {
        let mut record = rebuild(
            seen(last(VisibleStatus::Online, None, "")),
            vec![session("phone", 7)],
            false,
        );
        assert_eq!(record.sessions.len(), 1, "no stand-in beside own sessions");
        let end = Mutation::End {
            device_id: "phone".into(),
            conn_id: Some(7),
            reason: OfflineReason::Logout,
        };
        domain::apply(&mut record, end, 2_000, LIMITS).unwrap();
        assert_eq!(record.shown.status, VisibleStatus::Offline);
    }

    #[test]
    fn a_session_ending_as_the_outage_begins_takes_the_user_offline() {
        // The sweeper dropped the lease before the change: no own session
        // is left to rebuild from, and no stand-in may keep the user online.
        let mut record = rebuild(
            seen(last(VisibleStatus::Online, None, "")),
            Vec::new(),
            true,
        );
        let end = Mutation::End {
            device_id: "phone".into(),
            conn_id: Some(7),
            reason: OfflineReason::LeaseExpired,
        };
        let applied = domain::apply(&mut record, end, 2_000, LIMITS).unwrap();
        assert!(applied.shown_changed);
        assert_eq!(record.shown.status, VisibleStatus::Offline);
        assert_eq!(
            record.shown.offline_reason,
            Some(OfflineReason::LeaseExpired)
        );
    }

    #[test]
    fn an_invisible_user_stays_invisible_through_a_rebuild() {
        let hidden = last(VisibleStatus::Offline, Some(OfflineReason::Invisible), "");
        let mut record = rebuild(seen(hidden), vec![session("phone", 7)], false);
        let idle = Mutation::Update {
            session: session("phone", 7),
            activity: Some(Activity::Idle),
            status: None,
        };
        let applied = domain::apply(&mut record, idle, 2_000, LIMITS).unwrap();
        assert!(
            !applied.shown_changed,
            "nothing leaks about an invisible user"
        );
    }

    #[test]
    fn a_user_the_hot_store_does_not_know_reads_offline_not_as_a_ghost() {
        let online = last(VisibleStatus::Online, None, "hi");
        let trusted = durable_record(seen(online.clone()), false).unwrap();
        assert_eq!(trusted.shown.status, VisibleStatus::Online);
        assert!(trusted.sessions.is_empty());
        let unknown = durable_record(seen(online), true).unwrap();
        assert_eq!(unknown.shown.status, VisibleStatus::Offline);
        assert_eq!(unknown.shown.offline_reason, Some(OfflineReason::NodeLost));
        assert_eq!(unknown.shown.version, 1_000_001);
        assert_eq!(unknown.shown.last_seen_ms, 1_000);
    }

    #[test]
    fn changes_queue_in_order_and_repeats_collapse() {
        let degraded = Degraded::new(10);
        degraded.set_sessions(vec![(key("bob", "phone"), session("phone", 7))]);
        degraded.hold("bob", DurableState::default(), false);
        let beat = Mutation::Update {
            session: session("phone", 7),
            activity: Some(Activity::Active),
            status: None,
        };
        degraded.apply("bob", beat.clone(), 1_000, LIMITS).unwrap();
        degraded.apply("bob", beat.clone(), 1_001, LIMITS).unwrap();
        let busy = Mutation::SetStatus {
            chosen: ChosenStatus::Busy,
            custom_message: String::new(),
        };
        let (record, applied) = degraded.apply("bob", busy.clone(), 1_002, LIMITS).unwrap();
        assert!(applied.shown_changed);
        assert_eq!(record.shown.status, VisibleStatus::Busy);
        assert_eq!(degraded.queued(), 2);
        // A repeat keeps the time of the first copy: the change was made then.
        assert_eq!(
            degraded.queued_changes("bob"),
            vec![(1_000, beat), (1_002, busy.clone())]
        );
        assert!(matches!(degraded.replayed("bob", 1), Popped::More));
        assert_eq!(degraded.queued_changes("bob"), vec![(1_002, busy)]);
        let Popped::Done { recorded } = degraded.replayed("bob", 1) else {
            panic!("bob's queue is empty");
        };
        assert_eq!(recorded.status, VisibleStatus::Busy);
        assert!(!degraded.holds("bob"));
        assert_eq!(degraded.queued(), 0);
    }

    #[test]
    fn a_full_queue_refuses_changes_but_never_the_end_of_a_session() {
        let degraded = Degraded::new(1);
        degraded.set_sessions(vec![(key("bob", "phone"), session("phone", 7))]);
        degraded.hold("bob", DurableState::default(), false);
        let busy = Mutation::SetStatus {
            chosen: ChosenStatus::Busy,
            custom_message: String::new(),
        };
        degraded.apply("bob", busy, 1_000, LIMITS).unwrap();
        let online = Mutation::SetStatus {
            chosen: ChosenStatus::Online,
            custom_message: String::new(),
        };
        assert!(matches!(
            degraded.apply("bob", online, 1_001, LIMITS),
            Err(StoreError::Unavailable(_))
        ));
        let end = Mutation::End {
            device_id: "phone".into(),
            conn_id: Some(7),
            reason: OfflineReason::Logout,
        };
        let (record, _) = degraded.apply("bob", end, 1_002, LIMITS).unwrap();
        assert_eq!(record.shown.status, VisibleStatus::Offline);
        assert_eq!(degraded.queued(), 2);
    }

    #[test]
    fn records_handed_out_never_show_the_stand_in() {
        let degraded = Degraded::new(10);
        degraded.set_sessions(Vec::new());
        degraded.hold("bob", seen(last(VisibleStatus::Online, None, "")), false);
        assert!(degraded.record("bob").unwrap().sessions.is_empty());
        let opened = Mutation::Open {
            session: session("phone", 7),
            status: None,
        };
        let (record, _) = degraded.apply("bob", opened, 2_000, LIMITS).unwrap();
        assert_eq!(record.sessions.len(), 1);
        assert_eq!(record.sessions[0].device_id, "phone");
    }

    #[test]
    fn reads_from_the_durable_store_see_the_newest_change_made_here() {
        let degraded = Degraded::default();
        let shown = |version| Shown {
            status: VisibleStatus::Online,
            version,
            last_seen_ms: 5_000,
            ..Shown::default()
        };
        degraded.made("bob", &shown(3_000_000));
        degraded.made("bob", &shown(2_000_000));
        let users = ["bob".to_owned(), "carol".to_owned(), "dave".to_owned()];
        let mut states = vec![
            seen(last(VisibleStatus::Offline, None, "")),
            DurableState::default(),
            seen(last(VisibleStatus::Busy, None, "")),
        ];
        degraded.add_unprojected(&users, &mut states);
        let bob = states[0].last.as_ref().unwrap();
        assert_eq!(
            (bob.version, bob.status),
            (3_000_000, VisibleStatus::Online)
        );
        assert_eq!(states[1], DurableState::default());
        degraded.made("dave", &shown(500_000));
        degraded.add_unprojected(&users, &mut states);
        assert_eq!(states[2].last.as_ref().unwrap().status, VisibleStatus::Busy);
    }
}
