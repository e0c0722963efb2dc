//! A scripted stand-in for the presence server, for testing the SDK's
//! client-side promises (reconnects, go-away, resume filtering) where the
//! real server cannot easily be made to misbehave on cue. It speaks the real
//! generated API over real gRPC on 127.0.0.1:0.
//!
//! Each test file uses a different part of it.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use presence_sdk::proto::contacts_service_server::{ContactsService, ContactsServiceServer};
use presence_sdk::proto::presence_service_server::{PresenceService, PresenceServiceServer};
use presence_sdk::proto::*;
use presence_sdk::{ClientConfig, PresenceClient};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// What the fake saw, for assertions.
#[derive(Debug, Default)]
pub struct Log {
    pub authorization: Vec<String>,
    pub opens: Vec<SessionOpen>,
    pub beats: Vec<SessionBeat>,
    pub heartbeat_streams_ended: usize,
    pub disconnects: Vec<String>,
    pub set_status: Vec<SetStatusRequest>,
    pub touches: Vec<TouchRequest>,
    pub presence_batches: Vec<Vec<String>>,
    pub watch_requests: Vec<WatchContactsRequest>,
    pub history_requests: Vec<GetHistoryRequest>,
}

#[derive(Debug, Clone)]
enum Control {
    /// Fail every open stream with UNAVAILABLE, as a crashing node would.
    Kill,
    /// Send a go-away on every heartbeat stream.
    GoAway { reconnect_after_ms: u32 },
}

#[derive(Clone)]
struct Shared {
    log: Arc<Mutex<Log>>,
    presences: Arc<Mutex<HashMap<String, Presence>>>,
    contacts: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
    control: broadcast::Sender<Control>,
    changes: broadcast::Sender<Presence>,
    heartbeat_interval_ms: u32,
    lease_ms: u32,
}

pub struct FakeServer {
    pub url: String,
    shared: Shared,
    _shutdown: oneshot::Sender<()>,
}

impl FakeServer {
    /// A fake telling clients to beat every `heartbeat_interval_ms`.
    pub async fn start(heartbeat_interval_ms: u32) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let shared = Shared {
            log: Arc::default(),
            presences: Arc::default(),
            contacts: Arc::default(),
            control: broadcast::channel(16).0,
            changes: broadcast::channel(64).0,
            heartbeat_interval_ms,
            lease_ms: heartbeat_interval_ms * 3,
        };
        let log = shared.log.clone();
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            log.lock().unwrap().authorization.push(header.clone());
            if header == "Bearer bad" {
                return Err(Status::unauthenticated("invalid token"));
            }
            Ok(request)
        };
        let (shutdown, stop) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(PresenceServiceServer::with_interceptor(
                shared.clone(),
                check.clone(),
            ))
            .add_service(ContactsServiceServer::with_interceptor(
                shared.clone(),
                check,
            ));
        tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop.await;
                })
                .await;
        });
        Self {
            url: format!("http://{addr}"),
            shared,
            _shutdown: shutdown,
        }
    }

    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.shared.log()
    }

    /// A client of this fake with the default configuration.
    pub async fn client(&self) -> PresenceClient {
        PresenceClient::connect(ClientConfig::with_endpoint(&self.url))
            .await
            .unwrap()
    }

    /// Fails every open stream, as if the node crashed.
    pub fn kill_streams(&self) {
        let _ = self.shared.control.send(Control::Kill);
    }

    /// Sends a go-away to every open heartbeat stream.
    pub fn go_away(&self, reconnect_after_ms: u32) {
        let _ = self
            .shared
            .control
            .send(Control::GoAway { reconnect_after_ms });
    }

    /// Sets a user's presence; open watches see it.
    pub fn publish(&self, user_id: &str, status: VisibleStatus, version: u64) {
        let presence = Presence {
            user_id: user_id.into(),
            status: status as i32,
            version,
            ..Presence::default()
        };
        self.shared
            .presences
            .lock()
            .unwrap()
            .insert(user_id.into(), presence.clone());
        let _ = self.shared.changes.send(presence);
    }
}

