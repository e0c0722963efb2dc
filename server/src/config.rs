//! The one typed configuration, from flags and environment variables. Every
//! option has a documented default; `presence-server --help` lists them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The development secret: only accepted with `--dev`, so a server started
/// without it can never verify tokens anyone could mint.
pub const DEV_JWT_SECRET: &str = "presence-development-secret-never-use-in-production";

#[derive(Debug, Parser)]
#[command(
    name = "presence-server",
    version,
    about = "Real-time online presence over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default when no subcommand is given).
    Serve,
    /// Create or update the durable store's schema (needs --scylla), then exit.
    Migrate,
    /// Mint a token for trying the API (needs --dev or --jwt-secret).
    Token {
        /// The user the token speaks for (its `sub` claim).
        #[arg(long)]
        user: String,
        /// Grant the admin scope (internal services: contacts, any user).
        #[arg(long)]
        admin: bool,
        /// How long the token is valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Address to serve gRPC, gRPC-web, health and reflection on.
    #[arg(
        long,
        env = "PRESENCE_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen: SocketAddr,

    /// Serve plaintext on a non-loopback --listen address: only where TLS
    /// ends in front of the node (a gateway or load balancer on a private
    /// network). Logged as a warning at startup. Without it, a non-loopback
    /// --listen needs --tls-cert and --tls-key.
    #[arg(long, env = "PRESENCE_INSECURE_LISTEN", global = true)]
    pub insecure_listen: bool,

    /// TLS certificate chain (PEM file, leaf first). With --tls-key, every
    /// connection does a TLS handshake (ALPN h2 and http/1.1: native gRPC
    /// and gRPC-web) within --conn-handshake-timeout. Re-read on SIGHUP and
    /// when its contents change (--tls-reload-interval).
    #[arg(long, env = "PRESENCE_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM file: PKCS#8, PKCS#1 or SEC1).
    /// Re-read with it.
    #[arg(long, env = "PRESENCE_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM file) that client certificates must chain to
    /// (mutual TLS). Client certificates stay optional: clients without one
    /// connect with their token alone; one that presents a certificate not
    /// from this CA fails the handshake. Needs --tls-cert. Re-read with it.
    #[arg(long, env = "PRESENCE_TLS_CLIENT_CA", global = true)]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are read to see whether they changed (a
    /// certificate renewed in place, a Kubernetes Secret updated); changed
    /// files are loaded for new connections, as on SIGHUP. 0s: on SIGHUP
    /// only.
    #[arg(long, env = "PRESENCE_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub tls_reload_interval: Duration,

    /// Refuse calls made with an admin-scoped token (PERMISSION_DENIED)
    /// unless their connection presented a client certificate verified
    /// against --tls-client-ca (which it needs).
    #[arg(
        long,
        env = "PRESENCE_TLS_REQUIRE_CLIENT_CERT_FOR_ADMIN",
        global = true
    )]
    pub tls_require_client_cert_for_admin: bool,

    /// This node's id, unique among the nodes sharing one Redis Cluster.
    /// Default: a random id.
    #[arg(long, env = "PRESENCE_NODE_ID", global = true)]
    pub node_id: Option<String>,

    /// Redis Cluster seed URLs, comma-separated (redis://host:port). Unset:
    /// the embedded hot store and fan-out (single node).
    #[arg(
        long,
        env = "PRESENCE_REDIS_CLUSTER",
        value_delimiter = ',',
        global = true
    )]
    pub redis_cluster: Vec<String>,

    /// The most one Redis call may take, retries and redirects included,
    /// before the node takes Redis for down (see the degraded modes in the
    /// README). Longer than a master failover avoids the degraded mode during
    /// one; shorter keeps calls made during it from waiting that long.
    #[arg(long, env = "PRESENCE_REDIS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub redis_timeout: Duration,

    /// How many Redis replicas must hold a visible change before it is
    /// acknowledged (Redis WAIT), so that a master failover does not lose
    /// it. 0, the default: replication is asynchronous, and a failover may
    /// lose what the master acknowledged in its last moment. Costs a
    /// replication round trip per visible change.
    #[arg(
        long,
        env = "PRESENCE_REDIS_WAIT_REPLICAS",
        default_value_t = 0,
        global = true
    )]
    pub redis_wait_replicas: u32,

    /// The longest a change waits for --redis-wait-replicas. Past it (a
    /// replica down or lagging) the change is acknowledged anyway, and
    /// counted in presence_unreplicated_changes_total.
    #[arg(long, env = "PRESENCE_REDIS_WAIT_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration, global = true)]
    pub redis_wait_timeout: Duration,

    /// ScyllaDB (or any CQL server) contact points, comma-separated host:port.
    /// Unset: embedded contacts and history.
    #[arg(
        long,
        env = "PRESENCE_SCYLLA_NODES",
        value_delimiter = ',',
        global = true
    )]
    pub scylla: Vec<String>,

    /// Keyspace of the durable store; created if missing.
    #[arg(
        long,
        env = "PRESENCE_SCYLLA_KEYSPACE",
        default_value = "presence",
        global = true
    )]
    pub scylla_keyspace: String,

    /// Replication of the keyspace, used only when creating it. The default
    /// is for development; in production use e.g.
    /// {'class': 'NetworkTopologyStrategy', 'dc1': 3}.
    #[arg(
        long,
        env = "PRESENCE_SCYLLA_REPLICATION",
        default_value = "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        global = true
    )]
    pub scylla_replication: String,

    /// Client-side timeout of one CQL request: a hung database turns into
    /// retried errors after this.
    #[arg(long, env = "PRESENCE_SCYLLA_REQUEST_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub scylla_request_timeout: Duration,

    /// Most records held in memory while the durable store is slow or away:
    /// choices, and history rows of changes made while Redis is down (the
    /// history of other changes waits in the change log). Past it new
    /// records are refused (counted, logged).
    #[arg(
        long,
        env = "PRESENCE_HISTORY_BUFFER",
        default_value_t = 100_000,
        global = true
    )]
    pub history_buffer: usize,

    /// Secret that signs and verifies HS256 tokens (32 bytes or more).
    #[arg(
        long,
        env = "PRESENCE_JWT_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub jwt_secret: Option<String>,

    /// When set, tokens must carry this `iss` claim.
    #[arg(long, env = "PRESENCE_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// When set, tokens must name this audience in their `aud` claim.
    /// Unset: tokens that name any audience are refused (they were issued
    /// for another service).
    #[arg(long, env = "PRESENCE_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,

    /// Development mode: the built-in secret and the `token` subcommand work.
    /// Only on a loopback --listen address; logged as a warning at startup.
    #[arg(long, env = "PRESENCE_DEV", global = true)]
    pub dev: bool,

    /// How often clients are told to send heartbeats.
    #[arg(long, env = "PRESENCE_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub heartbeat_interval: Duration,

    /// A session ends when no heartbeat arrives for this long.
    #[arg(long, env = "PRESENCE_LEASE", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub lease: Duration,

    /// After a stream closes without Disconnect, how long the session waits
    /// for the device to reconnect before it ends (against flapping).
    #[arg(long, env = "PRESENCE_GRACE", default_value = "1s", value_parser = humantime::parse_duration, global = true)]
    pub grace: Duration,

    /// How often expired leases are looked for.
    #[arg(long, env = "PRESENCE_SWEEP_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration, global = true)]
    pub sweep_interval: Duration,

    /// How long a node stays alive in the shared hot store without renewing
    /// (every third of it). After that, another node ends its sessions with
    /// reason "node lost". Only matters with --redis-cluster.
    #[arg(long, env = "PRESENCE_NODE_LEASE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub node_lease: Duration,

    /// How long presence history is kept.
    #[arg(long, env = "PRESENCE_HISTORY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration, global = true)]
    pub history_retention: Duration,

    /// How many partitions spread the users, the change log and the fan-out
    /// (1 to 1024). A user's changes stay in order within their partition;
    /// a partition is one Redis slot, so use at least 4 per Redis master.
    /// Every node of a deployment must use the same count: a node started
    /// with another one refuses to start.
    #[arg(long, env = "PRESENCE_LOG_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024), global = true)]
    pub log_partitions: u16,

    /// How long the change log keeps a change (at least the history
    /// retention is advised: the history is written from the log).
    #[arg(long, env = "PRESENCE_LOG_RETENTION", default_value = "24h", value_parser = humantime::parse_duration, global = true)]
    pub log_retention: Duration,

    /// Most changes the embedded change log keeps in memory (the oldest go
    /// first, even within the retention). Redis trims its log by time only.
    #[arg(
        long,
        env = "PRESENCE_EMBEDDED_LOG_CAPACITY",
        default_value_t = 1_000_000,
        global = true
    )]
    pub embedded_log_capacity: usize,

    #[command(flatten)]
    pub limits: LimitsConfig,

    #[command(flatten)]
    pub connections: ConnectionLimits,

    /// Origins whose pages may call the API from a browser (gRPC-web),
    /// comma-separated, e.g. `https://app.example.com`. Unset: any origin.
    /// Browsers never send credentials (cookies) along: the API is
    /// authorized by a bearer token, not by ambient cookies.
    #[arg(
        long,
        env = "PRESENCE_CORS_ORIGINS",
        value_delimiter = ',',
        global = true
    )]
    pub cors_origins: Vec<String>,

    /// Proxies (CIDR ranges or addresses, comma-separated) whose
    /// `X-Forwarded-For` / `X-Real-IP` name the client, e.g. the gateway's
    /// `10.0.0.0/24`. Unset: none; the client is always the TCP peer, and
    /// such headers from anyone are ignored.
    #[arg(
        long,
        env = "PRESENCE_TRUSTED_PROXIES",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_proxies: Vec<crate::client_addr::ProxyRange>,

    /// Where to serve Prometheus metrics (/metrics). Unset: not served.
    #[arg(long, env = "PRESENCE_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format.
    #[arg(
        long,
        env = "PRESENCE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Args)]
