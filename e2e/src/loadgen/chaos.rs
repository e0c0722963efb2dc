//! The chaos soak: many users, each with one device session held as a raw
//! heartbeat stream, and a random chaos loop that kills, reconnects, replaces
//! and logs out their clients, while a node may be `kill -9`'d and restarted
//! from outside. The generator keeps its own truth (which users have a live
//! client); at the end the users the service shows online must be exactly
//! those: no ghosts (online without a live client), none missing.
//!
//! Every user is one actor task that owns its stream, so the truth of a user
//! changes in one place only. The chaos loop and the ramp talk to actors
//! through small bounded command channels.
//!
//! - **kill**: the stream is dropped (RST_STREAM, as a vanished app); the
//!   session must end after the grace period;
//! - **reconnect**: a killed or logged-out client opens a new stream;
//! - **replace**: a live client opens a second stream of the same device; the
//!   server ends the old one with ABORTED;
//! - **logout**: Disconnect (on a random node); the server ends the stream
//!   with FAILED_PRECONDITION;
//! - **status**: a beat carrying a status (ONLINE or BUSY, never INVISIBLE:
//!   that would read as offline) and an activity.
//!
//! A stream that ends without the generator asking (a node died, the server
//! sent GoAway) leaves its client "down": it reconnects to any node that
//! answers, with backoff, and counts as meant to be live.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt;
use http::uri::PathAndQuery;
use parking_lot::Mutex;
use presence_proto::v1 as pb;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use super::config::SoakConfig;
use super::net::{SmallCodec, connect};
use super::probe;
use super::stats::Errors;

const HEARTBEAT: &str = "/presence.v1.PresenceService/Heartbeat";
const DEVICE: &str = "d";
/// Largest GetPresence batch the server accepts by default (--max-batch).
const BATCH: usize = 100;
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an open, a Disconnect or the end of a stream may take before it
/// counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept per user, to explain a ghost.
const HISTORY: usize = 12;

/// What the generator knows of a user's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    /// Not opened yet (the ramp).
    New = 0,
    /// A stream is open and the server answered `opened`.
    Live = 1,
    /// The chaos dropped the stream; offline until a reconnect.
    Killed = 2,
    /// Logged out (Disconnect); offline until a reconnect.
    LoggedOut = 3,
    /// The stream ended without the generator asking (node died, GoAway) or
    /// an open failed: reconnecting, meant to be live.
    Down = 4,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Live,
            2 => State::Killed,
            3 => State::LoggedOut,
            4 => State::Down,
            _ => State::New,
        }
    }
}

/// Commands the chaos loop (and the ramp) sends an actor.
#[derive(Clone, Copy, Debug)]
enum Cmd {
    Connect,
    Kill,
    Replace,
    Logout,
    Status,
}

const KINDS: [&str; 5] = ["kill", "reconnect", "replace", "logout", "status"];

/// Killed and logged-out users, for the reconnect action to pick from in
/// O(1): a list with each member's position.
struct OfflineSet {
    list: Vec<u32>,
    pos: Vec<u32>,
}

const ABSENT: u32 = u32::MAX;

impl OfflineSet {
    fn new(users: usize) -> Self {
        OfflineSet {
            list: Vec::new(),
            pos: vec![ABSENT; users],
        }
    }

    fn insert(&mut self, u: usize) {
        if self.pos[u] == ABSENT {
            self.pos[u] = self.list.len() as u32;
            self.list.push(u as u32);
        }
    }

    fn take_random(&mut self) -> Option<usize> {
        if self.list.is_empty() {
            return None;
        }
        let i = rand::random_range(0..self.list.len());
        let u = self.list.swap_remove(i) as usize;
        if let Some(moved) = self.list.get(i) {
            self.pos[*moved as usize] = i as u32;
        }
        self.pos[u] = ABSENT;
        Some(u)
    }
}

struct User {
    /// The truth: a [`State`], written only by the user's actor.
    state: AtomicU8,
    /// The user's last events (ms since the start, what), to explain a ghost
    /// or a missing user.
    log: Mutex<VecDeque<(u64, String)>>,
}

/// State the actors, the chaos loop and the sampler share.
struct Soak {
    cfg: SoakConfig,
    started: Instant,
    tokens: Vec<AsciiMetadataValue>,
    admin_token: AsciiMetadataValue,
    /// `channels[node][k]`: the connections to each node.
    channels: Vec<Vec<Channel>>,
    users: Vec<User>,
    offline: Mutex<OfflineSet>,
    /// Bounds opens in flight (the ramp, and the reconnect storm after a
    /// node dies).
    open_gate: Semaphore,
    /// Chaos actions sent, by kind.
    actions: Errors,
    /// Stream ends and call outcomes, by cause.
    outcomes: Errors,
    beats_acked: AtomicU64,
    opens: AtomicU64,
    /// Streams the server left open that are kept beating (--keep-unended).
    zombies: AtomicU64,
    /// Raised when the soak ends: kept streams hang up.
    stop: tokio::sync::watch::Sender<bool>,
}

fn bearer(token: &str) -> anyhow::Result<AsciiMetadataValue> {
    Ok(format!("Bearer {token}").parse()?)
}

