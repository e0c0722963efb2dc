//! Every change to a user's hot state is a [`Mutation`] applied by [`apply`].
//! Hot stores load the record, apply, and write it back atomically, so the
//! rules live here once.

use super::model::{
    Activity, ChosenStatus, OfflineReason, Session, Shown, UserRecord, VisibleStatus,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// A device opens its session through a new connection, or reopens it
    /// after a reconnect (keeping `connected_since`).
    Open {
        session: Session,
        status: Option<(ChosenStatus, String)>,
    },
    /// A change sent on the connection that holds the session. If the session
    /// is missing (a hot store that lost its data) it is put back, because the
    /// node holding the connection knows it is live.
    Update {
        session: Session,
        activity: Option<Activity>,
        status: Option<(ChosenStatus, String)>,
    },
    /// A unary heartbeat: opens the session if absent, otherwise renews it and
    /// moves it to the connection and node that received the call.
    Touch {
        session: Session,
        activity: Option<Activity>,
    },
    SetStatus {
        chosen: ChosenStatus,
        custom_message: String,
    },
    /// Ends a device's session; with `conn_id`, only while that connection
    /// still holds it, so a late close cannot end a newer reconnect.
    End {
        device_id: String,
        conn_id: Option<u64>,
        reason: OfflineReason,
    },
    /// Ends every session held by a lost node.
    EndNode { node_id: String },
    /// Changes a node took while the hot store was unreachable, applied in
    /// order as one change, so that no reader sees a state between two of
    /// them. A change that no longer applies (a session another node took
    /// over meanwhile) is skipped: the hot store's state wins. Each applies
    /// at the time it was taken (Unix ms), so the replay shows what the node
    /// showed then, with the same versions and last seen: contacts of an
    /// invisible user see nothing move when it reaches the hot store.
    Replay(Vec<(i64, Mutation)>),
    /// The change, provided the hot store knows the user: on an empty record
    /// (a hot store that restarted empty and forgot the user) it is refused
    /// with [`TransitionError::Forgotten`], so that the node puts the user's
    /// durable state back first instead of building on the default choice.
    IfKnown(Box<Mutation>),
    /// What contacts last saw of the user through a node that held the user
    /// during an outage, after its replay: what the record shows must not
    /// be older. The same state takes that version; another one gets a
    /// version above it. (The replay builds on the hot store's record, which
    /// can differ from the one the node showed, e.g. after Redis restarted
    /// empty.)
    NotOlderThan(Shown),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions_per_user: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The record differs from before and must be written back.
    pub record_changed: bool,
    /// What contacts see changed: a new version to fan out and record.
    pub shown_changed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the user already has {0} sessions, the most allowed")]
    TooManySessions(usize),
    #[error("the session was taken over by a newer connection of the same device")]
    SessionReplaced,
    #[error("the hot store does not know the user")]
    Forgotten,
}

/// Applies `mutation` as [`apply`] does and also returns, for a replay, the
/// record after each of its changes that changed what contacts see, but the
/// last (that one is the record itself): each is an event of the change log
/// of its own, as it would have been had the change not waited for a replay.
pub fn apply_stepwise(
    record: &mut UserRecord,
    mutation: Mutation,
    now_ms: i64,
    limits: Limits,
) -> Result<(Applied, Vec<UserRecord>), TransitionError> {
    match mutation {
        Mutation::Replay(changes) => Ok(replay(record, changes, limits)),
        mutation => Ok((apply(record, mutation, now_ms, limits)?, Vec::new())),
    }
}

/// Applies each change at the time it was taken; see [`apply_stepwise`].
fn replay(
    record: &mut UserRecord,
    changes: Vec<(i64, Mutation)>,
    limits: Limits,
) -> (Applied, Vec<UserRecord>) {
    let before = record.clone();
    let mut steps = Vec::new();
    for (taken_ms, change) in changes {
        let shown = record.shown.clone();
        // Refused changes leave the record as it was.
        if apply(record, change, taken_ms, limits).is_ok() && record.shown != shown {
            steps.push(record.clone());
        }
    }
    steps.pop();
    let applied = Applied {
        record_changed: *record != before,
        shown_changed: record.shown != before.shown,
    };
    (applied, steps)
}

