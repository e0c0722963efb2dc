//! The gRPC services: authenticate, validate and convert, then call the node.
//! Only this layer knows protobuf.

pub mod convert;
pub mod error;
pub mod feed;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use presence_proto::v1 as pb;
use presence_proto::v1::contacts_service_server::ContactsService;
use presence_proto::v1::presence_service_server::PresenceService;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Authenticator, Caller};
use crate::domain::{Viewer, history_view};
use crate::leases::StreamEnd;
use crate::node::{BeatChange, Node, OpenRequest, OpenedSession};
use crate::quota::{StreamKind, TokenBucket};
use crate::watch::{WatchEvent, WatchRequest, watch};
use error::ApiError;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const DEFAULT_HISTORY_PAGE: usize = 100;
const MAX_HISTORY_PAGE: usize = 1000;

#[derive(Clone)]
pub struct Api {
    pub(crate) node: Arc<Node>,
    auth: Arc<Authenticator>,
}

impl Api {
    pub fn new(node: Arc<Node>, auth: Arc<Authenticator>) -> Self {
        Api { node, auth }
    }

    /// The caller the token names. With
    /// `--tls-require-client-cert-for-admin`, an admin-scoped token is only
    /// taken from a connection that presented a verified client certificate.
    pub(crate) fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        let caller = self.auth.verify(request.metadata())?;
        if caller.admin
            && self.node.config.tls_require_client_cert_for_admin
            && request
                .extensions()
                .get::<crate::tls::VerifiedClientCert>()
                .is_none()
        {
            return Err(ApiError::PermissionDenied(
                "admin-scoped tokens need a client certificate from --tls-client-ca on this server"
                    .into(),
            ));
        }
        Ok(caller)
    }

    /// Admins act on anyone; users only on themselves.
    fn check_acts_for(&self, caller: &Caller, user_id: &str) -> Result<(), ApiError> {
        if caller.admin || caller.user_id == user_id {
            return Ok(());
        }
        Err(ApiError::PermissionDenied(
            "callers may only act on their own user".into(),
        ))
    }

    /// Contacts change only through internal services, one user and a
    /// bounded batch of valid ids at a time.
    fn check_contacts_change(
        &self,
        caller: &Caller,
        user_id: &str,
        contact_ids: &[String],
    ) -> Result<(), ApiError> {
        self.check_admin(caller)?;
        let limits = &self.node.config.limits;
        convert::id(user_id, "user_id", limits)?;
        convert::id_batch(contact_ids, "contact_ids", limits.max_batch, limits)
    }

    pub(crate) fn check_admin(&self, caller: &Caller) -> Result<(), ApiError> {
        if caller.admin {
            return Ok(());
        }
        Err(ApiError::PermissionDenied(
            "this call needs the presence.admin scope".into(),
        ))
    }
}

/// The most a heartbeat stream told to move at its connection's maximum
/// age waits before reconnecting: far below any grace period.
const MAX_AGE_RECONNECT_SPREAD_MS: u32 = 200;

