//! The simulated clients: device sessions, watchers, the status churn and the
//! presence queries, all sharing one [`Shared`] state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use http::uri::PathAndQuery;
use parking_lot::Mutex;
use presence_proto::v1 as pb;
use presence_proto::v1::contacts_service_client::ContactsServiceClient;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tonic::Request;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use super::config::RunConfig;
use super::feed::{self, Ledger};
use super::net::{SmallCodec, connect};
use super::stats::{Clock, Counters, Errors, Histos};

const HEARTBEAT: &str = "/presence.v1.PresenceService/Heartbeat";
const WATCH: &str = "/presence.v1.PresenceService/WatchContacts";
/// Largest batch the server accepts by default (--max-batch).
const CONTACTS_BATCH: usize = 100;
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// State every task of the generator shares.
pub struct Shared {
    pub cfg: RunConfig,
    pub clock: Clock,
    pub counters: Counters,
    pub errors: Errors,
    pub histos: Histos,
    /// `authorization` values, minted up front so the ramp measures the
    /// server, not HMAC.
    session_tokens: Vec<AsciiMetadataValue>,
    watcher_tokens: Vec<AsciiMetadataValue>,
    admin_token: AsciiMetadataValue,
    /// When change `seq` was due, in clock microseconds (0: never sent).
    /// Indexed by sequence number; the custom message of the change carries
    /// it, so a watcher in this process reads the latency off one clock.
    change_sent: Vec<AtomicU64>,
    /// What became of each change, for the feed's consumers (empty
    /// without --consumers).
    pub feed: Ledger,
    /// How many watchers watch each watched user.
    watchers_of: Vec<u32>,
    /// Raised to end every stream: request streams finish, watchers hang up.
    stop: watch::Sender<bool>,
    /// Set just before `stop`: streams ending after it are not resets.
    stopping: AtomicBool,
    /// Raised during the heartbeat-only and load windows: heartbeat round
    /// trips are recorded only then, not while the ramp or the watchers'
    /// snapshots keep the server busy.
    measuring: AtomicBool,
    pub phase: Mutex<&'static str>,
    /// Heartbeat interval in use (ms), for the report.
    pub beat_interval_ms: AtomicU64,
}

fn bearer(token: &str) -> anyhow::Result<AsciiMetadataValue> {
    Ok(format!("Bearer {token}").parse()?)
}

/// `message` with `token`, a minted [`bearer`] value, as its authorization.
fn authorized<T>(message: T, token: AsciiMetadataValue) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", token);
    request
}

