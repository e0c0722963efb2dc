//! A raw device on a heartbeat stream, shared by the e2e tests and the
//! `gateway-sessions` client processes: the messages that open a session
//! and beat, and the loop that beats on time until the stream ends.

use std::collections::BTreeMap;
use std::time::Duration;

use presence_proto::v1::{self as pb, heartbeat_request, heartbeat_response};
use serde::{Deserialize, Serialize};

/// The message that opens a heartbeat session for `device`.
pub fn session_open(device: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        request: Some(heartbeat_request::Request::Open(pb::SessionOpen {
            device_id: device.into(),
            platform: pb::Platform::Desktop as i32,
            ..Default::default()
        })),
    }
}

/// Heartbeat number `seq` of a session.
pub fn session_beat(seq: u64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        request: Some(heartbeat_request::Request::Beat(pb::SessionBeat {
            seq,
            ..Default::default()
        })),
    }
}

/// Why a beating stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The node asked the device to move (a drain).
    GoAway,
    /// The stream closed or failed, or the request side was dropped.
    Broken,
}

/// Beats every `interval` on an opened session until the node sends
/// `go_away` or the stream ends.
pub async fn beat_until_end(
    outbound: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>,
    mut inbound: tonic::Streaming<pb::HeartbeatResponse>,
    interval: Duration,
) -> StreamEnd {
    let mut tick = tokio::time::interval(interval);
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                if outbound.send(session_beat(seq)).await.is_err() {
                    return StreamEnd::Broken;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(pb::HeartbeatResponse {
                    response: Some(heartbeat_response::Response::GoAway(_)),
                })) => return StreamEnd::GoAway,
                Ok(Some(_ack)) => {}
                Ok(None) | Err(_) => return StreamEnd::Broken,
            },
        }
    }
}

/// What a `gateway-sessions` process saw since its last report.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// How long each re-open took, from the go-away or broken stream to the
    /// new session's `opened`, in microseconds.
    pub reconnects_us: Vec<u64>,
    /// Users whose stream broke after `vanish`.
    pub vanished: Vec<String>,
    /// Opens that failed, by status, and were retried.
    pub refused: BTreeMap<String, usize>,
}
