//! The history promise against a real CQL server: a change that was
//! acknowledged is never lost because the database was away. A steady stream
//! of records goes through a [`BufferedHistory`] into Cassandra while the
//! database hangs (SIGSTOP) or restarts; afterwards every acknowledged record
//! is in the database and none was refused.
//!
//! Environment:
//! - `PRESENCE_TEST_SCYLLA_NODES`: the contact point of the node that
//!   `e2e/scripts/cassandra.sh` runs (these tests pause and restart it, so
//!   nothing else should be using it). Unset: each test prints a note and
//!   passes, unless `PRESENCE_REQUIRE_BACKENDS=1`, which makes that a failure.
//! - `PRESENCE_TEST_OUTAGE_SECS`: how long the database stays away (default
//!   60, the promise; e.g. 5 for a quick local run).
//!
//! The tests take turns on the one database (a lock), since each of them
//! takes it down.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use presence_server::domain::{HistoryRecord, VisibleStatus};
use presence_server::store::HistoryStore;
use presence_server::store::buffered::{BufferConfig, BufferedHistory};
use presence_server::store::scylla::{self, ScyllaConfig};

const KEYSPACE: &str = "presence_test";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// One test at a time takes the database down.
static DATABASE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn outage() -> Duration {
    let secs = std::env::var("PRESENCE_TEST_OUTAGE_SECS")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("PRESENCE_TEST_OUTAGE_SECS is whole seconds")
        })
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Runs `e2e/scripts/cassandra.sh COMMAND` and fails the test if it fails.
async fn cassandra(command: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../e2e/scripts/cassandra.sh");
    let started = Instant::now();
    let status = tokio::process::Command::new(&script)
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("running e2e/scripts/cassandra.sh");
    assert!(status.success(), "cassandra.sh {command} failed: {status}");
    eprintln!(
        "cassandra.sh {command}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Short timeouts: a request to the hung node fails after 1 s, and the
/// writer's backoff stays at most 1 s, so the catch-up starts soon after the
/// database is back.
async fn connect(nodes: &[String]) -> scylla::ScyllaBackends {
    let mut config = ScyllaConfig::new(nodes, KEYSPACE, DAY);
    config.request_timeout = Duration::from_secs(1);
    config.connect_timeout = Duration::from_secs(1);
    scylla::connect_with(&config)
        .await
        .expect("connecting to the CQL node")
}

fn buffer_config() -> BufferConfig {
    BufferConfig {
        max_backoff: Duration::from_secs(1),
        ..BufferConfig::default()
    }
}

/// A steady stream of changes of a few users, as a node would append them:
/// one record every 5 ms (200 per second), each user's versions increasing.
struct Stream {
    run_id: String,
    acknowledged: Mutex<Vec<HistoryRecord>>,
    refused: Mutex<usize>,
    stop: AtomicBool,
}

impl Stream {
    const USERS: usize = 20;

    fn start(history: Arc<BufferedHistory>) -> (Arc<Stream>, tokio::task::JoinHandle<()>) {
        let stream = Arc::new(Stream {
            run_id: format!("{:08x}", rand::random::<u32>()),
            acknowledged: Mutex::default(),
            refused: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let task = tokio::spawn({
            let stream = stream.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                let mut n = 0u64;
                while !stream.stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let now = presence_server::node::now_ms();
                    let record = HistoryRecord {
                        user_id: stream.user(n as usize % Self::USERS),
                        at_ms: now,
                        status: [VisibleStatus::Online, VisibleStatus::Idle][n as usize % 2],
                        custom_message: format!("change {n}"),
                        offline_reason: None,
                        // Microsecond-scaled like real versions, and distinct.
                        version: now as u64 * 1000 + n % 1000,
                    };
                    match history.append(std::slice::from_ref(&record)).await {
                        Ok(()) => stream.acknowledged.lock().push(record),
                        Err(_) => *stream.refused.lock() += 1,
                    }
                    n += 1;
                }
            }
        });
        (stream, task)
    }

    fn user(&self, i: usize) -> String {
        format!("outage-{}-{i}", self.run_id)
    }

    fn acknowledged(&self) -> usize {
        self.acknowledged.lock().len()
    }
}

/// What is stored for each user of the stream, read with a fresh session.
async fn verify_all_stored(nodes: &[String], stream: &Stream) {
    let store = connect(nodes).await.history;
    let acknowledged = stream.acknowledged.lock().clone();
    let mut expected: HashMap<String, BTreeSet<u64>> = HashMap::new();
    for record in &acknowledged {
        expected
            .entry(record.user_id.clone())
            .or_default()
            .insert(record.version);
    }
    let mut missing = 0;
    for (user, versions) in &expected {
        let stored: BTreeSet<u64> = store
            .page(user, 0, i64::MAX, 0, 1_000_000)
            .await
            .expect("reading the history back")
            .into_iter()
            .map(|r| r.version)
            .collect();
        missing += versions.difference(&stored).count();
        let last = store.last(std::slice::from_ref(user)).await.unwrap();
        assert_eq!(
            last[0].as_ref().map(|r| r.version),
            versions.last().copied(),
            "the current presence of {user} is its newest change"
        );
    }
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged records are missing",
        acknowledged.len()
    );
    eprintln!(
        "all {} acknowledged records of {} users are stored",
        acknowledged.len(),
        expected.len()
    );
}

/// The shared scenario: stream for 2 s, take the database away with `down`,
/// keep streaming through the outage, bring it back with `up`, stream 2 s
/// more, flush, and check that nothing was lost or refused.
async fn survives(down: &str, up: &str) {
    let Some(nodes) = common::backend_from_env("PRESENCE_TEST_SCYLLA_NODES") else {
        return;
    };
    let _turn = DATABASE.lock().await;
    let durable = connect(&nodes).await;
    let history = BufferedHistory::start(durable.history, buffer_config());
    let (stream, task) = Stream::start(history.clone());

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        history.written() > 0,
        "records are written before the outage"
    );

    cassandra(down).await;
    let outage = outage();
    let written_at_outage = history.written();
    tokio::time::sleep(outage).await;
    let buffered = history.depth();
    eprintln!(
        "after {} s away: {} acknowledged, {buffered} buffered",
        outage.as_secs(),
        stream.acknowledged()
    );
    assert!(
        buffered as u128 >= outage.as_millis() / 5 / 2,
        "changes made during the outage wait in the buffer ({buffered})"
    );
    // A user reads their own latest change while the database is away.
    let user = stream.user(0);
    let latest = history.last(std::slice::from_ref(&user)).await.unwrap();
    assert!(latest[0].is_some(), "the buffer answers for {user}");
    // (Some records may have been written as the node went down.)
    assert!(history.written() - written_at_outage < 500);

    cassandra(up).await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stream.stop.store(true, Ordering::SeqCst);
    task.await.unwrap();

    history
        .flush(Duration::from_secs(60))
        .await
        .expect("the buffer drains once the database is back");
    eprintln!(
        "drained {} s after the database came back",
        back.elapsed().as_secs_f64() - 2.0
    );
    assert_eq!(*stream.refused.lock(), 0, "nothing refused");
    assert_eq!(history.refused(), 0);
    verify_all_stored(&nodes, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_database_hangs() {
    survives("pause", "resume").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_database_restarts() {
    survives("stop", "start").await;
}

/// Starting with another retention alters the history table's TTL (and
/// compaction window); the same retention again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_follows_the_configured_retention() {
    let Some(nodes) = common::backend_from_env("PRESENCE_TEST_SCYLLA_NODES") else {
        return;
    };
    let _turn = DATABASE.lock().await;
    let keyspace = "presence_migrate_test";
    let ttl = |session: Arc<::scylla::client::session::Session>| async move {
        let (ttl, compaction): (i32, HashMap<String, String>) = session
            .query_unpaged(
                "SELECT default_time_to_live, compaction FROM system_schema.tables \
                 WHERE keyspace_name = ? AND table_name = 'presence_history'",
                (keyspace,),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .single_row()
            .unwrap();
        (ttl, compaction["compaction_window_size"].clone())
    };
    for (retention, window) in [
        (DAY, "60"),
        (Duration::from_secs(2 * 3600), "5"),
        (DAY, "60"),
    ] {
        scylla::migrate(&nodes, keyspace, retention).await.unwrap();
        let backends = scylla::connect(&nodes, keyspace, retention).await.unwrap();
        assert_eq!(
            ttl(backends.session.clone()).await,
            (retention.as_secs() as i32, window.to_owned())
        );
    }
}

/// Not a test of speed (the benchmark is): prints history write throughput
/// through the buffer and page latency, for the record. Run with
/// `cargo test -p presence-server --test history_outage -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_history_throughput_and_page_latency() {
    let Some(nodes) = common::backend_from_env("PRESENCE_TEST_SCYLLA_NODES") else {
        return;
    };
    let _turn = DATABASE.lock().await;
    let durable = connect(&nodes).await;
    let history = BufferedHistory::start(durable.history.clone(), BufferConfig::default());
    let run = format!("{:08x}", rand::random::<u32>());
    let (records, users) = (50_000u64, 1_000u64);
    let now = presence_server::node::now_ms();
    let started = Instant::now();
    for n in 0..records {
        let record = HistoryRecord {
            user_id: format!("tp-{run}-{}", n % users),
            at_ms: now + (n / users) as i64,
            status: VisibleStatus::Online,
            custom_message: String::new(),
            offline_reason: None,
            version: (now as u64 + n / users) * 1000,
        };
        history.append(&[record]).await.unwrap();
    }
    let appended = started.elapsed();
    history.flush(Duration::from_secs(300)).await.unwrap();
    let total = started.elapsed();
    eprintln!(
        "{records} records appended in {:.0} ms ({:.0}/s acknowledged); written to Cassandra \
         in {:.2} s: {:.0} rows/s (history rows; plus one current-presence upsert per user \
         per batch)",
        appended.as_secs_f64() * 1000.0,
        records as f64 / appended.as_secs_f64(),
        total.as_secs_f64(),
        records as f64 / total.as_secs_f64()
    );

    // GetHistory-style reads: the newest page of 50 within the last hour.
    let mut latencies = Vec::new();
    for i in 0..500u64 {
        let user = format!("tp-{run}-{}", i % users);
        let t = Instant::now();
        let page = history
            .page(&user, now - 3_600_000, now + 3_600_000, 0, 50)
            .await
            .unwrap();
        latencies.push(t.elapsed());
        assert_eq!(page.len(), 50);
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    eprintln!(
        "page of 50 (of 50 rows per user), 500 calls: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0
    );
}
