//! Reports: what one process measured (raw, mergeable), the figures derived
//! from all processes of a run, medians over runs, and the tables printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::probe::{ProcSample, RedisSample};
use super::stats::{decode, new_histogram};

/// Server processes sampled by the leader at the phase boundaries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerSamples {
    pub pids: Vec<u32>,
    /// Before the generator did anything.
    pub idle: ProcSample,
    /// After the contacts were set up, before any connection: RSS(0).
    pub baseline: ProcSample,
    /// After the ramp and the settle pause: RSS(N).
    pub opened: ProcSample,
    pub beats_start: ProcSample,
    pub beats_end: ProcSample,
    /// After every watcher received its snapshot.
    pub watching: ProcSample,
    pub load_start: ProcSample,
    pub load_end: ProcSample,
}

/// Redis masters' total_commands_processed at the window boundaries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RedisSamples {
    pub nodes: Vec<String>,
    pub beats_start: u64,
    pub beats_end: u64,
    pub load_start: u64,
    pub load_end: u64,
    /// The masters' command calls, memory and change log at the load
    /// window's boundaries.
    #[serde(default)]
    pub load_start_detail: Option<RedisSample>,
    #[serde(default)]
    pub load_end_detail: Option<RedisSample>,
}

/// Everything one generator process measured. Histograms are kept whole
/// (base64 V2) so the processes of one run merge exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessReport {
    pub label: String,
    pub proc_index: usize,
    pub procs: usize,
    pub targets: Vec<String>,
    pub sessions: u64,
    pub connections: u64,
    pub watchers: u64,
    pub contacts: u64,
    pub watched: u64,
    pub change_rate: f64,
    pub get_rate: f64,
    pub beat_interval_ms: f64,
    pub connected: u64,
    pub connect_secs: f64,
    pub sessions_opened: u64,
    pub open_secs: f64,
    pub watchers_ready: u64,
    pub watch_secs: f64,
    pub beats_window_secs: f64,
    pub beats_in_beats_window: u64,
    pub load_window_secs: f64,
    pub beats_in_load_window: u64,
    pub changes_sent: u64,
    pub changes_ok: u64,
    pub events_expected: u64,
    pub events_matched: u64,
    pub events_other: u64,
    pub gets_sent: u64,
    pub gets_ok: u64,
    pub dropped: u64,
    pub resets: u64,
    pub goaways: u64,
    pub sessions_alive_at_end: u64,
    pub max_lag_ms: f64,
    /// The change feed's consumers (see `loadgen::feed`).
    #[serde(default)]
    pub consumers: u64,
    #[serde(default)]
    pub consumers_ready: u64,
    #[serde(default)]
    pub feed_batches: u64,
    #[serde(default)]
    pub feed_events: u64,
    #[serde(default)]
    pub feed_matched: u64,
    #[serde(default)]
    pub feed_duplicates: u64,
    #[serde(default)]
    pub feed_other: u64,
    #[serde(default)]
    pub feed_missing: u64,
    #[serde(default)]
    pub feed_mismatched: u64,
    #[serde(default)]
    pub feed_early: u64,
    pub errors: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, String>,
    pub server: Option<ServerSamples>,
    pub redis: Option<RedisSamples>,
    /// This generator process itself over the whole run.
    pub loadgen: ProcSample,
    pub loadgen_secs: f64,
}

/// The file `--json` writes: the processes of a run and its figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub label: String,
    pub processes: Vec<ProcessReport>,
    pub summary: BTreeMap<String, f64>,
}

impl RunReport {
    pub fn new(processes: Vec<ProcessReport>) -> anyhow::Result<Self> {
        let summary = summarize(&processes)?;
        Ok(RunReport {
            label: processes
                .first()
                .map(|p| p.label.clone())
                .unwrap_or_default(),
            processes,
            summary,
        })
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_json(path, self)
    }
}

/// Medians over runs, with the spread.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MedianReport {
    pub label: String,
    pub runs: usize,
    pub files: Vec<String>,
    pub median: BTreeMap<String, f64>,
    pub min: BTreeMap<String, f64>,
    pub max: BTreeMap<String, f64>,
}

