//! Degraded modes, with the real services stopped mid-test and started again:
//! a server on Redis Cluster (hot state, fan-out, contacts cache) and a CQL
//! store (contacts, history) keeps its promises while either one is down.
//!
//! Needs `PRESENCE_TEST_REDIS_CLUSTER` and `PRESENCE_TEST_SCYLLA_NODES`;
//! without them every test prints a note and passes, unless
//! `PRESENCE_REQUIRE_BACKENDS=1`. The services are stopped and started
//! through `e2e/scripts/redis-cluster.sh` (told the cluster's base port; it
//! honours `REDIS_CLUSTER_DIR`) and `e2e/scripts/cassandra.sh` (told the
//! contact point's port; it honours `CASSANDRA_HOME`). The tests run one at a
//! time, and each restores the service it stopped however it ends, so a
//! failing test never leaves a service down for the next test binary.
//!
//! The server runs in-process (`presence_server::run`, as `support` does):
//! these tests need no second process, and a panic shows the server's state.
//! `RUST_LOG=presence_server=info` prints its logs.

#[path = "support/nodes.rs"]
mod nodes;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_proto::v1::{self as pb, presence_event};
use presence_sdk::{PresenceClient, SessionOptions};
use presence_server::domain::{HistoryRecord, UserRecord, VisibleStatus};
use presence_server::store::redis::keys;
use presence_server::store::{HistoryStore, cached, scylla};
use support::{
    Interruptions, PROJECTED_WITHIN, TestServer, VISIBLE_WITHIN, authed, befriend, client,
    raw_watch, token, user,
};

/// The keyspace these tests use in the CQL store.
const KEYSPACE: &str = "presence_e2e_degraded";

/// The node lease of the servers under test: short, so that a Redis that
/// came back is noticed (and the queued changes replayed) within half a
/// second.
const NODE_LEASE: Duration = nodes::NODE_LEASE;

/// How soon the hot state must be right again once Redis answers.
const CONVERGED_WITHIN: Duration = Duration::from_secs(10);

/// How soon every history row must be in the CQL store once it is back.
const FLUSHED_WITHIN: Duration = Duration::from_secs(60);

/// How long the CQL store stays down in the history outage test.
const SCYLLA_DOWN_FOR: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- services

/// The two services under test.
struct Services {
    redis: nodes::RedisCluster,
    scylla: Vec<String>,
}

impl Services {
    /// Both services from the environment, or `None` with a note.
    fn from_env() -> Option<Services> {
        let scylla = nodes::backend_from_env("PRESENCE_TEST_SCYLLA_NODES", "cassandra.sh")?;
        let redis = nodes::redis_cluster()?;
        Some(Services { redis, scylla })
    }

    /// A server on both services.
    async fn start_server(&self) -> TestServer {
        let (seeds, scylla) = (self.redis.seeds(), self.scylla.join(","));
        let node_lease = support::duration_flag(NODE_LEASE);
        TestServer::start_with(&[
            "--redis-cluster",
            &seeds,
            "--scylla",
            &scylla,
            "--scylla-keyspace",
            KEYSPACE,
            "--node-lease",
            &node_lease,
        ])
        .await
    }

    /// `redis-cluster.sh ARGS` for this cluster.
    fn redis_script(&self, args: &[&str]) -> Result<String, String> {
        self.redis.try_script(args)
    }

    /// `cassandra.sh ARGS` for this CQL node.
    fn cassandra_script(&self, args: &[&str]) -> Result<String, String> {
        let port = self.scylla[0]
            .rsplit_once(':')
            .map_or("9042", |(_, port)| port)
            .to_owned();
        nodes::run_script("cassandra.sh", args, &[("CASSANDRA_PORT", port)])
    }

    /// Both services up; a test before this one (or an earlier run that was
    /// killed) may have left one down.
    fn ensure_up(&self) {
        self.redis_script(&["start"]).expect("redis cluster up");
        self.redis_script(&["wait", "30"])
            .expect("redis cluster healthy");
        self.cassandra_script(&["start"]).expect("cassandra up");
    }

