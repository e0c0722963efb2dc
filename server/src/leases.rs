//! The node's own session leases. A heartbeat renews a lease here, in memory,
//! and nowhere else: no backend write per heartbeat. The sweeper ends the
//! sessions whose lease ran out.
//!
//! The rule this module keeps with [`crate::node::Node`]: a session of this
//! node exists in the hot store iff exactly one lease here names its current
//! connection. Every change of a device's lease happens under that device's
//! [`Leases::lock`], together with the hot-store mutation behind it, and a
//! lease is taken only after its mutation succeeded, so a refused or failed
//! call leaves nothing behind. A lease taken from a stream (replaced, logged
//! out, expired) ends that stream at once.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
// Tokio's clock, so that tests can move time forward past leases.
use tokio::time::Instant;

use crate::domain::{OfflineReason, Session};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub user_id: String,
    pub device_id: String,
}

/// Why a heartbeat stream was ended by the server while its client was
/// still there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// A newer connection of the same device took the session.
    Replaced,
    /// The device logged out (Disconnect), from this stream or another.
    LoggedOut,
    /// No heartbeat came within the lease: the session ended.
    Expired,
}

/// The receiving end of a stream's [`StreamEnd`].
pub type StreamEnded = oneshot::Receiver<StreamEnd>;

struct Lease {
    session: Session,
    deadline: Instant,
    /// Why the session ends if the deadline passes.
    reason: OfflineReason,
    /// The last time this node wrote the session to the hot store.
    written_at: Instant,
    /// Ends the heartbeat stream holding the lease; none for unary sessions.
    stream: Option<oneshot::Sender<StreamEnd>>,
}

impl Lease {
    fn end_stream(self, why: StreamEnd) {
        if let Some(stream) = self.stream {
            // The stream may be gone already: nothing left to end.
            let _ = stream.send(why);
        }
    }
}

/// A lease that ran out: its session is to be ended.
#[derive(Debug)]
pub struct Expired {
    pub key: SessionKey,
    pub conn_id: u64,
    pub reason: OfflineReason,
}

/// Stripes of the per-device locks: devices share a stripe by hash, which
/// costs an occasional wait on another device's backend call and saves a
/// lock object per session.
const LOCK_STRIPES: usize = 1024;

pub struct Leases {
    /// std-style Mutex, not Tokio's: nothing async runs while it is held.
    leases: Mutex<HashMap<SessionKey, Lease>>,
    /// The devices of each user with a lease, changed under the `leases`
    /// lock.
    users: Mutex<HashMap<String, HashSet<String>>>,
    /// Held across a device's hot-store mutation and the lease change that
    /// follows it, so the two are one step to every other path.
    locks: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            leases: Mutex::default(),
            users: Mutex::default(),
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Leases {
    /// Serializes every change of `key`'s lease and session on this node.
    pub async fn lock(&self, key: &SessionKey) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks[self.stripe(key)].lock().await
    }