impl MedianReport {
    pub fn of(runs: &[(String, RunReport)]) -> Self {
        let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (_, run) in runs {
            for (key, value) in &run.summary {
                values.entry(key.clone()).or_default().push(*value);
            }
        }
        let mut report = MedianReport {
            label: runs
                .first()
                .map(|(_, r)| r.label.clone())
                .unwrap_or_default(),
            runs: runs.len(),
            files: runs.iter().map(|(f, _)| f.clone()).collect(),
            median: BTreeMap::new(),
            min: BTreeMap::new(),
            max: BTreeMap::new(),
        };
        for (key, mut list) in values {
            list.sort_by(f64::total_cmp);
            let n = list.len();
            let median = if n % 2 == 1 {
                list[n / 2]
            } else {
                (list[n / 2 - 1] + list[n / 2]) / 2.0
            };
            report.median.insert(key.clone(), median);
            report.min.insert(key.clone(), list[0]);
            report.max.insert(key, list[n - 1]);
        }
        report
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_json(path, self)
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn merged(processes: &[ProcessReport], name: &str) -> anyhow::Result<Histogram<u64>> {
    let mut all = new_histogram();
    for process in processes {
        if let Some(text) = process.histograms.get(name) {
            all.add(decode(text).with_context(|| format!("histogram {name}"))?)?;
        }
    }
    Ok(all)
}

fn percentiles(figures: &mut BTreeMap<String, f64>, name: &str, histogram: &Histogram<u64>) {
    if histogram.is_empty() {
        return;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    figures.insert(format!("{name}_count"), histogram.len() as f64);
    figures.insert(
        format!("{name}_p50_ms"),
        ms(histogram.value_at_quantile(0.5)),
    );
    figures.insert(
        format!("{name}_p99_ms"),
        ms(histogram.value_at_quantile(0.99)),
    );
    figures.insert(
        format!("{name}_p999_ms"),
        ms(histogram.value_at_quantile(0.999)),
    );
    figures.insert(format!("{name}_max_ms"), ms(histogram.max()));
}

fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0 && numerator.is_finite()).then(|| numerator / denominator)
}

/// The figures of a run, from all of its processes.
pub fn summarize(processes: &[ProcessReport]) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut f = BTreeMap::new();
    let sum = |pick: fn(&ProcessReport) -> u64| processes.iter().map(pick).sum::<u64>() as f64;
    let max = |pick: fn(&ProcessReport) -> f64| processes.iter().map(pick).fold(0.0, f64::max);
    let mean = |pick: fn(&ProcessReport) -> f64| {
        processes.iter().map(pick).sum::<f64>() / processes.len().max(1) as f64
    };

    f.insert("processes".into(), processes.len() as f64);
    f.insert("sessions".into(), sum(|p| p.sessions_opened));
    f.insert("connections".into(), sum(|p| p.connected));
    f.insert("watchers".into(), sum(|p| p.watchers_ready));
    let opened = sum(|p| p.sessions_opened);
    let connected = sum(|p| p.connected);
    if let Some(v) = ratio(connected, max(|p| p.connect_secs)) {
        f.insert("ramp_connections_per_s".into(), v);
    }
    if let Some(v) = ratio(opened, max(|p| p.open_secs)) {
        f.insert("ramp_sessions_per_s".into(), v);
    }
    percentiles(&mut f, "connect", &merged(processes, "connect")?);
    percentiles(&mut f, "open", &merged(processes, "open")?);

    let beats_window = mean(|p| p.beats_window_secs);
    let beats = sum(|p| p.beats_in_beats_window);
    if let Some(v) = ratio(beats, beats_window) {
        f.insert("beats_per_s".into(), v);
    }
    let load_window = mean(|p| p.load_window_secs);
    if let Some(v) = ratio(sum(|p| p.beats_in_load_window), load_window) {
        f.insert("beats_per_s_load".into(), v);
    }
    percentiles(&mut f, "beat_rtt", &merged(processes, "beat_rtt")?);

