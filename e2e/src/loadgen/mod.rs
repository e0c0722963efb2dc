//! The load generator: many device sessions and watchers against real server
//! nodes, with status churn and presence queries on top, measured on one
//! monotonic clock.
//!
//! [`run`] drives one process through the phases (see [`RunConfig`]):
//!
//! 1. contacts: every watcher is linked with its contacts (admin token);
//! 2. ramp: K connections, then N heartbeat streams multiplexed over them;
//! 3. settle, then server memory is sampled: RSS(N) - RSS(0) per session;
//! 4. heartbeat-only window: server CPU and Redis commands per heartbeat;
//! 5. watchers open and receive their snapshots; change feed consumers
//!    join their group;
//! 6. load window: status changes (change-to-watcher and change-to-consumer
//!    latency) and GetPresence (per batch size) on top of the heartbeats;
//! 7. drain (and wait for the consumers to catch up: every change must
//!    reach one), then every stream is closed.
//!
//! Several processes (for more sockets than one process may open) meet at
//! each phase through a [`barrier::Barrier`]; their reports merge exactly.

pub mod barrier;
pub mod chaos;
pub mod config;
pub mod feed;
pub mod net;
pub mod probe;
pub mod report;
pub mod stats;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub use config::{Cli, Command, RunConfig, SoakConfig};
pub use report::{MedianReport, ProcessReport, RunReport};

use barrier::Barrier;
use probe::ProcSample;
use report::{RedisSamples, ServerSamples};
use stats::Counters;
use workload::Shared;

/// What the leader samples on the side: server processes and Redis masters.
struct Sampler {
    pids: Vec<u32>,
    redis: Vec<String>,
}

impl Sampler {
    fn server(&self) -> anyhow::Result<ProcSample> {
        Ok(probe::sample(&self.pids)?.unwrap_or_default())
    }

    async fn redis(&self) -> anyhow::Result<u64> {
        Ok(probe::redis_commands(&self.redis).await?.unwrap_or(0))
    }

    async fn redis_detail(&self) -> anyhow::Result<Option<probe::RedisSample>> {
        probe::redis_sample(&self.redis, true).await
    }
}

