//! [`RedisFanOut`]: cross-node fan-out on Redis Cluster sharded pub/sub.
//!
//! # Channel scheme
//!
//! Events travel on one sharded channel per partition (`SPUBLISH`/
//! `SSUBSCRIBE`, 16 by default, see [`super::keys`]); a user's events always take
//! their partition's channel, and every node subscribes to all of them. One
//! channel per user keeps each user's events in publish order, and one
//! subscription per channel per node delivers each event once per node. A
//! channel shares its slot with its partition's records and change log, so
//! the script that writes a change publishes it too (see [`super::hot`]);
//! the partitions spread evenly over however many masters own the slot
//! ranges, and publishing costs one `SPUBLISH` to one shard, never a
//! cluster-wide broadcast like classic `PUBLISH`. Every message on a channel
//! also wakes this node's readers of that partition's change log
//! ([`super::RedisChangeLog`]). We chose partitions over a channel per
//! watched user because presence changes are
//! small and frequent while watchers come and go: per-user channels would turn
//! every watch, unwatch and contact change into subscription traffic, and a
//! failover into re-subscribing tens of thousands of channels; with
//! partitions the subscription set is fixed and tiny, and each node drops events for
//! users nobody on it watches after reading a short header, before decoding.
//! The cost is that every node receives every change; at our scale (a handful
//! of nodes, changes of a few hundred bytes) that is cheap, and the numbers
//! to watch if nodes grow into the dozens are the per-node receive rate and
//! the share of skipped events.
//!
//! # Staying subscribed
//!
//! One dedicated RESP3 cluster connection per node carries the
//! subscriptions; redis-rs routes each channel to the master owning its slot
//! and hands every push message to [`Subscription::on_push`]. Sharded
//! subscriptions live on one master, so a failover or a slot migration drops
//! them (the connection reports a disconnection, or Redis sends
//! `sunsubscribe`), and we saw the client lose subscriptions of healthy
//! masters silently while it refreshed its connections after a failover. So
//! the keeper task does not trust bookkeeping: it proves every channel works
//! end to end by publishing a probe on it that this node must receive back,
//! every 10 s, and every 500 ms while a channel fails, subscribing again any
//! channel whose probe did not return. Pub/sub does not replay what was
//! published while a channel was lost; every such gap is counted in
//! [`RedisFanOut::gaps`], so that the node can read again the state of the
//! users its watchers watch.
//!
//! # Message format
//!
//! `kind` (1 byte: `P` presence, `C` contacts, `D` device taken), the user
//! id's length (4 bytes, big-endian), the user id, then for `P` the user's
//! record as JSON (what the hot store writes, so the script publishes it as
//! is), for the others the [`BusEvent`] as JSON. A probe is kind `H`, the
//! prober's instance id in place of the user id, then the probe round (8
//! bytes) and the channel's partition (2 bytes), big-endian.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::{Error, Redis, RedisOptions, decode, encode};
use crate::hub::Hub;
use crate::store::{BusEvent, FanOut, StoreError, StoreResult};

pub(super) const PRESENCE: u8 = b'P';
const CONTACTS: u8 = b'C';
const DEVICE: u8 = b'D';
const PROBE: u8 = b'H';

/// How often every channel is proven to work while all do.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// How soon a failing channel is subscribed and probed again.
const PROBE_AGAIN: Duration = Duration::from_millis(500);

/// How long a probe may take to come back before its channel counts as lost.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// The longest one subscribe or publish call of the keeper may take; a call
/// to a master that just died can hang in the client's retries, and the next
/// round tries again anyway.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls in flight at once while subscribing or probing.
const CALLS_IN_FLIGHT: usize = 256;

/// Publishes to, and receives from, the other nodes through Redis.
pub struct RedisFanOut {
    redis: Arc<Redis>,
    subscription: Arc<Subscription>,
    /// Dropping it stops the keeper task.
    _stop: watch::Sender<()>,
}

/// The subscription side, shared by the keeper task and the push handler.
struct Subscription {
    hub: Arc<Hub>,
    /// Tells this node's probes from other nodes'.
    instance_id: String,
    channels: Vec<String>,
    partition_of: HashMap<Vec<u8>, usize>,
    /// std-style Mutex: the push handler and the keeper hold it for a few
    /// assignments.
    state: Mutex<ProbeState>,
    /// Wakes the keeper when a push says a channel was lost.
    lost: Notify,
    /// Wakes a probe round waiting for its probes to come back.
    echo: Notify,
    /// How many times the subscriptions were restored after a loss.
    gaps: watch::Sender<u64>,
    /// Per partition, woken by every message on its channel.
    wakeups: Arc<Vec<Notify>>,
    /// Events received, and of those dropped unread because nobody on this
    /// node watches the user.
    received: AtomicU64,
    skipped: AtomicU64,
}