    let changes_ok = sum(|p| p.changes_ok);
    if sum(|p| p.changes_sent) > 0.0 {
        if let Some(v) = ratio(changes_ok, load_window) {
            f.insert("changes_per_s".into(), v);
        }
        let matched = sum(|p| p.events_matched);
        if let Some(v) = ratio(matched, load_window) {
            f.insert("c2w_events_per_s".into(), v);
        }
        if let Some(v) = ratio(matched, sum(|p| p.events_expected)) {
            f.insert("c2w_delivered_ratio".into(), v);
        }
        percentiles(&mut f, "c2w", &merged(processes, "c2w")?);
        percentiles(&mut f, "set_status", &merged(processes, "set_status")?);
    }
    percentiles(&mut f, "snapshot", &merged(processes, "snapshot")?);

    if sum(|p| p.consumers) > 0.0 {
        f.insert("consumers".into(), sum(|p| p.consumers_ready));
        if let Some(v) = ratio(sum(|p| p.feed_events), load_window) {
            f.insert("feed_events_per_s".into(), v);
        }
        if let Some(v) = ratio(sum(|p| p.feed_events), sum(|p| p.feed_batches)) {
            f.insert("feed_events_per_batch".into(), v);
        }
        f.insert("feed_matched".into(), sum(|p| p.feed_matched));
        f.insert("feed_duplicates".into(), sum(|p| p.feed_duplicates));
        f.insert("feed_other".into(), sum(|p| p.feed_other));
        f.insert("feed_missing".into(), sum(|p| p.feed_missing));
        f.insert("feed_mismatched".into(), sum(|p| p.feed_mismatched));
        f.insert("feed_early".into(), sum(|p| p.feed_early));
        percentiles(&mut f, "feed", &merged(processes, "feed")?);
        percentiles(&mut f, "feed_ok", &merged(processes, "feed_ok")?);
    }

    let mut get_names: Vec<String> = processes
        .iter()
        .flat_map(|p| p.histograms.keys())
        .filter(|k| k.starts_with("get_b"))
        .cloned()
        .collect();
    get_names.sort();
    get_names.dedup();
    for name in get_names {
        let histogram = merged(processes, &name)?;
        if histogram.is_empty() {
            continue;
        }
        if let Some(v) = ratio(histogram.len() as f64, load_window) {
            f.insert(format!("{name}_per_s"), v);
        }
        percentiles(&mut f, &name, &histogram);
    }

    if let Some(server) = processes.iter().find_map(|p| p.server.as_ref()) {
        let mb = |s: &ProcSample| s.rss_kb as f64 / 1024.0;
        f.insert("server_rss_idle_mb".into(), mb(&server.idle));
        f.insert("server_rss_baseline_mb".into(), mb(&server.baseline));
        f.insert("server_rss_opened_mb".into(), mb(&server.opened));
        if server.watching.rss_kb > 0 {
            f.insert("server_rss_watching_mb".into(), mb(&server.watching));
        }
        if server.load_end.rss_kb > 0 {
            f.insert("server_rss_end_mb".into(), mb(&server.load_end));
        }
        let grown = (server.opened.rss_kb as f64 - server.baseline.rss_kb as f64) * 1024.0;
        if let Some(v) = ratio(grown, opened) {
            f.insert("server_bytes_per_session".into(), v);
        }
        if let Some(v) = ratio(grown, connected) {
            f.insert("server_bytes_per_connection".into(), v);
        }
        if let Some(cores) = ratio(
            server.beats_end.cpu_secs - server.beats_start.cpu_secs,
            beats_window,
        ) {
            f.insert("server_cpu_beats_cores".into(), cores);
            if let Some(v) = ratio(cores, beats / beats_window.max(f64::MIN_POSITIVE) / 1000.0) {
                f.insert("server_cpu_per_1k_beats_per_s".into(), v);
            }
        }
        if let Some(cores) = ratio(
            server.load_end.cpu_secs - server.load_start.cpu_secs,
            load_window,
        ) {
            f.insert("server_cpu_load_cores".into(), cores);
        }
    }