/// Applies one mutation at `now_ms` (Unix milliseconds). On error the record
/// is left as it was.
pub fn apply(
    record: &mut UserRecord,
    mutation: Mutation,
    now_ms: i64,
    limits: Limits,
) -> Result<Applied, TransitionError> {
    let before = record.clone();
    let mut end_reason = OfflineReason::Logout;
    match mutation {
        Mutation::IfKnown(_) if record.is_empty() => return Err(TransitionError::Forgotten),
        Mutation::IfKnown(change) => return apply(record, *change, now_ms, limits),
        Mutation::NotOlderThan(seen) => {
            let shown = &mut record.shown;
            if shown.version < seen.version {
                let same = (shown.status, &shown.custom_message, shown.offline_reason)
                    == (seen.status, &seen.custom_message, seen.offline_reason);
                if same {
                    *shown = seen;
                } else {
                    shown.version = next_version(seen.version, now_ms);
                }
            }
            let changed = record.shown != before.shown;
            return Ok(Applied {
                record_changed: changed,
                shown_changed: changed,
            });
        }
        Mutation::Replay(changes) => return Ok(replay(record, changes, limits).0),
        Mutation::Open { session, status } => {
            // A reopen says what the device is doing now: the activity the
            // old connection last reported no longer holds.
            let activity = Some(session.activity);
            upsert_session(record, session, activity, limits)?;
            set_chosen(record, status);
        }
        Mutation::Update {
            session,
            activity,
            status,
        } => {
            if let Some(held) = record.session(&session.device_id)
                && held.conn_id != session.conn_id
            {
                return Err(TransitionError::SessionReplaced);
            }
            upsert_session(record, session, activity, limits)?;
            set_chosen(record, status);
        }
        Mutation::Touch { session, activity } => {
            upsert_session(record, session, activity, limits)?;
        }
        Mutation::SetStatus {
            chosen,
            custom_message,
        } => set_chosen(record, Some((chosen, custom_message))),
        Mutation::End {
            device_id,
            conn_id,
            reason,
        } => {
            record
                .sessions
                .retain(|s| s.device_id != device_id || conn_id.is_some_and(|c| c != s.conn_id));
            end_reason = reason;
        }
        Mutation::EndNode { node_id } => {
            record.sessions.retain(|s| s.node_id != node_id);
            end_reason = OfflineReason::NodeLost;
        }
    }
    let shown_changed = refresh_shown(record, now_ms, end_reason);
    Ok(Applied {
        record_changed: *record != before,
        shown_changed,
    })
}

/// Inserts the session, or replaces the one of the same device while keeping
/// when it first connected (a reconnect is the same session to the user).
fn upsert_session(
    record: &mut UserRecord,
    mut session: Session,
    activity: Option<Activity>,
    limits: Limits,
) -> Result<(), TransitionError> {
    match record
        .sessions
        .iter_mut()
        .find(|s| s.device_id == session.device_id)
    {
        Some(held) => {
            session.connected_since_ms = held.connected_since_ms;
            if activity.is_none() {
                session.activity = held.activity;
            }
            *held = session;
            if let Some(activity) = activity {
                held.activity = activity;
            }
        }
        None => {
            if record.sessions.len() >= limits.max_sessions_per_user {
                return Err(TransitionError::TooManySessions(record.sessions.len()));
            }
            if let Some(activity) = activity {
                session.activity = activity;
            }
            record.sessions.push(session);
        }
    }
    Ok(())
}

fn set_chosen(record: &mut UserRecord, status: Option<(ChosenStatus, String)>) {
    if let Some((chosen, message)) = status {
        record.chosen = chosen;
        record.custom_message = message;
    }
}

/// Re-derives what contacts see; on a change bumps the version and moves
/// `last_seen`. Returns whether it changed.
fn refresh_shown(record: &mut UserRecord, now_ms: i64, end_reason: OfflineReason) -> bool {
    let status = record.derived_status();
    let custom_message = if status == VisibleStatus::Offline {
        String::new()
    } else {
        record.custom_message.clone()
    };
    let shown = &record.shown;
    if shown.version != 0 && status == shown.status && custom_message == shown.custom_message {
        return false;
    }
    if shown.version == 0 && status == VisibleStatus::Offline {
        // Never seen and still not visible: there is nothing to tell anyone,
        // not even that the user exists.
        return false;
    }
    let offline_reason = (status == VisibleStatus::Offline).then(|| {
        if record.chosen == ChosenStatus::Invisible {
            OfflineReason::Invisible
        } else {
            end_reason
        }
    });
    record.shown = Shown {
        status,
        custom_message,
        last_seen_ms: now_ms,
        version: next_version(shown.version, now_ms),
        offline_reason,
    };
    true
}

/// Versions follow the clock (microsecond-scaled) but are strictly increasing
/// even when many changes share a millisecond. Tying them to time keeps them
/// increasing across a hot store that restarts empty, so clients holding old
/// versions never drop fresh events.
pub fn next_version(previous: u64, now_ms: i64) -> u64 {
    let from_clock = u64::try_from(now_ms).unwrap_or(0).saturating_mul(1000);
    from_clock.max(previous + 1)
}