/// Polls `condition` until it holds, failing the test after 5 s.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `future`, failing the test after 5 s.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

impl Shared {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }

    /// Applies `change` to both ends of each link between `user_id` and
    /// `contact_ids`; counts the links it changed on the side of `user_id`.
    fn change_links(
        &self,
        user_id: &str,
        contact_ids: Vec<String>,
        change: fn(&mut BTreeSet<String>, &str) -> bool,
    ) -> u32 {
        let mut contacts = self.contacts.lock().unwrap();
        let mut changed = 0;
        for id in contact_ids {
            if change(contacts.entry(user_id.to_owned()).or_default(), &id) {
                changed += 1;
            }
            change(contacts.entry(id).or_default(), user_id);
        }
        changed
    }
}

#[tonic::async_trait]
impl PresenceService for Shared {
    type HeartbeatStream = Stream<HeartbeatResponse>;
    type WatchContactsStream = Stream<PresenceEvent>;

    async fn heartbeat(
        &self,
        request: Request<tonic::Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(HeartbeatRequest {
                request: Some(heartbeat_request::Request::Open(open)),
            }) => open,
            _ => return Err(Status::invalid_argument("first message must be open")),
        };
        self.log().opens.push(open);
        let (tx, rx) = mpsc::channel(16);
        let opened = SessionOpened {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            lease_ms: self.lease_ms,
            presence: None,
        };
        let _ = tx
            .send(Ok(HeartbeatResponse {
                response: Some(heartbeat_response::Response::Opened(opened)),
            }))
            .await;
        let log = self.log.clone();
        let mut control = self.control.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(HeartbeatRequest { request: Some(heartbeat_request::Request::Beat(beat)) })) => {
                            let seq = beat.seq;
                            log.lock().unwrap().beats.push(beat);
                            let ack = HeartbeatResponse { response: Some(heartbeat_response::Response::Ack(HeartbeatAck { seq })) };
                            if tx.send(Ok(ack)).await.is_err() {
                                break;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                    control = control.recv() => match control {
                        Ok(Control::Kill) | Err(_) => {
                            let _ = tx.send(Err(Status::unavailable("node lost"))).await;
                            break;
                        }
                        Ok(Control::GoAway { reconnect_after_ms }) => {
                            let go_away = GoAway { reconnect_after_ms, reason: "draining".into() };
                            let _ = tx.send(Ok(HeartbeatResponse { response: Some(heartbeat_response::Response::GoAway(go_away)) })).await;
                        }
                    },
                }
            }
            log.lock().unwrap().heartbeat_streams_ended += 1;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn touch(
        &self,
        request: Request<TouchRequest>,
    ) -> Result<Response<TouchResponse>, Status> {
        self.log().touches.push(request.into_inner());
        Ok(Response::new(TouchResponse {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            lease_ms: self.lease_ms,
        }))
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        self.log().disconnects.push(request.into_inner().device_id);
        Ok(Response::new(DisconnectResponse {}))
    }

    async fn set_status(
        &self,
        request: Request<SetStatusRequest>,
    ) -> Result<Response<SetStatusResponse>, Status> {
        let request = request.into_inner();
        if request.custom_message.len() > 256 {
            return Err(Status::invalid_argument("custom message too long"));
        }
        let presence = Presence {
            user_id: "me".into(),
            status: VisibleStatus::Busy as i32,
            custom_message: request.custom_message.clone(),
            chosen_status: request.status,
            version: 1,
            ..Presence::default()
        };
        self.log().set_status.push(request);
        Ok(Response::new(SetStatusResponse {
            presence: Some(presence),
        }))
    }

    async fn get_presence(
        &self,
        request: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceResponse>, Status> {
        let ids = request.into_inner().user_ids;
        self.log().presence_batches.push(ids.clone());
        let known = self.presences.lock().unwrap();
        let presences = ids
            .into_iter()
            .map(|id| {
                known.get(&id).cloned().unwrap_or(Presence {
                    user_id: id,
                    status: VisibleStatus::Offline as i32,
                    ..Presence::default()
                })
            })
            .collect();
        Ok(Response::new(GetPresenceResponse { presences }))
    }

    async fn watch_contacts(
        &self,
        request: Request<WatchContactsRequest>,
    ) -> Result<Response<Self::WatchContactsStream>, Status> {
        let request = request.into_inner();
        self.log().watch_requests.push(request.clone());
        // Deliberately ignores `known_versions` and replays everything: the
        // worst a server may do, which the SDK must filter.
        let mut snapshot: Vec<Presence> =
            self.presences.lock().unwrap().values().cloned().collect();
        snapshot.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        if !request.user_ids.is_empty() {
            snapshot.retain(|p| request.user_ids.contains(&p.user_id));
        }
        let (tx, rx) = mpsc::channel(64);
        let watched = snapshot.len() as u32;
        for presence in snapshot {
            let _ = tx
                .send(Ok(PresenceEvent {
                    event: Some(presence_event::Event::Presence(presence)),
                }))
                .await;
        }
        let complete = SnapshotComplete { watched };
        let _ = tx
            .send(Ok(PresenceEvent {
                event: Some(presence_event::Event::SnapshotComplete(complete)),
            }))
            .await;
        let mut changes = self.changes.subscribe();
        let mut control = self.control.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(presence) => {
                            let event = PresenceEvent { event: Some(presence_event::Event::Presence(presence)) };
                            if tx.send(Ok(event)).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    },
                    control = control.recv() => match control {
                        Ok(Control::Kill) | Err(_) => {
                            let _ = tx.send(Err(Status::unavailable("node lost"))).await;
                            break;
                        }
                        Ok(Control::GoAway { .. }) => {}
                    },
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// Seven entries, served three per page.
    async fn get_history(
        &self,
        request: Request<GetHistoryRequest>,
    ) -> Result<Response<GetHistoryResponse>, Status> {
        let request = request.into_inner();
        self.log().history_requests.push(request.clone());
        let start: u64 = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page token"))?
        };
        let end = (start + 3).min(7);
        let entries = (start..end)
            .map(|version| HistoryEntry {
                at_unix_ms: 1_700_000_000_000 + version as i64,
                status: VisibleStatus::Online as i32,
                version,
                ..HistoryEntry::default()
            })
            .collect();
        let next_page_token = if end < 7 {
            end.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(GetHistoryResponse {
            entries,
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl ContactsService for Shared {
    async fn add_contacts(
        &self,
        request: Request<AddContactsRequest>,
    ) -> Result<Response<AddContactsResponse>, Status> {
        let request = request.into_inner();
        let added = self.change_links(&request.user_id, request.contact_ids, |links, id| {
            links.insert(id.to_owned())
        });
        Ok(Response::new(AddContactsResponse { added }))
    }

    async fn remove_contacts(
        &self,
        request: Request<RemoveContactsRequest>,
    ) -> Result<Response<RemoveContactsResponse>, Status> {
        let request = request.into_inner();
        let removed = self.change_links(&request.user_id, request.contact_ids, |links, id| {
            links.remove(id)
        });
        Ok(Response::new(RemoveContactsResponse { removed }))
    }

    async fn list_contacts(
        &self,
        request: Request<ListContactsRequest>,
    ) -> Result<Response<ListContactsResponse>, Status> {
        let user_id = request.into_inner().user_id;
        let contacts = self.contacts.lock().unwrap();
        let contact_ids = contacts
            .get(&user_id)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default();
        Ok(Response::new(ListContactsResponse {
            contact_ids,
            next_page_token: String::new(),
        }))
    }
}