    if let Some(redis) = processes.iter().find_map(|p| p.redis.as_ref()) {
        let per_beat = ratio(
            redis.beats_end.saturating_sub(redis.beats_start) as f64,
            beats,
        );
        if let Some(v) = per_beat {
            f.insert("redis_commands_per_beat".into(), v);
        }
        let in_load = redis.load_end.saturating_sub(redis.load_start) as f64;
        if let Some(v) = ratio(in_load, load_window) {
            f.insert("redis_commands_per_s_load".into(), v);
        }
        let beats_load = sum(|p| p.beats_in_load_window);
        if let Some(v) = ratio(in_load - per_beat.unwrap_or(0.0) * beats_load, changes_ok) {
            f.insert("redis_commands_per_change".into(), v);
        }
        if let (Some(start), Some(end)) = (&redis.load_start_detail, &redis.load_end_detail) {
            redis_detail(
                &mut f,
                start,
                end,
                in_load - per_beat.unwrap_or(0.0) * beats_load,
            );
        }
    }

    let loadgen_cpu: f64 = processes.iter().map(|p| p.loadgen.cpu_secs).sum();
    if let Some(v) = ratio(loadgen_cpu, max(|p| p.loadgen_secs)) {
        f.insert("loadgen_cpu_cores".into(), v);
    }
    f.insert(
        "loadgen_rss_mb".into(),
        processes
            .iter()
            .map(|p| p.loadgen.rss_kb as f64 / 1024.0)
            .sum(),
    );
    f.insert(
        "errors".into(),
        processes
            .iter()
            .flat_map(|p| p.errors.values())
            .sum::<u64>() as f64,
    );
    f.insert("resets".into(), sum(|p| p.resets));
    f.insert("goaways".into(), sum(|p| p.goaways));
    f.insert("dropped".into(), sum(|p| p.dropped));
    f.insert(
        "sessions_alive_at_end".into(),
        sum(|p| p.sessions_alive_at_end),
    );
    f.insert("max_lag_ms".into(), max(|p| p.max_lag_ms));
    Ok(f)
}

/// The commands that make the nodes' round trips to Redis (and XADD, which
/// only a script runs, to tell scripts' inner calls apart), per change.
/// PING is the connection pool's check of a connection it hands out.
const ROUND_TRIP_COMMANDS: [&str; 8] = [
    "evalsha",
    "hmget",
    "spublish",
    "xadd",
    "xreadgroup",
    "xack",
    "xautoclaim",
    "ping",
];

/// Calls per change of each command, the round trips they add up to, and
/// what the change log's growth cost in memory. "Per change" here is per
/// change logged within the window (an append is one change): when the
/// nodes fall behind, changes sent in the window are applied after it, and
/// dividing the window's commands by the changes acknowledged would
/// undercount. `commands` is the window's total, heartbeats' share taken out.
fn redis_detail(
    f: &mut BTreeMap<String, f64>,
    start: &RedisSample,
    end: &RedisSample,
    commands: f64,
) {
    let calls = |command: &str| {
        let at = |s: &RedisSample| s.calls.get(command).copied().unwrap_or(0);
        at(end).saturating_sub(at(start)) as f64
    };
    let changes = end.log_entries.saturating_sub(start.log_entries) as f64;
    if let Some(v) = ratio(commands, changes) {
        f.insert("redis_commands_per_logged_change".into(), v);
    }
    for command in ROUND_TRIP_COMMANDS {
        if let Some(v) = ratio(calls(command), changes) {
            f.insert(format!("redis_{command}_per_change"), v);
        }
    }
    // Only the compare-and-set script appends (XADD), and each append comes
    // with the script's own HMGET and SPUBLISH: those are inner calls, not
    // round trips. A script run that logs nothing would still count its
    // inner HMGET as a round trip here, so this errs high.
    let xadd = calls("xadd");
    let round_trips = calls("evalsha")
        + (calls("hmget") - xadd).max(0.0)
        + (calls("spublish") - xadd).max(0.0)
        + calls("xreadgroup")
        + calls("xack")
        + calls("xautoclaim")
        + calls("ping");
    if let Some(v) = ratio(round_trips, changes) {
        f.insert("redis_round_trips_per_change".into(), v);
    }
    f.insert("log_entries_logged".into(), changes);
    f.insert("log_entries_end".into(), end.log_entries as f64);
    if let Some(v) = ratio(end.log_bytes as f64, end.log_entries as f64) {
        f.insert("log_bytes_per_entry".into(), v);
    }
    if let Some(v) = ratio(end.used_memory as f64 - start.used_memory as f64, changes) {
        f.insert("redis_used_memory_per_logged_change".into(), v);
    }
}