struct ProbeState {
    /// Per partition, the last probe round that came back.
    seen: Vec<u64>,
    /// Per partition, whether its last probe came back and nothing was lost
    /// since.
    verified: Vec<bool>,
    /// A channel was lost since every channel was last verified.
    gap_open: bool,
    /// Counts reported losses, so that a probe round during which one was
    /// reported does not declare the lost channels verified.
    losses: u64,
}

impl RedisFanOut {
    /// Subscribes this node to every channel and proves each works, failing
    /// if that does not succeed within `op_timeout`; then starts the keeper.
    pub(super) async fn start(
        redis: Arc<Redis>,
        options: &RedisOptions,
        hub: Arc<Hub>,
        wakeups: Arc<Vec<Notify>>,
    ) -> StoreResult<(Arc<RedisFanOut>, JoinHandle<()>)> {
        let channels: Vec<String> = (0..redis.keys.partitions())
            .map(|partition| redis.keys.bus_channel(partition))
            .collect();
        let subscription = Arc::new(Subscription {
            hub,
            instance_id: format!("{:016x}", rand::random::<u64>()),
            partition_of: channels
                .iter()
                .enumerate()
                .map(|(partition, channel)| (channel.as_bytes().to_vec(), partition))
                .collect(),
            state: Mutex::new(ProbeState {
                seen: vec![0; channels.len()],
                verified: vec![false; channels.len()],
                gap_open: false,
                losses: 0,
            }),
            channels,
            lost: Notify::new(),
            echo: Notify::new(),
            gaps: watch::channel(0).0,
            wakeups,
            received: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        });
        let handler = subscription.clone();
        let client = ClusterClientBuilder::new(options.urls.clone())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(move |push: PushInfo| {
                // This runs on the Redis client's own task, which a panic
                // would end silently, and with it every event to this node.
                let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    handler.on_push(push)
                }));
                if delivered.is_err() {
                    tracing::error!("the fan-out subscriber panicked, aborting the process");
                    std::process::abort();
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .connection_timeout(options.op_timeout)
            .response_timeout(options.op_timeout)
            .build()
            .map_err(Error::from)?;
        let connect = async {
            let conn = client.get_async_connection().await?;
            let mut round = 0;
            while !subscription.all_verified() {
                round += 1;
                subscription.subscribe_unverified(&conn).await;
                subscription.probe(&conn, round).await;
            }
            Ok::<_, Error>((conn, round))
        };
        let (conn, round) = match tokio::time::timeout(options.op_timeout, connect).await {
            Ok(connected) => connected?,
            Err(_) => {
                let failing = subscription
                    .state
                    .lock()
                    .verified
                    .iter()
                    .filter(|v| !**v)
                    .count();
                return Err(StoreError::Unavailable(format!(
                    "{failing} of {} fan-out channels could not be subscribed within {:?}",
                    subscription.channels.len(),
                    options.op_timeout
                )));
            }
        };
        let (stop, stopped) = watch::channel(());
        // A keeper that died would leave lost channels lost for good: a
        // panic in it takes the process down instead.
        let keeper = crate::spawn_critical(
            "fan-out keeper",
            subscription.clone().keep(client, conn, round, stopped),
        );
        Ok((
            Arc::new(RedisFanOut {
                redis,
                subscription,
                _stop: stop,
            }),
            keeper,
        ))
    }

    /// Counts the times the subscriptions were lost and restored: events
    /// published in between were not received, so a change of this value
    /// means the watched users' state should be read again.
    pub fn gaps(&self) -> watch::Receiver<u64> {
        self.subscription.gaps.subscribe()
    }

    /// Events received from the bus, and of those skipped because nobody on
    /// this node watched the user.
    pub fn received(&self) -> (u64, u64) {
        (
            self.subscription.received.load(Ordering::Relaxed),
            self.subscription.skipped.load(Ordering::Relaxed),
        )
    }

