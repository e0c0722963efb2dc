//! The device session: one background task holding the bidirectional
//! `Heartbeat` stream open, renewing the lease, and reconnecting.
//!
//! # How the task talks to the client handle
//!
//! - a `watch` of the [`Desired`] activity and status: the handle writes, the
//!   task reads the latest value when it beats or re-opens. A watch rather than
//!   a queue, because only the latest activity matters: ten quick changes while
//!   reconnecting collapse into one, with no buffer to grow;
//! - a `oneshot` stop signal: dropping or firing it ends the task wherever it
//!   is waiting, which drops the stream (a clean close for the server);
//! - a `watch` of [`SessionState`] the task publishes for anyone to observe.
//!
//! The task owns only an `Arc<Connector>`, never the client, so dropping the
//! last [`PresenceClient`](crate::PresenceClient) drops the stop signal and
//! the task ends: no task outlives its handles.

use std::sync::Arc;
use std::time::Duration;

use presence_proto::v1::{
    Activity, HeartbeatRequest, Platform, SessionBeat, SessionOpen, UserStatus, heartbeat_request,
    heartbeat_response,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_stream::wrappers::ReceiverStream;

use crate::connector::{Connector, Lease};
use crate::{Backoff, Error};

/// Outgoing heartbeat messages waiting for HTTP/2 to take them. Beats are
/// periodic and each carries the full current activity, so when this is full
/// (the server stopped reading) a beat is skipped rather than queued: nothing
/// is lost, and the liveness check decides whether the stream is dead.
const OUTBOUND_CAPACITY: usize = 4;

/// The longest a `go_away` may make us wait before reconnecting, whatever
/// the server asks: a bogus huge value must not park the session for days.
const MAX_GO_AWAY_WAIT: Duration = Duration::from_secs(30);

/// The least time between two beats when activity changes arrive in quick
/// succession. The server limits beats per session (5 per second by
/// default); four per second at most leaves room for the periodic beat.
const MIN_BEAT_GAP: Duration = Duration::from_millis(250);

/// Floor for the server-chosen heartbeat interval, so a zero or tiny value
/// from a misconfigured server cannot turn the task into a busy loop.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// Used only if the server's `opened` carries no interval at all.
const FALLBACK_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// What the session reports when it opens: passed to
/// [`PresenceClient::start_session`](crate::PresenceClient::start_session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    /// This device's activity. Default: [`Activity::Active`].
    pub activity: Activity,
    /// The user-level status to set when the session opens;
    /// [`UserStatus::Unspecified`] leaves the user's current status as it is.
    /// Default: `Unspecified`.
    pub status: UserStatus,
    /// The custom message, applied only together with `status`.
    /// Default: empty.
    pub custom_message: String,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            activity: Activity::Active,
            status: UserStatus::Unspecified,
            custom_message: String::new(),
        }
    }
}

/// The session as observed through
/// [`PresenceClient::session_state`](crate::PresenceClient::session_state).
#[derive(Debug, Clone)]
pub enum SessionState {
    /// No session was started on this client.
    Idle,
    /// The first open is in progress.
    Connecting,
    /// The stream is open and the lease is being renewed.
    Connected {
        /// The endpoint the stream is open to.
        endpoint: String,
        /// How often the session beats, as the server chose.
        heartbeat_interval: Duration,
        /// How long the server keeps the session without a beat.
        lease: Duration,
    },
    /// The stream broke, or the server is draining; the session is being
    /// re-opened with the same device id. The server keeps the session through
    /// its grace period, so contacts see no change if this ends quickly.
    Reconnecting {
        /// 1 for the first attempt after the stream was lost.
        attempt: u32,
        /// Why, in words (the error, or the server's go-away reason).
        reason: String,
    },
    /// The session ended: through
    /// [`end_session`](crate::PresenceClient::end_session) (`error` is
    /// `None`), or on an error retrying cannot fix, such as an expired token.
    Closed {
        /// The error that ended the session, if any.
        error: Option<Error>,
    },
}

/// The activity and status the session should report; the latest value wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Desired {
    pub(crate) activity: Activity,
    /// Re-sent on every re-open, so a server that lost the user's state (a
    /// restarted embedded store) gets it back.
    pub(crate) status: UserStatus,
    pub(crate) custom_message: String,
}