    /// `redis-cli -c` against the first node: follows the cluster's redirects.
    fn redis_cli(&self, args: &[&str]) -> Option<String> {
        self.redis
            .cli(self.redis.base_port, &[&["-c"], args].concat())
    }

    /// The user's record as the Redis hot store holds it.
    fn hot_record(&self, user_id: &str) -> Option<UserRecord> {
        let json = self.redis_cli(&["HGET", &keys::Keys::new(16).user(user_id), "d"])?;
        serde_json::from_str(&json).ok()
    }

    /// The CQL store itself, without any node's buffer in front.
    async fn durable_history(&self) -> Arc<dyn HistoryStore> {
        scylla::connect(&self.scylla, KEYSPACE, Duration::from_secs(24 * 3600))
            .await
            .expect("connecting to the CQL store")
            .history
    }
}

/// A service stopped by the test. Dropping it starts the service again if
/// the test did not (it failed half-way), so the next test finds it up.
struct Outage<'a> {
    services: &'a Services,
    service: Service,
    restored: bool,
}

#[derive(Clone, Copy, Debug)]
enum Service {
    Redis,
    Cassandra,
}

impl<'a> Outage<'a> {
    fn begin(services: &'a Services, service: Service) -> Outage<'a> {
        let outage = Outage {
            services,
            service,
            restored: false,
        };
        let stopped = match service {
            Service::Redis => services.redis_script(&["stop"]),
            // `stop` keeps the data: the node went down and comes back.
            Service::Cassandra => services.cassandra_script(&["stop"]),
        };
        stopped.unwrap_or_else(|error| panic!("stopping {service:?}: {error}"));
        outage
    }

    /// Starts the service again and waits until it serves.
    fn end(mut self) {
        self.restored = true;
        self.start()
            .unwrap_or_else(|error| panic!("starting {:?} again: {error}", self.service));
    }

    fn start(&self) -> Result<(), String> {
        match self.service {
            // The cluster comes back empty, with the same ports.
            Service::Redis => {
                self.services.redis_script(&["start"])?;
                self.services.redis_script(&["wait", "30"]).map(drop)
            }
            Service::Cassandra => self.services.cassandra_script(&["start"]).map(drop),
        }
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        if !self.restored
            && let Err(error) = self.start()
        {
            eprintln!(
                "could not restore {:?} after the test: {error}",
                self.service
            );
        }
    }
}

/// The services, up, with the test holding them; `None` if not configured.
async fn setup() -> Option<(Services, tokio::sync::MutexGuard<'static, ()>)> {
    let services = Services::from_env()?;
    let guard = nodes::serial().await;
    if std::env::var_os("RUST_LOG").is_some() {
        static LOGS: std::sync::Once = std::sync::Once::new();
        LOGS.call_once(|| {
            // Kept for the life of the test binary.
            std::mem::forget(presence_server::telemetry::init(
                presence_server::config::LogFormat::Text,
            ));
        });
    }
    services.ensure_up();
    Some((services, guard))
}

// ---------------------------------------------------------------- clients

/// A raw WatchContacts stream: unlike the SDK's, which resumes by itself, it
/// shows whether the server ever ended it.
struct Watch {
    stream: tonic::Streaming<pb::PresenceEvent>,
}

impl Watch {
    async fn open(server: &TestServer, user_id: &str) -> Watch {
        let stream = raw_watch(server.presence().await, user_id).await;
        Watch { stream }
    }

    async fn next(&mut self, within: Duration) -> presence_event::Event {
        let message = tokio::time::timeout(within, self.stream.message())
            .await
            .unwrap_or_else(|_| panic!("no watch event within {within:?}"));
        match message {
            Ok(Some(pb::PresenceEvent { event: Some(event) })) => event,
            Ok(Some(_)) => panic!("an empty watch event"),
            Ok(None) => panic!("the server ended the watch"),
            Err(status) => panic!("the watch failed: {status}"),
        }
    }

    /// Waits for a presence of `user_id` with `status`.
    async fn wait_for(&mut self, user_id: &str, status: pb::VisibleStatus) -> pb::Presence {
        let deadline = Instant::now() + VISIBLE_WITHIN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let presence_event::Event::Presence(p) = self.next(left).await
                && p.user_id == user_id
                && p.status() == status
            {
                return p;
            }
        }
    }
}