    /// Whether every channel's last probe came back and none was lost since.
    pub fn fully_subscribed(&self) -> bool {
        self.subscription.all_verified()
    }
}

#[async_trait]
impl FanOut for RedisFanOut {
    async fn publish(&self, event: BusEvent) -> StoreResult<()> {
        let (user_id, message) = match &event {
            BusEvent::Presence { user_id, record } => (
                user_id,
                frame(PRESENCE, user_id, &encode("user record", record)?),
            ),
            BusEvent::Contacts { user_id, .. } => (
                user_id,
                frame(CONTACTS, user_id, &encode("bus event", &event)?),
            ),
            BusEvent::DeviceTaken { user_id, .. } => (
                user_id,
                frame(DEVICE, user_id, &encode("bus event", &event)?),
            ),
        };
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                redis::cmd("SPUBLISH")
                    .arg(self.redis.keys.bus_channel_of(user_id))
                    .arg(message)
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            })
            .await
    }
}

pub(super) fn frame(kind: u8, id: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(5 + id.len() + body.len());
    message.push(kind);
    message.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
    message.extend_from_slice(id.as_bytes());
    message.extend_from_slice(body);
    message
}

/// Splits a message into its kind, id and body.
fn split(message: &[u8]) -> Option<(u8, &str, &[u8])> {
    let (&kind, rest) = message.split_first()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (id, body) = rest.split_at(len);
    Some((kind, std::str::from_utf8(id).ok()?, body))
}