pub struct LimitsConfig {
    /// Largest message accepted or sent, in bytes.
    #[arg(long, env = "PRESENCE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024, global = true)]
    pub max_message_bytes: usize,

    /// Most user ids in one request (GetPresence, contacts calls, admin watches).
    #[arg(long, env = "PRESENCE_MAX_BATCH", default_value_t = 100, global = true)]
    pub max_batch: usize,

    /// Most contacts per user.
    #[arg(
        long,
        env = "PRESENCE_MAX_CONTACTS",
        default_value_t = 1000,
        global = true
    )]
    pub max_contacts: usize,

    /// Most live sessions (devices) per user.
    #[arg(
        long,
        env = "PRESENCE_MAX_SESSIONS_PER_USER",
        default_value_t = 16,
        global = true
    )]
    pub max_sessions_per_user: usize,

    /// Most open WatchContacts streams per user on one node.
    #[arg(
        long,
        env = "PRESENCE_MAX_WATCHES_PER_USER",
        default_value_t = 16,
        global = true
    )]
    pub max_watches_per_user: usize,

    /// Most open Heartbeat streams per user on one node. A device's newer
    /// stream ends its older one, so this only bounds opens in flight and
    /// clients that open streams without end.
    #[arg(
        long,
        env = "PRESENCE_MAX_HEARTBEAT_STREAMS_PER_USER",
        default_value_t = 32,
        global = true
    )]
    pub max_heartbeat_streams_per_user: usize,

    /// Most open ChangeFeed streams (Consume and Tail) per caller on one
    /// node. Only admin callers may open them; each holds a few tasks and
    /// up to its batches in flight.
    #[arg(
        long,
        env = "PRESENCE_MAX_FEED_STREAMS_PER_USER",
        default_value_t = 16,
        global = true
    )]
    pub max_feed_streams_per_user: usize,

    /// Most visible-state changes per second one user may cause (session
    /// opens, status and activity changes; bursts of twice this). Each one
    /// fans out to every watcher of the user: past it, calls are refused
    /// with RESOURCE_EXHAUSTED. Ends of sessions are never refused.
    #[arg(
        long,
        env = "PRESENCE_MAX_USER_CHANGES_PER_SECOND",
        default_value_t = 10,
        global = true
    )]
    pub max_user_changes_per_second: u32,

    /// Most such changes per user per hour (a sliding budget). Bounds the
    /// history rows of one user: at most twice this per hour, counting the
    /// session ends that follow opens.
    #[arg(
        long,
        env = "PRESENCE_MAX_USER_CHANGES_PER_HOUR",
        default_value_t = 3600,
        global = true
    )]
    pub max_user_changes_per_hour: u32,

    /// Most heartbeats per second one session may send (bursts of this size
    /// are allowed).
    #[arg(
        long,
        env = "PRESENCE_MAX_BEATS_PER_SECOND",
        default_value_t = 5,
        global = true
    )]
    pub max_beats_per_second: u32,

    /// Longest custom message, in bytes.
    #[arg(
        long,
        env = "PRESENCE_MAX_CUSTOM_MESSAGE_BYTES",
        default_value_t = 256,
        global = true
    )]
    pub max_custom_message_bytes: usize,

    /// Longest user or device id, in bytes.
    #[arg(
        long,
        env = "PRESENCE_MAX_ID_BYTES",
        default_value_t = 128,
        global = true
    )]
    pub max_id_bytes: usize,
}