/// The rows of the tables, in order: figure key, then its description.
/// Percentile groups are expanded from their prefix.
fn rows(keys: &BTreeMap<String, f64>) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut groups: Vec<(String, String)> = vec![
        ("connect".into(), "connection setup".into()),
        ("open".into(), "session open".into()),
        ("beat_rtt".into(), "heartbeat round trip".into()),
        ("c2w".into(), "change-to-watcher".into()),
        ("set_status".into(), "SetStatus".into()),
        ("feed".into(), "change-to-consumer (from due)".into()),
        (
            "feed_ok".into(),
            "change-to-consumer (from SetStatus reply)".into(),
        ),
        ("snapshot".into(), "watch snapshot".into()),
    ];
    let mut gets: Vec<(usize, String)> = keys
        .keys()
        .filter_map(|k| {
            let batch = k.strip_prefix("get_b")?.strip_suffix("_per_s")?;
            Some((batch.parse().ok()?, batch.to_owned()))
        })
        .collect();
    gets.sort();
    for (_, batch) in &gets {
        groups.push((
            format!("get_b{batch}"),
            format!("GetPresence batch {batch}"),
        ));
    }
    let mut push = |key: String, what: String| rows.push((key, what));
    for (key, what) in [
        ("processes", "generator processes"),
        ("sessions", "sessions opened"),
        ("connections", "connections"),
        ("watchers", "watchers ready"),
        ("ramp_connections_per_s", "ramp: connections/s"),
        ("ramp_sessions_per_s", "ramp: sessions opened/s"),
    ] {
        push(key.into(), what.into());
    }
    push(
        "beats_per_s".into(),
        "heartbeats/s (heartbeat-only window)".into(),
    );
    push(
        "beats_per_s_load".into(),
        "heartbeats/s (load window)".into(),
    );
    push("changes_per_s".into(), "status changes/s".into());
    push("c2w_events_per_s".into(), "watcher deliveries/s".into());
    push(
        "c2w_delivered_ratio".into(),
        "deliveries / expected (1 = none coalesced)".into(),
    );
    for (key, what) in [
        ("consumers", "feed consumers (group complete)"),
        ("feed_events_per_s", "feed events consumed/s"),
        ("feed_events_per_batch", "feed events per batch"),
        ("feed_matched", "feed: changes consumed"),
        (
            "feed_duplicates",
            "feed: duplicates (same user and version)",
        ),
        ("feed_missing", "feed: acknowledged changes never consumed"),
        ("feed_mismatched", "feed: consumed with another version"),
        ("feed_early", "feed: consumed before the SetStatus reply"),
        ("feed_other", "feed: other events"),
    ] {
        push(key.into(), what.into());
    }
    for (_, batch) in &gets {
        push(
            format!("get_b{batch}_per_s"),
            format!("GetPresence batch {batch} req/s"),
        );
    }
    for (prefix, what) in &groups {
        for (suffix, p) in [
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
            ("p999_ms", "p99.9 ms"),
            ("max_ms", "max ms"),
        ] {
            push(format!("{prefix}_{suffix}"), format!("{what} {p}"));
        }
    }
    for (key, what) in [
        ("server_rss_idle_mb", "server RSS idle, MiB"),
        (
            "server_rss_baseline_mb",
            "server RSS(0) (contacts set up), MiB",
        ),
        ("server_rss_opened_mb", "server RSS(N) (sessions open), MiB"),
        ("server_rss_watching_mb", "server RSS with watchers, MiB"),
        ("server_rss_end_mb", "server RSS at the end, MiB"),
        (
            "server_bytes_per_session",
            "server memory per session, bytes",
        ),
        (
            "server_bytes_per_connection",
            "server memory per connection, bytes",
        ),
        (
            "server_cpu_beats_cores",
            "server CPU, heartbeat-only window, cores",
        ),
        (
            "server_cpu_per_1k_beats_per_s",
            "server CPU per 1k heartbeats/s, cores",
        ),
        ("server_cpu_load_cores", "server CPU, load window, cores"),
        ("redis_commands_per_beat", "Redis commands per heartbeat"),
        ("redis_commands_per_change", "Redis commands per change"),
        ("redis_commands_per_s_load", "Redis commands/s, load window"),
        (
            "redis_commands_per_logged_change",
            "Redis commands per change logged in the window",
        ),
        (
            "redis_round_trips_per_change",
            "Redis round trips per logged change (top-level calls)",
        ),
        ("redis_evalsha_per_change", "  EVALSHA per change"),
        (
            "redis_hmget_per_change",
            "  HMGET per change (incl. in scripts)",
        ),
        (
            "redis_spublish_per_change",
            "  SPUBLISH per change (incl. in scripts)",
        ),
        ("redis_xadd_per_change", "  XADD per change (in scripts)"),
        ("redis_xreadgroup_per_change", "  XREADGROUP per change"),
        ("redis_xack_per_change", "  XACK per change"),
        ("redis_xautoclaim_per_change", "  XAUTOCLAIM per change"),
        ("redis_ping_per_change", "  PING per change"),
        (
            "log_entries_logged",
            "change log entries added, load window",
        ),
        ("log_entries_end", "change log entries at the end"),
        (
            "log_bytes_per_entry",
            "change log bytes per entry (MEMORY USAGE)",
        ),
        (
            "redis_used_memory_per_logged_change",
            "Redis used_memory growth per logged change, bytes",
        ),
        ("loadgen_cpu_cores", "generator CPU, cores"),
        ("loadgen_rss_mb", "generator RSS, MiB"),
        ("errors", "errors"),
        ("resets", "unexpected stream resets"),
        ("goaways", "go-aways received"),
        ("dropped", "requests dropped (generator overloaded)"),
        ("max_lag_ms", "generator max lag behind schedule, ms"),
        ("sessions_alive_at_end", "sessions alive at the end"),
    ] {
        push(key.into(), what.into());
    }
    rows.retain(|(key, _)| keys.contains_key(key));
    rows
}