fn user_id(prefix: &str, u: usize) -> String {
    format!("{prefix}u{u}")
}

fn code(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Soak {
    fn state(&self, u: usize) -> State {
        State::from_u8(self.users[u].state.load(Ordering::Relaxed))
    }

    fn set_state(&self, u: usize, state: State, why: &str) {
        self.users[u].state.store(state as u8, Ordering::Relaxed);
        if matches!(state, State::Killed | State::LoggedOut) {
            self.offline.lock().insert(u);
        }
        self.note(u, why);
    }

    fn note(&self, u: usize, what: &str) {
        let at = self.started.elapsed().as_millis() as u64;
        let mut log = self.users[u].log.lock();
        if log.len() == HISTORY {
            log.pop_front();
        }
        log.push_back((at, what.to_owned()));
    }

    fn channel(&self, node: usize, u: usize) -> Channel {
        let conns = &self.channels[node];
        conns[u % conns.len()].clone()
    }

    fn random_node(&self) -> usize {
        rand::random_range(0..self.channels.len())
    }

    fn count_states(&self) -> [u64; 5] {
        let mut counts = [0u64; 5];
        for u in 0..self.users.len() {
            counts[self.state(u) as usize] += 1;
        }
        counts
    }
}

/// One open heartbeat stream.
struct Stream {
    tx: mpsc::Sender<pb::HeartbeatRequest>,
    inbound: tonic::Streaming<pb::HeartbeatResponse>,
    ticker: tokio::time::Interval,
    seq: u64,
    node: usize,
}

enum Event {
    Tick,
    Message(Result<Option<pb::HeartbeatResponse>, tonic::Status>),
}

impl Stream {
    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.ticker.tick() => Event::Tick,
            message = self.inbound.message() => Event::Message(message),
        }
    }

    fn beat(&mut self, status: pb::UserStatus, activity: pb::Activity, message: String) {
        self.seq += 1;
        // A full request channel means the transport is stalled: the beat
        // is skipped, as a real client's would be late.
        let _ = self.tx.try_send(pb::HeartbeatRequest {
            request: Some(pb::heartbeat_request::Request::Beat(pb::SessionBeat {
                seq: self.seq,
                activity: activity as i32,
                status: status as i32,
                custom_message: message,
            })),
        });
    }
}

/// Opens a session of user `u`'s device on `node` and waits for `opened`.
async fn open(soak: &Soak, u: usize, node: usize) -> Result<Stream, String> {
    let _permit = soak.open_gate.acquire().await.map_err(|_| "closed")?;
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(pb::HeartbeatRequest {
        request: Some(pb::heartbeat_request::Request::Open(pb::SessionOpen {
            device_id: DEVICE.into(),
            platform: pb::Platform::Android as i32,
            activity: pb::Activity::Active as i32,
            status: pb::UserStatus::Unspecified as i32,
            custom_message: String::new(),
        })),
    })
    .expect("a new channel has room");
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", soak.tokens[u].clone());
    let mut grpc = tonic::client::Grpc::new(soak.channel(node, u));
    let opening = async {
        grpc.ready()
            .await
            .map_err(|error| format!("not ready: {error}"))?;
        let codec =
            SmallCodec::<pb::HeartbeatRequest, pb::HeartbeatResponse>::new(soak.cfg.client_buffer);
        let mut inbound = grpc
            .streaming(request, PathAndQuery::from_static(HEARTBEAT), codec)
            .await
            .map_err(|status| code(&status))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(pb::HeartbeatResponse {
                response: Some(pb::heartbeat_response::Response::Opened(opened)),
            })) => Ok((inbound, opened)),
            Ok(_) => Err("no `opened` reply".to_owned()),
            Err(status) => Err(code(&status)),
        }
    };
    let (inbound, opened) = tokio::time::timeout(CALL_TIMEOUT, opening)
        .await
        .map_err(|_| "timed out".to_owned())??;
    soak.opens.fetch_add(1, Ordering::Relaxed);
    let interval = Duration::from_millis(u64::from(opened.heartbeat_interval_ms).max(100));
    // A random phase, so that the beats of many sessions spread evenly.
    let first = tokio::time::Instant::now() + interval.mul_f64(rand::random::<f64>());
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Ok(Stream {
        tx,
        inbound,
        ticker,
        seq: 0,
        node,
    })
}

/// Waits for a stream to end (beating meanwhile) and names how it ended.
async fn end_of(stream: &mut Stream, limit: Duration) -> String {
    let ending = async {
        loop {
            match stream.next().await {
                Event::Tick => stream.beat(
                    pb::UserStatus::Unspecified,
                    pb::Activity::Unspecified,
                    String::new(),
                ),
                Event::Message(Ok(Some(_))) => {}
                Event::Message(Ok(None)) => return "OK (no status)".to_owned(),
                Event::Message(Err(status)) => return code(&status),
            }
        }
    };
    tokio::time::timeout(limit, ending)
        .await
        .unwrap_or_else(|_| format!("still open after {} s", limit.as_secs()))
}