/// What one client connection may hold, and for how long (see
/// `connections.rs`). A duration of 0 turns that bound off.
#[derive(Clone, Debug, Args)]
pub struct ConnectionLimits {
    /// A connection must send its first request bytes (the HTTP/2 preface,
    /// or an HTTP/1.1 request head) within this long after it is accepted,
    /// else it is closed.
    #[arg(long, env = "PRESENCE_CONN_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub conn_handshake_timeout: Duration,

    /// A connection with no call in progress for this long is closed
    /// (HTTP/2: with a GOAWAY; clients reconnect when they next call).
    #[arg(long, env = "PRESENCE_CONN_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub conn_idle_timeout: Duration,

    /// How often the server pings each HTTP/2 connection, to find peers
    /// that vanished without closing.
    #[arg(long, env = "PRESENCE_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_interval: Duration,

    /// A connection whose peer does not answer a ping within this long is
    /// closed.
    #[arg(long, env = "PRESENCE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_timeout: Duration,

    /// A connection older than this (plus or minus 10% jitter, so that
    /// connections opened together do not all move at once) is asked to go
    /// away with a GOAWAY: calls in progress finish, new calls go to a new
    /// connection. Spreads clients over nodes added since they connected.
    #[arg(long, env = "PRESENCE_MAX_CONNECTION_AGE", default_value = "30m", value_parser = humantime::parse_duration, global = true)]
    pub max_connection_age: Duration,

