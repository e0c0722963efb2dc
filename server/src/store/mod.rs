//! The backends, one trait each, with the contract every implementation
//! keeps. The embedded implementations (in-process, single node) are the
//! default; production ones implement the same traits and pass the same suite.

pub mod buffered;
pub mod cached;
pub mod embedded;
pub mod embedded_log;
pub mod redis;
pub mod scylla;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{
    Applied, ChosenStatus, HistoryRecord, Limits, Mutation, TransitionError, UserRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("a user may have at most {0} contacts")]
    TooManyContacts(usize),
    /// The backend cannot be reached; the message is for logs, not clients.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Hot per-user state: sessions, chosen status, and what contacts see.
#[async_trait]
pub trait HotStore: Send + Sync + 'static {
    /// Applies `mutation` to the user's record atomically with respect to every
    /// other `apply` on the same user, on any node, and returns the record
    /// after it. A record left empty by the mutation may be deleted. When
    /// what contacts see changed, the same atomic step appends the change to
    /// the [`ChangeLog`] and publishes it on the [`FanOut`]: no crash can
    /// leave a change written but not logged, or logged but not written.
    async fn apply(
        &self,
        user_id: &str,
        mutation: Mutation,
        now_ms: i64,
        limits: Limits,
    ) -> StoreResult<(UserRecord, Applied)>;

    /// The records of `user_ids`, in the same order; `None` for users never
    /// seen (or forgotten).
    async fn get(&self, user_ids: &[String]) -> StoreResult<Vec<Option<UserRecord>>>;

    /// Writes `record` (a user without sessions, as the durable store knew
    /// them) unless the store knows the user: anything written through
    /// `apply` wins over it. Returns whether it was written.
    async fn seed(&self, user_id: &str, record: &UserRecord) -> StoreResult<bool>;

    /// Marks `node_id` alive for `ttl`. Returns false if the store did not
    /// know the node any more (it lost its data, or declared the node lost):
    /// the node must then re-assert every session it holds.
    async fn renew_node(&self, node_id: &str, ttl: Duration) -> StoreResult<bool>;

    /// Nodes whose lease ran out without a clean exit.
    async fn lost_nodes(&self) -> StoreResult<Vec<String>>;

    /// The users that had a session on `node_id` (kept up to date by
    /// `apply` from the sessions' `node_id`).
    async fn users_of_node(&self, node_id: &str) -> StoreResult<Vec<String>>;

    /// Forgets a node whose sessions were all ended (or that exits cleanly).
    async fn forget_node(&self, node_id: &str) -> StoreResult<()>;
}

/// Contacts: mutual links between two users.
#[async_trait]
pub trait ContactStore: Send + Sync + 'static {
    /// Links `user_id` with each of `contact_ids`, both ways, refusing the
    /// whole call if either side would pass `max_contacts`. Returns how many
    /// links are new. Ids equal to `user_id` are ignored.
    async fn add(
        &self,
        user_id: &str,
        contact_ids: &[String],
        max_contacts: usize,
    ) -> StoreResult<u32>;

    /// Removes the links both ways; returns how many existed.
    async fn remove(&self, user_id: &str, contact_ids: &[String]) -> StoreResult<u32>;

    /// The user's contacts, sorted.
    async fn list(&self, user_id: &str) -> StoreResult<Vec<String>>;
}

/// Presence history: every change of what contacts see, kept for the
/// retention period.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores the records; appending a record twice (same user and version)
    /// stores it once, so callers may retry.
    async fn append(&self, records: &[HistoryRecord]) -> StoreResult<()>;

    /// Up to `limit` records of the user with `from_ms <= at_ms <= to_ms` and a
    /// version above `after_version`, oldest first.
    async fn page(
        &self,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        after_version: u64,
        limit: usize,
    ) -> StoreResult<Vec<HistoryRecord>>;

    /// The latest record of each user, in the order given; kept past the
    /// retention where the backend can (it is the user's durable presence,
    /// read when the hot store is unavailable).
    async fn last(&self, user_ids: &[String]) -> StoreResult<Vec<Option<HistoryRecord>>>;

    /// Stores the users' choices. Per user the choice with the highest
    /// `at_us` wins, whatever order the writes arrive in, and storing a
    /// choice twice stores it once, so callers may retry. Kept past the
    /// retention where the backend can, like `last`.
    async fn save_choices(&self, choices: &[ChoiceRecord]) -> StoreResult<()>;

    /// What the store knows of each user, in the order given: the latest
    /// record (as `last` answers it) and the latest choice. Fails rather
    /// than answer a part: a node must not guess a choice it could not read.
    async fn durable(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>>;
}

/// A user's choice (the status they chose and their custom message) as the
/// durable store keeps it. Every accepted change of the choice is saved, also
/// one contacts cannot see (going invisible while offline): the shown state
/// alone cannot tell the choice, and a hot store that loses the user, or
/// cannot be reached, must not make a node guess it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChoiceRecord {
    pub user_id: String,
    pub chosen: ChosenStatus,
    pub custom_message: String,
    /// Orders the choices of one user, the highest wins: a microsecond
    /// stamp from [`choice_stamp`].
    pub at_us: u64,
}

/// What the durable store knows of one user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DurableState {
    /// The latest change of what contacts saw; `None` if never visible (or
    /// forgotten past the retention, where the backend cannot keep it).
    pub last: Option<HistoryRecord>,
    /// The latest choice; `None` if the user never chose anything (then the
    /// default applies), or chose only before choices were saved (then the
    /// shown state tells what it can).
    pub choice: Option<ChoiceRecord>,
}