async fn get_presence(server: &TestServer, viewer: &str, user_id: &str) -> pb::Presence {
    let request = authed(
        pb::GetPresenceRequest {
            user_ids: vec![user_id.to_owned()],
        },
        &token(viewer),
    );
    let mut presences = server
        .presence()
        .await
        .get_presence(request)
        .await
        .unwrap_or_else(|status| panic!("GetPresence failed: {status}"))
        .into_inner()
        .presences;
    assert_eq!(presences.len(), 1);
    presences.remove(0)
}

/// What `viewer` sees of `user_id`, which must be offline.
async fn seen_offline(server: &TestServer, viewer: &str, user_id: &str) -> pb::Presence {
    let seen = get_presence(server, viewer, user_id).await;
    assert_eq!(seen.status(), pb::VisibleStatus::Offline, "{seen:?}");
    seen
}

async fn set_status(
    server: &TestServer,
    user_id: &str,
    status: pb::UserStatus,
    message: &str,
) -> pb::Presence {
    let request = authed(
        pb::SetStatusRequest {
            status: status as i32,
            custom_message: message.to_owned(),
        },
        &token(user_id),
    );
    server
        .presence()
        .await
        .set_status(request)
        .await
        .unwrap_or_else(|status| panic!("SetStatus failed: {status}"))
        .into_inner()
        .presence
        .expect("SetStatus answers the presence")
}

/// `user_id`'s history as the owner reads it through GetHistory, in its
/// order.
async fn history(
    server: &TestServer,
    user_id: &str,
) -> Result<Vec<pb::HistoryEntry>, tonic::Status> {
    let request = authed(
        pb::GetHistoryRequest {
            user_id: user_id.to_owned(),
            page_size: 1000,
            ..Default::default()
        },
        &token(user_id),
    );
    Ok(server
        .presence()
        .await
        .get_history(request)
        .await?
        .into_inner()
        .entries)
}

/// The versions of `user_id`'s history as GetHistory answers them, in its
/// order.
async fn history_versions(server: &TestServer, user_id: &str) -> Result<Vec<u64>, tonic::Status> {
    let entries = history(server, user_id).await?;
    Ok(entries.into_iter().map(|entry| entry.version).collect())
}

/// The versions of `user_id`'s history stored in the CQL store.
async fn stored_versions(history: &dyn HistoryStore, user_id: &str) -> BTreeSet<u64> {
    history
        .page(user_id, 0, i64::MAX, 0, 1000)
        .await
        .map(|records: Vec<HistoryRecord>| records.into_iter().map(|r| r.version).collect())
        .unwrap_or_default()
}

/// Polls `check` every 100 ms until it holds, at most `within`; returns how
/// long that took.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An SDK client of `user_id` on `device_id` whose session has opened.
async fn open_session(
    server: &TestServer,
    user_id: &str,
    device_id: &str,
    options: SessionOptions,
) -> PresenceClient {
    let device = client(server, user_id, device_id).await;
    device
        .start_session(options)
        .await
        .unwrap_or_else(|error| panic!("{user_id}'s session on {device_id} opens: {error}"));
    device
}

/// A server on both services where alice watches her contact bob, whose
/// device has opened a session.
struct BobSession {
    server: TestServer,
    alice: String,
    bob: String,
    watch: Watch,
    /// Bob's device, which holds his session.
    device: PresenceClient,
    /// Whether that session was ever interrupted.
    interruptions: Interruptions,
}

impl BobSession {
    /// Alice's watch is open before bob's session, so it sees the session
    /// arrive.
    async fn open(services: &Services, device_id: &str, options: SessionOptions) -> BobSession {
        let server = services.start_server().await;
        let (alice, bob) = (user("alice"), user("bob"));
        befriend(&server, &alice, &[&bob]).await;
        let watch = Watch::open(&server, &alice).await;
        let device = open_session(&server, &bob, device_id, options).await;
        let interruptions = Interruptions::watch(&device);
        BobSession {
            server,
            alice,
            bob,
            watch,
            device,
            interruptions,
        }
    }

