//! The session and lease rules, proven over random interleavings: a model of
//! what every call must do drives a real node through opens, reopens on new
//! connections, beats (late ones on replaced streams too), unary touches,
//! closes, logouts, status changes, limits, sweeps and jumps of the clock,
//! and after every step checks the invariants:
//!
//! - a session exists in the hot store iff exactly one lease on the node
//!   names its current connection (no session without its lease, no lease
//!   without its session);
//! - every session of a closed or silent connection ends at the first sweep
//!   past its deadline, and none ends before it;
//! - a stream that loses its session is ended at once, with the reason;
//! - the visible status matches the sessions and the chosen status;
//! - versions never go back, and nothing visible changes while invisible.
//!
//! It runs on the embedded backends with a paused clock (many cases), and on
//! Redis Cluster + ScyllaDB when `PRESENCE_TEST_REDIS_CLUSTER` and
//! `PRESENCE_TEST_SCYLLA_NODES` are set (fewer cases, real time, the hot
//! store losing everything among the steps).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use presence_server::auth::Caller;
use presence_server::config::Cli;
use presence_server::domain::{Activity, ChosenStatus, Platform, UserRecord, VisibleStatus};
use presence_server::feed::{Feed, FeedConfig, run_projection};
use presence_server::leases::{SessionKey, StreamEnd, StreamEnded};
use presence_server::node::{BeatChange, Node, OpenRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use tokio::sync::watch;

const USERS: usize = 2;
const DEVICES: usize = 3;
const MAX_SESSIONS: usize = 2;
const LEASE_MS: u64 = 1_000;
const GRACE_MS: u64 = 200;

#[derive(Clone, Debug)]
enum Step {
    Open {
        user: usize,
        device: usize,
        idle: bool,
    },
    /// A beat on the n-th stream ever opened (mod their count), whatever
    /// became of it: late beats on replaced or ended streams included.
    Beat {
        stream: usize,
        idle: Option<bool>,
    },
    Close {
        stream: usize,
    },
    Touch {
        user: usize,
        device: usize,
        idle: Option<bool>,
    },
    Disconnect {
        user: usize,
        device: usize,
    },
    SetStatus {
        user: usize,
        chosen: u8,
    },
    Sweep,
    Advance {
        ms: u64,
    },
    /// The hot store forgets everything (Redis restarted empty); the node
    /// then runs one round of its duties, as its maintenance loop would.
    LoseHotStore,
}

fn step(lose_hot_store: bool) -> impl Strategy<Value = Step> {
    let user = 0..USERS;
    let device = 0..DEVICES;
    let idle = proptest::option::of(any::<bool>());
    let steps = prop_oneof![
        3 => (user.clone(), device.clone(), any::<bool>())
            .prop_map(|(user, device, idle)| Step::Open { user, device, idle }),
        4 => (any::<usize>(), idle.clone()).prop_map(|(stream, idle)| Step::Beat { stream, idle }),
        2 => any::<usize>().prop_map(|stream| Step::Close { stream }),
        2 => (user.clone(), device.clone(), idle)
            .prop_map(|(user, device, idle)| Step::Touch { user, device, idle }),
        1 => (user.clone(), device).prop_map(|(user, device)| Step::Disconnect { user, device }),
        2 => (user, 0u8..3).prop_map(|(user, chosen)| Step::SetStatus { user, chosen }),
        2 => Just(Step::Sweep),
        2 => (0u64..2_500).prop_map(|ms| Step::Advance { ms }),
    ];
    if lose_hot_store {
        prop_oneof![12 => steps, 1 => Just(Step::LoseHotStore)].boxed()
    } else {
        steps.boxed()
    }
}

fn chosen(n: u8) -> ChosenStatus {
    [
        ChosenStatus::Online,
        ChosenStatus::Busy,
        ChosenStatus::Invisible,
    ][usize::from(n) % 3]
}

fn activity(idle: bool) -> Activity {
    if idle {
        Activity::Idle
    } else {
        Activity::Active
    }
}

/// What holds a device's lease, as the model expects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Stream(usize),
    Touch,
}

#[derive(Clone, Debug)]
struct Lease {
    holder: Holder,
    deadline_ms: u64,
}

struct Stream {
    key: SessionKey,
    session: presence_server::domain::Session,
    ended: StreamEnded,
    closed: bool,
}