/// The client's grip on a running session task. Dropping it stops the task.
pub(crate) struct SessionHandle {
    pub(crate) desired: watch::Sender<Desired>,
    /// Fired or dropped to stop the task.
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl SessionHandle {
    pub(crate) fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops the task and waits until it has dropped its stream.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        // The task never panics by design; if it somehow did, there is nothing
        // left to stop.
        let _ = self.task.await;
    }
}

/// Everything the task needs, owned: no reference back to the client.
pub(crate) struct SessionTask {
    pub(crate) connector: Arc<Connector>,
    pub(crate) backoff: Backoff,
    pub(crate) request_timeout: Duration,
    pub(crate) device_id: String,
    pub(crate) platform: Platform,
    pub(crate) state: watch::Sender<SessionState>,
}

impl SessionTask {
    /// Spawns the task. `ready` gets the outcome of the first open: `Ok` once
    /// the server answered `opened`, or the error that stopped the first
    /// attempt (the task then ends; it does not retry a session that never
    /// opened, so the caller learns about a bad token or an unreachable server
    /// at once).
    pub(crate) fn spawn(
        self,
        desired: Desired,
        ready: oneshot::Sender<Result<(), Error>>,
    ) -> SessionHandle {
        let (desired_tx, desired_rx) = watch::channel(desired);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let state = self.state.clone();
            state.send_replace(SessionState::Connecting);
            let error = tokio::select! {
                error = self.run(desired_rx, ready) => error,
                // Fired or dropped: either way the owner is done with us.
                _ = stop_rx => None,
            };
            if let Some(error) = &error {
                tracing::warn!(%error, "presence session closed");
            }
            state.send_replace(SessionState::Closed { error });
        });
        SessionHandle {
            desired: desired_tx,
            stop: stop_tx,
            task,
        }
    }

    /// Opens, keeps, and re-opens the stream until an error that retrying
    /// cannot fix, which it returns, or until the handle is gone (`None`).
    async fn run(
        &self,
        mut desired: watch::Receiver<Desired>,
        ready: oneshot::Sender<Result<(), Error>>,
    ) -> Option<Error> {
        let mut ready = Some(ready);
        // Failed attempts since the stream last worked; drives the backoff.
        let mut failures: u32 = 0;
        // A fresh token was fetched and no stream has worked with it yet:
        // refused again, it will not be fetched again.
        let mut refreshed = false;
        loop {
            let lease = self.connector.lease();
            let end = self.run_stream(&lease, &mut desired, &mut ready).await;
            match end {
                // The handle is gone; the stop signal normally wins first.
                StreamEnd::Stopped => return None,
                StreamEnd::GoAway { wait, reason } => {
                    failures = 0;
                    self.state.send_replace(SessionState::Reconnecting {
                        attempt: 1,
                        reason: format!("server draining: {reason}"),
                    });
                    tracing::info!(%reason, ?wait, "server draining, moving the session");
                    sleep(wait).await;
                    self.connector.rotate(lease.generation);
                }
                StreamEnd::Failed { error, healthy } => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(error.clone()));
                        return Some(error);
                    }
                    if healthy {
                        refreshed = false;
                    }
                    if matches!(error, Error::Unauthenticated(_)) && !refreshed {
                        match self.connector.refresh_token().await {
                            // Back at once: the server keeps the session
                            // through its grace period, contacts see nothing.
                            Ok(true) => {
                                refreshed = true;
                                self.state.send_replace(SessionState::Reconnecting {
                                    attempt: 1,
                                    reason: error.to_string(),
                                });
                                tracing::info!("token refused, reconnecting with a fresh one");
                                continue;
                            }
                            Ok(false) => {}
                            Err(refresh) => {
                                tracing::warn!(error = %refresh, "fetching a fresh token failed");
                            }
                        }
                    }
                    if !error.is_retryable() {
                        return Some(error);
                    }
                    failures = if healthy {
                        1
                    } else {
                        failures.saturating_add(1)
                    };
                    self.state.send_replace(SessionState::Reconnecting {
                        attempt: failures,
                        reason: error.to_string(),
                    });
                    tracing::info!(%error, attempt = failures, "presence session lost, reconnecting");
                    self.connector.rotate(lease.generation);
                    sleep(self.backoff.delay(failures)).await;
                }
            }
        }
    }

    fn open_request(&self, desired: &Desired) -> HeartbeatRequest {
        let (status, custom_message) = match desired.status {
            UserStatus::Unspecified => (UserStatus::Unspecified, String::new()),
            status => (status, desired.custom_message.clone()),
        };
        HeartbeatRequest {
            request: Some(heartbeat_request::Request::Open(SessionOpen {
                device_id: self.device_id.clone(),
                platform: self.platform as i32,
                activity: desired.activity as i32,
                status: status as i32,
                custom_message,
            })),
        }
    }

    /// One stream, from open to its end.
    async fn run_stream(
        &self,
        lease: &Lease,
        desired: &mut watch::Receiver<Desired>,
        ready: &mut Option<oneshot::Sender<Result<(), Error>>>,
    ) -> StreamEnd {
        let failed = |error: Error| StreamEnd::Failed {
            error,
            healthy: false,
        };
        let (outbound, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let open = self.open_request(&desired.borrow_and_update());
        // Cannot fail: the channel is new and empty, and we hold its receiver.
        let _ = outbound.try_send(open);

        let mut stub = self.connector.presence(lease);
        let mut inbound = match stub.heartbeat(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return failed(status.into()),
        };
        let opened = match tokio::time::timeout(self.request_timeout, inbound.message()).await {
            Err(_) => {
                return failed(Error::DeadlineExceeded(
                    "no answer to the session open".to_owned(),
                ));
            }
            Ok(Err(status)) => return failed(status.into()),
            Ok(Ok(None)) => {
                return failed(Error::Unavailable(
                    "server closed the session stream".to_owned(),
                ));
            }
            Ok(Ok(Some(response))) => match response.response {
                Some(heartbeat_response::Response::Opened(opened)) => opened,
                Some(heartbeat_response::Response::GoAway(go_away)) => {
                    return StreamEnd::GoAway {
                        wait: go_away_wait(go_away.reconnect_after_ms),
                        reason: go_away.reason,
                    };
                }
                _ => {
                    return failed(Error::Protocol(
                        "first session response was not opened".to_owned(),
                    ));
                }
            },
        };
        let (interval, lease_time) = timings(opened.heartbeat_interval_ms, opened.lease_ms);
        self.state.send_replace(SessionState::Connected {
            endpoint: lease.endpoint.clone(),
            heartbeat_interval: interval,
            lease: lease_time,
        });
        tracing::debug!(endpoint = %lease.endpoint, ?interval, lease = ?lease_time, "presence session open");
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }

        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        // After a stall, beat once and carry on at the normal pace rather than
        // sending a burst of catch-up beats.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut last_heard = Instant::now();
        let mut healthy = false;
        // An activity change waiting for its beat, and when the last beat
        // went out: changes are sent at once, but never closer together than
        // `MIN_BEAT_GAP`, so an app flipping active/idle quickly stays under
        // the server's per-session beat rate. Quick flips coalesce into one
        // beat carrying the latest activity.
        let mut change_pending = false;
        let mut last_beat = Instant::now();
        // Set by a go-away: keep beating the draining node until then, so the
        // lease stays fresh while we wait as asked.
        let mut go_away: Option<(Instant, String)> = None;
        loop {
            let go_away_at = go_away.as_ref().map_or_else(Instant::now, |(at, _)| *at);
            let beat_now = tokio::select! {
                _ = ticker.tick() => true,
                changed = desired.changed(), if !change_pending => match changed {
                    Ok(()) => {
                        change_pending = true;
                        false
                    }
                    Err(_) => return StreamEnd::Stopped,
                },
                // Fires at once unless the last beat was very recent.
                _ = sleep_until(last_beat + MIN_BEAT_GAP), if change_pending => true,
                message = inbound.message() => {
                    last_heard = Instant::now();
                    let error = match message {
                        Ok(Some(response)) => {
                            match response.response {
                                Some(heartbeat_response::Response::Ack(_)) => healthy = true,
                                Some(heartbeat_response::Response::GoAway(g)) => {
                                    let wait = go_away_wait(g.reconnect_after_ms);
                                    go_away.get_or_insert((Instant::now() + wait, g.reason));
                                }
                                // A repeated `opened`, or a response kind
                                // newer than this SDK: nothing to do.
                                _ => {}
                            }
                            None
                        }
                        Ok(None) => Some(Error::Unavailable("server closed the session stream".to_owned())),
                        Err(status) => Some(status.into()),
                    };
                    if let Some(error) = error {
                        // A draining node closing first is expected: wait out
                        // the rest of the delay it asked for.
                        if let Some((at, reason)) = go_away.take() {
                            let wait = at.saturating_duration_since(Instant::now());
                            return StreamEnd::GoAway { wait, reason };
                        }
                        return StreamEnd::Failed { error, healthy };
                    }
                    false
                }
                _ = sleep_until(last_heard + lease_time) => {
                    // Beats get acks; a lease without any answer means the
                    // server (or the path to it) is gone, and the server has
                    // dropped the session by now anyway.
                    return StreamEnd::Failed {
                        error: Error::Unavailable("no answer from the server within the lease".to_owned()),
                        healthy,
                    };
                }
                _ = sleep_until(go_away_at), if go_away.is_some() => {
                    let reason = go_away.take().map(|(_, reason)| reason).unwrap_or_default();
                    return StreamEnd::GoAway { wait: Duration::ZERO, reason };
                }
            };
            if beat_now {
                change_pending = false;
                last_beat = Instant::now();
                // The next periodic beat is a full interval after this one.
                ticker.reset();
                let activity = desired.borrow_and_update().activity;
                seq += 1;
                let beat = HeartbeatRequest {
                    request: Some(heartbeat_request::Request::Beat(SessionBeat {
                        seq,
                        // Every beat carries the full current activity, so a
                        // skipped beat loses nothing.
                        activity: activity as i32,
                        status: UserStatus::Unspecified as i32,
                        custom_message: String::new(),
                    })),
                };
                match outbound.try_send(beat) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!("session stream not draining, skipped a beat");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // tonic dropped the request side: the call is over.
                        return StreamEnd::Failed {
                            error: Error::Unavailable("session stream closed".to_owned()),
                            healthy,
                        };
                    }
                }
            }
        }
    }
}