    /// Bob's session, and the presence of his alice saw come online.
    async fn online(services: &Services, device_id: &str) -> (BobSession, pb::Presence) {
        let mut session = BobSession::open(services, device_id, SessionOptions::default()).await;
        let online = session
            .watch
            .wait_for(&session.bob, pb::VisibleStatus::Online)
            .await;
        (session, online)
    }

    /// Bob's session, invisible from the moment it opened.
    async fn invisible(services: &Services, device_id: &str) -> BobSession {
        let options = SessionOptions {
            status: pb::UserStatus::Invisible,
            ..SessionOptions::default()
        };
        BobSession::open(services, device_id, options).await
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_keeps_presence_answering_and_history_recording() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let started = Instant::now();
    let (mut fixture, online) = BobSession::online(&services, "bob-laptop").await;

    let outage = Outage::begin(&services, Service::Redis);
    let down_at = Instant::now();

    // Reads fall back to the durable store (contacts too: alice's list says
    // she may see bob).
    let seen = get_presence(&fixture.server, &fixture.alice, &fixture.bob).await;
    assert_eq!(seen.status(), pb::VisibleStatus::Online, "{seen:?}");
    assert_eq!(seen.version, online.version);
    println!(
        "GetPresence answered from the durable store {:?} into the outage",
        down_at.elapsed()
    );

    // A change is taken, recorded and delivered to this node's watchers.
    let busy = set_status(
        &fixture.server,
        &fixture.bob,
        pb::UserStatus::Busy,
        "redis is down",
    )
    .await;
    assert_eq!(busy.status(), pb::VisibleStatus::Busy);
    assert!(busy.version > online.version);
    let delivered = fixture
        .watch
        .wait_for(&fixture.bob, pb::VisibleStatus::Busy)
        .await;
    assert_eq!(delivered.version, busy.version);
    assert_eq!(delivered.custom_message, "redis is down");

    // Heartbeats keep bob's session alive through several leases.
    tokio::time::sleep(support::LEASE * 2).await;
    let seen = get_presence(&fixture.server, &fixture.alice, &fixture.bob).await;
    assert_eq!(seen.status(), pb::VisibleStatus::Busy, "{seen:?}");
    fixture.interruptions.assert_none("bob's heartbeat stream");

    // The change is in the history, and in the CQL store itself.
    let history = services.durable_history().await;
    let flushed = eventually(FLUSHED_WITHIN, "bob's busy change stored", || {
        let history = history.clone();
        let bob = fixture.bob.clone();
        async move {
            stored_versions(history.as_ref(), &bob)
                .await
                .contains(&busy.version)
        }
    })
    .await;
    println!("the busy change was in the CQL store {flushed:?} after it was made");
    assert!(
        history_versions(&fixture.server, &fixture.bob)
            .await
            .unwrap()
            .contains(&busy.version)
    );
    println!("redis was down for {:?}", down_at.elapsed());

    // Redis comes back empty: the node re-asserts bob's session and replays
    // the change, so the hot state is right again.
    outage.end();
    let back_at = Instant::now();
    let converged = eventually(CONVERGED_WITHIN, "bob busy in redis again", || {
        let record = services.hot_record(&fixture.bob);
        async move {
            record.is_some_and(|r| {
                r.shown.status == VisibleStatus::Busy
                    && r.custom_message == "redis is down"
                    && r.sessions.iter().any(|s| s.device_id == "bob-laptop")
            })
        }
    })
    .await;
    println!("redis held bob's busy state {converged:?} after it was back");
    let seen = get_presence(&fixture.server, &fixture.alice, &fixture.bob).await;
    assert_eq!(seen.status(), pb::VisibleStatus::Busy, "{seen:?}");
    assert_eq!(seen.custom_message, "redis is down");

    // The watch that lived through the outage carries on, now through the
    // fan-out again.
    let online_again = set_status(&fixture.server, &fixture.bob, pb::UserStatus::Online, "").await;
    let delivered = fixture
        .watch
        .wait_for(&fixture.bob, pb::VisibleStatus::Online)
        .await;
    assert!(delivered.version >= online_again.version);
    fixture.interruptions.assert_none("bob's heartbeat stream");
    let record = services.hot_record(&fixture.bob).expect("bob in redis");
    assert_eq!(record.shown.status, VisibleStatus::Online);
    println!(
        "whole test {:?}, {:?} after redis came back",
        started.elapsed(),
        back_at.elapsed()
    );
    fixture.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scylla_down_keeps_presence_working_and_loses_no_history() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let started = Instant::now();
    let (mut fixture, online) = BobSession::online(&services, "bob-phone").await;
    // Alice's contact list is cached in Redis after her first read once the
    // contacts change has deleted it for the second time.
    tokio::time::sleep(cached::SECOND_DELETE_AFTER + Duration::from_millis(200)).await;
    get_presence(&fixture.server, &fixture.alice, &fixture.bob).await;
    let cache_key = cached::cache_key(&fixture.alice);
    eventually(Duration::from_secs(5), "alice's contacts cached", || {
        let cached = services.redis_cli(&["EXISTS", &cache_key]);
        async move { cached.as_deref() == Some("1") }
    })
    .await;

    let outage = Outage::begin(&services, Service::Cassandra);
    let down_at = Instant::now();
    let mut made = vec![online.version];
    for (status, message, shows) in [
        (
            pb::UserStatus::Busy,
            "cassandra is down",
            pb::VisibleStatus::Busy,
        ),
        (
            pb::UserStatus::Online,
            "still here",
            pb::VisibleStatus::Online,
        ),
        (pb::UserStatus::Invisible, "", pb::VisibleStatus::Offline),
        (pb::UserStatus::Online, "", pb::VisibleStatus::Online),
    ] {
        let presence = set_status(&fixture.server, &fixture.bob, status, message).await;
        let delivered = fixture.watch.wait_for(&fixture.bob, shows).await;
        assert_eq!(delivered.version, presence.version);
        made.push(presence.version);
    }
    // Reads keep working: presence from Redis, alice's contacts from the cache.
    let seen = get_presence(&fixture.server, &fixture.alice, &fixture.bob).await;
    assert_eq!(seen.status(), pb::VisibleStatus::Online);
    assert_eq!(seen.version, *made.last().unwrap());
    // A minute down: the history projection holds every change in the
    // change log, not in memory, until Cassandra is back.
    let mut round = 0;
    while down_at.elapsed() < SCYLLA_DOWN_FOR {
        round += 1;
        let (status, shows) = if round % 2 == 1 {
            (pb::UserStatus::Busy, pb::VisibleStatus::Busy)
        } else {
            (pb::UserStatus::Online, pb::VisibleStatus::Online)
        };
        let presence = set_status(
            &fixture.server,
            &fixture.bob,
            status,
            &format!("round {round}"),
        )
        .await;
        fixture.watch.wait_for(&fixture.bob, shows).await;
        made.push(presence.version);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    fixture.interruptions.assert_none("bob's heartbeat stream");
    println!(
        "{} changes made while cassandra was down ({:?})",
        made.len() - 1,
        down_at.elapsed()
    );

    outage.end();
    let back_at = Instant::now();
    let history = services.durable_history().await;
    let flushed = eventually(FLUSHED_WITHIN, "every change stored", || {
        let history = history.clone();
        let (bob, made) = (fixture.bob.clone(), made.clone());
        async move {
            let stored = stored_versions(history.as_ref(), &bob).await;
            made.iter().all(|version| stored.contains(version))
        }
    })
    .await;
    println!("every change was in the CQL store {flushed:?} after it was back");
    let answered = history_versions(&fixture.server, &fixture.bob)
        .await
        .expect("GetHistory answers");
    let since_outage: Vec<u64> = answered
        .iter()
        .copied()
        .filter(|version| *version >= made[0])
        .collect();
    assert_eq!(since_outage, made, "every change, in order, once");
    fixture.interruptions.assert_none("bob's heartbeat stream");
    println!(
        "whole test {:?}, {:?} after cassandra came back",
        started.elapsed(),
        back_at.elapsed()
    );
    fixture.server.stop().await;
}

/// Redis lost users it held (here the whole cluster restarted empty) while
/// ScyllaDB kept their last visible state. A read answers from ScyllaDB and
/// puts the user back into Redis, and a device opening a session builds on
/// what ScyllaDB knew: an invisible user does not come back visible. (A busy
/// user who is offline shows nothing busy, so ScyllaDB cannot tell that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_redis_lost_come_back_from_scylla_as_they_left() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let server = services.start_server().await;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    befriend(&server, &alice, &[&bob, &carol]).await;
    for (who, status) in [
        (&bob, pb::UserStatus::Invisible),
        (&carol, pb::UserStatus::Online),
    ] {
        let device = open_session(&server, who, "phone", SessionOptions::default()).await;
        set_status(&server, who, status, "").await;
        device.end_session().await.expect("logout");
    }
    let durable = services.durable_history().await;
    let ids = [bob.clone(), carol.clone()];
    eventually(
        FLUSHED_WITHIN,
        "both users' last state in the CQL store",
        || async {
            let lasts = durable.last(&ids).await.unwrap_or_default();
            lasts.iter().flatten().count() == 2
                && lasts
                    .iter()
                    .flatten()
                    .all(|last| last.status == VisibleStatus::Offline)
        },
    )
    .await;

    Outage::begin(&services, Service::Redis).end();
    assert!(
        services.hot_record(&carol).is_none(),
        "Redis restarted empty"
    );

    // A read of carol is answered from ScyllaDB, then served by Redis again.
    let seen = seen_offline(&server, &alice, &carol).await;
    let refilled = eventually(
        CONVERGED_WITHIN,
        "carol back in Redis after a read",
        || async {
            get_presence(&server, &alice, &carol).await;
            services.hot_record(&carol).is_some()
        },
    )
    .await;
    let carol_hot = services.hot_record(&carol).expect("carol in Redis");
    assert!(carol_hot.sessions.is_empty(), "{carol_hot:?}");
    assert_eq!(carol_hot.shown.status, VisibleStatus::Offline);
    assert_eq!(
        carol_hot.shown.last_seen_ms, seen.last_seen_unix_ms,
        "{carol_hot:?}"
    );
    println!("carol was back in Redis {refilled:?} after Redis came back");

    // Bob comes back on a new device that says nothing of his status, before
    // anyone read him (a read would have put him back into Redis already).
    let _bob_laptop = open_session(&server, &bob, "laptop", SessionOptions::default()).await;
    let bob_hot = services.hot_record(&bob).expect("bob's session in Redis");
    assert_eq!(bob_hot.sessions.len(), 1, "{bob_hot:?}");
    assert_eq!(
        bob_hot.chosen,
        presence_server::domain::ChosenStatus::Invisible
    );
    seen_offline(&server, &alice, &bob).await;
}

// ------------------------------------------- the choice is durable (issue 8/6)

/// Reads `watch` for `within` and fails if it shows `user_id` as anything
/// but offline.
async fn never_visible(watch: &mut Watch, user_id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let Ok(message) = tokio::time::timeout(left, watch.stream.message()).await else {
            return;
        };
        match message {
            Ok(Some(pb::PresenceEvent {
                event: Some(presence_event::Event::Presence(p)),
            })) => assert!(
                p.user_id != user_id || p.status() == pb::VisibleStatus::Offline,
                "the watch showed {user_id} visible: {p:?}"
            ),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the server ended the watch"),
            Err(error) => panic!("the watch failed: {error}"),
        }
    }
}