/// After a stream the server should have ended was left open: with
/// --keep-unended it stays open and beating until the soak ends (and the
/// way it ends later is counted), else it is dropped.
fn unended(soak: &Arc<Soak>, mut stream: Stream, what: &'static str) {
    if !soak.cfg.keep_unended {
        return;
    }
    let soak = soak.clone();
    tokio::spawn(async move {
        soak.zombies.fetch_add(1, Ordering::Relaxed);
        let mut stop = soak.stop.subscribe();
        let how = tokio::select! {
            how = end_of(&mut stream, Duration::from_secs(365 * 24 * 3600)) => how,
            _ = stop.wait_for(|raised| *raised) => "still open at the end".to_owned(),
        };
        soak.zombies.fetch_sub(1, Ordering::Relaxed);
        soak.outcomes
            .count(format!("{what} left open, kept beating: then {how}"));
    });
}

/// Where `node` is, seen from a stream on `stream_node`.
fn place(stream_node: usize, node: usize) -> &'static str {
    if stream_node == node {
        "same node"
    } else {
        "other node"
    }
}

/// Waits for `stream`, which the server should end because of `cause`, to
/// end, and counts how it did; one left open is kept as `unended` says.
async fn await_end(
    soak: &Arc<Soak>,
    mut stream: Stream,
    what: &'static str,
    cause: &str,
) -> String {
    let how = end_of(&mut stream, CALL_TIMEOUT).await;
    soak.outcomes
        .count(format!("{what} ended ({cause}): {how}"));
    if how.starts_with("still open") {
        unended(soak, stream, what);
    }
    how
}

/// Logs user `u` out through `node`.
async fn disconnect(soak: &Soak, u: usize, node: usize) -> Result<(), String> {
    let mut request = Request::new(pb::DisconnectRequest {
        device_id: DEVICE.into(),
    });
    request
        .metadata_mut()
        .insert("authorization", soak.tokens[u].clone());
    let mut client = PresenceServiceClient::new(soak.channel(node, u));
    let call = client.disconnect(request);
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(code(&status)),
        Err(_) => Err("timed out".into()),
    }
}

/// One user's client: owns its stream, obeys commands, reconnects after a
/// stream it did not end.
async fn actor(soak: Arc<Soak>, u: usize, mut commands: mpsc::Receiver<Cmd>) {
    let mut current: Option<Stream> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    // The node of the stream that broke: reconnects try the others first.
    let mut broken_node = 0usize;
    enum Wake {
        Cmd(Option<Cmd>),
        Stream(Event),
        Retry,
    }
    loop {
        let wake = {
            let next = async {
                match current.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = commands.recv() => Wake::Cmd(cmd),
                event = next => Wake::Stream(event),
                _ = retry => Wake::Retry,
            }
        };
        match wake {
            // The soak is over: dropping the stream ends it.
            Wake::Cmd(None) => return,
            Wake::Stream(Event::Tick) => {
                if let Some(stream) = current.as_mut() {
                    stream.beat(
                        pb::UserStatus::Unspecified,
                        pb::Activity::Unspecified,
                        String::new(),
                    );
                }
            }
            Wake::Stream(Event::Message(Ok(Some(message)))) => match message.response {
                Some(pb::heartbeat_response::Response::Ack(_)) => {
                    soak.beats_acked.fetch_add(1, Ordering::Relaxed);
                }
                Some(pb::heartbeat_response::Response::GoAway(_)) => {
                    soak.outcomes.count("live stream: GoAway received");
                }
                _ => {}
            },
            Wake::Stream(Event::Message(end)) => {
                // Not asked for: a node died, or the server ended it.
                let how = match end {
                    Ok(_) => "OK (no status)".to_owned(),
                    Err(status) => code(&status),
                };
                let node = current.take().map(|s| s.node).unwrap_or(0);
                broken_node = node;
                soak.outcomes
                    .count(format!("live stream ended unasked: {how}"));
                soak.set_state(
                    u,
                    State::Down,
                    &format!("stream on node {node} ended: {how}"),
                );
                failures = 0;
                retry_at = Some(backoff(0));
            }
            Wake::Retry => {
                retry_at = None;
                let node = (broken_node + 1 + failures as usize) % soak.channels.len();
                match open(&soak, u, node).await {
                    Ok(stream) => {
                        current = Some(stream);
                        soak.outcomes.count("reconnect after a break: opened");
                        soak.set_state(u, State::Live, &format!("reopened on node {node}"));
                    }
                    Err(why) => {
                        failures += 1;
                        soak.outcomes
                            .count(format!("reconnect after a break: failed: {why}"));
                        soak.note(u, &format!("reopen on node {node} failed: {why}"));
                        retry_at = Some(backoff(failures));
                    }
                }
            }
            Wake::Cmd(Some(cmd)) => {
                command(&soak, u, cmd, &mut current, &mut retry_at, &mut broken_node).await;
            }
        }
    }
}

/// When to retry after `failures` failed opens: 100 ms to 3 s, with jitter.
fn backoff(failures: u32) -> tokio::time::Instant {
    let base = Duration::from_millis(100 << failures.min(5)).min(Duration::from_secs(3));
    tokio::time::Instant::now() + base.mul_f64(0.5 + rand::random::<f64>())
}

