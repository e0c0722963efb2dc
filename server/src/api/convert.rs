//! The one place that converts between protobuf messages and domain types,
//! and validates what clients send.

use presence_proto::v1 as pb;

use super::error::ApiError;
use crate::config::LimitsConfig;
use crate::domain::{
    Activity, ChosenStatus, HistoryRecord, OfflineReason, Platform, Session, View, VisibleStatus,
};

pub fn platform(value: i32) -> Result<Platform, ApiError> {
    Ok(match enum_value::<pb::Platform>(value, "platform")? {
        pb::Platform::Unspecified => Platform::Unspecified,
        pb::Platform::Web => Platform::Web,
        pb::Platform::Ios => Platform::Ios,
        pb::Platform::Android => Platform::Android,
        pb::Platform::Desktop => Platform::Desktop,
        pb::Platform::Service => Platform::Service,
    })
}

/// `None` for ACTIVITY_UNSPECIFIED ("unchanged").
pub fn activity(value: i32) -> Result<Option<Activity>, ApiError> {
    Ok(match enum_value::<pb::Activity>(value, "activity")? {
        pb::Activity::Unspecified => None,
        pb::Activity::Active => Some(Activity::Active),
        pb::Activity::Idle => Some(Activity::Idle),
    })
}

/// `None` for USER_STATUS_UNSPECIFIED ("unchanged").
pub fn chosen_status(value: i32) -> Result<Option<ChosenStatus>, ApiError> {
    Ok(match enum_value::<pb::UserStatus>(value, "status")? {
        pb::UserStatus::Unspecified => None,
        pb::UserStatus::Online => Some(ChosenStatus::Online),
        pb::UserStatus::Busy => Some(ChosenStatus::Busy),
        pb::UserStatus::Invisible => Some(ChosenStatus::Invisible),
    })
}

/// A status with its message, if the status is set; the message is checked
/// against the limit even when ignored, so clients learn of the mistake.
pub fn status_change(
    status: i32,
    custom_message: String,
    limits: &LimitsConfig,
) -> Result<Option<(ChosenStatus, String)>, ApiError> {
    let status = chosen_status(status)?;
    if custom_message.len() > limits.max_custom_message_bytes {
        return Err(ApiError::InvalidArgument(format!(
            "custom_message is longer than {} bytes",
            limits.max_custom_message_bytes
        )));
    }
    Ok(status.map(|s| (s, custom_message)))
}

fn enum_value<E: TryFrom<i32>>(value: i32, field: &str) -> Result<E, ApiError> {
    E::try_from(value)
        .map_err(|_| ApiError::InvalidArgument(format!("{field} has no value {value}")))
}

/// Checks a user or device id: 1 to `max_id_bytes` bytes, no control
/// characters.
pub fn id(value: &str, field: &str, limits: &LimitsConfig) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is empty")));
    }
    if value.len() > limits.max_id_bytes {
        return Err(ApiError::InvalidArgument(format!(
            "{field} is longer than {} bytes",
            limits.max_id_bytes
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument(format!(
            "{field} has control characters"
        )));
    }
    Ok(())
}

/// Checks a batch of ids: 1 to `max` of them, each valid.
pub fn id_batch(
    values: &[String],
    field: &str,
    max: usize,
    limits: &LimitsConfig,
) -> Result<(), ApiError> {
    if values.is_empty() {
        return Err(ApiError::InvalidArgument(format!("{field} is empty")));
    }
    if values.len() > max {
        return Err(ApiError::InvalidArgument(format!(
            "{field} has {} ids, more than the {max} allowed",
            values.len()
        )));
    }
    values.iter().try_for_each(|v| id(v, field, limits))
}

pub fn presence(view: View) -> pb::Presence {
    pb::Presence {
        user_id: view.user_id,
        status: visible_status(view.status) as i32,
        custom_message: view.custom_message,
        last_seen_unix_ms: view.last_seen_ms,
        version: view.version,
        offline_reason: offline_reason(view.offline_reason) as i32,
        chosen_status: view.chosen.map_or(pb::UserStatus::Unspecified, user_status) as i32,
        devices: view.devices.into_iter().map(device).collect(),
    }
}

pub fn history_entry(record: HistoryRecord) -> pb::HistoryEntry {
    pb::HistoryEntry {
        at_unix_ms: record.at_ms,
        status: visible_status(record.status) as i32,
        offline_reason: offline_reason(record.offline_reason) as i32,
        custom_message: record.custom_message,
        version: record.version,
    }
}

fn device(session: Session) -> pb::DeviceSession {
    pb::DeviceSession {
        device_id: session.device_id,
        platform: match session.platform {
            Platform::Unspecified => pb::Platform::Unspecified,
            Platform::Web => pb::Platform::Web,
            Platform::Ios => pb::Platform::Ios,
            Platform::Android => pb::Platform::Android,
            Platform::Desktop => pb::Platform::Desktop,
            Platform::Service => pb::Platform::Service,
        } as i32,
        activity: match session.activity {
            Activity::Active => pb::Activity::Active,
            Activity::Idle => pb::Activity::Idle,
        } as i32,
        connected_since_unix_ms: session.connected_since_ms,
    }
}

fn visible_status(status: VisibleStatus) -> pb::VisibleStatus {
    match status {
        VisibleStatus::Offline => pb::VisibleStatus::Offline,
        VisibleStatus::Online => pb::VisibleStatus::Online,
        VisibleStatus::Idle => pb::VisibleStatus::Idle,
        VisibleStatus::Busy => pb::VisibleStatus::Busy,
    }
}

fn user_status(status: ChosenStatus) -> pb::UserStatus {
    match status {
        ChosenStatus::Online => pb::UserStatus::Online,
        ChosenStatus::Busy => pb::UserStatus::Busy,
        ChosenStatus::Invisible => pb::UserStatus::Invisible,
    }
}

fn offline_reason(reason: Option<OfflineReason>) -> pb::OfflineReason {
    match reason {
        None => pb::OfflineReason::Unspecified,
        Some(OfflineReason::Logout) => pb::OfflineReason::Logout,
        Some(OfflineReason::ConnectionClosed) => pb::OfflineReason::ConnectionClosed,
        Some(OfflineReason::LeaseExpired) => pb::OfflineReason::LeaseExpired,
        Some(OfflineReason::NodeLost) => pb::OfflineReason::NodeLost,
        Some(OfflineReason::Invisible) => pb::OfflineReason::Invisible,
    }
}