/// How one stream ended.
enum StreamEnd {
    /// The client handle is gone.
    Stopped,
    /// The server is draining: reconnect, to the next endpoint, after `wait`.
    GoAway { wait: Duration, reason: String },
    /// The stream failed. `healthy` says whether it had worked (a beat was
    /// acknowledged), which restarts the backoff from its first step.
    Failed { error: Error, healthy: bool },
}

fn go_away_wait(reconnect_after_ms: u32) -> Duration {
    Duration::from_millis(u64::from(reconnect_after_ms)).min(MAX_GO_AWAY_WAIT)
}

/// The beat interval and lease to use, from the server's `opened`: the server
/// chooses; we only guard against values that would break the loop.
fn timings(heartbeat_interval_ms: u32, lease_ms: u32) -> (Duration, Duration) {
    let interval = match (heartbeat_interval_ms, lease_ms) {
        (0, 0) => FALLBACK_HEARTBEAT_INTERVAL,
        (0, lease) => Duration::from_millis(u64::from(lease)) / 3,
        (interval, _) => Duration::from_millis(u64::from(interval)),
    }
    .max(MIN_HEARTBEAT_INTERVAL);
    let lease = match lease_ms {
        0 => interval * 3,
        lease => Duration::from_millis(u64::from(lease)),
    };
    // A lease shorter than two beats would declare a healthy stream dead
    // between acks.
    (interval, lease.max(interval * 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_chooses_the_heartbeat_interval_and_lease() {
        assert_eq!(
            timings(5_000, 15_000),
            (Duration::from_secs(5), Duration::from_secs(15))
        );
        assert_eq!(
            timings(250, 1_000),
            (Duration::from_millis(250), Duration::from_secs(1))
        );
    }

    #[test]
    fn nonsense_timings_from_the_server_cannot_spin_the_task() {
        assert_eq!(
            timings(0, 0),
            (FALLBACK_HEARTBEAT_INTERVAL, FALLBACK_HEARTBEAT_INTERVAL * 3)
        );
        assert_eq!(
            timings(0, 9_000),
            (Duration::from_secs(3), Duration::from_secs(9))
        );
        assert_eq!(
            timings(1, 0),
            (MIN_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL * 3)
        );
        assert_eq!(
            timings(5_000, 1),
            (Duration::from_secs(5), Duration::from_secs(10))
        );
    }

    #[test]
    fn a_go_away_wait_is_capped() {
        assert_eq!(go_away_wait(500), Duration::from_millis(500));
        assert_eq!(go_away_wait(u32::MAX), MAX_GO_AWAY_WAIT);
    }
}