/// The stamp of a choice made at `now_ms` by a user whose shown version is
/// now `version`: the clock in microseconds (the unit of versions and of CQL
/// write timestamps), never below `version`, and above every stamp this
/// process handed out before. Versions grow through the hot store across
/// nodes, so a choice that changed what contacts see outranks every earlier
/// one; two unseen changes on two nodes are ordered by the nodes' clocks.
pub fn choice_stamp(now_ms: i64, version: u64) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let floor = u64::try_from(now_ms)
        .unwrap_or(0)
        .saturating_mul(1000)
        .max(version);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let stamp = floor.max(last + 1);
        match LAST.compare_exchange_weak(last, stamp, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return stamp,
            Err(actual) => last = actual,
        }
    }
}

/// What one node tells the others: every presence change and every contacts
/// change, so each node can update its own watchers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BusEvent {
    /// What contacts see of `user_id` changed; `record` is the state after.
    Presence { user_id: String, record: UserRecord },
    /// `user_id` gained or lost contacts.
    Contacts {
        user_id: String,
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// A device's session was just opened on a connection of the
    /// publishing node, or logged out there. A node still holding a lease
    /// of the device for an older connection checks the hot store and ends
    /// that stream: a device reconnecting through another node must not
    /// leave its old stream renewing a lease of a session it lost.
    DeviceTaken {
        user_id: String,
        device_id: String,
        logged_out: bool,
        /// The publishing node, which has settled its own leases already.
        node_id: String,
    },
}

/// A position in one partition of the change log, as Redis numbers stream
/// entries: the appending clock in milliseconds, then a sequence within that
/// millisecond. Written `<ms>-<seq>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    pub ms: u64,
    pub seq: u64,
}

impl Offset {
    /// The offset just before every entry logged at or after `ms`.
    pub fn before(ms: u64) -> Offset {
        match ms.checked_sub(1) {
            Some(ms) => Offset { ms, seq: u64::MAX },
            None => Offset::default(),
        }
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Offset {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        match (ms.parse(), seq.parse()) {
            (Ok(ms), Ok(seq)) => Ok(Offset { ms, seq }),
            _ => Err(format!("not an offset: {text:?}")),
        }
    }
}

/// One change of what contacts see, as the change log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedChange {
    pub partition: u16,
    pub offset: Offset,
    pub user_id: String,
    /// The user's whole record after the change; `record.shown.version` is
    /// the change's version.
    pub record: UserRecord,
}

/// Where a consumer group starts reading when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupStart {
    /// Changes logged from now on.
    Latest,
    /// Everything still retained.
    Oldest,
    /// Changes logged at or after this Unix time, in milliseconds.
    At(u64),
}

/// The change log: every change of what contacts see, appended by
/// [`HotStore::apply`] once per version into the partition of its user (so a
/// user's changes stay in version order), kept for the retention period.
/// Consumer groups read it at least once: what a member reads stays pending
/// until acknowledged, and pending changes left idle can be claimed by
/// another member.
#[async_trait]
pub trait ChangeLog: Send + Sync + 'static {
    fn partitions(&self) -> u16;

    /// Up to `count` changes of `partition` after `after`, waiting up to
    /// `wait` for the first.
    async fn read(
        &self,
        partition: u16,
        after: Offset,
        count: usize,
        wait: Duration,
    ) -> StoreResult<Vec<LoggedChange>>;

    /// Creates `group` on every partition, starting at `start`; a group that
    /// exists keeps its position.
    async fn create_group(&self, group: &str, start: GroupStart) -> StoreResult<()>;

    /// Up to `count` changes of `partition` that no member of `group` has
    /// read, waiting up to `wait` for the first; they become pending for
    /// `consumer`.
    async fn read_group(
        &self,
        group: &str,
        consumer: &str,
        partition: u16,
        count: usize,
        wait: Duration,
    ) -> StoreResult<Vec<LoggedChange>>;

    /// Up to `count` changes of `partition` pending in `group` for longer
    /// than `idle` (their reader vanished or never acknowledged), now
    /// pending for `consumer`, oldest first.
    async fn claim_stale(
        &self,
        group: &str,
        consumer: &str,
        partition: u16,
        idle: Duration,
        count: usize,
    ) -> StoreResult<Vec<LoggedChange>>;

    /// How many changes of `partition` are pending in `group`: read by a
    /// member and not acknowledged.
    async fn pending(&self, group: &str, partition: u16) -> StoreResult<usize>;

    /// Acknowledges changes of `partition` read in `group`; acknowledging
    /// twice is harmless.
    async fn ack(&self, group: &str, partition: u16, offsets: &[Offset]) -> StoreResult<()>;

    /// Marks `member` of `group` alive for `ttl` and returns every member
    /// alive, sorted.
    async fn join(&self, group: &str, member: &str, ttl: Duration) -> StoreResult<Vec<String>>;

    /// Removes `member` from `group` at once.
    async fn leave(&self, group: &str, member: &str) -> StoreResult<()>;
}

/// Cross-node fan-out. Implementations deliver every published event to the
/// [`crate::hub::Hub`] of every node that has watchers for the user concerned,
/// in publish order per user.
#[async_trait]
pub trait FanOut: Send + Sync + 'static {
    async fn publish(&self, event: BusEvent) -> StoreResult<()>;
}