/// The statuses of `user_id`'s history as the owner reads it.
async fn history_statuses(server: &TestServer, user_id: &str) -> Vec<pb::VisibleStatus> {
    let entries = history(server, user_id)
        .await
        .unwrap_or_else(|status| panic!("GetHistory failed: {status}"));
    entries.iter().map(|entry| entry.status()).collect()
}

/// Asserts that `record` keeps the user's invisible choice and shows them
/// offline.
#[track_caller]
fn assert_hidden(record: &UserRecord) {
    assert_eq!(
        record.chosen,
        presence_server::domain::ChosenStatus::Invisible,
        "{record:?}"
    );
    assert_eq!(record.shown.status, VisibleStatus::Offline, "{record:?}");
}

/// Waits until Redis holds `user_id`'s record with a session of `device`
/// (the node re-asserted it after Redis came back empty).
async fn reasserted(services: &Services, user_id: &str, device: &str) -> UserRecord {
    eventually(CONVERGED_WITHIN, "the session back in redis", || {
        let record = services.hot_record(user_id);
        async move { record.is_some_and(|r| r.sessions.iter().any(|s| s.device_id == device)) }
    })
    .await;
    services.hot_record(user_id).expect("the record in redis")
}

/// 6a: a user who went invisible while no device of theirs was connected
/// (so contacts never saw anything change, and ScyllaDB held no visible
/// record of them) opens a device on a node while Redis is down. The node's
/// degraded rebuild must use the durable choice, not the default: the user
/// is never shown online, nor written to the history as online. The same for
/// a user seen before, who went invisible while offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_chosen_offline_stays_hidden_when_a_device_opens_during_a_redis_outage() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let server = services.start_server().await;
    let (alice, bob, dan) = (user("alice"), user("bob"), user("dan"));
    befriend(&server, &alice, &[&bob, &dan]).await;
    // Dan was seen once, and left.
    let dan_device = open_session(&server, &dan, "dan-phone", SessionOptions::default()).await;
    dan_device.end_session().await.expect("logout");
    // Both choose invisible with no device connected.
    for who in [&bob, &dan] {
        let shown = set_status(&server, who, pb::UserStatus::Invisible, "").await;
        assert_eq!(shown.status(), pb::VisibleStatus::Offline);
    }
    // The choice went through the node's history buffer, and Dan's session
    // through the change log to the history projection; let both reach
    // ScyllaDB before Redis, and the log with it, goes away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eventually(PROJECTED_WITHIN, "dan's session in the history", || async {
        history_statuses(&server, &dan).await.len() == 2
    })
    .await;
    let mut watch = Watch::open(&server, &alice).await;

    let outage = Outage::begin(&services, Service::Redis);
    let mut devices = Vec::new();
    for who in [&bob, &dan] {
        devices.push(open_session(&server, who, "laptop", SessionOptions::default()).await);
    }
    never_visible(&mut watch, &bob, Duration::from_secs(1)).await;
    never_visible(&mut watch, &dan, Duration::from_millis(200)).await;
    for who in [&bob, &dan] {
        seen_offline(&server, &alice, who).await;
        let own = get_presence(&server, who, who).await;
        assert_eq!(own.chosen_status(), pb::UserStatus::Invisible, "{own:?}");
    }
    // Nothing online was written to the history (read while ScyllaDB is up).
    for who in [&bob, &dan] {
        let statuses = history_statuses(&server, who).await;
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s != pb::VisibleStatus::Offline)
                .count(),
            usize::from(*who == dan),
            "{who}: {statuses:?}"
        );
    }

    // Redis comes back empty: the replay keeps both invisible.
    outage.end();
    for who in [&bob, &dan] {
        assert_hidden(&reasserted(&services, who, "laptop").await);
    }
    never_visible(&mut watch, &bob, Duration::from_secs(1)).await;
    for who in [&bob, &dan] {
        seen_offline(&server, &alice, who).await;
    }
    server.stop().await;
}

