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
//! - an invisible user is never shown online, to a contact reading them
//!   (GetPresence) or watching them, whatever fails in whatever order.
//!
//! It runs on the embedded backends with a paused clock (many cases), and on
//! Redis Cluster + ScyllaDB when `PRESENCE_TEST_REDIS_CLUSTER` and
//! `PRESENCE_TEST_SCYLLA_NODES` are set (fewer cases, real time, the hot
//! store losing everything or becoming unreachable among the steps, the
//! other steps running during the outage; once it is over, the hot store
//! must hold the leases' sessions again).

mod common;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::{FutureExt, StreamExt};
use presence_server::api::error::ApiError;
use presence_server::auth::Caller;
use presence_server::config::Cli;
use presence_server::domain::{Activity, ChosenStatus, Platform, UserRecord, View, VisibleStatus};
use presence_server::feed::{Feed, FeedConfig, run_projection};
use presence_server::leases::{SessionKey, StreamEnd, StreamEnded};
use presence_server::node::{BeatChange, Node, OpenRequest};
use presence_server::watch::{WatchEvent, WatchRequest};
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
    /// The hot store forgets everything (Redis restarted empty). Nothing
    /// tells the node until a call of its fails or its next `Maintain`.
    LoseHotStore,
    /// The hot store stops answering (every Redis node paused) for `ms`;
    /// the steps that follow run during the outage.
    Outage {
        ms: u64,
    },
    /// One round of the node's duties (node lease renewal, which probes the
    /// hot store, sweep, catch-up), as its maintenance loops run them.
    Maintain,
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
        prop_oneof![
            12 => steps,
            1 => Just(Step::LoseHotStore),
            1 => (300u64..1_500).prop_map(|ms| Step::Outage { ms }),
            2 => Just(Step::Maintain),
        ]
        .boxed()
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

type Watch = Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, ApiError>> + Send>>;