struct Model {
    node: Arc<Node>,
    /// Keeps the node's history projection running (on Redis).
    _projection: Option<watch::Sender<bool>>,
    users: Vec<String>,
    /// The model's clock: Tokio's, paused on the embedded backends.
    started: tokio::time::Instant,
    leases: HashMap<SessionKey, Lease>,
    streams: Vec<Stream>,
    chosen: Vec<ChosenStatus>,
    /// What contacts last saw of each user, to check versions and
    /// invisibility between steps.
    last_seen: Vec<Option<(u64, VisibleStatus)>>,
    /// Real time (Redis): deadlines are only known within this slack.
    slack_ms: u64,
}

fn check(condition: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if condition {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

impl Model {
    fn key(&self, user: usize, device: usize) -> SessionKey {
        SessionKey {
            user_id: self.users[user].clone(),
            device_id: format!("device-{device}"),
        }
    }

    fn caller(&self, user: usize) -> Caller {
        Caller {
            user_id: self.users[user].clone(),
            admin: false,
            expires_at_secs: u64::MAX,
        }
    }

    /// Whether a new device of `user` fits under the session limit.
    fn admits(&self, key: &SessionKey) -> bool {
        self.leases.contains_key(key)
            || self
                .leases
                .keys()
                .filter(|held| held.user_id == key.user_id)
                .count()
                < MAX_SESSIONS
    }

    /// The stream held `key` and lost it: it must have been told why.
    fn expect_stream_ended(
        &mut self,
        lease: Option<Lease>,
        why: StreamEnd,
    ) -> Result<(), TestCaseError> {
        let Some(Lease {
            holder: Holder::Stream(index),
            ..
        }) = lease
        else {
            return Ok(());
        };
        let stream = &mut self.streams[index];
        if stream.closed {
            return Ok(());
        }
        let told = stream.ended.try_recv();
        check(told == Ok(why), || {
            format!("stream {index} should have ended with {why:?}, got {told:?}")
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// After a sweep that started at `now`: the leases due by then are gone,
    /// and their streams told so.
    fn swept(&mut self, now: u64) -> Result<(), TestCaseError> {
        let slack = self.slack_ms;
        let due: Vec<SessionKey> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline_ms + slack <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let ended = self.leases.remove(&key);
            self.expect_stream_ended(ended, StreamEnd::Expired)?;
        }
        if slack > 0 {
            // Real time: a lease within the slack of its deadline may or may
            // not have been swept; take the node's word for those.
            let held: Vec<SessionKey> = self
                .node
                .held_sessions()
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            self.leases.retain(|key, _| held.contains(key));
        }
        Ok(())
    }

    async fn run(&mut self, step: Step) -> Result<(), TestCaseError> {
        let lease_ms = LEASE_MS;
        match step {
            Step::Open { user, device, idle } => {
                let key = self.key(user, device);
                let admitted = self.admits(&key);
                let now = self.now_ms();
                let opened = self
                    .node
                    .open_session(
                        &self.caller(user),
                        OpenRequest {
                            device_id: key.device_id.clone(),
                            platform: Platform::Ios,
                            activity: activity(idle),
                            status: None,
                        },
                    )
                    .await;
                check(opened.is_ok() == admitted, || {
                    format!(
                        "open of {key:?} should be {}: {:?}",
                        if admitted { "admitted" } else { "refused" },
                        opened.as_ref().err()
                    )
                })?;
                if let Ok(opened) = opened {
                    let index = self.streams.len();
                    self.streams.push(Stream {
                        key: opened.key,
                        session: opened.session,
                        ended: opened.ended,
                        closed: false,
                    });
                    let lease = Lease {
                        holder: Holder::Stream(index),
                        deadline_ms: now + lease_ms,
                    };
                    let replaced = self.leases.insert(key, lease);
                    self.expect_stream_ended(replaced, StreamEnd::Replaced)?;
                }
            }
            Step::Beat { stream, idle } => {
                if self.streams.is_empty() {
                    return Ok(());
                }
                let index = stream % self.streams.len();
                if self.streams[index].closed {
                    return Ok(());
                }
                let key = self.streams[index].key.clone();
                let holds = self
                    .leases
                    .get(&key)
                    .is_some_and(|lease| lease.holder == Holder::Stream(index));
                let change = BeatChange {
                    activity: idle.map(activity),
                    status: None,
                };
                let mut session = self.streams[index].session.clone();
                let now = self.now_ms();
                let beat = self.node.beat(&key, &mut session, change).await;
                self.streams[index].session = session;
                check(beat.is_ok() == holds, || {
                    format!("beat on stream {index} (holds: {holds}): {beat:?}")
                })?;
                if holds {
                    self.leases.get_mut(&key).unwrap().deadline_ms = now + lease_ms;
                }
            }
            Step::Close { stream } => {
                if self.streams.is_empty() {
                    return Ok(());
                }
                let index = stream % self.streams.len();
                let stream = &mut self.streams[index];
                if stream.closed {
                    return Ok(());
                }
                stream.closed = true;
                let now = self.started.elapsed().as_millis() as u64;
                self.node
                    .connection_closed(&stream.key, stream.session.conn_id);
                if let Some(lease) = self.leases.get_mut(&stream.key)
                    && lease.holder == Holder::Stream(index)
                {
                    lease.deadline_ms = now + GRACE_MS;
                }
            }
            Step::Touch { user, device, idle } => {
                let key = self.key(user, device);
                let admitted = self.admits(&key);
                let now = self.now_ms();
                let touched = self
                    .node
                    .touch(
                        &self.caller(user),
                        key.device_id.clone(),
                        Platform::Web,
                        idle.map(activity),
                    )
                    .await;
                check(touched.is_ok() == admitted, || {
                    format!("touch of {key:?} (admitted: {admitted}): {touched:?}")
                })?;
                if touched.is_ok() {
                    let deadline_ms = now + lease_ms;
                    self.leases
                        .entry(key)
                        .and_modify(|lease| lease.deadline_ms = deadline_ms)
                        .or_insert(Lease {
                            holder: Holder::Touch,
                            deadline_ms,
                        });
                }
            }
            Step::Disconnect { user, device } => {
                let key = self.key(user, device);
                let logged_out = self
                    .node
                    .disconnect(&self.caller(user), key.device_id.clone())
                    .await;
                check(logged_out.is_ok(), || format!("disconnect: {logged_out:?}"))?;
                let ended = self.leases.remove(&key);
                self.expect_stream_ended(ended, StreamEnd::LoggedOut)?;
            }
            Step::SetStatus { user, chosen: n } => {
                let set = self
                    .node
                    .set_status(&self.caller(user), chosen(n), String::new())
                    .await;
                check(set.is_ok(), || format!("set status: {set:?}"))?;
                self.chosen[user] = chosen(n);
            }
            Step::Sweep => {
                let now = self.now_ms();
                self.node.sweep().await;
                self.swept(now)?;
            }
            Step::Advance { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Step::LoseHotStore => {
                self.projected().await?;
                lose_hot_store().await;
                let now = self.now_ms();
                self.node.maintain_once().await;
                self.swept(now)?;
            }
        }
        self.check_invariants().await
    }

    /// Waits until the durable store holds every user's current version:
    /// Redis loses what the history projection has not written yet (the
    /// change log with it), which is milliseconds' worth; the model checks
    /// the loss of everything older.
    async fn projected(&self) -> Result<(), TestCaseError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.node.backends.hot.get(&self.users).await;
            let durable = self.node.backends.history.durable(&self.users).await;
            if let (Ok(records), Ok(durable)) = (records, durable) {
                let caught_up = records.iter().zip(&durable).all(|(record, durable)| {
                    let version = record.as_ref().map_or(0, |r| r.shown.version);
                    version == 0 || durable.last.as_ref().is_some_and(|l| l.version >= version)
                });
                if caught_up {
                    return Ok(());
                }
            }
            check(tokio::time::Instant::now() < deadline, || {
                "the history projection did not catch up within 10 s".into()
            })?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn check_invariants(&mut self) -> Result<(), TestCaseError> {
        let records = self
            .node
            .backends
            .hot
            .get(&self.users)
            .await
            .map_err(|e| TestCaseError::fail(format!("hot store read failed: {e}")))?;
        let read = self
            .node
            .presence_records(&self.users)
            .await
            .map_err(|e| TestCaseError::fail(format!("presence read failed: {e:?}")))?;
        let held = self.node.held_sessions();
        for (user, (record, read)) in records.iter().zip(read).enumerate() {
            let user_id = &self.users[user];
            let record = record.clone().unwrap_or_default();
            let mut in_store: Vec<(String, u64)> = record
                .sessions
                .iter()
                .map(|s| (s.device_id.clone(), s.conn_id))
                .collect();
            let mut leased: Vec<(String, u64)> = held
                .iter()
                .filter(|(key, _)| key.user_id == *user_id)
                .map(|(key, session)| (key.device_id.clone(), session.conn_id))
                .collect();
            in_store.sort();
            leased.sort();
            check(in_store == leased, || {
                format!("{user_id}: sessions in the hot store {in_store:?} != leases {leased:?}")
            })?;
            let mut expected: Vec<String> = self
                .leases
                .keys()
                .filter(|key| key.user_id == *user_id)
                .map(|key| key.device_id.clone())
                .collect();
            let mut devices: Vec<String> = leased.iter().map(|(d, _)| d.clone()).collect();
            expected.sort();
            devices.sort();
            check(expected == devices, || {
                format!(
                    "{user_id}: the model expects leases of {expected:?}, the node holds {devices:?}"
                )
            })?;
            for (key, lease) in &self.leases {
                if let Holder::Stream(index) = lease.holder {
                    let conn = self.streams[index].session.conn_id;
                    check(
                        held.iter().any(|(k, s)| k == key && s.conn_id == conn),
                        || format!("{key:?} should be held by stream {index}"),
                    )?;
                }
            }
            self.check_visible(user, &record, &read.unwrap_or_default())?;
        }
        Ok(())
    }

    /// `record` is the hot store's, `read` what a reader of the user gets
    /// (after a hot-store loss, the durable store's until re-asserted).
    fn check_visible(
        &mut self,
        user: usize,
        record: &UserRecord,
        read: &UserRecord,
    ) -> Result<(), TestCaseError> {
        let user_id = &self.users[user];
        let shown = &read.shown;
        if record.shown.version == 0 {
            check(record.derived_status() == VisibleStatus::Offline, || {
                format!("{user_id} is visible but was never shown: {record:?}")
            })?;
        } else {
            check(record.shown.status == record.derived_status(), || {
                format!(
                    "{user_id}: shown {:?}, derived {:?}",
                    record.shown.status,
                    record.derived_status()
                )
            })?;
        }
        if self.chosen[user] == ChosenStatus::Invisible {
            check(shown.status == VisibleStatus::Offline, || {
                format!("{user_id} chose invisible but is shown {:?}", shown.status)
            })?;
        }
        let now = (shown.version, shown.status);
        if let Some((version, status)) = self.last_seen[user] {
            check(now.0 >= version, || {
                format!("{user_id}: version went back from {version} to {}", now.0)
            })?;
            if self.chosen[user] == ChosenStatus::Invisible && status == VisibleStatus::Offline {
                check(now.0 == version, || {
                    format!("{user_id}: the version moved while invisible")
                })?;
            }
        }
        self.last_seen[user] = Some(now);
        Ok(())
    }
}

/// The backends of the run, from the environment: `None` for embedded.
#[derive(Clone)]
struct Services {
    redis: Vec<String>,
    scylla: Vec<String>,
}

static SERVICES: std::sync::OnceLock<Option<Services>> = std::sync::OnceLock::new();

async fn lose_hot_store() {
    let Some(Some(services)) = SERVICES.get() else {
        return;
    };
    let client = redis::cluster::ClusterClient::new(services.redis.clone()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
}

/// A node as `presence_server::run` builds it; on Redis, with the history
/// projection running for as long as the returned sender lives.
async fn node(services: Option<&Services>) -> (Arc<Node>, Option<watch::Sender<bool>>) {
    let mut args: Vec<String> = [
        "presence-server",
        "--dev",
        "--lease",
        "1s",
        "--grace",
        "200ms",
        "--heartbeat-interval",
        "300ms",
        "--sweep-interval",
        "100ms",
        "--node-lease",
        "3s",
        "--max-sessions-per-user",
        "2",
        "--max-user-changes-per-second",
        "1000000",
        "--max-user-changes-per-hour",
        "1000000000",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(services) = services {
        args.extend(["--redis-cluster".into(), services.redis.join(",")]);
        args.extend(["--scylla".into(), services.scylla.join(",")]);
        args.extend(["--redis-timeout".into(), "2s".into()]);
    }
    let config = Cli::parse_from(args).config;
    let opened = presence_server::open_backends(&config).await.unwrap();
    let node_id = format!("model-{}", rand::random::<u32>());
    // On the embedded backends, the model never reads the durable store,
    // and a projection's timers would move the paused clock.
    let projection = services.map(|_| {
        let (stop, stopped) = watch::channel(false);
        let feed = Feed::new(opened.backends.log.clone(), FeedConfig::default());
        tokio::spawn(run_projection(
            feed,
            opened.projection.clone(),
            node_id.clone(),
            stopped,
        ));
        stop
    });
    let node = Node::new(config, node_id, opened.backends);
    node.join().await.unwrap();
    (node, projection)
}

async fn run_case(services: Option<&Services>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let run = rand::random::<u32>();
    let (node, projection) = node(services).await;
    let mut model = Model {
        node,
        _projection: projection,
        users: (0..USERS)
            .map(|u| format!("model-{run}-user-{u}"))
            .collect(),
        started: tokio::time::Instant::now(),
        leases: HashMap::new(),
        streams: Vec::new(),
        chosen: vec![ChosenStatus::Online; USERS],
        last_seen: vec![None; USERS],
        slack_ms: if services.is_some() { 150 } else { 0 },
    };
    for (i, step) in steps.into_iter().enumerate() {
        let described = format!("{step:?}");
        model
            .run(step)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {i} {described}: {e}")))?;
    }
    Ok(())
}

#[test]
fn sessions_and_leases_keep_their_invariants_on_the_embedded_backends() {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(step(false), 1..60), on_embedded)
        .unwrap();
}

/// One case on the embedded backends, with a paused clock that the steps
/// move.
fn on_embedded(steps: Vec<Step>) -> Result<(), TestCaseError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(run_case(None, steps))
}

#[test]
fn sessions_and_leases_keep_their_invariants_on_redis_cluster_and_scylla() {
    let (Some(redis), Some(scylla)) = (
        common::backend_from_env("PRESENCE_TEST_REDIS_CLUSTER"),
        common::backend_from_env("PRESENCE_TEST_SCYLLA_NODES"),
    ) else {
        return;
    };
    let services = SERVICES
        .get_or_init(|| Some(Services { redis, scylla }))
        .clone()
        .unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(step(true), 1..40), |steps| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(run_case(Some(&services), steps))
        })
        .unwrap();
}

/// The shrunk cases of the defects the model found, kept as plain tests.
fn replay(steps: Vec<Step>) {
    on_embedded(steps).unwrap();
}

#[test]
fn a_late_beat_on_a_replaced_stream_leaves_the_new_connection_its_lease() {
    replay(vec![
        Step::Open {
            user: 0,
            device: 0,
            idle: false,
        },
        Step::Open {
            user: 0,
            device: 0,
            idle: false,
        },
        Step::Beat {
            stream: 0,
            idle: Some(true),
        },
        Step::Close { stream: 1 },
        Step::Advance { ms: 300 },
        Step::Sweep,
    ]);
}

#[test]
fn a_touch_refused_by_the_session_limit_leaves_no_lease() {
    replay(vec![
        Step::Open {
            user: 1,
            device: 2,
            idle: false,
        },
        Step::Open {
            user: 1,
            device: 0,
            idle: false,
        },
        Step::Touch {
            user: 1,
            device: 1,
            idle: None,
        },
        Step::Touch {
            user: 1,
            device: 1,
            idle: None,
        },
    ]);
}

#[test]
fn a_beat_after_logout_ends_the_stream_and_brings_nothing_back() {
    replay(vec![
        Step::Open {
            user: 0,
            device: 1,
            idle: false,
        },
        Step::Disconnect { user: 0, device: 1 },
        Step::Beat {
            stream: 0,
            idle: Some(true),
        },
    ]);
}

#[test]
fn a_silent_stream_loses_its_session_within_the_lease_and_is_ended() {
    replay(vec![
        Step::Open {
            user: 0,
            device: 0,
            idle: false,
        },
        Step::Advance { ms: LEASE_MS },
        Step::Sweep,
        Step::Beat {
            stream: 0,
            idle: None,
        },
    ]);
}