impl Shared {
    pub fn new(cfg: RunConfig) -> anyhow::Result<Self> {
        let secret = cfg
            .jwt_secret
            .clone()
            .unwrap_or_else(|| presence_server::config::DEV_JWT_SECRET.to_owned());
        let mint = |user: &str, admin| {
            bearer(&presence_server::auth::mint(
                &secret, user, admin, TOKEN_TTL,
            ))
        };
        let session_tokens = (0..cfg.sessions)
            .map(|i| mint(&session_user(&cfg.user_prefix, i), false))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let watcher_tokens = (0..cfg.watchers)
            .map(|w| mint(&watcher_user(&cfg.user_prefix, w), false))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let admin_token = mint(&format!("{}admin", cfg.user_prefix), true)?;
        let watched = cfg.watched_count();
        let mut watchers_of = vec![0u32; watched];
        for w in 0..cfg.watchers {
            for user in contacts_of(w, cfg.contacts, watched) {
                watchers_of[user] += 1;
            }
        }
        // Room for every change of the load window, with slack for a pacer
        // that catches up.
        let changes = (cfg.change_rate * (cfg.duration.as_secs_f64() + 1.0)).ceil() as usize + 2;
        let change_sent = (0..changes).map(|_| AtomicU64::new(0)).collect();
        let feed = Ledger::new(if cfg.consumers > 0 { changes } else { 0 });
        let histos = Histos::new(&cfg.get_batch);
        Ok(Shared {
            cfg,
            clock: Clock::new(),
            counters: Counters::default(),
            errors: Errors::default(),
            histos,
            session_tokens,
            watcher_tokens,
            admin_token,
            change_sent,
            feed,
            watchers_of,
            stop: watch::channel(false).0,
            stopping: AtomicBool::new(false),
            measuring: AtomicBool::new(false),
            phase: Mutex::new("setup"),
            beat_interval_ms: AtomicU64::new(0),
        })
    }

    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock() = phase;
    }

    /// Whether heartbeat round trips are recorded now.
    pub fn set_measuring(&self, measuring: bool) {
        self.measuring.store(measuring, Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Ends every stream.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.send_replace(true);
    }

    pub fn admin_token(&self) -> AsciiMetadataValue {
        self.admin_token.clone()
    }

    pub fn subscribe_stop(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// When change `seq` was due (clock µs; 0: never sent).
    pub fn change_due_us(&self, seq: usize) -> u64 {
        self.change_sent
            .get(seq)
            .map_or(0, |at| at.load(Ordering::Relaxed))
    }

    fn since_us(&self, start_us: u64) -> u64 {
        self.clock.now_us().saturating_sub(start_us)
    }

    fn note_lag(&self, lag_us: u64) {
        self.counters
            .max_lag_us
            .fetch_max(lag_us, Ordering::Relaxed);
    }

    /// Counts a client that failed: why, under the errors, and in `failures`.
    fn count_failure(&self, failures: &AtomicU64, why: String) {
        self.errors.count(why);
        Counters::add(failures, 1);
    }

    /// Counts a stream that ended before the generator closed it.
    pub fn stream_ended(&self, place: &str, result: Result<(), tonic::Status>) {
        if self.stopping() {
            return;
        }
        Counters::add(&self.counters.resets, 1);
        match result {
            Ok(()) => self.errors.count(format!("{place}: ended by the server")),
            Err(status) => self.errors.status(place, &status),
        }
    }
}

pub fn session_user(prefix: &str, i: usize) -> String {
    format!("{prefix}u{i}")
}

pub fn watcher_user(prefix: &str, w: usize) -> String {
    format!("{prefix}w{w}")
}

/// The watched users (indices of session users) watcher `w` watches:
/// consecutive blocks, so every watched user gets the same number of
/// watchers when watchers * contacts is a multiple of `watched`.
pub fn contacts_of(w: usize, contacts: usize, watched: usize) -> impl Iterator<Item = usize> {
    (0..contacts).map(move |j| (w * contacts + j) % watched)
}

/// Resolves once `stop` is raised.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here.
    let _ = stop.wait_for(|raised| *raised).await;
}

