//! The metrics a presence operator looks at, in one place: names, units and
//! what they mean. Recorded through the `metrics` facade, so they cost next to
//! nothing when no exporter is installed (tests, `--metrics-listen` unset).

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::domain::OfflineReason;

pub const SESSIONS: &str = "presence_sessions";
pub const WATCH_STREAMS: &str = "presence_watch_streams";
pub const WATCHED_USERS: &str = "presence_watched_users";
pub const CHANGES: &str = "presence_changes_total";
pub const FANOUT_RECIPIENTS: &str = "presence_fanout_recipients";
pub const SESSIONS_ENDED: &str = "presence_sessions_ended_total";
pub const RECONNECTS_IN_GRACE: &str = "presence_reconnects_in_grace_total";
pub const SNAPSHOT_SIZE: &str = "presence_snapshot_size";
pub const BACKEND_ERRORS: &str = "presence_backend_errors_total";
pub const HISTORY_BUFFERED: &str = "presence_history_buffered_rows";
pub const PROJECTION_LAG: &str = "presence_projection_lag_seconds";
pub const UNREPLICATED: &str = "presence_unreplicated_changes_total";

pub fn describe() {
    // Connection bounds (connections.rs).
    describe_gauge!(
        "presence_connections_open",
        "client connections open on this node"
    );
    describe_counter!(
        "presence_connections_refused_total",
        "connections closed as they were accepted, by reason (cap: past --max-connections and the health reserve)"
    );
    describe_counter!(
        "presence_connections_closed_total",
        "connections the node closed, by reason (handshake_timeout, idle, max_age)"
    );
    describe_counter!(
        "presence_request_body_timeouts_total",
        "calls failed because their request body did not arrive within --request-body-timeout"
    );
    describe_gauge!(SESSIONS, "live device sessions held by this node");
    describe_gauge!(WATCH_STREAMS, "open WatchContacts streams on this node");
    describe_gauge!(
        WATCHED_USERS,
        "distinct users watched by this node's streams"
    );
    describe_counter!(
        CHANGES,
        "changes of what contacts see, made through this node"
    );
    describe_histogram!(
        FANOUT_RECIPIENTS,
        "watch streams on this node reached by one change"
    );
    describe_counter!(SESSIONS_ENDED, "sessions ended, by offline reason");
    describe_counter!(
        RECONNECTS_IN_GRACE,
        "devices that reconnected within the grace period (flaps absorbed)"
    );
    describe_histogram!(SNAPSHOT_SIZE, "users in a WatchContacts snapshot");
    describe_counter!(BACKEND_ERRORS, "failed backend calls, by backend");
    describe_gauge!(
        crate::degraded::QUEUED_METRIC,
        "changes waiting to be replayed into the hot store after an outage"
    );
    describe_counter!(
        crate::degraded::REFUSED_METRIC,
        "changes refused because the outage replay queue was full"
    );
    describe_counter!(
        crate::store::buffered::REFUSED_METRIC,
        "history records refused because the history buffer was full"
    );
    describe_gauge!(
        HISTORY_BUFFERED,
        Unit::Count,
        "history rows waiting to be written to the durable store"
    );
    describe_gauge!(
        PROJECTION_LAG,
        Unit::Seconds,
        "age of the oldest change in the last batch this node's history projection wrote"
    );
    describe_counter!(
        UNREPLICATED,
        "changes acknowledged although fewer Redis replicas than --redis-wait-replicas held them within --redis-wait-timeout"
    );
}

pub fn change() {
    counter!(CHANGES).increment(1);
}

pub fn fanout(recipients: usize) {
    histogram!(FANOUT_RECIPIENTS).record(recipients as f64);
}

pub fn session_ended(reason: OfflineReason) {
    let reason = match reason {
        OfflineReason::Logout => "logout",
        OfflineReason::ConnectionClosed => "connection_closed",
        OfflineReason::LeaseExpired => "lease_expired",
        OfflineReason::NodeLost => "node_lost",
        OfflineReason::Invisible => "invisible",
    };
    counter!(SESSIONS_ENDED, "reason" => reason).increment(1);
}

pub fn reconnect_in_grace() {
    counter!(RECONNECTS_IN_GRACE).increment(1);
}

pub fn snapshot(size: usize) {
    histogram!(SNAPSHOT_SIZE).record(size as f64);
}

pub fn backend_error(backend: &'static str) {
    counter!(BACKEND_ERRORS, "backend" => backend).increment(1);
}

pub fn node_gauges(sessions: usize, watch_streams: usize, watched_users: usize) {
    gauge!(SESSIONS).set(sessions as f64);
    gauge!(WATCH_STREAMS).set(watch_streams as f64);
    gauge!(WATCHED_USERS).set(watched_users as f64);
}

pub fn history_buffered(rows: usize) {
    gauge!(HISTORY_BUFFERED).set(rows as f64);
}

pub fn projection_lag(lag: std::time::Duration) {
    gauge!(PROJECTION_LAG).set(lag.as_secs_f64());
}

pub fn unreplicated() {
    counter!(UNREPLICATED).increment(1);
}
