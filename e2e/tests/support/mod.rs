//! A real server for tests: `presence_server::run` on 127.0.0.1:0 with short
//! timers, plus tokens, SDK and raw gRPC clients, and watches. Every test
//! binary includes this module; not every binary uses every helper.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use presence_proto::v1::change_feed_client::ChangeFeedClient;
use presence_proto::v1::contacts_service_client::ContactsServiceClient;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use presence_proto::v1::{self as pb, presence_event};
// Not every test binary uses every one.
#[allow(unused_imports)]
pub use presence_e2e::beating::{StreamEnd, beat_until_end, session_beat, session_open};
use presence_sdk::{
    Presence, PresenceClient, PresenceStream, PresenceUpdate, SessionState, VisibleStatus,
};
use presence_server::config::{Cli, DEV_JWT_SECRET};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Short timers so that lease, grace and sweep behaviour shows in seconds.
pub const LEASE: Duration = Duration::from_millis(1500);
pub const GRACE: Duration = Duration::from_millis(400);
pub const SWEEP: Duration = Duration::from_millis(100);
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// FR4: every change is visible to watchers within this.
pub const VISIBLE_WITHIN: Duration = Duration::from_secs(2);
/// A change reaches the history (written from the change log by the
/// history projection) within this: a few milliseconds normally, and up to
/// a member's expiry (3 s), a renewal (1 s) and a read (1 s) after the node
/// whose member owned the partition died, or on a store a previous test's
/// nodes still count as members of.
pub const PROJECTED_WITHIN: Duration = Duration::from_secs(10);

/// Server flags that lift the per-user change budget, for tests that make
/// far more changes than one user may by default.
pub const UNLIMITED_CHANGES: &[&str] = &[
    "--max-user-changes-per-second",
    "1000000",
    "--max-user-changes-per-hour",
    "1000000000",
];