async fn command(
    soak: &Arc<Soak>,
    u: usize,
    cmd: Cmd,
    current: &mut Option<Stream>,
    retry_at: &mut Option<tokio::time::Instant>,
    broken_node: &mut usize,
) {
    match cmd {
        Cmd::Connect => {
            if current.is_some() || retry_at.is_some() {
                soak.outcomes.count("connect: already live or reconnecting");
                return;
            }
            let node = if soak.state(u) == State::New {
                u % soak.channels.len()
            } else {
                soak.random_node()
            };
            match open(soak, u, node).await {
                Ok(stream) => {
                    *current = Some(stream);
                    soak.set_state(u, State::Live, &format!("opened on node {node}"));
                }
                Err(why) => {
                    *broken_node = node;
                    soak.outcomes.count(format!("connect: failed: {why}"));
                    soak.set_state(
                        u,
                        State::Down,
                        &format!("open on node {node} failed: {why}"),
                    );
                    *retry_at = Some(backoff(1));
                }
            }
        }
        Cmd::Kill => {
            let Some(stream) = current.take() else {
                soak.outcomes.count("kill: not live");
                return;
            };
            // Dropping both halves resets the HTTP/2 stream: the server sees
            // the client vanish mid-stream.
            drop(stream);
            soak.set_state(u, State::Killed, "killed");
        }
        Cmd::Replace => {
            let Some(old_node) = current.as_ref().map(|s| s.node) else {
                soak.outcomes.count("replace: not live");
                return;
            };
            let node = soak.random_node();
            match open(soak, u, node).await {
                Ok(stream) => {
                    let old = current.replace(stream).expect("checked above");
                    soak.note(u, &format!("replaced node {old_node} by node {node}"));
                    let soak = soak.clone();
                    // The old stream must be ended by the server (ABORTED);
                    // it is held, and keeps its request side open, until then.
                    let cause = format!("new one on the {}", place(old_node, node));
                    tokio::spawn(async move {
                        await_end(&soak, old, "replaced stream", &cause).await;
                    });
                }
                Err(why) => {
                    soak.outcomes.count(format!("replace: open failed: {why}"));
                    soak.note(u, &format!("replace on node {node} failed: {why}"));
                }
            }
        }
        Cmd::Logout => {
            if current.is_none() {
                soak.outcomes.count("logout: not live");
                return;
            }
            let stream_node = current.as_ref().map_or(0, |s| s.node);
            let node = soak.random_node();
            let cause = format!("Disconnect on the {}", place(stream_node, node));
            if let Err(why) = disconnect(soak, u, node).await {
                soak.outcomes
                    .count(format!("logout: Disconnect failed: {why}"));
                soak.note(u, &format!("Disconnect failed: {why}"));
                return;
            }
            let stream = current.take().expect("checked above");
            let how = await_end(soak, stream, "logged-out stream", &cause).await;
            soak.set_state(
                u,
                State::LoggedOut,
                &format!("logged out, stream ended: {how}"),
            );
        }
        Cmd::Status => {
            let Some(stream) = current.as_mut() else {
                soak.outcomes.count("status: not live");
                return;
            };
            let status = if rand::random::<bool>() {
                pb::UserStatus::Online
            } else {
                pb::UserStatus::Busy
            };
            let activity = if rand::random::<bool>() {
                pb::Activity::Active
            } else {
                pb::Activity::Idle
            };
            stream.beat(status, activity, format!("soak {}", stream.seq + 1));
            soak.note(u, &format!("status {status:?} {activity:?}"));
        }
    }
}