/// Links every watcher with its contacts, through ContactsService with an
/// admin token. Nodes sharing a backend share the contacts, so the first node
/// is enough; `--contacts-on-every-node` repeats them on each.
pub async fn setup_contacts(shared: &Arc<Shared>, admin: &[Channel]) -> anyhow::Result<()> {
    let cfg = &shared.cfg;
    if cfg.watchers == 0 {
        return Ok(());
    }
    let watched = cfg.watched_count();
    let nodes = if cfg.contacts_on_every_node {
        admin
    } else {
        &admin[..admin.len().min(1)]
    };
    let mut calls = Vec::new();
    for channel in nodes {
        for w in 0..cfg.watchers {
            let ids: Vec<String> = contacts_of(w, cfg.contacts, watched)
                .map(|i| session_user(&cfg.user_prefix, i))
                .collect();
            for chunk in ids.chunks(CONTACTS_BATCH) {
                calls.push((channel.clone(), w, chunk.to_vec()));
            }
        }
    }
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(calls)
        .map(|(channel, w, contact_ids)| {
            let shared = shared.clone();
            async move {
                let request = authorized(
                    pb::AddContactsRequest {
                        user_id: watcher_user(&shared.cfg.user_prefix, w),
                        contact_ids,
                    },
                    shared.admin_token.clone(),
                );
                ContactsServiceClient::new(channel)
                    .add_contacts(request)
                    .await
                    .map_err(|status| anyhow::anyhow!("AddContacts failed: {status}"))?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Opens the K connections, `--ramp-concurrency` at a time. A connection that
/// fails three times is left out (`None`) and its sessions count as failed.
pub async fn connect_all(shared: &Arc<Shared>) -> Vec<Option<Channel>> {
    let cfg = &shared.cfg;
    let count = cfg.connection_count();
    futures::stream::iter(0..count)
        .map(|k| {
            let shared = shared.clone();
            async move {
                let cfg = &shared.cfg;
                let target = cfg.target[k % cfg.target.len()];
                let local =
                    (!cfg.source_ip.is_empty()).then(|| cfg.source_ip[k % cfg.source_ip.len()]);
                for attempt in 0..3 {
                    let start = shared.clock.now_us();
                    match connect(target, local, Duration::from_secs(10)).await {
                        Ok(channel) => {
                            shared.histos.connect.record_us(shared.since_us(start));
                            Counters::add(&shared.counters.connections, 1);
                            return Some(channel);
                        }
                        Err(error) => {
                            if attempt == 2 {
                                shared.errors.count(format!("connect: {error}"));
                            }
                            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                        }
                    }
                }
                Counters::add(&shared.counters.connect_failed, 1);
                None
            }
        })
        .buffered(cfg.ramp_concurrency.max(1))
        .collect()
        .await
}

/// A place among the opens in flight; the task holds it until its stream
/// opened or failed.
async fn ramp_permit(gate: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    gate.clone()
        .acquire_owned()
        .await
        .expect("the ramp gate is never closed")
}

/// Waits until `total` clients are `ready` or `failed`, at most --ramp-timeout.
async fn ramp_settled(shared: &Shared, ready: &AtomicU64, failed: &AtomicU64, total: usize) {
    wait_until(shared.cfg.ramp_timeout, || {
        Counters::get(ready) + Counters::get(failed) >= total as u64
    })
    .await;
}

/// Starts every session, at `--ramp-rate` and `--ramp-concurrency` opens in
/// flight; returns their tasks once all opened or failed (or the ramp timed
/// out).
pub async fn open_sessions(
    shared: &Arc<Shared>,
    channels: &[Option<Channel>],
) -> Vec<tokio::task::JoinHandle<()>> {
    let cfg = &shared.cfg;
    let gate = Arc::new(Semaphore::new(cfg.ramp_concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.sessions);
    for i in 0..cfg.sessions {
        if cfg.ramp_rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / cfg.ramp_rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let Some(channel) = channels[i % channels.len()].clone() else {
            Counters::add(&shared.counters.sessions_failed, 1);
            continue;
        };
        let permit = ramp_permit(&gate).await;
        tasks.push(tokio::spawn(session(shared.clone(), i, channel, permit)));
    }
    let counters = &shared.counters;
    ramp_settled(
        shared,
        &counters.sessions_opened,
        &counters.sessions_failed,
        cfg.sessions,
    )
    .await;
    tasks
}

/// Opens every watcher and waits for their snapshots.
pub async fn open_watchers(
    shared: &Arc<Shared>,
    channels: &[Option<Channel>],
) -> Vec<tokio::task::JoinHandle<()>> {
    let cfg = &shared.cfg;
    let gate = Arc::new(Semaphore::new(cfg.ramp_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(cfg.watchers);
    let live: Vec<&Channel> = channels.iter().flatten().collect();
    for w in 0..cfg.watchers {
        let Some(channel) = live.get(w % live.len().max(1)).map(|c| (*c).clone()) else {
            Counters::add(&shared.counters.watchers_failed, 1);
            continue;
        };
        let permit = ramp_permit(&gate).await;
        tasks.push(tokio::spawn(watcher(shared.clone(), w, channel, permit)));
    }
    let counters = &shared.counters;
    ramp_settled(
        shared,
        &counters.watchers_ready,
        &counters.watchers_failed,
        cfg.watchers,
    )
    .await;
    tasks
}

/// Starts the feed's consumers, each on a connection of its own to the
/// nodes in turn, and waits until each saw the whole group.
pub async fn open_consumers(shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let cfg = &shared.cfg;
    let mut tasks = Vec::with_capacity(cfg.consumers);
    for c in 0..cfg.consumers {
        let target = cfg.target[c % cfg.target.len()];
        match connect(
            target,
            cfg.source_ip.first().copied(),
            Duration::from_secs(10),
        )
        .await
        {
            Ok(channel) => tasks.push(tokio::spawn(feed::consumer(shared.clone(), c, channel))),
            Err(error) => {
                shared.errors.count(format!("Consume connect: {error}"));
                Counters::add(&shared.counters.consumers_failed, 1);
            }
        }
    }
    let counters = &shared.counters;
    ramp_settled(
        shared,
        &counters.consumers_ready,
        &counters.consumers_failed,
        cfg.consumers,
    )
    .await;
    tasks
}

/// After the load: waits until every change SetStatus acknowledged reached a
/// consumer, or `limit` passed.
pub async fn drain_feed(shared: &Shared, limit: Duration) {
    if shared.cfg.consumers == 0 {
        return;
    }
    let deadline = Instant::now() + limit;
    while shared.feed.unconsumed() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Opens a stream of `rpc` on `channel` with `call` once the connection is
/// ready, or counts why not in `failures`.
async fn open_stream<Req, Resp, Call, Opening>(
    shared: &Shared,
    failures: &AtomicU64,
    channel: Channel,
    rpc: &str,
    call: Call,
) -> Option<tonic::Streaming<Resp>>
where
    Call: FnOnce(tonic::client::Grpc<Channel>, SmallCodec<Req, Resp>) -> Opening,
    Opening: Future<Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(error) = grpc.ready().await {
        shared.count_failure(failures, format!("{rpc}: connection not ready: {error}"));
        return None;
    }
    match call(grpc, SmallCodec::new(shared.cfg.client_buffer)).await {
        Ok(response) => Some(response.into_inner()),
        Err(status) => {
            shared.count_failure(failures, format!("{rpc} open: {:?}", status.code()));
            None
        }
    }
}

/// The requests of one device: `open`, then a beat every interval (the
/// server's, unless --beat-interval) at a random phase so that the sessions'
/// beats spread evenly, until the generator stops. The request stream is the
/// device's clock; `last_sent` tells the reader when the beat in flight left.
fn beat_stream(
    shared: Arc<Shared>,
    interval: oneshot::Receiver<Duration>,
    last_sent: Arc<AtomicU64>,
) -> impl Stream<Item = pb::HeartbeatRequest> + Send + 'static {
    let stop = stopped(shared.stop.subscribe());
    async_stream::stream! {
        yield pb::HeartbeatRequest {
            request: Some(pb::heartbeat_request::Request::Open(pb::SessionOpen {
                device_id: "d".into(),
                platform: pb::Platform::Android as i32,
                activity: pb::Activity::Active as i32,
                status: pb::UserStatus::Unspecified as i32,
                custom_message: String::new(),
            })),
        };
        let Ok(interval) = interval.await else { return };
        let phase = interval.mul_f64(rand::random::<f64>());
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = &mut stop => return,
            }
            seq += 1;
            last_sent.store(shared.clock.now_us(), Ordering::Relaxed);
            Counters::add(&shared.counters.beats_sent, 1);
            yield pb::HeartbeatRequest {
                request: Some(pb::heartbeat_request::Request::Beat(pb::SessionBeat {
                    seq,
                    ..Default::default()
                })),
            };
        }
    }
}

/// One device session: a heartbeat stream on a shared connection, with the
/// user's own token.
async fn session(shared: Arc<Shared>, i: usize, channel: Channel, permit: OwnedSemaphorePermit) {
    let start = shared.clock.now_us();
    let (interval_tx, interval_rx) = oneshot::channel();
    let last_sent = Arc::new(AtomicU64::new(0));
    let request = authorized(
        beat_stream(shared.clone(), interval_rx, last_sent.clone()),
        shared.session_tokens[i].clone(),
    );
    let failures = &shared.counters.sessions_failed;
    let heartbeat = |mut grpc: tonic::client::Grpc<Channel>, codec| async move {
        grpc.streaming(request, PathAndQuery::from_static(HEARTBEAT), codec)
            .await
    };
    let Some(mut inbound) = open_stream(&shared, failures, channel, "Heartbeat", heartbeat).await
    else {
        return;
    };
    let failed = |why: String| shared.count_failure(failures, why);
    match inbound.message().await {
        Ok(Some(pb::HeartbeatResponse {
            response: Some(pb::heartbeat_response::Response::Opened(opened)),
        })) => {
            shared.histos.open.record_us(shared.since_us(start));
            let interval = shared.cfg.beat_interval.unwrap_or(Duration::from_millis(
                u64::from(opened.heartbeat_interval_ms).max(1),
            ));
            shared
                .beat_interval_ms
                .store(interval.as_millis() as u64, Ordering::Relaxed);
            let _ = interval_tx.send(interval);
            Counters::add(&shared.counters.sessions_opened, 1);
        }
        Ok(_) => return failed("Heartbeat open: no `opened` reply".into()),
        Err(status) => return failed(format!("Heartbeat open: {:?}", status.code())),
    }
    drop(permit);
    let result = loop {
        match inbound.message().await {
            Ok(Some(message)) => match message.response {
                Some(pb::heartbeat_response::Response::Ack(_)) => {
                    let sent = last_sent.load(Ordering::Relaxed);
                    if shared.measuring.load(Ordering::Relaxed) {
                        shared.histos.beat_rtt.record_us(shared.since_us(sent));
                    }
                    Counters::add(&shared.counters.beats_acked, 1);
                }
                Some(pb::heartbeat_response::Response::GoAway(_)) => {
                    Counters::add(&shared.counters.goaways, 1);
                }
                _ => {}
            },
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    Counters::add(&shared.counters.sessions_closed, 1);
    shared.stream_ended("Heartbeat", result);
}

/// One watcher: a WatchContacts stream with the watcher's token. After the
/// snapshot, every event whose custom message carries one of our sequence
/// numbers is a delivered change.
async fn watcher(shared: Arc<Shared>, w: usize, channel: Channel, permit: OwnedSemaphorePermit) {
    let start = shared.clock.now_us();
    let request = authorized(
        pb::WatchContactsRequest::default(),
        shared.watcher_tokens[w].clone(),
    );
    let watch = |mut grpc: tonic::client::Grpc<Channel>, codec| async move {
        grpc.server_streaming(request, PathAndQuery::from_static(WATCH), codec)
            .await
    };
    let failures = &shared.counters.watchers_failed;
    let opening = open_stream(&shared, failures, channel, "WatchContacts", watch);
    let Some(mut inbound) = opening.await else {
        return;
    };
    let stop = stopped(shared.stop.subscribe());
    tokio::pin!(stop);
    let mut permit = Some(permit);
    let result = loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            _ = &mut stop => return,
        };
        let event = match message {
            Ok(Some(pb::PresenceEvent { event: Some(event) })) => event,
            Ok(Some(_)) => continue,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        };
        match event {
            pb::presence_event::Event::SnapshotComplete(_) => {
                shared.histos.snapshot.record_us(shared.since_us(start));
                Counters::add(&shared.counters.watchers_ready, 1);
                permit = None;
            }
            pb::presence_event::Event::Presence(presence) if permit.is_none() => {
                let arrived = shared.clock.now_us();
                let sent = presence
                    .custom_message
                    .parse::<usize>()
                    .ok()
                    .and_then(|seq| shared.change_sent.get(seq))
                    .map_or(0, |at| at.load(Ordering::Relaxed));
                if sent == 0 {
                    Counters::add(&shared.counters.events_other, 1);
                } else {
                    shared
                        .histos
                        .change_to_watcher
                        .record_us(arrived.saturating_sub(sent));
                    Counters::add(&shared.counters.events_matched, 1);
                }
            }
            _ => {}
        }
    };
    if permit.is_some() {
        Counters::add(&shared.counters.watchers_failed, 1);
    }
    shared.stream_ended("WatchContacts", result);
}

/// Calls `each(n, due_us)` `rate` times a second for `window`, on schedule:
/// an open loop, so a slow server cannot slow the offered load down (latency
/// is measured from when a request was due, not when it went out).
async fn pace(shared: &Shared, rate: f64, window: Duration, mut each: impl FnMut(u64, u64)) {
    if rate <= 0.0 {
        return;
    }
    let total = (rate * window.as_secs_f64()).floor() as u64;
    let start = Instant::now();
    let start_us = shared.clock.now_us();
    let mut n = 0u64;
    while n < total {
        let due = ((start.elapsed().as_secs_f64() * rate).floor() as u64 + 1).min(total);
        while n < due {
            let due_us = start_us + (n as f64 / rate * 1e6) as u64;
            shared.note_lag(shared.since_us(due_us));
            each(n, due_us);
            n += 1;
        }
        if n < total {
            let next = start + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(next.into()).await;
        }
    }
}

/// Admits one more request in flight, or counts it dropped.
fn admit(shared: &Shared) -> bool {
    let counters = &shared.counters;
    if Counters::get(&counters.inflight) >= shared.cfg.max_inflight as u64 {
        Counters::add(&counters.dropped, 1);
        return false;
    }
    Counters::add(&counters.inflight, 1);
    true
}

/// The status churn: `--change-rate` SetStatus calls a second, round-robin
/// over the watched users, each on its user's own connection and token.
pub async fn churn(shared: Arc<Shared>, channels: Arc<Vec<Option<Channel>>>, window: Duration) {
    let watched = shared.cfg.watched_count();
    let rate = shared.cfg.change_rate;
    pace(&shared.clone(), rate, window, |n, due_us| {
        let seq = n as usize + 1;
        let user = n as usize % watched;
        let (Some(sent), Some(Some(channel))) = (
            shared.change_sent.get(seq),
            channels.get(user % channels.len()),
        ) else {
            return;
        };
        if !admit(&shared) {
            return;
        }
        sent.store(due_us.max(1), Ordering::Relaxed);
        Counters::add(
            &shared.counters.events_expected,
            u64::from(shared.watchers_of[user]),
        );
        Counters::add(&shared.counters.changes_sent, 1);
        let request = authorized(
            pb::SetStatusRequest {
                status: pb::UserStatus::Online as i32,
                custom_message: seq.to_string(),
            },
            shared.session_tokens[user].clone(),
        );
        let (shared, channel) = (shared.clone(), channel.clone());
        tokio::spawn(async move {
            match PresenceServiceClient::new(channel)
                .set_status(request)
                .await
            {
                Ok(response) => {
                    let now = shared.clock.now_us();
                    shared
                        .histos
                        .set_status
                        .record_us(now.saturating_sub(due_us));
                    let version = response.into_inner().presence.map_or(0, |p| p.version);
                    shared.feed.done(seq, now, version);
                    Counters::add(&shared.counters.changes_ok, 1);
                }
                Err(status) => shared.errors.status("SetStatus", &status),
            }
            shared.counters.inflight.fetch_sub(1, Ordering::Relaxed);
        });
    })
    .await;
}

/// Presence queries: `--get-rate` GetPresence calls a second, cycling through
/// the batch sizes; callers are watchers (or session users), ids are
/// consecutive session users from a random start.
pub async fn queries(shared: Arc<Shared>, channels: Arc<Vec<Option<Channel>>>, window: Duration) {
    let rate = shared.cfg.get_rate;
    let live: Vec<Channel> = channels.iter().flatten().cloned().collect();
    if live.is_empty() {
        return;
    }
    pace(&shared.clone(), rate, window, |n, due_us| {
        if !admit(&shared) {
            return;
        }
        let cfg = &shared.cfg;
        let which = n as usize % cfg.get_batch.len();
        let batch = cfg.get_batch[which];
        let token = if shared.watcher_tokens.is_empty() {
            shared.session_tokens[rand::random_range(0..shared.session_tokens.len())].clone()
        } else {
            shared.watcher_tokens[rand::random_range(0..shared.watcher_tokens.len())].clone()
        };
        let users = cfg.sessions.max(1);
        let first = rand::random_range(0..users);
        let user_ids = (0..batch)
            .map(|j| session_user(&cfg.user_prefix, (first + j) % users))
            .collect();
        let request = authorized(pb::GetPresenceRequest { user_ids }, token);
        let channel = live[n as usize % live.len()].clone();
        let shared = shared.clone();
        Counters::add(&shared.counters.gets_sent, 1);
        tokio::spawn(async move {
            match PresenceServiceClient::new(channel)
                .get_presence(request)
                .await
            {
                Ok(_) => {
                    shared.histos.get[which]
                        .1
                        .record_us(shared.since_us(due_us));
                    Counters::add(&shared.counters.gets_ok, 1);
                }
                Err(status) => shared.errors.status("GetPresence", &status),
            }
            shared.counters.inflight.fetch_sub(1, Ordering::Relaxed);
        });
    })
    .await;
}

/// Prints a progress line every `--progress` until the generator stops.
pub async fn progress(shared: Arc<Shared>) {
    let every = shared.cfg.progress;
    if every.is_zero() {
        return;
    }
    let started = Instant::now();
    let c = &shared.counters;
    let rated_counts = || {
        (
            Instant::now(),
            Counters::get(&c.beats_acked),
            Counters::get(&c.changes_ok),
            Counters::get(&c.events_matched),
            Counters::get(&c.gets_ok),
            Counters::get(&c.feed_events),
        )
    };
    let mut last = rated_counts();
    let stop = stopped(shared.stop.subscribe());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return,
        }
        let now = rated_counts();
        let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| (a - b) as f64 / secs;
        let p99 = |h: &super::stats::Histo| h.quantile_ms(0.99);
        let opened = Counters::get(&c.sessions_opened);
        eprintln!(
            "[{:>7.1}s] {:<9} conns {} sessions {}/{} (alive {}) watchers {} | beats/s {:.0} changes/s {:.0} events/s {:.0} gets/s {:.0} feed/s {:.0} | p99 beat {:.1}ms c2w {:.1}ms get {} | errors {} resets {} dropped {}",
            started.elapsed().as_secs_f64(),
            *shared.phase.lock(),
            Counters::get(&c.connections),
            opened,
            shared.cfg.sessions,
            opened.saturating_sub(Counters::get(&c.sessions_closed)),
            Counters::get(&c.watchers_ready),
            rate(now.1, last.1),
            rate(now.2, last.2),
            rate(now.3, last.3),
            rate(now.4, last.4),
            rate(now.5, last.5),
            p99(&shared.histos.beat_rtt),
            p99(&shared.histos.change_to_watcher),
            shared
                .histos
                .get
                .iter()
                .map(|(b, h)| format!("b{b}:{:.1}ms", p99(h)))
                .collect::<Vec<_>>()
                .join(","),
            shared.errors.total(),
            Counters::get(&c.resets),
            Counters::get(&c.dropped),
        );
        last = now;
    }
}

/// Sessions whose stream is open right now.
pub fn sessions_alive(shared: &Shared) -> u64 {
    Counters::get(&shared.counters.sessions_opened)
        .saturating_sub(Counters::get(&shared.counters.sessions_closed))
}