/// Runs one generator process through every phase and returns what it
/// measured.
pub async fn run(cfg: RunConfig) -> anyhow::Result<ProcessReport> {
    cfg.validate()?;
    let started = Instant::now();
    let barrier = Barrier::new(
        cfg.barrier.clone(),
        cfg.procs,
        cfg.proc_index,
        cfg.ramp_timeout * 2 + cfg.duration + cfg.beats_only + Duration::from_secs(60),
    );
    let sampler = Sampler {
        pids: if barrier.is_leader() {
            cfg.server_pid.clone()
        } else {
            Vec::new()
        },
        redis: if barrier.is_leader() {
            cfg.redis.clone()
        } else {
            Vec::new()
        },
    };
    let mut server = ServerSamples {
        pids: sampler.pids.clone(),
        idle: sampler.server()?,
        ..ServerSamples::default()
    };
    let mut redis = RedisSamples {
        nodes: sampler.redis.clone(),
        ..RedisSamples::default()
    };

    let shared = Arc::new(Shared::new(cfg.clone()).context("preparing tokens")?);
    let progress = tokio::spawn(workload::progress(shared.clone()));
    let counters = &shared.counters;

    shared.set_phase("contacts");
    let mut admin = Vec::new();
    for target in &cfg.target {
        admin.push(
            net::connect(
                *target,
                cfg.source_ip.first().copied(),
                Duration::from_secs(10),
            )
            .await
            .with_context(|| format!("connecting to {target}"))?,
        );
    }
    workload::setup_contacts(&shared, &admin).await?;
    barrier.wait("contacts").await?;
    server.baseline = sampler.server()?;
    barrier.wait("baseline").await?;

    shared.set_phase("connect");
    let clock = Instant::now();
    let channels = workload::connect_all(&shared).await;
    let connect_secs = clock.elapsed().as_secs_f64();

    shared.set_phase("open");
    let clock = Instant::now();
    let sessions = workload::open_sessions(&shared, &channels).await;
    let open_secs = clock.elapsed().as_secs_f64();
    barrier.wait("opened").await?;

    shared.set_phase("settle");
    tokio::time::sleep(cfg.settle).await;
    server.opened = sampler.server()?;
    barrier.wait("settled").await?;

    let mut beats_window_secs = 0.0;
    let mut beats_in_beats_window = 0;
    if !cfg.beats_only.is_zero() {
        shared.set_phase("beats");
        server.beats_start = sampler.server()?;
        redis.beats_start = sampler.redis().await?;
        let beats = Counters::get(&counters.beats_acked);
        let clock = Instant::now();
        shared.set_measuring(true);
        tokio::time::sleep(cfg.beats_only).await;
        shared.set_measuring(false);
        beats_in_beats_window = Counters::get(&counters.beats_acked) - beats;
        beats_window_secs = clock.elapsed().as_secs_f64();
        server.beats_end = sampler.server()?;
        redis.beats_end = sampler.redis().await?;
    }
    barrier.wait("beats").await?;

    shared.set_phase("watch");
    let clock = Instant::now();
    let watchers = workload::open_watchers(&shared, &channels).await;
    let watch_secs = clock.elapsed().as_secs_f64();
    server.watching = sampler.server()?;
    barrier.wait("watching").await?;

    shared.set_phase("consume");
    let consumers = workload::open_consumers(&shared).await;
    barrier.wait("consuming").await?;

    // The generator's own footprint while everything is open.
    let mut loadgen_rss_kb = probe::sample_self().rss_kb;
    let mut load_window_secs = 0.0;
    let mut beats_in_load_window = 0;
    if !cfg.duration.is_zero() {
        shared.set_phase("load");
        let channels = Arc::new(channels);
        server.load_start = sampler.server()?;
        redis.load_start = sampler.redis().await?;
        redis.load_start_detail = sampler.redis_detail().await?;
        let beats = Counters::get(&counters.beats_acked);
        let clock = Instant::now();
        shared.set_measuring(true);
        let churn = tokio::spawn(workload::churn(
            shared.clone(),
            channels.clone(),
            cfg.duration,
        ));
        let queries = tokio::spawn(workload::queries(
            shared.clone(),
            channels.clone(),
            cfg.duration,
        ));
        tokio::time::sleep(cfg.duration).await;
        beats_in_load_window = Counters::get(&counters.beats_acked) - beats;
        shared.set_measuring(false);
        load_window_secs = clock.elapsed().as_secs_f64();
        server.load_end = sampler.server()?;
        redis.load_end = sampler.redis().await?;
        redis.load_end_detail = sampler.redis_detail().await?;
        loadgen_rss_kb = probe::sample_self().rss_kb;
        churn.await?;
        queries.await?;
    }

    shared.set_phase("drain");
    let deadline = Instant::now() + cfg.drain;
    while Counters::get(&counters.inflight) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    workload::drain_feed(&shared, cfg.feed_drain).await;
    let feed_check = shared.feed.check(&shared);
    barrier.wait("drained").await?;

    shared.set_phase("close");
    let sessions_alive_at_end = workload::sessions_alive(&shared);
    shared.stop();
    let closing = futures::future::join_all(sessions.into_iter().chain(watchers).chain(consumers));
    if tokio::time::timeout(Duration::from_secs(20), closing)
        .await
        .is_err()
    {
        shared.errors.count("close: streams still open after 20 s");
    }
    progress.abort();
    barrier.wait("closed").await?;

    let c = counters;
    Ok(ProcessReport {
        label: cfg.label.clone(),
        proc_index: cfg.proc_index,
        procs: cfg.procs,
        targets: cfg.target.iter().map(ToString::to_string).collect(),
        sessions: cfg.sessions as u64,
        connections: cfg.connection_count() as u64,
        watchers: cfg.watchers as u64,
        contacts: cfg.contacts as u64,
        watched: cfg.watched_count() as u64,
        change_rate: cfg.change_rate,
        get_rate: cfg.get_rate,
        beat_interval_ms: Counters::get(&shared.beat_interval_ms) as f64,
        connected: Counters::get(&c.connections),
        connect_secs,
        sessions_opened: Counters::get(&c.sessions_opened),
        open_secs,
        watchers_ready: Counters::get(&c.watchers_ready),
        watch_secs,
        beats_window_secs,
        beats_in_beats_window,
        load_window_secs,
        beats_in_load_window,
        changes_sent: Counters::get(&c.changes_sent),
        changes_ok: Counters::get(&c.changes_ok),
        events_expected: Counters::get(&c.events_expected),
        events_matched: Counters::get(&c.events_matched),
        events_other: Counters::get(&c.events_other),
        gets_sent: Counters::get(&c.gets_sent),
        gets_ok: Counters::get(&c.gets_ok),
        dropped: Counters::get(&c.dropped),
        resets: Counters::get(&c.resets),
        goaways: Counters::get(&c.goaways),
        sessions_alive_at_end,
        max_lag_ms: Counters::get(&c.max_lag_us) as f64 / 1000.0,
        consumers: cfg.consumers as u64,
        consumers_ready: Counters::get(&c.consumers_ready),
        feed_batches: Counters::get(&c.feed_batches),
        feed_events: Counters::get(&c.feed_events),
        feed_matched: Counters::get(&c.feed_matched),
        feed_duplicates: Counters::get(&c.feed_duplicates),
        feed_other: Counters::get(&c.feed_other),
        feed_missing: feed_check.missing,
        feed_mismatched: feed_check.mismatched,
        feed_early: feed_check.early,
        errors: shared.errors.snapshot(),
        histograms: shared.histos.encode_all(),
        server: (!sampler.pids.is_empty()).then_some(server),
        redis: (!sampler.redis.is_empty()).then_some(redis),
        loadgen: ProcSample {
            rss_kb: loadgen_rss_kb,
            cpu_secs: probe::sample_self().cpu_secs,
        },
        loadgen_secs: started.elapsed().as_secs_f64(),
    })
}