pub fn format_value(key: &str, value: f64) -> String {
    if key.ends_with("_ratio") {
        return format!("{value:.3}");
    }
    if key.starts_with("server_cpu") || key.starts_with("loadgen_cpu") {
        return format!("{value:.3}");
    }
    let magnitude = value.abs();
    if magnitude >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The figures of one run as a plain table.
pub fn run_table(report: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== {} ==", report.label);
    for (key, what) in rows(&report.summary) {
        let _ = writeln!(
            out,
            "{what:<48} {:>14}",
            format_value(&key, report.summary[&key])
        );
    }
    for process in &report.processes {
        for (kind, count) in &process.errors {
            let _ = writeln!(
                out,
                "  error (process {}): {kind} x{count}",
                process.proc_index
            );
        }
    }
    out
}

/// Medians over runs, plain or as Markdown.
pub fn median_table(report: &MedianReport, markdown: bool) -> String {
    let mut out = String::new();
    if markdown {
        let _ = writeln!(
            out,
            "| {} (median of {} runs) | median | min | max |",
            report.label, report.runs
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
    } else {
        let _ = writeln!(
            out,
            "== {}: median of {} runs ==\n{:<48} {:>14} {:>12} {:>12}",
            report.label, report.runs, "", "median", "min", "max"
        );
    }
    for (key, what) in rows(&report.median) {
        let (median, min, max) = (
            format_value(&key, report.median[&key]),
            format_value(&key, report.min[&key]),
            format_value(&key, report.max[&key]),
        );
        if markdown {
            let _ = writeln!(out, "| {what} | {median} | {min} | {max} |");
        } else {
            let _ = writeln!(out, "{what:<48} {median:>14} {min:>12} {max:>12}");
        }
    }
    out
}