fn ms(duration: std::time::Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl PresenceService for Api {
    type HeartbeatStream = ResponseStream<pb::HeartbeatResponse>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let caller = self.caller(&request)?;
        self.node.check_serving()?;
        let slot = self
            .node
            .admit_stream(&caller.user_id, StreamKind::Heartbeat)?;
        let node = self.node.clone();
        // Served outside `connections::serve` (tests): never ages.
        let aged = request
            .extensions()
            .get::<crate::connections::ConnectionAged>()
            .cloned();
        let mut inbound = request.into_inner();
        let stream = async_stream::try_stream! {
            let _slot = slot;
            let limits = &node.config.limits;
            let open = match inbound.message().await {
                Ok(Some(pb::HeartbeatRequest { request: Some(pb::heartbeat_request::Request::Open(open)) })) => open,
                Ok(Some(_)) => Err(ApiError::InvalidArgument("the first message must be `open`".into()))?,
                // The client left before opening: nothing to clean up.
                Ok(None) | Err(_) => return,
            };
            convert::id(&open.device_id, "device_id", limits)?;
            let open = OpenRequest {
                platform: convert::platform(open.platform)?,
                activity: convert::activity(open.activity)?.unwrap_or_default(),
                status: convert::status_change(open.status, open.custom_message, limits)?,
                device_id: open.device_id,
            };
            // Boxed: the stream's state machine lives as long as the session,
            // and would otherwise be as large as the biggest future it awaits.
            let OpenedSession { key, mut session, record, mut ended } =
                Box::pin(node.open_session(&caller, open)).await?;
            let _lingers = Lingers { node: node.clone(), key: key.clone(), conn_id: session.conn_id };
            yield pb::HeartbeatResponse {
                response: Some(pb::heartbeat_response::Response::Opened(pb::SessionOpened {
                    heartbeat_interval_ms: ms(node.config.heartbeat_interval),
                    lease_ms: ms(node.config.lease),
                    presence: Some(convert::presence(crate::domain::View::of(&key.user_id, Some(&record), Viewer::Owner))),
                })),
            };
            let mut rate = TokenBucket::new(
                f64::from(limits.max_beats_per_second),
                f64::from(limits.max_beats_per_second),
            );
            let drained = node.drained();
            tokio::pin!(drained);
            let aged = async move {
                match aged {
                    Some(aged) => aged.reached().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(aged);
            let expired = tokio::time::sleep(caller.valid_for());
            tokio::pin!(expired);
            loop {
                let message = tokio::select! {
                    biased;
                    why = &mut ended => Err(stream_ended(why.unwrap_or(StreamEnd::Replaced))),
                    // The session lingers through the grace period: a client
                    // back with a fresh token keeps it.
                    () = &mut expired => Err(ApiError::Unauthenticated("token expired".into())),
                    _ = &mut drained => {
                        yield pb::HeartbeatResponse {
                            response: Some(pb::heartbeat_response::Response::GoAway(pb::GoAway {
                                reconnect_after_ms: 0,
                                reason: "node draining".into(),
                            })),
                        };
                        break;
                    }
                    // The connection is about to close: the client moves to
                    // a new one well within the grace period. Spread a
                    // little, as connections opened together age together.
                    () = &mut aged => {
                        yield pb::HeartbeatResponse {
                            response: Some(pb::heartbeat_response::Response::GoAway(pb::GoAway {
                                reconnect_after_ms: rand::random_range(0..=MAX_AGE_RECONNECT_SPREAD_MS),
                                reason: "connection max age".into(),
                            })),
                        };
                        break;
                    }
                    message = inbound.message() => Ok(message),
                };
                let message = match message {
                    Ok(message) => message,
                    Err(end) => {
                        Err(end)?;
                        return;
                    }
                };
                // A transport error means the client is gone: the session
                // lingers through the grace period (see `Lingers`).
                let Ok(Some(message)) = message else { break };
                let beat = match message.request {
                    Some(pb::heartbeat_request::Request::Beat(beat)) => beat,
                    Some(pb::heartbeat_request::Request::Open(_)) => {
                        Err(ApiError::InvalidArgument("`open` may only be the first message".into()))?;
                        return;
                    }
                    None => {
                        Err(ApiError::InvalidArgument("the request has neither `open` nor `beat`".into()))?;
                        return;
                    }
                };
                if !rate.admit(Instant::now()) {
                    Err(ApiError::ResourceExhausted(format!(
                        "more than {} heartbeats per second", limits.max_beats_per_second
                    )))?;
                }
                let change = BeatChange {
                    activity: convert::activity(beat.activity)?,
                    status: convert::status_change(beat.status, beat.custom_message, limits)?,
                };
                match Box::pin(node.beat(&key, &mut session, change)).await {
                    Ok(()) => {}
                    // The lease was renewed in memory; only the change could
                    // not be recorded (no backend could take it). The session
                    // is alive, so the stream stays open and the beat is
                    // acknowledged: the SDK sends its activity with every
                    // beat, so the next one tries the change again.
                    Err(ApiError::Unavailable(cause)) => {
                        tracing::warn!(%cause, user_id = %key.user_id, "a heartbeat's change could not be recorded");
                    }
                    // The session was taken from this stream: say why.
                    Err(ApiError::Aborted(_)) => {
                        Err(stream_ended(ended.try_recv().unwrap_or(StreamEnd::Replaced)))?;
                        return;
                    }
                    Err(error) => Err(error)?,
                }
                yield pb::HeartbeatResponse {
                    response: Some(pb::heartbeat_response::Response::Ack(pb::HeartbeatAck { seq: beat.seq })),
                };
            }
        };
        Ok(Response::new(Box::pin(stream.map(
            |item: Result<_, ApiError>| item.map_err(Status::from),
        ))))
    }

    async fn touch(
        &self,
        request: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::TouchResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let limits = &self.node.config.limits;
        convert::id(&request.device_id, "device_id", limits)?;
        let platform = convert::platform(request.platform)?;
        let activity = convert::activity(request.activity)?;
        self.node
            .touch(&caller, request.device_id, platform, activity)
            .await?;
        Ok(Response::new(pb::TouchResponse {
            heartbeat_interval_ms: ms(self.node.config.heartbeat_interval),
            lease_ms: ms(self.node.config.lease),
        }))
    }

    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        convert::id(&request.device_id, "device_id", &self.node.config.limits)?;
        self.node.disconnect(&caller, request.device_id).await?;
        Ok(Response::new(pb::DisconnectResponse {}))
    }

    async fn set_status(
        &self,
        request: Request<pb::SetStatusRequest>,
    ) -> Result<Response<pb::SetStatusResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let Some((status, message)) = convert::status_change(
            request.status,
            request.custom_message,
            &self.node.config.limits,
        )?
        else {
            return Err(ApiError::InvalidArgument("status must be set".into()).into());
        };
        let record = self.node.set_status(&caller, status, message).await?;
        let view = crate::domain::View::of(&caller.user_id, Some(&record), Viewer::Owner);
        Ok(Response::new(pb::SetStatusResponse {
            presence: Some(convert::presence(view)),
        }))
    }

    async fn get_presence(
        &self,
        request: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let limits = &self.node.config.limits;
        convert::id_batch(&request.user_ids, "user_ids", limits.max_batch, limits)?;
        let views = self.node.get_presence(&caller, &request.user_ids).await?;
        Ok(Response::new(pb::GetPresenceResponse {
            presences: views.into_iter().map(convert::presence).collect(),
        }))
    }

    type WatchContactsStream = ResponseStream<pb::PresenceEvent>;

    async fn watch_contacts(
        &self,
        request: Request<pb::WatchContactsRequest>,
    ) -> Result<Response<Self::WatchContactsStream>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let limits = &self.node.config.limits;
        if !request.user_ids.is_empty() {
            convert::id_batch(&request.user_ids, "user_ids", limits.max_contacts, limits)?;
        }
        if request.known_versions.len() > limits.max_contacts {
            return Err(ApiError::InvalidArgument(format!(
                "known_versions has more than {} entries",
                limits.max_contacts
            ))
            .into());
        }
        let events = watch(
            self.node.clone(),
            caller,
            WatchRequest {
                user_ids: request.user_ids,
                known_versions: request.known_versions,
            },
        )?;
        Ok(Response::new(Box::pin(events.map(|event| {
            let event = match event.map_err(Status::from)? {
                WatchEvent::Presence(view) => {
                    pb::presence_event::Event::Presence(convert::presence(view))
                }
                WatchEvent::SnapshotComplete { watched } => {
                    pb::presence_event::Event::SnapshotComplete(pb::SnapshotComplete { watched })
                }
                WatchEvent::Removed { user_id } => {
                    pb::presence_event::Event::ContactRemoved(pb::ContactRemoved { user_id })
                }
            };
            Ok(pb::PresenceEvent { event: Some(event) })
        }))))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        convert::id(&request.user_id, "user_id", &self.node.config.limits)?;
        let to_ms = if request.to_unix_ms == 0 {
            crate::node::now_ms()
        } else {
            request.to_unix_ms
        };
        if request.from_unix_ms < 0 || to_ms < request.from_unix_ms {
            return Err(
                ApiError::InvalidArgument("the time window is empty or negative".into()).into(),
            );
        }
        let limit = match request.page_size as usize {
            0 => DEFAULT_HISTORY_PAGE,
            n if n > MAX_HISTORY_PAGE => {
                return Err(ApiError::InvalidArgument(format!(
                    "page_size may be at most {MAX_HISTORY_PAGE}"
                ))
                .into());
            }
            n => n,
        };
        let after_version = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse::<u64>().map_err(|_| {
                ApiError::InvalidArgument("page_token is not one this server issued".into())
            })?
        };
        // One more than asked tells whether another page follows.
        let (mut records, viewer) = self
            .node
            .history(
                &caller,
                &request.user_id,
                request.from_unix_ms,
                to_ms,
                after_version,
                limit + 1,
            )
            .await?;
        let next_page_token = if records.len() > limit {
            records.truncate(limit);
            records
                .last()
                .map(|r| r.version.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::GetHistoryResponse {
            entries: records
                .into_iter()
                .map(|r| convert::history_entry(history_view(r, viewer)))
                .collect(),
            next_page_token,
        }))
    }
}