/// 6b: a user invisible from their very first session was never visible, so
/// ScyllaDB held no shown state of them. When Redis restarts empty, the node
/// re-asserts their live session on the durable choice: they stay hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_from_the_first_session_stays_hidden_after_redis_restarts_empty() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let mut fixture = BobSession::invisible(&services, "bob-phone").await;
    seen_offline(&fixture.server, &fixture.alice, &fixture.bob).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    Outage::begin(&services, Service::Redis).end();
    assert_hidden(&reasserted(&services, &fixture.bob, "bob-phone").await);
    never_visible(&mut fixture.watch, &fixture.bob, Duration::from_secs(2)).await;
    seen_offline(&fixture.server, &fixture.alice, &fixture.bob).await;
    assert!(
        history_statuses(&fixture.server, &fixture.bob)
            .await
            .is_empty(),
        "bob was never visible"
    );
    fixture.interruptions.assert_none("bob's heartbeat stream");
    fixture.server.stop().await;
}

/// 6c: a user who went invisible after being visible, with a device still
/// connected, when Redis restarts empty: the node restores their durable
/// state (version, last seen, reason) under the re-asserted session, so
/// what contacts see never goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_after_visible_keeps_its_version_after_redis_restarts_empty() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let (mut fixture, online) = BobSession::online(&services, "bob-tablet").await;
    let hidden = set_status(&fixture.server, &fixture.bob, pb::UserStatus::Invisible, "").await;
    assert_eq!(hidden.status(), pb::VisibleStatus::Offline);
    assert!(hidden.version > online.version);
    let delivered = fixture
        .watch
        .wait_for(&fixture.bob, pb::VisibleStatus::Offline)
        .await;
    assert_eq!(delivered.version, hidden.version);
    let durable = services.durable_history().await;
    eventually(FLUSHED_WITHIN, "bob's invisible change stored", || {
        let (durable, bob) = (durable.clone(), fixture.bob.clone());
        async move {
            durable
                .last(&[bob])
                .await
                .ok()
                .and_then(|mut l| l.pop().flatten())
                .is_some_and(|last| last.version == hidden.version)
        }
    })
    .await;

    Outage::begin(&services, Service::Redis).end();
    let record = reasserted(&services, &fixture.bob, "bob-tablet").await;
    assert_hidden(&record);
    assert!(record.shown.version >= hidden.version, "{record:?}");
    assert_eq!(
        record.shown.last_seen_ms, hidden.last_seen_unix_ms,
        "{record:?}"
    );
    assert_eq!(
        record.shown.offline_reason,
        Some(presence_server::domain::OfflineReason::Invisible),
        "{record:?}"
    );
    let seen = seen_offline(&fixture.server, &fixture.alice, &fixture.bob).await;
    assert!(seen.version >= hidden.version, "{seen:?}");
    assert_eq!(seen.last_seen_unix_ms, hidden.last_seen_unix_ms, "{seen:?}");
    assert_eq!(seen.offline_reason(), pb::OfflineReason::Logout, "{seen:?}");
    never_visible(&mut fixture.watch, &fixture.bob, Duration::from_secs(1)).await;
    fixture.interruptions.assert_none("bob's heartbeat stream");
    fixture.server.stop().await;
}