struct Model {
    node: Arc<Node>,
    /// Keeps the node's history projection running (on Redis).
    _projection: Option<watch::Sender<bool>>,
    users: Vec<String>,
    /// A contact of every user, reading them (GetPresence) and watching them.
    contact: Caller,
    watch: Watch,
    /// The model's clock: Tokio's, paused on the embedded backends.
    started: tokio::time::Instant,
    leases: HashMap<SessionKey, Lease>,
    streams: Vec<Stream>,
    chosen: Vec<ChosenStatus>,
    /// What contacts last saw of each user, to check versions and
    /// invisibility between steps.
    last_seen: Vec<Option<(u64, VisibleStatus)>>,
    /// Per user, the versions from which they were invisible, and until
    /// which (`None`: still invisible). A watch event inside one must be
    /// OFFLINE, however late it arrives.
    invisible: Vec<Vec<(u64, Option<u64>)>>,
    /// The latest version the watch sent of each user.
    watched: Vec<u64>,
    /// Real time (Redis): deadlines are only known within this slack.
    slack_ms: u64,
    /// Until when the hot store is paused (an `Outage`).
    paused_until: Option<tokio::time::Instant>,
    /// The hot store lost everything and the node has not caught up yet.
    flushed: bool,
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
                let version = set.unwrap().shown.version;
                let was_invisible = self.chosen[user] == ChosenStatus::Invisible;
                let invisible = chosen(n) == ChosenStatus::Invisible;
                if invisible && !was_invisible {
                    self.invisible[user].push((version, None));
                } else if was_invisible
                    && !invisible
                    && let Some((_, until)) = self.invisible[user].last_mut()
                {
                    *until = Some(version);
                }
                self.chosen[user] = chosen(n);
            }
            Step::Sweep => {
                let now = self.now_ms();
                self.node.sweep().await;
                self.swept(now)?;
            }
            Step::Advance { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            Step::LoseHotStore => {
                self.wait_out_outage().await;
                self.projected().await?;
                lose_hot_store().await;
                self.flushed = true;
            }
            Step::Outage { ms } => {
                // A paused Redis takes no new pause: outages follow each other.
                self.wait_out_outage().await;
                pause_hot_store(ms).await;
                self.paused_until = Some(tokio::time::Instant::now() + Duration::from_millis(ms));
            }
            Step::Maintain => self.maintain().await?,
        }
        self.check_invariants(false).await
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

    fn in_outage(&self) -> bool {
        self.paused_until
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }

    async fn wait_out_outage(&mut self) {
        if let Some(until) = self.paused_until.take() {
            tokio::time::sleep_until(until).await;
        }
    }

    async fn maintain(&mut self) -> Result<(), TestCaseError> {
        let now = self.now_ms();
        let outage = self.in_outage();
        self.node.maintain_once().await;
        if !outage && self.node.hot_store_in_step() {
            self.flushed = false;
        }
        self.swept(now)
    }

    /// The end of a case: the outage over, the node's duties run until it
    /// caught up, then every invariant must hold, the hot store's too.
    async fn recover(&mut self) -> Result<(), TestCaseError> {
        self.wait_out_outage().await;
        let mut last = Ok(());
        for _ in 0..10 {
            self.maintain().await?;
            last = self.check_invariants(true).await;
            if last.is_ok() {
                // Late fan-out events still reach the watch.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return self.check_watch();
            }
        }
        last
    }

    /// Every watch event so far: nobody shown online within a stretch of
    /// versions in which they were invisible, versions never back.
    fn check_watch(&mut self) -> Result<(), TestCaseError> {
        while let Some(Some(event)) = self.watch.next().now_or_never() {
            let event =
                event.map_err(|e| TestCaseError::fail(format!("the watch failed: {e:?}")))?;
            let WatchEvent::Presence(view) = event else {
                continue;
            };
            let Some(user) = self.users.iter().position(|u| *u == view.user_id) else {
                continue;
            };
            let hidden = self.invisible[user].iter().any(|(from, until)| {
                view.version >= *from && until.is_none_or(|u| view.version < u)
            });
            check(!hidden || view.status == VisibleStatus::Offline, || {
                format!(
                    "{} is invisible but the watch shows them {:?} at version {}",
                    view.user_id, view.status, view.version
                )
            })?;
            // The snapshot shows a user never seen at version 0.
            let last = self.watched[user];
            check(
                view.version > last || view.version == 0 && last == 0,
                || {
                    format!(
                        "{}: the watch went from version {} to {}",
                        view.user_id, last, view.version
                    )
                },
            )?;
            self.watched[user] = view.version;
        }
        Ok(())
    }

    /// The hot store is checked against the leases only while it has
    /// everything the node holds (`strict`: it must); the rest always.
    async fn check_invariants(&mut self, strict: bool) -> Result<(), TestCaseError> {
        let in_step = !self.in_outage() && !self.flushed && self.node.hot_store_in_step();
        check(in_step || !strict, || {
            "the hot store did not catch up after the outage".to_owned()
        })?;
        let records = if in_step {
            match self.node.backends.hot.get(&self.users).await {
                Ok(records) => Some(records),
                Err(e) if strict => {
                    return Err(TestCaseError::fail(format!("hot store read failed: {e}")));
                }
                // A slow answer on a loaded machine: the next step checks.
                Err(_) => None,
            }
        } else {
            None
        };
        let views = self
            .node
            .get_presence(&self.contact, &self.users)
            .await
            .map_err(|e| TestCaseError::fail(format!("GetPresence as a contact failed: {e:?}")))?;
        let held = self.node.held_sessions();
        for (user, view) in views.iter().enumerate() {
            let user_id = &self.users[user];
            let mut leased: Vec<(String, u64)> = held
                .iter()
                .filter(|(key, _)| key.user_id == *user_id)
                .map(|(key, session)| (key.device_id.clone(), session.conn_id))
                .collect();
            leased.sort();
            let record = records
                .as_ref()
                .map(|records| records[user].clone().unwrap_or_default());
            if let Some(record) = &record {
                let mut in_store: Vec<(String, u64)> = record
                    .sessions
                    .iter()
                    .map(|s| (s.device_id.clone(), s.conn_id))
                    .collect();
                in_store.sort();
                check(in_store == leased, || {
                    format!(
                        "{user_id}: sessions in the hot store {in_store:?} != leases {leased:?}"
                    )
                })?;
            }
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
            self.check_visible(user, record.as_ref(), view)?;
        }
        self.check_watch()
    }

    /// `record` is the hot store's (when it is in step), `view` what a
    /// contact reading the user gets (during an outage, or after a loss
    /// until re-asserted, the durable store's).
    fn check_visible(
        &mut self,
        user: usize,
        record: Option<&UserRecord>,
        view: &View,
    ) -> Result<(), TestCaseError> {
        let user_id = &self.users[user];
        if let Some(record) = record {
            self.check_derived(user, record)?;
        }
        if self.chosen[user] == ChosenStatus::Invisible {
            check(view.status == VisibleStatus::Offline, || {
                format!("{user_id} chose invisible but is shown {:?}", view.status)
            })?;
        }
        let now = (view.version, view.status);
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

    fn check_derived(&self, user: usize, record: &UserRecord) -> Result<(), TestCaseError> {
        let user_id = &self.users[user];
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

/// Every Redis node stops answering clients for `ms` (`CLIENT PAUSE ALL`):
/// the node's calls run into its Redis timeout, as in a network outage.
async fn pause_hot_store(ms: u64) {
    let Some(Some(services)) = SERVICES.get() else {
        return;
    };
    for url in &services.redis {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
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
        // Short, so that calls into a paused Redis fail fast: the outages
        // last 0.3 to 1.5 s.
        args.extend(["--redis-timeout".into(), "400ms".into()]);
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
    let users: Vec<String> = (0..USERS)
        .map(|u| format!("model-{run}-user-{u}"))
        .collect();
    let contact = Caller {
        user_id: format!("model-{run}-contact"),
        admin: false,
        expires_at_secs: u64::MAX,
    };
    node.add_contacts(&contact.user_id, &users).await.unwrap();
    let watch = presence_server::watch::watch(
        node.clone(),
        contact.clone(),
        WatchRequest {
            user_ids: Vec::new(),
            known_versions: HashMap::new(),
        },
    )
    .unwrap();
    let mut model = Model {
        node,
        _projection: projection,
        users,
        contact,
        watch: Box::pin(watch),
        started: tokio::time::Instant::now(),
        leases: HashMap::new(),
        streams: Vec::new(),
        chosen: vec![ChosenStatus::Online; USERS],
        last_seen: vec![None; USERS],
        invisible: vec![Vec::new(); USERS],
        watched: vec![0; USERS],
        slack_ms: if services.is_some() { 150 } else { 0 },
        paused_until: None,
        flushed: false,
    };
    for (i, step) in steps.into_iter().enumerate() {
        let described = format!("{step:?}");
        if let Err(e) = model.run(step).await {
            // The next case must not start in this one's outage.
            model.wait_out_outage().await;
            return Err(TestCaseError::fail(format!("step {i} {described}: {e}")));
        }
    }
    model
        .recover()
        .await
        .map_err(|e| TestCaseError::fail(format!("after the last step: {e}")))
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

/// Redis Cluster and ScyllaDB from the environment, if set.
fn services() -> Option<Services> {
    SERVICES
        .get_or_init(|| {
            let (Some(redis), Some(scylla)) = (
                common::backend_from_env("PRESENCE_TEST_REDIS_CLUSTER"),
                common::backend_from_env("PRESENCE_TEST_SCYLLA_NODES"),
            ) else {
                return None;
            };
            Some(Services { redis, scylla })
        })
        .clone()
}

/// One case on Redis Cluster and ScyllaDB, in real time, one at a time: an
/// outage of one would fail the calls of another.
fn on_services(services: &Services, steps: Vec<Step>) -> Result<(), TestCaseError> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_case(Some(services), steps))
}

#[test]
fn sessions_and_leases_keep_their_invariants_on_redis_cluster_and_scylla() {
    let Some(services) = services() else {
        return;
    };
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(step(true), 1..40), |steps| {
            on_services(&services, steps)
        })
        .unwrap();
}

/// The shrunk cases of the defects the model found, kept as plain tests.
fn replay(steps: Vec<Step>) {
    on_embedded(steps).unwrap();
}

/// A case that needs Redis Cluster and ScyllaDB (skipped without them).
fn replay_on_services(steps: Vec<Step>) {
    if let Some(services) = services() {
        on_services(&services, steps).unwrap();
    }
}

/// Right after Redis restarted empty a contact read the user from the
/// durable store as offline (at the next version: no node had put a session
/// back yet), though this node held one; during the outage that followed,
/// the same read showed them online at the older version.
#[test]
fn a_read_between_a_hot_store_loss_and_an_outage_never_goes_back() {
    replay_on_services(vec![
        Step::Touch {
            user: 0,
            device: 0,
            idle: None,
        },
        Step::LoseHotStore,
        Step::Outage { ms: 850 },
    ]);
}

/// A change made through Redis a moment before it became unreachable was not
/// in the durable store yet (the history projection writes it from the
/// change log), so a read during the outage showed the user at an older
/// version: here version 0, as the user had never been visible.
#[test]
fn a_read_during_an_outage_sees_the_change_made_just_before_it() {
    replay_on_services(vec![
        Step::Outage { ms: 1378 },
        Step::LoseHotStore,
        Step::Maintain,
        Step::Touch {
            user: 1,
            device: 0,
            idle: Some(false),
        },
        Step::Outage { ms: 1457 },
    ]);
}

/// Changes queued during an outage were replayed at the time of the replay:
/// a user who went invisible during it showed offline at a new version once
/// the queue reached Redis (contacts saw the version move while invisible).
#[test]
fn a_replay_shows_the_versions_the_node_showed_during_the_outage() {
    replay_on_services(vec![
        Step::Touch {
            user: 0,
            device: 0,
            idle: None,
        },
        Step::Outage { ms: 800 },
        Step::SetStatus { user: 0, chosen: 2 },
    ]);
}

/// After Redis restarted empty, a change restored the user for the node's
/// live session as offline at the next version, and a read after the next
/// loss showed them online at the older one.
#[test]
fn a_restore_for_a_held_session_keeps_the_shown_version() {
    replay_on_services(vec![
        Step::Open {
            user: 1,
            device: 0,
            idle: false,
        },
        Step::LoseHotStore,
        Step::SetStatus { user: 1, chosen: 1 },
        Step::LoseHotStore,
    ]);
}

/// A replay that moved the user's version without changing their status
/// did not record it, so after the next loss of Redis the durable store
/// answered with an older version than contacts had seen.
#[test]
fn a_replayed_version_reaches_the_durable_store() {
    replay_on_services(vec![
        Step::Open {
            user: 1,
            device: 0,
            idle: true,
        },
        Step::Touch {
            user: 1,
            device: 1,
            idle: Some(true),
        },
        Step::Outage { ms: 1_494 },
        Step::Open {
            user: 1,
            device: 2,
            idle: false,
        },
        Step::Outage { ms: 400 },
        Step::Close { stream: 0 },
        Step::LoseHotStore,
        Step::Maintain,
        Step::LoseHotStore,
    ]);
}

/// After Redis restarted empty, the session limit counted only the sessions
/// put back so far: a third device got in, and the re-assertion of the
/// first was refused later, leaving a lease without its session.
#[test]
fn the_session_limit_counts_the_sessions_a_hot_store_loss_forgot() {
    replay_on_services(vec![
        Step::Touch {
            user: 0,
            device: 2,
            idle: Some(true),
        },
        Step::LoseHotStore,
        Step::Open {
            user: 0,
            device: 1,
            idle: false,
        },
        Step::Touch {
            user: 0,
            device: 0,
            idle: None,
        },
    ]);
}

/// Redis restarted empty, then the user's session ended during an outage:
/// the replay seeded the user as the durable store knew them before (one
/// version above it, offline) and the end changed nothing there, so the hot
/// store showed an older version than contacts had seen during the outage.
#[test]
fn a_replay_into_an_emptied_hot_store_keeps_the_versions_seen_during_the_outage() {
    replay_on_services(vec![
        Step::Open {
            user: 1,
            device: 1,
            idle: false,
        },
        Step::LoseHotStore,
        Step::Outage { ms: 1_200 },
        Step::Outage { ms: 500 },
        Step::Sweep,
        Step::SetStatus { user: 1, chosen: 1 },
        Step::Maintain,
    ]);
}

/// The same with a replay that shows the user again before they go
/// invisible: seeding the version contacts saw last would make the replay
/// move it once more.
#[test]
fn a_replay_into_an_emptied_hot_store_moves_nothing_while_invisible() {
    replay_on_services(vec![
        Step::Touch {
            user: 1,
            device: 2,
            idle: Some(true),
        },
        Step::LoseHotStore,
        Step::Outage { ms: 900 },
        Step::Open {
            user: 1,
            device: 1,
            idle: false,
        },
        Step::SetStatus { user: 1, chosen: 2 },
        Step::Close { stream: 1 },
        Step::Advance { ms: 2_000 },
    ]);
}

/// A replay into an emptied Redis built on the durable state and converged
/// on an older version than the node had shown its contacts meanwhile.
#[test]
fn a_replay_never_shows_an_older_version_than_the_outage_did() {
    replay_on_services(vec![
        Step::Open {
            user: 0,
            device: 0,
            idle: false,
        },
        Step::Outage { ms: 1_235 },
        Step::Touch {
            user: 0,
            device: 2,
            idle: Some(true),
        },
        Step::Open {
            user: 1,
            device: 2,
            idle: false,
        },
        Step::LoseHotStore,
        Step::Sweep,
    ]);
}

/// A session that expired after Redis restarted empty ended on an empty
/// record: nothing changed there, nothing reached the durable store, and
/// during the next outage the user read online from it again.
#[test]
fn a_session_ending_after_a_hot_store_loss_reaches_the_durable_store() {
    replay_on_services(vec![
        Step::Touch {
            user: 0,
            device: 1,
            idle: Some(true),
        },
        Step::LoseHotStore,
        Step::Advance { ms: 2_048 },
        Step::Maintain,
        Step::Outage { ms: 1_390 },
    ]);
}

/// Redis restarted empty between two renewals of the node lease, so nothing
/// told the node; the next change of an invisible user's device built on
/// the default choice and showed them online.
#[test]
fn a_change_right_after_the_hot_store_restarted_empty_keeps_an_invisible_user_offline() {
    replay_on_services(vec![
        Step::Open {
            user: 0,
            device: 0,
            idle: false,
        },
        Step::SetStatus { user: 0, chosen: 2 },
        Step::LoseHotStore,
        Step::Beat {
            stream: 0,
            idle: Some(true),
        },
        Step::Touch {
            user: 0,
            device: 1,
            idle: Some(true),
        },
    ]);
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
