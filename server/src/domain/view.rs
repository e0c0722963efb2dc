//! Per-viewer privacy: what a caller may see of a user.

use super::model::{
    ChosenStatus, HistoryRecord, OfflineReason, Session, UserRecord, VisibleStatus,
};

/// How the caller relates to the user being looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Viewer {
    /// The user themself.
    Owner,
    /// An internal service with the admin scope.
    Admin,
    Contact,
    /// Anyone else: learns nothing, not even that the user exists.
    Stranger,
}

impl Viewer {
    fn sees_private(self) -> bool {
        matches!(self, Viewer::Owner | Viewer::Admin)
    }
}

/// One user's presence as one viewer may see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub user_id: String,
    pub status: VisibleStatus,
    pub custom_message: String,
    pub last_seen_ms: i64,
    pub version: u64,
    pub offline_reason: Option<OfflineReason>,
    /// Owner and admin only.
    pub chosen: Option<ChosenStatus>,
    /// Owner and admin only.
    pub devices: Vec<Session>,
}

impl View {
    pub fn of(user_id: &str, record: Option<&UserRecord>, viewer: Viewer) -> View {
        let unknown = View {
            user_id: user_id.to_owned(),
            ..View::default()
        };
        let Some(record) = record else {
            return unknown;
        };
        if viewer == Viewer::Stranger {
            return unknown;
        }
        let shown = &record.shown;
        let private = viewer.sees_private();
        View {
            user_id: user_id.to_owned(),
            status: shown.status,
            custom_message: shown.custom_message.clone(),
            last_seen_ms: shown.last_seen_ms,
            version: shown.version,
            offline_reason: mask_reason(shown.offline_reason, viewer),
            chosen: private.then_some(record.chosen),
            devices: if private {
                record.sessions.clone()
            } else {
                Vec::new()
            },
        }
    }
}

/// A history entry as one viewer may see it (strangers are refused earlier).
pub fn history_view(mut record: HistoryRecord, viewer: Viewer) -> HistoryRecord {
    record.offline_reason = mask_reason(record.offline_reason, viewer);
    record
}

/// Invisible users look exactly like logged-out ones to everyone but
/// themselves and admins.
fn mask_reason(reason: Option<OfflineReason>, viewer: Viewer) -> Option<OfflineReason> {
    match reason {
        Some(OfflineReason::Invisible) if !viewer.sees_private() => Some(OfflineReason::Logout),
        other => other,
    }
}