    /// How long calls still open on a connection that was asked to go away
    /// (max age, idle) may take before the connection is closed. Streams cut
    /// here are reopened by the SDKs, and their sessions live through the
    /// reconnect thanks to --grace.
    #[arg(long, env = "PRESENCE_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub max_connection_age_grace: Duration,

    /// Most client connections this node serves at once. Default: 90% of
    /// the process's open-files limit, minus --health-connection-reserve.
    #[arg(long, env = "PRESENCE_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,

    /// Connections accepted past --max-connections that may still call
    /// grpc.health.v1.Health/Check (every other call gets
    /// RESOURCE_EXHAUSTED), so a full node still answers its health checks.
    /// They are closed after --conn-handshake-timeout without a call.
    /// Connections past this reserve too are closed at once.
    #[arg(
        long,
        env = "PRESENCE_HEALTH_CONNECTION_RESERVE",
        default_value_t = 32,
        global = true
    )]
    pub health_connection_reserve: usize,

    /// A call's request body (every call but the client-streaming Heartbeat
    /// and reflection) must arrive in full within this long; a stalled body
    /// fails the call with DEADLINE_EXCEEDED and frees its connection.
    #[arg(long, env = "PRESENCE_REQUEST_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub request_body_timeout: Duration,

    /// Bytes one HTTP/2 stream may hold queued for a peer that does not take
    /// them. Past it the stream is not pulled any more, and a watch stream's
    /// updates are coalesced (latest state per contact) until the peer reads
    /// again: a client that stops reading its watches costs this much per
    /// stream, not every change it missed.
    #[arg(
        long,
        env = "PRESENCE_STREAM_SEND_BUFFER",
        default_value_t = 4 * 1024,
        global = true
    )]
    pub stream_send_buffer: usize,
}