/// The chaos loop: `rate` actions per second for `duration`.
async fn chaos(soak: Arc<Soak>, commands: Arc<Vec<mpsc::Sender<Cmd>>>, duration: Duration) {
    let rate = soak.cfg.chaos_rate;
    if rate <= 0.0 {
        tokio::time::sleep(duration).await;
        return;
    }
    let weights = soak.cfg.weights.clone();
    let total: u32 = weights.iter().sum();
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let users = soak.users.len();
    for n in 0u64.. {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let mut pick = rand::random_range(0..total);
        let kind = weights
            .iter()
            .position(|w| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .expect("pick is below the total");
        let (u, cmd) = if kind == 1 {
            let Some(u) = soak.offline.lock().take_random() else {
                soak.actions.count("reconnect: none offline (skipped)");
                continue;
            };
            (u, Cmd::Connect)
        } else {
            // A random live user; a few tries, as nearly all are live.
            let Some(u) = (0..32)
                .map(|_| rand::random_range(0..users))
                .find(|u| soak.state(*u) == State::Live)
            else {
                soak.actions
                    .count(format!("{}: no live user found (skipped)", KINDS[kind]));
                continue;
            };
            let cmd = match kind {
                0 => Cmd::Kill,
                2 => Cmd::Replace,
                3 => Cmd::Logout,
                _ => Cmd::Status,
            };
            (u, cmd)
        };
        match commands[u].try_send(cmd) {
            Ok(()) => soak.actions.count(KINDS[kind]),
            Err(_) => {
                soak.actions
                    .count(format!("{}: actor busy (skipped)", KINDS[kind]));
                if kind == 1 {
                    soak.offline.lock().insert(u);
                }
            }
        }
    }
}

/// Presence of every user, through the admin token, in batches of 100 over
/// the nodes that answer. `None` for a batch no node answered.
async fn scan(soak: &Soak) -> Vec<Option<pb::Presence>> {
    let users = soak.users.len();
    let batches: Vec<(usize, usize)> = (0..users)
        .step_by(BATCH)
        .map(|from| (from, (from + BATCH).min(users)))
        .collect();
    let results: Vec<(usize, Vec<Option<pb::Presence>>)> = futures::stream::iter(batches)
        .enumerate()
        .map(|(i, (from, to))| async move {
            let ids: Vec<String> = (from..to)
                .map(|u| user_id(&soak.cfg.user_prefix, u))
                .collect();
            for attempt in 0..soak.channels.len() * 2 {
                let node = (i + attempt) % soak.channels.len();
                let mut request = Request::new(pb::GetPresenceRequest {
                    user_ids: ids.clone(),
                });
                request
                    .metadata_mut()
                    .insert("authorization", soak.admin_token.clone());
                let mut client = PresenceServiceClient::new(soak.channel(node, i));
                let call = client.get_presence(request);
                match tokio::time::timeout(CALL_TIMEOUT, call).await {
                    Ok(Ok(reply)) => {
                        let presences = reply.into_inner().presences;
                        if presences.len() == ids.len() {
                            return (from, presences.into_iter().map(Some).collect());
                        }
                        soak.outcomes
                            .count("GetPresence: wrong number of presences");
                    }
                    Ok(Err(status)) => soak
                        .outcomes
                        .count(format!("GetPresence: {}", code(&status))),
                    Err(_) => soak.outcomes.count("GetPresence: timed out"),
                }
            }
            (from, vec![None; to - from])
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut all = vec![None; users];
    for (from, presences) in results {
        for (j, presence) in presences.into_iter().enumerate() {
            all[from + j] = presence;
        }
    }
    all
}

fn shown_online(presence: &pb::Presence) -> bool {
    matches!(
        pb::VisibleStatus::try_from(presence.status),
        Ok(pb::VisibleStatus::Online | pb::VisibleStatus::Idle | pb::VisibleStatus::Busy)
    )
}

/// One sample of the run, every --sample-every.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the generator started.
    pub t: f64,
    pub phase: String,
    /// VmRSS of each node, KiB (None: not running).
    pub rss_kb: Vec<Option<u64>>,
    pub pids: Vec<Option<u32>>,
    /// The presence_sessions gauge of each node.
    pub sessions: Vec<Option<u64>>,
    /// Users with a live client, in the generator's truth.
    pub live: u64,
    /// Clients reconnecting after a stream they did not end.
    pub down: u64,
    /// Killed or logged out.
    pub offline: u64,
    /// Users GetPresence shows online.
    pub shown_online: u64,
    /// Batches of the scan no node answered.
    pub scan_failed: u64,
    pub actions: u64,
    pub beats_acked: u64,
    /// Streams the server left open, kept beating (--keep-unended).
    pub zombies: u64,
    pub loadgen_rss_kb: u64,
}

/// A ghost or a missing user, with what the generator did to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mismatch {
    pub user_id: String,
    pub truth: String,
    pub status: String,
    pub devices: usize,
    pub offline_reason: String,
    pub last_seen_unix_ms: i64,
    pub version: u64,
    /// The generator's last events of the user (ms since start, what).
    pub history: Vec<(u64, String)>,
}

/// The comparison at the end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Check {
    /// Seconds since the chaos stopped.
    pub after_chaos_secs: f64,
    pub live: u64,
    pub shown_online: u64,
    pub ghosts: u64,
    pub missing: u64,
    /// Users whose truth changed while the scan ran (left out).
    pub unsettled: u64,
    /// Users no node answered for.
    pub unknown: u64,
    pub examples: Vec<Mismatch>,
}

/// Memory of one node over the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeMemory {
    pub node: usize,
    /// VmRSS at the end of the warm-up (after the ramp), KiB.
    pub warmup_kb: Option<u64>,
    pub end_kb: Option<u64>,
    pub max_kb: Option<u64>,
    /// When the node's pid changed (a restart), seconds since the start.
    pub restarted_at: Vec<f64>,
    /// VmRSS one warm-up after its last restart, KiB: the restarted node's
    /// own baseline.
    pub after_restart_warmup_kb: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SoakReport {
    pub label: String,
    pub started_unix_ms: u64,
    pub targets: Vec<String>,
    pub sessions: u64,
    pub connections_per_node: u64,
    pub chaos_rate: f64,
    pub weights: Vec<u32>,
    pub keep_unended: bool,
    pub duration_secs: f64,
    pub ramp_secs: f64,
    /// When the chaos started and stopped, seconds since the start.
    pub chaos_from_secs: f64,
    pub chaos_to_secs: f64,
    pub actions: BTreeMap<String, u64>,
    pub outcomes: BTreeMap<String, u64>,
    pub opens: u64,
    pub beats_acked: u64,
    pub samples: Vec<Sample>,
    pub memory: Vec<NodeMemory>,
    pub checks: Vec<Check>,
    pub loadgen_cpu_secs: f64,
    pub loadgen_secs: f64,
}