/// Redis restarts empty while ScyllaDB is down too: the node cannot read
/// the choice of its users, so it re-asserts none of their sessions and
/// takes no change of them (it would start from the default choice) until
/// ScyllaDB answers. An invisible user stays hidden throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_stays_hidden_when_redis_restarts_empty_while_scylla_is_down() {
    let Some((services, _serial)) = setup().await else {
        return;
    };
    let mut fixture = BobSession::invisible(&services, "bob-watch").await;
    // Out of the node's buffer: only ScyllaDB knows bob's choice now.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let scylla = Outage::begin(&services, Service::Cassandra);
    Outage::begin(&services, Service::Redis).end();
    tokio::time::sleep(NODE_LEASE * 2).await;
    // A change of bob's device while his choice cannot be read.
    fixture
        .device
        .set_activity(presence_sdk::Activity::Idle)
        .expect("activity sent");
    never_visible(&mut fixture.watch, &fixture.bob, Duration::from_secs(2)).await;
    if let Some(record) = services.hot_record(&fixture.bob) {
        assert_eq!(
            record.chosen,
            presence_server::domain::ChosenStatus::Invisible,
            "{record:?}"
        );
    }

    scylla.end();
    assert_hidden(&reasserted(&services, &fixture.bob, "bob-watch").await);
    never_visible(&mut fixture.watch, &fixture.bob, Duration::from_secs(1)).await;
    seen_offline(&fixture.server, &fixture.alice, &fixture.bob).await;
    fixture.server.stop().await;
}
