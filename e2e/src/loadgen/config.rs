//! The generator's command line: one typed struct per subcommand, every option
//! with its default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    // A later flag overrides an earlier one, so profiles can be adjusted by
    // appending flags.
    args_override_self = true,
    about = "Load generator and benchmark of the presence service",
    long_about = "Opens device sessions (bidirectional heartbeat streams) and contact watchers \
                  against one or more server nodes, drives status changes and presence queries, \
                  and measures them with HDR histograms on one monotonic clock. \
                  See e2e/bench/run.sh for the benchmark profiles."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a load against server nodes and report what was measured.
    Run(Box<RunConfig>),
    /// The chaos soak: sessions killed, reconnected, replaced and logged out
    /// at random for a long while, then every user shown online is checked
    /// against the clients that are live (no ghosts, none missing).
    Soak(Box<SoakConfig>),
    /// Merge the reports of the processes of one multi-process run into one.
    Merge {
        /// Where to write the merged report (JSON).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Per-process reports written by `run --json`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Medians (with min and max) over the reports of several runs.
    Median {
        /// Where to write the medians (JSON).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Print a Markdown table instead of the plain one.
        #[arg(long)]
        markdown: bool,
        /// Reports of whole runs (`run --json` or `merge --json`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// One run: the workload, its phases, and what to sample on the side.
///
/// The timeline: set up contacts, connect, open the sessions (the ramp),
/// settle, a heartbeat-only window (CPU and Redis accounting), open the
/// watchers, then the load window (status changes and queries on top of the
/// heartbeats), a short drain for events still in flight, and close.
#[derive(Clone, Debug, Args)]
pub struct RunConfig {
    /// Server nodes (host:port), comma-separated. Connections are spread over
    /// them round-robin; several nodes need a shared backend (Redis Cluster).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:50051")]
    pub target: Vec<SocketAddr>,

    /// Device sessions (one user with one device each), each a heartbeat
    /// stream.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,

    /// HTTP/2 connections the sessions are multiplexed over (session i uses
    /// connection i mod K). 0: one connection per session.
    #[arg(long, default_value_t = 0)]
    pub connections: usize,

    /// Watchers: users that each hold one WatchContacts stream.
    #[arg(long, default_value_t = 0)]
    pub watchers: usize,

    /// Contacts per watcher. Watcher w watches the watched users
    /// w*C .. w*C+C-1 (mod --watched), so every watched user has
    /// watchers*contacts/watched watchers.
    #[arg(long, default_value_t = 20)]
    pub contacts: usize,

    /// How many of the session users are watched, and changed by the status
    /// churn (the first ones). 0: all sessions.
    #[arg(long, default_value_t = 0)]
    pub watched: usize,

    /// Status changes per second in the load window (SetStatus of a watched
    /// user, round-robin over them; the custom message carries a sequence
    /// number that watchers turn into change-to-watcher latency).
    #[arg(long, default_value_t = 0.0)]
    pub change_rate: f64,

    /// GetPresence requests per second in the load window, spread evenly over
    /// the batch sizes of --get-batch.
    #[arg(long, default_value_t = 0.0)]
    pub get_rate: f64,

    /// GetPresence batch sizes, comma-separated; each has its own histogram.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    pub get_batch: Vec<usize>,

    /// Interval between heartbeats of one session. Default: the interval the
    /// server announces when the session opens.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub beat_interval: Option<Duration>,

    /// Sessions opened per second during the ramp. 0: as fast as
    /// --ramp-concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    pub ramp_rate: f64,

    /// Connections being set up, and sessions being opened, at once.
    #[arg(long, default_value_t = 256)]
    pub ramp_concurrency: usize,

    /// Give up waiting for the ramp (connections, sessions, watchers) after
    /// this long and go on with what opened.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub ramp_timeout: Duration,

    /// Pause after the ramp before server memory is sampled.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,

    /// Heartbeat-only window: server CPU and Redis commands per heartbeat are
    /// measured over it. 0s: skipped.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub beats_only: Duration,

    /// The load window: changes and queries on top of the heartbeats. 0s:
    /// skipped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// After the load window, how long to wait for events still in flight.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub drain: Duration,

    /// Local addresses client sockets bind to before connecting,
    /// comma-separated, used round-robin (e.g. 127.0.0.2,127.0.0.3: each
    /// source address has its own ~28k ephemeral ports). Default: any.
    #[arg(long, value_delimiter = ',')]
    pub source_ip: Vec<IpAddr>,

    /// Set up the contacts through every target node instead of the first
    /// only: for nodes that each keep their own contacts.
    #[arg(long)]
    pub contacts_on_every_node: bool,

    /// Prefix of every user id this process creates; processes of one run
    /// need distinct prefixes.
    #[arg(long, default_value = "lg")]
    pub user_prefix: String,

    /// Secret the server verifies tokens with. Default: the development secret
    /// (the server runs with --dev).
    #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Server processes to account memory (VmRSS) and CPU (utime+stime) of,
    /// comma-separated pids. Only the leader (--proc-index 0) samples them.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,

    /// Redis Cluster nodes (host:port or redis://host:port), comma-separated:
    /// the masters' INFO total_commands_processed gives Redis commands per
    /// heartbeat and per change. Only the leader samples them.
    #[arg(long, value_delimiter = ',')]
    pub redis: Vec<String>,

    /// Write the report (JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// A name for the run, carried into the report.
    #[arg(long, default_value = "run")]
    pub label: String,

    /// How often to print progress to stderr. 0s: never.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub progress: Duration,

    /// Directory the processes of one multi-process run meet in: each phase
    /// starts once all --procs processes reached it. Unset: one process.
    #[arg(long)]
    pub barrier: Option<PathBuf>,

    /// Processes in the run (with --barrier).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,

    /// This process's index, 0..procs; 0 is the leader that samples servers.
    #[arg(long, default_value_t = 0)]
    pub proc_index: usize,

    /// Change feed consumers: ChangeFeed.Consume streams of one group (admin
    /// token), spread over the nodes, joined before the load window from
    /// the group's latest change on; each acknowledges every batch. After
    /// the load every change SetStatus acknowledged must have reached one
    /// of them.
    #[arg(long, default_value_t = 0)]
    pub consumers: usize,

    /// Most changes in one batch a consumer asks for (the server's range is
    /// 1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub consumer_batch: u32,

    /// The consumers' group. Processes of one run share it.
    #[arg(long, default_value = "loadgen")]
    pub feed_group: String,

    /// After the drain, how long to wait at most for changes still on their
    /// way to the consumers before counting them missing.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub feed_drain: Duration,

    /// Requests (changes and queries) in flight at most; past it a scheduled
    /// request is dropped and counted.
    #[arg(long, default_value_t = 20_000)]
    pub max_inflight: usize,

    /// Client codec buffer per stream, in bytes (tonic's default is 8 KiB;
    /// our messages are tiny, and 100k streams add up).
    #[arg(long, default_value_t = 1024)]
    pub client_buffer: usize,

    /// Worker threads of this process. 0: one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl RunConfig {
    /// Connections actually used.
    pub fn connection_count(&self) -> usize {
        match self.connections {
            0 => self.sessions.max(1),
            k => k.min(self.sessions.max(1)),
        }
    }

    /// Session users that are watched and changed.
    pub fn watched_count(&self) -> usize {
        match self.watched {
            0 => self.sessions,
            w => w.min(self.sessions),
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.target.is_empty(), "--target needs at least one node");
        anyhow::ensure!(self.procs >= 1, "--procs must be at least 1");
        anyhow::ensure!(
            self.proc_index < self.procs,
            "--proc-index must be below --procs"
        );
        anyhow::ensure!(
            self.procs == 1 || self.barrier.is_some(),
            "--procs above 1 needs --barrier"
        );
        if self.watchers > 0 {
            anyhow::ensure!(self.sessions > 0, "watchers need sessions to watch");
            anyhow::ensure!(
                self.contacts >= 1 && self.contacts <= self.watched_count(),
                "--contacts must be between 1 and the number of watched users ({})",
                self.watched_count()
            );
        }
        if self.change_rate > 0.0 {
            anyhow::ensure!(self.sessions > 0, "status changes need sessions");
        }
        if self.get_rate > 0.0 {
            anyhow::ensure!(
                !self.get_batch.is_empty() && self.get_batch.iter().all(|b| *b >= 1),
                "--get-batch needs sizes of at least 1"
            );
            anyhow::ensure!(
                self.sessions > 0 || self.watchers > 0,
                "queries need sessions or watchers (their tokens call GetPresence)"
            );
        }
        anyhow::ensure!(
            self.change_rate >= 0.0 && self.get_rate >= 0.0 && self.ramp_rate >= 0.0,
            "rates cannot be negative"
        );
        Ok(())
    }
}

/// The chaos soak (`loadgen soak`): one device session per user, held as a
/// raw heartbeat stream, and a random chaos loop over them; see
/// `loadgen::chaos`.
///
/// The timeline: connect, open every session (the ramp), chaos for
/// --duration (a node may be killed and restarted meanwhile, from outside),
/// then the live clients keep beating for --settle-after (at least the
/// server's staleness bound) and every user shown online is compared with
/// the generator's own truth.
#[derive(Clone, Debug, Args)]
pub struct SoakConfig {
    /// Server nodes (host:port), comma-separated. Sessions start spread over
    /// them; a client whose stream breaks reconnects to any node that answers.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:50051")]
    pub target: Vec<SocketAddr>,

    /// Users, each with one device session.
    #[arg(long, default_value_t = 20_000)]
    pub sessions: usize,

    /// HTTP/2 connections per node the streams are multiplexed over.
    #[arg(long, default_value_t = 100)]
    pub connections_per_node: usize,

    /// Chaos actions per second, each on one random user (kill, reconnect,
    /// replace, logout, status change; see --weights).
    #[arg(long, default_value_t = 50.0)]
    pub chaos_rate: f64,

    /// Relative weights of kill, reconnect, replace, logout and status,
    /// comma-separated. Reconnect picks a killed or logged-out client, the
    /// others a live one.
    #[arg(long, value_delimiter = ',', default_value = "3,4,3,1,2")]
    pub weights: Vec<u32>,

    /// How long the chaos runs.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Memory is "after warm-up" from this long after the ramp on (and this
    /// long after a node restarted, for that node).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// After the chaos: how long the live clients keep beating before the
    /// check. Must cover the server's staleness bound (lease + sweep + node
    /// lease + sweep).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub settle_after: Duration,

    /// Sample memory, sessions and users shown online this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,

    /// Files holding the current pid of each node, comma-separated (rewritten
    /// by whoever restarts a node): VmRSS per node is sampled from them.
    #[arg(long, value_delimiter = ',')]
    pub server_pid_file: Vec<PathBuf>,

    /// Each node's metrics listener (host:port), comma-separated, in the
    /// order of --target: the presence_sessions gauge is sampled from it.
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<SocketAddr>,

    /// Local addresses the connections bind to, used round-robin.
    #[arg(long, value_delimiter = ',')]
    pub source_ip: Vec<IpAddr>,

    /// Prefix of every user id.
    #[arg(long, default_value = "soak")]
    pub user_prefix: String,

    /// Secret the server verifies tokens with. Default: the development secret.
    #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// A stream the server should have ended (the old one of a replaced
    /// device, or a logged-out one) but left open for 10 s: keep it open and
    /// beating until the end, as a client that was never told would, instead
    /// of dropping it. It no longer counts as a live client either way.
    #[arg(long)]
    pub keep_unended: bool,

    /// Session opens in flight at most (the ramp, and a reconnect storm
    /// after a node dies).
    #[arg(long, default_value_t = 256)]
    pub open_concurrency: usize,

    /// Client codec buffer per stream, in bytes.
    #[arg(long, default_value_t = 256)]
    pub client_buffer: usize,

    /// Write the report (JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// A name for the run, carried into the report.
    #[arg(long, default_value = "soak")]
    pub label: String,

    /// Worker threads. 0: one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl SoakConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.target.is_empty(), "--target needs at least one node");
        anyhow::ensure!(self.sessions > 0, "--sessions must be above zero");
        anyhow::ensure!(
            self.connections_per_node > 0,
            "--connections-per-node must be above zero"
        );
        anyhow::ensure!(self.chaos_rate >= 0.0, "--chaos-rate cannot be negative");
        anyhow::ensure!(
            self.weights.len() == 5 && self.weights.iter().any(|w| *w > 0),
            "--weights needs 5 weights (kill, reconnect, replace, logout, status), not all 0"
        );
        anyhow::ensure!(
            self.metrics.is_empty() || self.metrics.len() == self.target.len(),
            "--metrics needs one address per --target"
        );
        anyhow::ensure!(
            !self.sample_every.is_zero(),
            "--sample-every must be above zero"
        );
        Ok(())
    }
}