    /// The device's lock if it is free now: for a path that may hold the
    /// lock of another device of the same stripe already.
    pub fn try_lock(&self, key: &SessionKey) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.locks[self.stripe(key)].try_lock().ok()
    }

    fn stripe(&self, key: &SessionKey) -> usize {
        self.hasher.hash_one(key) as usize % LOCK_STRIPES
    }

    /// Starts the lease of `session`, just written to the hot store,
    /// replacing (and ending the stream of) any lease of another connection
    /// of the same device. With `stream`, returns what ends it. The bool is
    /// true if the replaced lease was waiting out the grace period: a
    /// reconnect that spared contacts a flap.
    pub fn hold(
        &self,
        key: SessionKey,
        session: Session,
        lease: Duration,
        stream: bool,
    ) -> (Option<StreamEnded>, bool) {
        let (sender, ended) = if stream {
            let (sender, ended) = oneshot::channel();
            (Some(sender), Some(ended))
        } else {
            (None, None)
        };
        let now = Instant::now();
        let conn_id = session.conn_id;
        let held = Lease {
            session,
            deadline: now + lease,
            reason: OfflineReason::LeaseExpired,
            written_at: now,
            stream: sender,
        };
        let mut leases = self.leases.lock();
        self.users
            .lock()
            .entry(key.user_id.clone())
            .or_default()
            .insert(key.device_id.clone());
        let replaced = leases.insert(key, held);
        drop(leases);
        let mut in_grace = false;
        if let Some(old) = replaced {
            in_grace = old.reason == OfflineReason::ConnectionClosed;
            if old.session.conn_id != conn_id {
                old.end_stream(StreamEnd::Replaced);
            }
        }
        (ended, in_grace)
    }

    /// Renews the lease while `conn_id` holds it; false if it does not (the
    /// lease ended, or a newer connection took the device).
    pub fn renew(&self, key: &SessionKey, conn_id: u64, lease: Duration) -> bool {
        let mut leases = self.leases.lock();
        match leases.get_mut(key) {
            Some(held) if held.session.conn_id == conn_id => {
                held.deadline = Instant::now() + lease;
                held.reason = OfflineReason::LeaseExpired;
                true
            }
            _ => false,
        }
    }

    /// The session held under `key`, and when it was last written to the
    /// hot store.
    pub fn session(&self, key: &SessionKey) -> Option<(Session, Instant)> {
        self.leases
            .lock()
            .get(key)
            .map(|held| (held.session.clone(), held.written_at))
    }

    /// Records a change of the held session just written to the hot store.
    pub fn update_session(&self, key: &SessionKey, session: &Session) {
        if let Some(held) = self.leases.lock().get_mut(key)
            && held.session.conn_id == session.conn_id
        {
            held.session = session.clone();
            held.written_at = Instant::now();
        }
    }

    /// The connection closed: the session ends after `grace` unless the
    /// device reconnects first (a newer connection replaces this lease).
    pub fn linger(&self, key: &SessionKey, conn_id: u64, grace: Duration) {
        if let Some(held) = self.leases.lock().get_mut(key)
            && held.session.conn_id == conn_id
        {
            held.deadline = Instant::now() + grace;
            held.reason = OfflineReason::ConnectionClosed;
        }
    }

    /// Ends the lease of `key`, whatever connection holds it (`None`) or only
    /// while `conn_id` does, and ends its stream with `why`.
    pub fn release(&self, key: &SessionKey, conn_id: Option<u64>, why: StreamEnd) {
        let mut leases = self.leases.lock();
        if conn_id.is_some_and(|c| leases.get(key).is_none_or(|held| held.session.conn_id != c)) {
            return;
        }
        if let Some(old) = leases.remove(key) {
            let mut users = self.users.lock();
            if let Some(devices) = users.get_mut(&key.user_id) {
                devices.remove(&key.device_id);
                if devices.is_empty() {
                    users.remove(&key.user_id);
                }
            }
            drop(users);
            drop(leases);
            old.end_stream(why);
        }
    }

    /// Whether this node holds a session of `user_id`.
    pub fn holds_user(&self, user_id: &str) -> bool {
        self.users.lock().contains_key(user_id)
    }

    /// A copy of the sessions this node holds of `user_id`.
    pub fn sessions_of(&self, user_id: &str) -> Vec<(SessionKey, Session)> {
        let leases = self.leases.lock();
        let users = self.users.lock();
        let Some(devices) = users.get(user_id) else {
            return Vec::new();
        };
        devices
            .iter()
            .filter_map(|device_id| {
                let key = SessionKey {
                    user_id: user_id.to_owned(),
                    device_id: device_id.clone(),
                };
                let session = leases.get(&key)?.session.clone();
                Some((key, session))
            })
            .collect()
    }

    /// The leases whose deadline has passed. They stay held until their
    /// session is ended: a sweep that fails to end one tries again.
    pub fn expired(&self, now: Instant) -> Vec<Expired> {
        self.leases
            .lock()
            .iter()
            .filter(|(_, held)| held.deadline <= now)
            .map(|(key, held)| Expired {
                key: key.clone(),
                conn_id: held.session.conn_id,
                reason: held.reason,
            })
            .collect()
    }

    /// Whether the lease of `expired` is still the one that ran out (not
    /// renewed or replaced since it was found).
    pub fn still_expired(&self, expired: &Expired, now: Instant) -> bool {
        self.leases
            .lock()
            .get(&expired.key)
            .is_some_and(|held| held.session.conn_id == expired.conn_id && held.deadline <= now)
    }

    /// A copy of every session held, for re-asserting them.
    pub fn sessions(&self) -> Vec<(SessionKey, Session)> {
        self.leases
            .lock()
            .iter()
            .map(|(key, held)| (key.clone(), held.session.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.leases.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
