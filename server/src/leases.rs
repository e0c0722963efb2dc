//! The node's own session leases. A heartbeat renews a lease here, in memory,
//! and nowhere else: no backend write per heartbeat. The sweeper ends the
//! sessions whose lease ran out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::domain::{OfflineReason, Session};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub user_id: String,
    pub device_id: String,
}

struct Lease {
    session: Session,
    deadline: Instant,
    /// Why the session ends if the deadline passes.
    reason: OfflineReason,
}

/// A lease that ran out: its session is to be ended.
#[derive(Debug)]
pub struct Expired {
    pub key: SessionKey,
    pub conn_id: u64,
    pub reason: OfflineReason,
}

/// std-style Mutex, not Tokio's: nothing async runs while it is held.
#[derive(Default)]
pub struct Leases {
    leases: Mutex<HashMap<SessionKey, Lease>>,
}

impl Leases {
    /// Starts or renews the lease of `session` (held by `session.conn_id`),
    /// replacing any lease of an older connection of the same device. Returns
    /// true if that older connection had closed and its session was waiting
    /// out the grace period: a reconnect that spared contacts a flap.
    pub fn hold(&self, key: SessionKey, session: Session, lease: Duration) -> bool {
        let lease = Lease {
            session,
            deadline: Instant::now() + lease,
            reason: OfflineReason::LeaseExpired,
        };
        self.leases
            .lock()
            .insert(key, lease)
            .is_some_and(|old| old.reason == OfflineReason::ConnectionClosed)
    }

    /// Renews the lease while `conn_id` holds it; false if it does not (the
    /// lease ran out and was swept, or a newer connection took the device).
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

    /// The session held under `key`, if any.
    pub fn session(&self, key: &SessionKey) -> Option<Session> {
        self.leases.lock().get(key).map(|held| held.session.clone())
    }

    /// Records a change of the held session (e.g. its activity).
    pub fn update_session(&self, key: &SessionKey, session: &Session) {
        if let Some(held) = self.leases.lock().get_mut(key)
            && held.session.conn_id == session.conn_id
        {
            held.session = session.clone();
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

    /// Drops the lease whatever connection holds it (explicit logout).
    pub fn release(&self, key: &SessionKey) {
        self.leases.lock().remove(key);
    }

    /// Removes and returns the leases whose deadline has passed.
    pub fn take_expired(&self, now: Instant) -> Vec<Expired> {
        let mut expired = Vec::new();
        self.leases.lock().retain(|key, held| {
            if held.deadline > now {
                return true;
            }
            expired.push(Expired {
                key: key.clone(),
                conn_id: held.session.conn_id,
                reason: held.reason,
            });
            false
        });
        expired
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
