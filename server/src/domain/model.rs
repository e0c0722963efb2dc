use serde::{Deserialize, Serialize};

/// The status a user chooses for all of their devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChosenStatus {
    #[default]
    Online,
    Busy,
    Invisible,
}

/// What one device reports about its user's attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    #[default]
    Active,
    Idle,
}

/// What others see, derived from the sessions and the chosen status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisibleStatus {
    #[default]
    Offline,
    Online,
    Idle,
    Busy,
}

/// Why a user is offline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfflineReason {
    Logout,
    ConnectionClosed,
    LeaseExpired,
    NodeLost,
    /// Shown only to the user and admins; contacts see `Logout`.
    Invisible,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Platform {
    #[default]
    Unspecified,
    Web,
    Ios,
    Android,
    Desktop,
    Service,
}

/// One device's live session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub device_id: String,
    pub platform: Platform,
    pub activity: Activity,
    pub connected_since_ms: i64,
    /// Identifies the connection that holds the session. A reconnect of the
    /// same device gets a new one, so that the old connection's late close or
    /// lease expiry cannot end the new session.
    pub conn_id: u64,
    /// The server node holding the connection; its loss ends the session.
    pub node_id: String,
}

/// What contacts currently see of a user. Only changes of this bump the
/// version, so nothing that contacts cannot see (devices, activity while
/// invisible) leaks through version numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    pub status: VisibleStatus,
    pub custom_message: String,
    /// The last moment the user was visibly online; 0 if never.
    pub last_seen_ms: i64,
    /// 0 until the user is first seen.
    pub version: u64,
    /// Unmasked: `Invisible` is turned into `Logout` for contacts by the view.
    pub offline_reason: Option<OfflineReason>,
}

/// The whole hot state of one user: what a hot store keeps per user and what
/// every transition reads and writes atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// A user has a handful of devices at most, so a Vec beats a map.
    pub sessions: Vec<Session>,
    pub chosen: ChosenStatus,
    pub custom_message: String,
    pub shown: Shown,
}

impl UserRecord {
    pub fn session(&self, device_id: &str) -> Option<&Session> {
        self.sessions.iter().find(|s| s.device_id == device_id)
    }

    /// The visible status the rules derive from the current sessions and the
    /// chosen status.
    pub fn derived_status(&self) -> VisibleStatus {
        if self.sessions.is_empty() || self.chosen == ChosenStatus::Invisible {
            return VisibleStatus::Offline;
        }
        if self.chosen == ChosenStatus::Busy {
            return VisibleStatus::Busy;
        }
        if self.sessions.iter().any(|s| s.activity == Activity::Active) {
            VisibleStatus::Online
        } else {
            VisibleStatus::Idle
        }
    }

    /// True when nothing about the user is worth keeping in a hot store.
    pub fn is_empty(&self) -> bool {
        *self == UserRecord::default()
    }
}

/// One change of what contacts see, as kept in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub user_id: String,
    pub at_ms: i64,
    pub status: VisibleStatus,
    pub custom_message: String,
    pub offline_reason: Option<OfflineReason>,
    pub version: u64,
}

impl HistoryRecord {
    pub fn of(user_id: &str, shown: &Shown, at_ms: i64) -> Self {
        HistoryRecord {
            user_id: user_id.to_owned(),
            at_ms,
            status: shown.status,
            custom_message: shown.custom_message.clone(),
            offline_reason: shown.offline_reason,
            version: shown.version,
        }
    }
}