impl ConnectionLimits {
    /// `--max-connections`, or its default from the open-files limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections.unwrap_or_else(|| {
            let files = open_files_limit().unwrap_or(1024);
            // The rest of the files: backend connections, the listener, logs.
            (files - files / 10)
                .saturating_sub(self.health_connection_reserve)
                .max(1)
        })
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no token secret: set --jwt-secret (PRESENCE_JWT_SECRET), or pass --dev to use the development secret"
    )]
    NoSecret,
    #[error("the development secret is refused outside --dev")]
    DevSecretOutsideDev,
    #[error("--jwt-secret must be at least 32 bytes")]
    ShortSecret,
    #[error(
        "--dev refused on {0}: the development secret lets anyone mint tokens, so --dev only listens on a loopback address (127.0.0.1, ::1)"
    )]
    DevOnNetwork(SocketAddr),
    #[error(
        "plaintext refused on {0}: a non-loopback --listen address needs --tls-cert and --tls-key, or --insecure-listen (PRESENCE_INSECURE_LISTEN=true) when TLS ends at a gateway in front of the node"
    )]
    PlaintextOnNetwork(SocketAddr),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Checks the options against each other; called before anything binds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.jwt_secret()?;
        if self.heartbeat_interval >= self.lease {
            return Err(ConfigError::Invalid(
                "--heartbeat-interval must be shorter than --lease".into(),
            ));
        }
        if self.sweep_interval.is_zero()
            || self.heartbeat_interval.is_zero()
            || self.node_lease.is_zero()
        {
            return Err(ConfigError::Invalid(
                "--sweep-interval, --heartbeat-interval and --node-lease must be above zero".into(),
            ));
        }
        if let Some(origin) = self
            .cors_origins
            .iter()
            .find(|origin| http::HeaderValue::from_str(origin).is_err() || !origin.contains("://"))
        {
            return Err(ConfigError::Invalid(format!(
                "--cors-origins: {origin:?} is not an origin like https://app.example.com"
            )));
        }
        let connections = &self.connections;
        if connections.conn_handshake_timeout.is_zero()
            || connections.conn_idle_timeout.is_zero()
            || connections.request_body_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "--conn-handshake-timeout, --conn-idle-timeout and --request-body-timeout must be above zero".into(),
            ));
        }
        if !connections.http2_keepalive_interval.is_zero()
            && connections.http2_keepalive_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "--http2-keepalive-timeout must be above zero while pings are on (--http2-keepalive-interval 0 turns them off)".into(),
            ));
        }
        if connections.max_connections == Some(0) {
            return Err(ConfigError::Invalid(
                "--max-connections must be above zero".into(),
            ));
        }
        if self.dev && !self.listen.ip().is_loopback() {
            return Err(ConfigError::DevOnNetwork(self.listen));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && !self.tls_enabled() {
            return Err(ConfigError::Invalid(
                "--tls-client-ca needs --tls-cert and --tls-key".into(),
            ));
        }
        if self.tls_require_client_cert_for_admin && self.tls_client_ca.is_none() {
            return Err(ConfigError::Invalid(
                "--tls-require-client-cert-for-admin needs --tls-client-ca".into(),
            ));
        }
        if !self.listen.ip().is_loopback() && !self.tls_enabled() && !self.insecure_listen {
            return Err(ConfigError::PlaintextOnNetwork(self.listen));
        }
        if self.history_buffer == 0 {
            return Err(ConfigError::Invalid(
                "--history-buffer must be above zero".into(),
            ));
        }
        Ok(())
    }

    /// Whether the listener speaks TLS (--tls-cert and --tls-key).
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// How to reach the durable store.
    pub fn scylla_config(&self) -> crate::store::scylla::ScyllaConfig {
        let mut config = crate::store::scylla::ScyllaConfig::new(
            &self.scylla,
            &self.scylla_keyspace,
            self.history_retention,
        );
        config.replication = self.scylla_replication.clone();
        config.request_timeout = self.scylla_request_timeout;
        config
    }

    /// The secret tokens are verified with.
    pub fn jwt_secret(&self) -> Result<&str, ConfigError> {
        match (&self.jwt_secret, self.dev) {
            (Some(secret), false) if secret == DEV_JWT_SECRET => {
                Err(ConfigError::DevSecretOutsideDev)
            }
            (Some(secret), _) if secret.len() < 32 => Err(ConfigError::ShortSecret),
            (Some(secret), _) => Ok(secret),
            (None, true) => Ok(DEV_JWT_SECRET),
            (None, false) => Err(ConfigError::NoSecret),
        }
    }

    /// The worst case between a client vanishing and its contacts seeing it
    /// offline: the lease runs out, then a sweep finds it. A closed stream
    /// waits `grace` instead of the lease. If the node holding the session
    /// dies meanwhile, a surviving node ends it once the node lease runs out
    /// and its next sweep notices (shared hot store only).
    pub fn staleness_bound(&self) -> Duration {
        let local = self.lease.max(self.grace) + self.sweep_interval;
        if self.redis_cluster.is_empty() {
            local
        } else {
            local + self.node_lease + self.sweep_interval
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["presence-server"];
        argv.extend_from_slice(args);
        Cli::parse_from(argv).config
    }

    #[test]
    fn trusted_proxies_are_none_by_default_and_a_bad_range_is_refused() {
        assert!(config(&[]).trusted_proxies.is_empty());
        let ranges = config(&["--trusted-proxies", "10.0.0.0/8, 127.0.0.1"]).trusted_proxies;
        assert_eq!(
            ranges,
            vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1".parse().unwrap()]
        );
        let refused = Cli::try_parse_from(["presence-server", "--trusted-proxies", "10.0.0.0/40"]);
        assert!(refused.is_err());
    }

    #[test]
    fn dev_mode_is_refused_on_a_network_address() {
        let error = config(&["--dev", "--listen", "0.0.0.0:50051"])
            .validate()
            .unwrap_err();
        assert!(matches!(error, ConfigError::DevOnNetwork(_)), "{error}");
        assert!(error.to_string().contains("loopback"), "{error}");
        config(&["--dev", "--listen", "127.0.0.1:50051"])
            .validate()
            .unwrap();
        config(&["--dev", "--listen", "[::1]:50051"])
            .validate()
            .unwrap();
    }

    #[test]
    fn plaintext_is_refused_on_a_network_address() {
        let secret = "a-test-secret-that-is-long-enough-32b";
        let error = config(&["--jwt-secret", secret, "--listen", "0.0.0.0:50051"])
            .validate()
            .unwrap_err();
        assert!(
            matches!(error, ConfigError::PlaintextOnNetwork(_)),
            "{error}"
        );
        assert!(error.to_string().contains("--insecure-listen"), "{error}");
        config(&[
            "--jwt-secret",
            secret,
            "--listen",
            "0.0.0.0:50051",
            "--insecure-listen",
        ])
        .validate()
        .unwrap();
        config(&[
            "--jwt-secret",
            secret,
            "--listen",
            "0.0.0.0:50051",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
        ])
        .validate()
        .unwrap();
        config(&["--jwt-secret", secret, "--listen", "127.0.0.1:50051"])
            .validate()
            .unwrap();
        config(&["--jwt-secret", secret, "--listen", "[::1]:50051"])
            .validate()
            .unwrap();
    }

    #[test]
    fn tls_options_are_checked_against_each_other() {
        for args in [
            &["--dev", "--tls-cert", "cert.pem"][..],
            &["--dev", "--tls-key", "key.pem"][..],
            &["--dev", "--tls-client-ca", "ca.pem"][..],
            &[
                "--dev",
                "--tls-cert",
                "cert.pem",
                "--tls-key",
                "key.pem",
                "--tls-require-client-cert-for-admin",
            ][..],
        ] {
            assert!(
                matches!(config(args).validate(), Err(ConfigError::Invalid(_))),
                "{args:?}"
            );
        }
        config(&[
            "--dev",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
            "--tls-client-ca",
            "ca.pem",
            "--tls-require-client-cert-for-admin",
        ])
        .validate()
        .unwrap();
    }

    #[test]
    fn a_short_secret_is_refused_in_every_mode() {
        for args in [
            &["--jwt-secret", "short"][..],
            &["--jwt-secret", "short", "--dev"][..],
        ] {
            assert!(matches!(
                config(args).validate(),
                Err(ConfigError::ShortSecret)
            ));
        }
    }

    #[test]
    fn the_connection_cap_defaults_below_the_open_files_limit() {
        let limits = config(&["--dev"]).connections;
        let files = open_files_limit().unwrap();
        assert!(limits.max_connections() + limits.health_connection_reserve < files);
        let set = config(&["--dev", "--max-connections", "7"]).connections;
        assert_eq!(set.max_connections(), 7);
    }
}