impl SoakReport {
    /// Whether the final check found the online users exactly as the truth.
    pub fn clean(&self) -> bool {
        self.checks
            .last()
            .is_some_and(|c| c.ghosts == 0 && c.missing == 0 && c.unknown == 0)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

fn read_pid(path: &PathBuf) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The presence_sessions gauge from a node's metrics listener.
async fn sessions_gauge(addr: SocketAddr) -> Option<u64> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        text.lines().find_map(|line| {
            let rest = line.strip_prefix("presence_sessions")?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            Some(value as u64)
        })
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

async fn sample(soak: &Soak, phase: &str) -> Sample {
    let pids: Vec<Option<u32>> = soak.cfg.server_pid_file.iter().map(read_pid).collect();
    let rss_kb = pids
        .iter()
        .map(|pid| {
            pid.and_then(|pid| probe::sample(&[pid]).ok().flatten())
                .map(|s| s.rss_kb)
        })
        .collect();
    let mut sessions = Vec::new();
    for addr in &soak.cfg.metrics {
        sessions.push(sessions_gauge(*addr).await);
    }
    let presences = scan(soak).await;
    let states = soak.count_states();
    Sample {
        t: soak.started.elapsed().as_secs_f64(),
        phase: phase.to_owned(),
        rss_kb,
        pids,
        sessions,
        live: states[State::Live as usize],
        down: states[State::Down as usize],
        offline: states[State::Killed as usize] + states[State::LoggedOut as usize],
        shown_online: presences
            .iter()
            .flatten()
            .filter(|p| shown_online(p))
            .count() as u64,
        scan_failed: presences.iter().filter(|p| p.is_none()).count() as u64,
        actions: soak.actions.total(),
        beats_acked: soak.beats_acked.load(Ordering::Relaxed),
        zombies: soak.zombies.load(Ordering::Relaxed),
        loadgen_rss_kb: probe::sample_self().rss_kb,
    }
}

fn print_sample(s: &Sample) {
    let rss: Vec<String> = s
        .rss_kb
        .iter()
        .map(|r| r.map_or("-".into(), |kb| format!("{:.1}", kb as f64 / 1024.0)))
        .collect();
    let sessions: Vec<String> = s
        .sessions
        .iter()
        .map(|n| n.map_or("-".into(), |n| n.to_string()))
        .collect();
    eprintln!(
        "[soak {:>7.1}s {:<6}] live {:>6} down {:>5} offline {:>5} shown online {:>6} | rss MiB [{}] sessions [{}] | actions {} beats acked {} kept unended {}",
        s.t,
        s.phase,
        s.live,
        s.down,
        s.offline,
        s.shown_online,
        rss.join(", "),
        sessions.join(", "),
        s.actions,
        s.beats_acked,
        s.zombies,
    );
}

/// Compares the users shown online with the truth.
async fn check(soak: &Soak, after_chaos: Instant) -> Check {
    let before: Vec<State> = (0..soak.users.len()).map(|u| soak.state(u)).collect();
    let presences = scan(soak).await;
    let mut check = Check {
        after_chaos_secs: after_chaos.elapsed().as_secs_f64(),
        ..Check::default()
    };
    for (u, presence) in presences.iter().enumerate() {
        let truth = soak.state(u);
        if truth != before[u] {
            check.unsettled += 1;
            continue;
        }
        let live = truth == State::Live;
        check.live += u64::from(live);
        let Some(presence) = presence else {
            check.unknown += 1;
            continue;
        };
        let online = shown_online(presence);
        check.shown_online += u64::from(online);
        if online == live {
            continue;
        }
        if online {
            check.ghosts += 1;
        } else {
            check.missing += 1;
        }
        if check.examples.len() < 20 {
            check.examples.push(Mismatch {
                user_id: presence.user_id.clone(),
                truth: format!("{truth:?}"),
                status: format!("{:?}", pb::VisibleStatus::try_from(presence.status)),
                devices: presence.devices.len(),
                offline_reason: format!(
                    "{:?}",
                    pb::OfflineReason::try_from(presence.offline_reason)
                ),
                last_seen_unix_ms: presence.last_seen_unix_ms,
                version: presence.version,
                history: soak.users[u].log.lock().iter().cloned().collect(),
            });
        }
    }
    check
}

fn memory(samples: &[Sample], nodes: usize, warmup_end: f64, warmup: f64) -> Vec<NodeMemory> {
    (0..nodes)
        .map(|node| {
            let mut m = NodeMemory {
                node,
                ..NodeMemory::default()
            };
            let mut last_pid = None;
            for s in samples {
                let pid = s.pids.get(node).copied().flatten();
                let rss = s.rss_kb.get(node).copied().flatten();
                if let (Some(pid), Some(last)) = (pid, last_pid)
                    && pid != last
                {
                    m.restarted_at.push(s.t);
                }
                if pid.is_some() {
                    last_pid = pid;
                }
                if m.warmup_kb.is_none() && s.t >= warmup_end && m.restarted_at.is_empty() {
                    m.warmup_kb = rss;
                }
                if let Some(restart) = m.restarted_at.last()
                    && s.t >= restart + warmup
                    && m.after_restart_warmup_kb.is_none()
                {
                    m.after_restart_warmup_kb = rss;
                }
                if rss.is_some() {
                    m.end_kb = rss;
                }
                m.max_kb = m.max_kb.max(rss);
            }
            m
        })
        .collect()
}

/// Runs the soak: ramp, chaos, settle, check.
pub async fn run(cfg: SoakConfig) -> anyhow::Result<SoakReport> {
    cfg.validate()?;
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let secret = cfg
        .jwt_secret
        .clone()
        .unwrap_or_else(|| presence_server::config::DEV_JWT_SECRET.to_owned());
    let tokens = (0..cfg.sessions)
        .map(|u| {
            bearer(&presence_server::auth::mint(
                &secret,
                &user_id(&cfg.user_prefix, u),
                false,
                TOKEN_TTL,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let admin_token = bearer(&presence_server::auth::mint(
        &secret,
        &format!("{}admin", cfg.user_prefix),
        true,
        TOKEN_TTL,
    ))?;
    let mut channels = Vec::new();
    for (node, target) in cfg.target.iter().enumerate() {
        let mut conns = Vec::new();
        for k in 0..cfg.connections_per_node {
            let local = (!cfg.source_ip.is_empty())
                .then(|| cfg.source_ip[(node + k) % cfg.source_ip.len()]);
            conns.push(
                connect(*target, local, CALL_TIMEOUT)
                    .await
                    .with_context(|| format!("connecting to {target}"))?,
            );
        }
        channels.push(conns);
    }
    let users = (0..cfg.sessions)
        .map(|_| User {
            state: AtomicU8::new(State::New as u8),
            log: Mutex::new(VecDeque::new()),
        })
        .collect();
    let soak = Arc::new(Soak {
        started,
        tokens,
        admin_token,
        channels,
        users,
        offline: Mutex::new(OfflineSet::new(cfg.sessions)),
        open_gate: Semaphore::new(cfg.open_concurrency.max(1)),
        actions: Errors::default(),
        outcomes: Errors::default(),
        beats_acked: AtomicU64::new(0),
        opens: AtomicU64::new(0),
        zombies: AtomicU64::new(0),
        stop: tokio::sync::watch::channel(false).0,
        cfg: cfg.clone(),
    });

    let mut senders = Vec::with_capacity(cfg.sessions);
    let mut actors = Vec::with_capacity(cfg.sessions);
    for u in 0..cfg.sessions {
        let (tx, rx) = mpsc::channel(4);
        senders.push(tx);
        actors.push(tokio::spawn(actor(soak.clone(), u, rx)));
    }
    let senders = Arc::new(senders);

    eprintln!("[soak] opening {} sessions", cfg.sessions);
    for tx in senders.iter() {
        tx.send(Cmd::Connect).await.ok();
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let states = soak.count_states();
        if states[State::Live as usize] as usize == cfg.sessions || Instant::now() > ramp_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ramp_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[soak] ramp done in {ramp_secs:.1} s: {:?} (new, live, killed, logged out, down)",
        soak.count_states()
    );

    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let phase = Arc::new(Mutex::new("chaos"));
    let sampler = {
        let soak = soak.clone();
        let samples = samples.clone();
        let phase = phase.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(soak.cfg.sample_every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let name = *phase.lock();
                let s = sample(&soak, name).await;
                print_sample(&s);
                samples.lock().push(s);
            }
        })
    };

    let chaos_from_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[soak] chaos for {}",
        humantime::format_duration(cfg.duration)
    );
    chaos(soak.clone(), senders.clone(), cfg.duration).await;
    let chaos_to_secs = started.elapsed().as_secs_f64();
    let chaos_end = Instant::now();
    *phase.lock() = "settle";

    // Let every command in flight finish (a logout waits up to CALL_TIMEOUT
    // for its stream to end), and every client that is meant to be live
    // (down: its stream broke) reconnect.
    tokio::time::sleep(CALL_TIMEOUT + Duration::from_secs(1)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let busy = senders.iter().any(|tx| tx.capacity() < tx.max_capacity());
        let down = soak.count_states()[State::Down as usize];
        if (!busy && down == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[soak] chaos stopped; clients settled after {:.1} s; waiting {} for the staleness bound",
        chaos_end.elapsed().as_secs_f64(),
        humantime::format_duration(cfg.settle_after)
    );
    tokio::time::sleep(cfg.settle_after).await;
    *phase.lock() = "check";
    let mut checks = vec![check(&soak, chaos_end).await];
    // A second look, one more settle later: a ghost that stays is a leak,
    // not a slow sweep.
    if !(checks[0].ghosts == 0 && checks[0].missing == 0) {
        eprintln!(
            "[soak] mismatch: looking again after {}",
            humantime::format_duration(cfg.settle_after)
        );
        tokio::time::sleep(cfg.settle_after).await;
        checks.push(check(&soak, chaos_end).await);
    }
    sampler.abort();
    let last = sample(&soak, "end").await;
    print_sample(&last);
    samples.lock().push(last);

    // Ends every stream.
    soak.stop.send_replace(true);
    drop(senders);
    let closing = futures::future::join_all(actors);
    let _ = tokio::time::timeout(Duration::from_secs(20), closing).await;

    let samples = std::mem::take(&mut *samples.lock());
    let memory = memory(
        &samples,
        cfg.server_pid_file.len(),
        ramp_secs + cfg.warmup.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
    );
    Ok(SoakReport {
        label: cfg.label.clone(),
        started_unix_ms,
        targets: cfg.target.iter().map(ToString::to_string).collect(),
        sessions: cfg.sessions as u64,
        connections_per_node: cfg.connections_per_node as u64,
        chaos_rate: cfg.chaos_rate,
        weights: cfg.weights.clone(),
        keep_unended: cfg.keep_unended,
        duration_secs: cfg.duration.as_secs_f64(),
        ramp_secs,
        chaos_from_secs,
        chaos_to_secs,
        actions: soak.actions.snapshot(),
        outcomes: soak.outcomes.snapshot(),
        opens: soak.opens.load(Ordering::Relaxed),
        beats_acked: soak.beats_acked.load(Ordering::Relaxed),
        samples,
        memory,
        checks,
        loadgen_cpu_secs: probe::sample_self().cpu_secs,
        loadgen_secs: started.elapsed().as_secs_f64(),
    })
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or("-".into(), |kb| format!("{:.1}", kb as f64 / 1024.0))
}

/// The report as text.
pub fn table(r: &SoakReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "soak `{}`: {} sessions on {} nodes ({} connections each), chaos {} actions/s for {:.0} s (weights kill,reconnect,replace,logout,status = {:?})",
        r.label,
        r.sessions,
        r.targets.len(),
        r.connections_per_node,
        r.chaos_rate,
        r.duration_secs,
        r.weights
    );
    let _ = writeln!(out, "kept streams the server left open: {}", r.keep_unended);
    let _ = writeln!(
        out,
        "ramp {:.1} s; chaos {:.1}..{:.1} s; opens {}; beats acked {}",
        r.ramp_secs, r.chaos_from_secs, r.chaos_to_secs, r.opens, r.beats_acked
    );
    let _ = writeln!(out, "\nchaos actions:");
    for (kind, n) in &r.actions {
        let _ = writeln!(out, "  {kind:<45} {n:>8}");
    }
    let _ = writeln!(out, "\noutcomes (stream ends, calls):");
    for (kind, n) in &r.outcomes {
        let _ = writeln!(out, "  {kind:<60} {n:>8}");
    }
    let _ = writeln!(out, "\nmemory per node (VmRSS, MiB):");
    for m in &r.memory {
        let _ = writeln!(
            out,
            "  node {}: after warm-up {}, end {}, max {}; restarted at {:?} s, one warm-up after the restart {}",
            m.node,
            mib(m.warmup_kb),
            mib(m.end_kb),
            mib(m.max_kb),
            m.restarted_at
                .iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>(),
            mib(m.after_restart_warmup_kb),
        );
    }
    let _ = writeln!(
        out,
        "\nsamples (t s, phase, live, down, offline, shown online, kept unended, rss MiB per node, sessions per node):"
    );
    for s in &r.samples {
        let rss: Vec<String> = s.rss_kb.iter().map(|kb| mib(*kb)).collect();
        let sessions: Vec<String> = s
            .sessions
            .iter()
            .map(|n| n.map_or("-".into(), |n| n.to_string()))
            .collect();
        let _ = writeln!(
            out,
            "  {:>7.1} {:<6} {:>6} {:>5} {:>5} {:>6} {:>5}  [{}]  [{}]",
            s.t,
            s.phase,
            s.live,
            s.down,
            s.offline,
            s.shown_online,
            s.zombies,
            rss.join(", "),
            sessions.join(", ")
        );
    }
    for c in &r.checks {
        let _ = writeln!(
            out,
            "\ncheck {:.1} s after the chaos: live clients {}, users shown online {}, GHOSTS {}, MISSING {}, unsettled {}, unknown {}",
            c.after_chaos_secs, c.live, c.shown_online, c.ghosts, c.missing, c.unsettled, c.unknown
        );
        for m in &c.examples {
            let _ = writeln!(
                out,
                "  {} truth {} shown {} devices {} reason {} last seen {} version {}",
                m.user_id,
                m.truth,
                m.status,
                m.devices,
                m.offline_reason,
                m.last_seen_unix_ms,
                m.version
            );
            for (at, what) in &m.history {
                let _ = writeln!(out, "      {:>9.3} s  {what}", *at as f64 / 1000.0);
            }
        }
    }
    let _ = writeln!(
        out,
        "\nverdict: {}",
        if r.clean() {
            "CLEAN (0 ghosts, 0 missing)"
        } else {
            "MISMATCH"
        }
    );
    out
}