/// `d` as a duration flag's value.
pub fn duration_flag(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The test timers as server flags.
pub fn timer_flags() -> Vec<String> {
    vec![
        "--lease".into(),
        duration_flag(LEASE),
        "--grace".into(),
        duration_flag(GRACE),
        "--sweep-interval".into(),
        duration_flag(SWEEP),
        "--heartbeat-interval".into(),
        duration_flag(HEARTBEAT),
    ]
}

pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(&[]).await
    }

    /// Starts a server with the test timers and `extra` flags.
    pub async fn start_with(extra: &[&str]) -> TestServer {
        let mut args: Vec<String> = vec!["presence-server".into(), "--dev".into()];
        args.extend(timer_flags());
        args.extend(extra.iter().map(|a| a.to_string()));
        let config = Cli::parse_from(args).config;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(presence_server::run(config, listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drains the server as SIGTERM would and waits until it has exited.
    pub async fn stop(mut self) {
        self.drain();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Starts draining without waiting for the exit.
    pub fn drain(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn presence(&self) -> PresenceServiceClient<Channel> {
        PresenceServiceClient::connect(self.url()).await.unwrap()
    }

    pub async fn contacts(&self) -> ContactsServiceClient<Channel> {
        ContactsServiceClient::connect(self.url()).await.unwrap()
    }

    pub async fn feed(&self) -> ChangeFeedClient<Channel> {
        ChangeFeedClient::connect(self.url()).await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn token(user: &str) -> String {
    presence_server::auth::mint(DEV_JWT_SECRET, user, false, Duration::from_secs(3600))
}

pub fn admin_token() -> String {
    presence_server::auth::mint(DEV_JWT_SECRET, "ops", true, Duration::from_secs(3600))
}

/// A request carrying `token` as its bearer token.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A fresh user id, so tests never see each other's users.
pub fn user(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

/// Links `user` with `contacts` through the admin API.
pub async fn befriend(server: &TestServer, user: &str, contacts: &[&str]) {
    let request = pb::AddContactsRequest {
        user_id: user.to_owned(),
        contact_ids: contacts.iter().map(|c| c.to_string()).collect(),
    };
    server
        .contacts()
        .await
        .add_contacts(authed(request, &admin_token()))
        .await
        .unwrap();
}

/// Unlinks `user` from `contacts` through the admin API.
pub async fn unfriend(server: &TestServer, user: &str, contacts: &[&str]) {
    let request = pb::RemoveContactsRequest {
        user_id: user.to_owned(),
        contact_ids: contacts.iter().map(|c| c.to_string()).collect(),
    };
    server
        .contacts()
        .await
        .remove_contacts(authed(request, &admin_token()))
        .await
        .unwrap();
}

/// An SDK client for `user` on `device`.
pub async fn client(server: &TestServer, user: &str, device: &str) -> PresenceClient {
    PresenceClient::connect(presence_sdk::ClientConfig {
        endpoints: vec![server.url()],
        token: Some(token(user)),
        device_id: device.to_owned(),
        platform: presence_sdk::Platform::Desktop,
        ..presence_sdk::ClientConfig::default()
    })
    .await
    .unwrap()
}

/// A watch through the SDK, read past its snapshot, and what it says about
/// one contact.
pub struct ContactWatch {
    pub updates: PresenceStream,
    pub contact: String,
    /// The presences the snapshot held.
    pub snapshot: Vec<Presence>,
}

impl ContactWatch {
    /// Opens `watcher`'s watch of its contacts and reads its snapshot.
    pub async fn open(watcher: &PresenceClient, contact: &str) -> ContactWatch {
        let mut updates = watcher.watch_contacts();
        let mut snapshot = Vec::new();
        loop {
            let update = tokio::time::timeout(VISIBLE_WITHIN, updates.next())
                .await
                .expect("the snapshot arrives")
                .expect("the watch ended during the snapshot");
            match update.unwrap() {
                PresenceUpdate::Presence(p) => snapshot.push(p),
                PresenceUpdate::SnapshotComplete { .. } => break,
                other => panic!("unexpected {other:?} during the snapshot"),
            }
        }
        ContactWatch {
            updates,
            contact: contact.to_owned(),
            snapshot,
        }
    }

    /// Waits for a presence of the contact showing `status`, at most
    /// [`VISIBLE_WITHIN`].
    pub async fn sees(&mut self, status: VisibleStatus) -> Presence {
        self.sees_within(status, VISIBLE_WITHIN).await
    }

    /// Waits for a presence of the contact showing `status`, at most `within`.
    pub async fn sees_within(&mut self, status: VisibleStatus, within: Duration) -> Presence {
        let contact = &self.contact;
        let updates = &mut self.updates;
        tokio::time::timeout(within, async {
            while let Some(update) = updates.next().await {
                if let PresenceUpdate::Presence(p) = update.unwrap()
                    && p.user_id == *contact
                    && p.status() == status
                {
                    return p;
                }
            }
            panic!("the watch ended");
        })
        .await
        .unwrap_or_else(|_| panic!("no {status:?} presence of {contact} within {within:?}"))
    }

    /// Asserts that no presence of the contact arrives for `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        let contact = &self.contact;
        let updates = &mut self.updates;
        let _ = tokio::time::timeout(quiet, async {
            while let Some(update) = updates.next().await {
                if let PresenceUpdate::Presence(p) = update.unwrap() {
                    assert_ne!(
                        p.user_id, *contact,
                        "unexpected presence of {contact}: {p:?}"
                    );
                }
            }
        })
        .await;
    }
}

/// A fresh server on which alice watches her one contact, bob.
pub struct AliceWatchesBob {
    pub server: TestServer,
    pub bob: String,
    /// Alice's client, whose watch `watch` is.
    pub watcher: PresenceClient,
    pub watch: ContactWatch,
}

impl AliceWatchesBob {
    pub async fn start() -> AliceWatchesBob {
        let server = TestServer::start().await;
        let (alice, bob) = (user("alice"), user("bob"));
        befriend(&server, &alice, &[&bob]).await;
        let watcher = client(&server, &alice, "alice-laptop").await;
        let watch = ContactWatch::open(&watcher, &bob).await;
        AliceWatchesBob {
            server,
            bob,
            watcher,
            watch,
        }
    }
}

/// A raw heartbeat stream that opens a session and then does only what the
/// test says: the way to play a client that vanishes, drops its stream or
/// cannot move to another node (the SDK would reconnect).
pub struct RawSession {
    pub outbound: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>,
    pub inbound: tonic::Streaming<pb::HeartbeatResponse>,
}

impl RawSession {
    /// Opens a session of `user` on `device` through `presence`'s connection.
    pub async fn open(
        presence: PresenceServiceClient<Channel>,
        user: &str,
        device: &str,
    ) -> RawSession {
        Self::open_with_token(presence, &token(user), device).await
    }

    /// Opens a session on `device` for whoever `token` names.
    pub async fn open_with_token(
        mut presence: PresenceServiceClient<Channel>,
        token: &str,
        device: &str,
    ) -> RawSession {
        let (outbound, rx) = tokio::sync::mpsc::channel(8);
        outbound.send(session_open(device)).await.unwrap();
        let request = authed(tokio_stream::wrappers::ReceiverStream::new(rx), token);
        let mut inbound = presence.heartbeat(request).await.unwrap().into_inner();
        let opened = inbound.message().await.unwrap().unwrap();
        assert!(matches!(
            opened.response,
            Some(pb::heartbeat_response::Response::Opened(_))
        ));
        RawSession { outbound, inbound }
    }
}

/// A raw heartbeat stream that opens a session on the node at `url` and
/// beats on time until that node goes away: a device that cannot move
/// (unlike the SDK).
pub struct BeatingSession {
    task: JoinHandle<StreamEnd>,
}

impl BeatingSession {
    pub async fn open(url: String, user: &str, device: &str) -> BeatingSession {
        let stub = PresenceServiceClient::connect(url).await.unwrap();
        let RawSession { outbound, inbound } = RawSession::open(stub, user, device).await;
        BeatingSession {
            task: tokio::spawn(beat_until_end(outbound, inbound, HEARTBEAT)),
        }
    }
}

impl Drop for BeatingSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `user`'s raw WatchContacts stream on `presence`'s connection, read past
/// its snapshot: unlike the SDK's, it shows whether the server ended it.
pub async fn raw_watch(
    mut presence: PresenceServiceClient<Channel>,
    user: &str,
) -> tonic::Streaming<pb::PresenceEvent> {
    let request = authed(pb::WatchContactsRequest::default(), &token(user));
    let mut stream = presence
        .watch_contacts(request)
        .await
        .expect("watch opens")
        .into_inner();
    loop {
        let event = tokio::time::timeout(VISIBLE_WITHIN, stream.message())
            .await
            .expect("the snapshot arrives")
            .expect("the watch delivers its snapshot")
            .expect("the watch stays open during the snapshot");
        match event.event {
            Some(presence_event::Event::SnapshotComplete(_)) => return stream,
            Some(presence_event::Event::Presence(_)) => {}
            other => panic!("unexpected {other:?} in the snapshot"),
        }
    }
}

/// Every state other than connected that an SDK session passes through from
/// now on.
#[derive(Clone, Default)]
pub struct Interruptions(Arc<parking_lot::Mutex<Vec<String>>>);

impl Interruptions {
    pub fn watch(device: &PresenceClient) -> Interruptions {
        let interruptions = Interruptions::default();
        let seen = interruptions.clone();
        let mut state = device.session_state();
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                let now = state.borrow_and_update().clone();
                if !matches!(now, SessionState::Connected { .. }) {
                    seen.0.lock().push(format!("{now:?}"));
                }
            }
        });
        interruptions
    }

    pub fn seen(&self) -> Vec<String> {
        self.0.lock().clone()
    }

    pub fn assert_none(&self, what: &str) {
        let seen = self.seen();
        assert!(seen.is_empty(), "{what} was interrupted: {seen:?}");
    }
}

/// A gRPC frame holding `message`, for tests that speak gRPC below tonic.
pub fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    bytes::Bytes::from(frame)
}