/// What a client is told when the server ends its heartbeat stream. A
/// logout is final (the SDK does not reopen); a replaced or expired session
/// is reopened by a client that is still there.
fn stream_ended(why: StreamEnd) -> ApiError {
    match why {
        StreamEnd::Replaced => {
            ApiError::Aborted("a newer connection of this device took the session over".into())
        }
        StreamEnd::Expired => {
            ApiError::Aborted("no heartbeat within the lease, the session ended".into())
        }
        StreamEnd::LoggedOut => ApiError::FailedPrecondition("the device logged out".into()),
    }
}

/// Ends the session after the grace period when its stream goes away without
/// Disconnect, however the stream ends.
struct Lingers {
    node: Arc<Node>,
    key: crate::leases::SessionKey,
    conn_id: u64,
}

impl Drop for Lingers {
    fn drop(&mut self) {
        self.node.connection_closed(&self.key, self.conn_id);
    }
}

#[tonic::async_trait]
impl ContactsService for Api {
    async fn add_contacts(
        &self,
        request: Request<pb::AddContactsRequest>,
    ) -> Result<Response<pb::AddContactsResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        self.check_contacts_change(&caller, &request.user_id, &request.contact_ids)?;
        let added = self
            .node
            .add_contacts(&request.user_id, &request.contact_ids)
            .await?;
        Ok(Response::new(pb::AddContactsResponse { added }))
    }

    async fn remove_contacts(
        &self,
        request: Request<pb::RemoveContactsRequest>,
    ) -> Result<Response<pb::RemoveContactsResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        self.check_contacts_change(&caller, &request.user_id, &request.contact_ids)?;
        let removed = self
            .node
            .remove_contacts(&request.user_id, &request.contact_ids)
            .await?;
        Ok(Response::new(pb::RemoveContactsResponse { removed }))
    }

    async fn list_contacts(
        &self,
        request: Request<pb::ListContactsRequest>,
    ) -> Result<Response<pb::ListContactsResponse>, Status> {
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let user_id = if request.user_id.is_empty() {
            caller.user_id.clone()
        } else {
            request.user_id
        };
        convert::id(&user_id, "user_id", &self.node.config.limits)?;
        self.check_acts_for(&caller, &user_id)?;
        let mut contacts = self.node.list_contacts(&user_id).await?;
        contacts.sort_unstable();
        let limits = &self.node.config.limits;
        // A page never exceeds the message limit, whatever the ids' length:
        // each id costs at most its bytes plus 3 of framing.
        let fits =
            (limits.max_message_bytes.saturating_sub(256) / (limits.max_id_bytes + 3)).max(1);
        let page_size = match request.page_size as usize {
            0 => fits,
            asked => asked.min(fits),
        };
        // The token is the last id of the previous page: the list is sorted,
        // so the next page starts after it even if contacts changed between.
        let start = if request.page_token.is_empty() {
            0
        } else {
            contacts.partition_point(|id| *id <= request.page_token)
        };
        let end = (start + page_size).min(contacts.len());
        let contact_ids = contacts[start..end].to_vec();
        let next_page_token = match contact_ids.last() {
            Some(last) if end < contacts.len() => last.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListContactsResponse {
            contact_ids,
            next_page_token,
        }))
    }
}
