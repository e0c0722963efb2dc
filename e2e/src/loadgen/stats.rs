//! What the generator counts and measures: one monotonic clock, HDR
//! histograms in microseconds, and counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use parking_lot::Mutex;

/// The one clock every latency is read from: microseconds since the process
/// started measuring. A sender and a receiver in the same process read the
/// same clock, so their difference is a true latency.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn instant_of(&self, us: u64) -> Instant {
        self.base + Duration::from_micros(us)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Latencies in microseconds, 1 µs to 1 h, 3 significant digits.
///
/// A Mutex, not per-task histograms: 100k session tasks holding a histogram
/// each would cost gigabytes, and the lock is held for one increment.
pub struct Histo(Mutex<Histogram<u64>>);

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

impl Histo {
    pub fn new() -> Self {
        Histo(Mutex::new(new_histogram()))
    }

    pub fn record_us(&self, us: u64) {
        self.0.lock().saturating_record(us.max(1));
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().clone()
    }

    /// A quantile so far, in milliseconds (0 when empty).
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        self.0.lock().value_at_quantile(quantile) as f64 / 1000.0
    }
}

impl Default for Histo {
    fn default() -> Self {
        Self::new()
    }
}

/// A histogram as base64 of its V2 serialization: exact, and mergeable across
/// the processes of a run.
pub fn encode(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .expect("serializing into memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    let histogram: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice())?;
    Ok(histogram)
}

/// Counters shared by every task of the process.
#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub connect_failed: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub sessions_failed: AtomicU64,
    pub sessions_closed: AtomicU64,
    pub beats_sent: AtomicU64,
    pub beats_acked: AtomicU64,
    pub goaways: AtomicU64,
    /// Streams (heartbeat or watch) the server ended, or the transport broke,
    /// before the generator closed them.
    pub resets: AtomicU64,
    pub watchers_ready: AtomicU64,
    pub watchers_failed: AtomicU64,
    pub changes_sent: AtomicU64,
    pub changes_ok: AtomicU64,
    /// Watcher deliveries the changes should cause (watchers of the user).
    pub events_expected: AtomicU64,
    /// Deliveries that carried one of our sequence numbers.
    pub events_matched: AtomicU64,
    /// Other presence events after the snapshot (sessions opening, ...).
    pub events_other: AtomicU64,
    pub gets_sent: AtomicU64,
    pub gets_ok: AtomicU64,
    /// Scheduled requests skipped because --max-inflight were in flight.
    pub dropped: AtomicU64,
    pub inflight: AtomicU64,
    /// Largest lag of a pacer behind its schedule, in microseconds.
    pub max_lag_us: AtomicU64,
    /// Feed consumers that saw the whole group, or failed to join it.
    pub consumers_ready: AtomicU64,
    pub consumers_failed: AtomicU64,
    pub feed_batches: AtomicU64,
    /// Events consumed: all, first deliveries of our changes, repeated
    /// deliveries of them (same user and version), and others (sessions
    /// opening or ending).
    pub feed_events: AtomicU64,
    pub feed_matched: AtomicU64,
    pub feed_duplicates: AtomicU64,
    pub feed_other: AtomicU64,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Errors by kind (gRPC code and where it happened).
#[derive(Default)]
pub struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    pub fn count(&self, kind: impl Into<String>) {
        *self.0.lock().entry(kind.into()).or_default() += 1;
    }

    pub fn status(&self, place: &str, status: &tonic::Status) {
        self.count(format!("{place}: {:?}", status.code()));
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().clone()
    }

    pub fn total(&self) -> u64 {
        self.0.lock().values().sum()
    }
}

/// The histograms the generator records, by name.
pub struct Histos {
    pub connect: Histo,
    pub open: Histo,
    pub beat_rtt: Histo,
    pub snapshot: Histo,
    pub change_to_watcher: Histo,
    pub set_status: Histo,
    /// Change to feed consumer, from when the change was due, and from its
    /// SetStatus reply.
    pub feed: Histo,
    pub feed_after_ok: Histo,
    /// One per --get-batch size, in that order.
    pub get: Vec<(usize, Histo)>,
}

impl Histos {
    pub fn new(batches: &[usize]) -> Self {
        Histos {
            connect: Histo::new(),
            open: Histo::new(),
            beat_rtt: Histo::new(),
            snapshot: Histo::new(),
            change_to_watcher: Histo::new(),
            set_status: Histo::new(),
            feed: Histo::new(),
            feed_after_ok: Histo::new(),
            get: batches.iter().map(|b| (*b, Histo::new())).collect(),
        }
    }

    pub fn encode_all(&self) -> BTreeMap<String, String> {
        let mut all = BTreeMap::new();
        all.insert("connect".into(), encode(&self.connect.snapshot()));
        all.insert("open".into(), encode(&self.open.snapshot()));
        all.insert("beat_rtt".into(), encode(&self.beat_rtt.snapshot()));
        all.insert("snapshot".into(), encode(&self.snapshot.snapshot()));
        all.insert("c2w".into(), encode(&self.change_to_watcher.snapshot()));
        all.insert("set_status".into(), encode(&self.set_status.snapshot()));
        all.insert("feed".into(), encode(&self.feed.snapshot()));
        all.insert("feed_ok".into(), encode(&self.feed_after_ok.snapshot()));
        for (batch, histo) in &self.get {
            all.insert(format!("get_b{batch}"), encode(&histo.snapshot()));
        }
        all
    }
}
