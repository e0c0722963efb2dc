//! A real server for tests: `presence_server::run` on 127.0.0.1:0 with short
//! timers, plus tokens and raw gRPC clients. Every test binary includes this
//! module; not every binary uses every helper.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use presence_proto::v1::contacts_service_client::ContactsServiceClient;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
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
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut args: Vec<String> = vec![
            "presence-server".into(),
            "--dev".into(),
            "--lease".into(),
            ms(LEASE),
            "--grace".into(),
            ms(GRACE),
            "--sweep-interval".into(),
            ms(SWEEP),
            "--heartbeat-interval".into(),
            ms(HEARTBEAT),
        ];
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
    let request = presence_proto::v1::AddContactsRequest {
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

/// An SDK client for `user` on `device`.
pub async fn client(server: &TestServer, user: &str, device: &str) -> presence_sdk::PresenceClient {
    presence_sdk::PresenceClient::connect(presence_sdk::ClientConfig {
        endpoints: vec![server.url()],
        token: Some(token(user)),
        device_id: device.to_owned(),
        platform: presence_sdk::Platform::Desktop,
        ..presence_sdk::ClientConfig::default()
    })
    .await
    .unwrap()
}

/// Reads `updates` until a presence of `user` matches `wanted`, at most
/// `within`; returns it with how long it took. Panics on timeout.
pub async fn wait_for<S>(
    updates: &mut S,
    user: &str,
    within: Duration,
    wanted: impl Fn(&presence_sdk::Presence) -> bool,
) -> (presence_sdk::Presence, Duration)
where
    S: futures::Stream<Item = Result<presence_sdk::PresenceUpdate, presence_sdk::Error>> + Unpin,
{
    use futures::StreamExt;
    let started = std::time::Instant::now();
    let found = tokio::time::timeout(within, async {
        while let Some(update) = updates.next().await {
            if let presence_sdk::PresenceUpdate::Presence(p) = update.unwrap()
                && p.user_id == user
                && wanted(&p)
            {
                return p;
            }
        }
        panic!("the watch ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no matching presence of {user} within {within:?}"));
    (found, started.elapsed())
}

/// Asserts that no presence of `user` arrives for `quiet`.
pub async fn assert_quiet<S>(updates: &mut S, user: &str, quiet: Duration)
where
    S: futures::Stream<Item = Result<presence_sdk::PresenceUpdate, presence_sdk::Error>> + Unpin,
{
    use futures::StreamExt;
    let _ = tokio::time::timeout(quiet, async {
        while let Some(update) = updates.next().await {
            if let presence_sdk::PresenceUpdate::Presence(p) = update.unwrap() {
                assert_ne!(p.user_id, user, "unexpected presence of {user}: {p:?}");
            }
        }
    })
    .await;
}

/// Reads `updates` through the end of the snapshot; returns its presences.
pub async fn snapshot<S>(updates: &mut S) -> Vec<presence_sdk::Presence>
where
    S: futures::Stream<Item = Result<presence_sdk::PresenceUpdate, presence_sdk::Error>> + Unpin,
{
    use futures::StreamExt;
    let mut seen = Vec::new();
    while let Some(update) = tokio::time::timeout(VISIBLE_WITHIN, updates.next())
        .await
        .expect("the snapshot arrives")
    {
        match update.unwrap() {
            presence_sdk::PresenceUpdate::Presence(p) => seen.push(p),
            presence_sdk::PresenceUpdate::SnapshotComplete { .. } => return seen,
            other => panic!("unexpected {other:?} during the snapshot"),
        }
    }
    panic!("the watch ended during the snapshot")
}