impl Subscription {
    /// Runs on the connection's push path for every push message: it must
    /// not block, and it does not (hub delivery only queues).
    fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                if let [Value::BulkString(channel), Value::BulkString(message)] =
                    push.data.as_slice()
                {
                    if let Some(partition) = self.partition_of.get(channel) {
                        self.wakeups[*partition].notify_waiters();
                    }
                    self.on_message(message);
                }
            }
            PushKind::SUnsubscribe => {
                // Redis moved the channel's slot to another master.
                if let Some(Value::BulkString(channel)) = push.data.first()
                    && let Some(partition) = self.partition_of.get(channel)
                {
                    self.lose(Some(*partition));
                }
            }
            // Which master went away is not said; a replica's going costs a
            // needless resubscription, a master's a real gap.
            PushKind::Disconnection => self.lose(None),
            _ => {}
        }
    }

    fn on_message(&self, message: &[u8]) {
        let Some((kind, id, body)) = split(message) else {
            tracing::warn!(bytes = message.len(), "malformed fan-out message dropped");
            return;
        };
        if kind == PROBE {
            if id == self.instance_id
                && let Some((round, partition)) = body.split_first_chunk::<8>()
                && let Some((partition, _)) = partition.split_first_chunk::<2>()
            {
                let (round, partition) =
                    (u64::from_be_bytes(*round), u16::from_be_bytes(*partition));
                if let Some(seen) = self.state.lock().seen.get_mut(usize::from(partition)) {
                    *seen = (*seen).max(round);
                }
                self.echo.notify_one();
            }
            return;
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        if kind == PRESENCE && !self.hub.is_watched(id) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let event = if kind == PRESENCE {
            decode("user record", body).map(|record| BusEvent::Presence {
                user_id: id.to_owned(),
                record,
            })
        } else {
            decode::<BusEvent>("bus event", body)
        };
        match event {
            Ok(event) => self.hub.deliver(&event),
            Err(error) => tracing::warn!(%error, user_id = id, "undecodable fan-out event dropped"),
        }
    }

    /// Marks one channel (or, not knowing which master went away, all) as
    /// lost, and wakes the keeper.
    fn lose(&self, partition: Option<usize>) {
        let mut state = self.state.lock();
        match partition {
            Some(partition) => state.verified[partition] = false,
            None => state.verified.iter_mut().for_each(|v| *v = false),
        }
        state.gap_open = true;
        state.losses += 1;
        drop(state);
        self.lost.notify_one();
    }

    fn all_verified(&self) -> bool {
        self.state.lock().verified.iter().all(|v| *v)
    }

    /// Subscribes every channel not verified. Subscribing a channel twice is
    /// harmless: Redis and the client keep one subscription.
    async fn subscribe_unverified(&self, conn: &ClusterConnection) -> bool {
        let unverified: Vec<usize> = {
            let state = self.state.lock();
            (0..state.verified.len())
                .filter(|b| !state.verified[*b])
                .collect()
        };
        let failures = futures::stream::iter(unverified)
            .map(|partition| {
                let mut conn = conn.clone();
                let channel = &self.channels[partition];
                async move {
                    match tokio::time::timeout(CALL_TIMEOUT, conn.ssubscribe(channel)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(error.to_string()),
                        Err(_) => Some("ssubscribe timed out".to_owned()),
                    }
                }
            })
            .buffer_unordered(CALLS_IN_FLIGHT)
            .filter_map(|failure| async move { failure })
            .collect::<Vec<String>>()
            .await;
        if let Some(error) = failures.first() {
            tracing::warn!(
                error,
                failures = failures.len(),
                "fan-out subscriptions failed, retrying"
            );
        }
        failures.is_empty()
    }

    /// Publishes probe `round` on every channel and waits (a bounded time)
    /// for them to come back; a channel whose probe did not is unverified.
    async fn probe(&self, conn: &ClusterConnection, round: u64) {
        let losses = self.state.lock().losses;
        let partitions = 0..self.channels.len();
        futures::stream::iter(partitions.clone())
            .map(|partition| {
                let mut conn = conn.clone();
                let mut body = round.to_be_bytes().to_vec();
                body.extend_from_slice(&u16::try_from(partition).unwrap_or(u16::MAX).to_be_bytes());
                let message = frame(PROBE, &self.instance_id, &body);
                let channel = &self.channels[partition];
                async move {
                    let mut publish = redis::cmd("SPUBLISH");
                    publish.arg(channel).arg(message);
                    let publish = publish.query_async::<()>(&mut conn);
                    // A failed publish shows as a probe that did not return.
                    let _ = tokio::time::timeout(CALL_TIMEOUT, publish).await;
                }
            })
            .buffer_unordered(CALLS_IN_FLIGHT)
            .collect::<()>()
            .await;
        let all_back = || self.state.lock().seen.iter().all(|seen| *seen >= round);
        let _ = tokio::time::timeout(PROBE_WAIT, async {
            while !all_back() {
                self.echo.notified().await;
            }
        })
        .await;
        let mut state = self.state.lock();
        // A loss reported meanwhile may postdate a probe that came back.
        let trust_echoes = state.losses == losses;
        let mut lost = 0;
        for partition in partitions {
            let back = state.seen[partition] >= round;
            if !back && state.verified[partition] {
                lost += 1;
            }
            state.verified[partition] = back && (trust_echoes || state.verified[partition]);
        }
        if lost > 0 {
            state.gap_open = true;
            drop(state);
            tracing::warn!(
                channels = lost,
                "fan-out channels stopped delivering, subscribing again"
            );
        }
    }

    /// Keeps every channel working until `stop`'s sender is dropped.
    async fn keep(
        self: Arc<Self>,
        client: redis::cluster::ClusterClient,
        mut conn: ClusterConnection,
        mut round: u64,
        mut stop: watch::Receiver<()>,
    ) {
        loop {
            let pause = if self.all_verified() {
                PROBE_EVERY
            } else {
                PROBE_AGAIN
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.lost.notified() => {}
            }
            if !self.subscribe_unverified(&conn).await {
                // A connection that lost every node (the whole cluster
                // restarted) may never take a subscription again: start over
                // on a new one.
                match tokio::time::timeout(CALL_TIMEOUT, client.get_async_connection()).await {
                    Ok(Ok(fresh)) => {
                        tracing::info!("fan-out: new subscription connection");
                        conn = fresh;
                        self.lose(None);
                        continue;
                    }
                    Ok(Err(error)) => tracing::warn!(%error, "fan-out: cannot connect"),
                    Err(_) => tracing::warn!("fan-out: connecting timed out"),
                }
            }
            round += 1;
            self.probe(&conn, round).await;
            let mut state = self.state.lock();
            if state.gap_open && state.verified.iter().all(|v| *v) {
                state.gap_open = false;
                drop(state);
                self.gaps.send_modify(|gaps| *gaps += 1);
                tracing::info!("fan-out subscriptions restored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reads_the_header() {
        let message = frame(PRESENCE, "bob", b"{}");
        assert_eq!(split(&message), Some((PRESENCE, "bob", &b"{}"[..])));
        assert_eq!(split(&[PRESENCE, 0, 0]), None);
        assert_eq!(split(&[PRESENCE, 0, 0, 0, 9, b'x']), None);
    }
}
