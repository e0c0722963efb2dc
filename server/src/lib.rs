//! The presence server.
//!
//! # Layout
//!
//! - [`domain`]: the presence model, pure: sessions, statuses, versions,
//!   visibility. No I/O.
//! - [`store`]: one trait per backend (hot store, contacts, history, fan-out),
//!   the embedded implementations, ScyllaDB for contacts and history, and
//!   the buffer that keeps history writes off the hot path.
//! - [`hub`]: this node's index of watchers, fed by the fan-out.
//! - [`leases`]: this node's session leases, renewed in memory.
//! - [`node`]: the presence operations on top of the backends.
//! - [`degraded`]: how a node keeps taking changes while the hot store is
//!   unreachable, and replays them into it when it is back.
//! - [`watch`]: one WatchContacts stream.
//! - [`api`]: the gRPC services; the only layer that knows protobuf.
//! - [`connections`]: accepting and serving client connections, each
//!   within bounds (handshake, idle, keepalive, age, count, request bodies).
//! - [`tls`]: TLS on the listener, optional client certificates, SIGHUP reload.
//! - [`auth`], [`config`], [`telemetry`]: tokens, options, logs.
//!
//! [`run`] serves a node on a listener until `shutdown` resolves, then drains.

pub mod api;
pub mod auth;
pub mod client_addr;
pub mod config;
pub mod connections;
pub mod degraded;
pub mod domain;
pub mod feed;
pub mod hub;
pub mod leases;
pub mod metrics;
pub mod node;
pub mod quota;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod watch;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use presence_proto::v1::change_feed_server::ChangeFeedServer;
use presence_proto::v1::contacts_service_server::ContactsServiceServer;
use presence_proto::v1::presence_service_server::PresenceServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch as signal;
use tokio::task::{JoinError, JoinHandle};
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::api::Api;
use crate::api::feed::FeedApi;
use crate::auth::Authenticator;
use crate::client_addr::{ClientAddr, TrustedProxies};
use crate::config::Config;
use crate::feed::{Feed, FeedConfig};
use crate::hub::Hub;
use crate::node::{Backends, Node};
use crate::store::buffered::{BufferConfig, BufferedHistory};
use crate::store::cached::CachedContacts;
use crate::store::embedded::{
    EmbeddedContactStore, EmbeddedFanOut, EmbeddedHistoryStore, EmbeddedHotStore,
};
use crate::store::embedded_log::EmbeddedChangeLog;
use crate::store::redis::{RedisOptions, ReplicaWait};
use crate::store::{ChangeLog, ContactStore, FanOut, HistoryStore, HotStore};

/// The backends a node runs on, as the configuration names them, with what
/// the node must look after besides.
pub struct OpenedBackends {
    pub backends: Backends,
    /// Flushed before the node exits (when the durable store is remote).
    pub history_buffer: Option<Arc<BufferedHistory>>,
    /// Where the history projection writes what the change log holds: the
    /// durable store itself, not the buffer, so that a change is
    /// acknowledged in the log only once it is durable.
    pub projection: Arc<dyn HistoryStore>,
    /// Ticks when cross-node fan-out may have lost events (Redis pub/sub
    /// does not replay): the node then refills its watchers.
    pub fanout_gaps: Option<signal::Receiver<u64>>,
}

/// Opens the backends: Redis Cluster for hot state and fan-out when
/// configured, ScyllaDB for contacts and history when configured (else Redis
/// when configured, else embedded), and the embedded ones otherwise. With
/// both, contacts are durable in ScyllaDB and cached in Redis.
pub async fn open_backends(config: &Config) -> anyhow::Result<OpenedBackends> {
    let hub = Arc::new(Hub::default());
    let redis = if config.redis_cluster.is_empty() {
        None
    } else {
        let mut options = RedisOptions::new(&config.redis_cluster, config.history_retention);
        options.op_timeout = config.redis_timeout;
        options.partitions = config.log_partitions;
        options.log_retention = config.log_retention;
        options.replica_wait = (config.redis_wait_replicas > 0).then_some(ReplicaWait {
            replicas: config.redis_wait_replicas,
            timeout: config.redis_wait_timeout,
        });
        Some(store::redis::connect_with(options, hub.clone()).await?)
    };
    type Shared = (
        Arc<dyn HotStore>,
        Arc<dyn FanOut>,
        Arc<dyn ChangeLog>,
        Option<signal::Receiver<u64>>,
    );
    let (hot, fanout, log, fanout_gaps): Shared = match &redis {
        Some(redis) => (
            redis.hot.clone(),
            redis.fanout.clone(),
            redis.log.clone(),
            Some(redis.fanout.gaps()),
        ),
        None => {
            let log = Arc::new(EmbeddedChangeLog::new(
                config.log_partitions,
                config.log_retention,
                config.embedded_log_capacity,
            ));
            (
                Arc::new(EmbeddedHotStore::new(log.clone(), hub.clone())),
                Arc::new(EmbeddedFanOut::new(hub.clone())),
                log,
                None,
            )
        }
    };
    // History kept remotely (ScyllaDB, else Redis) is written through a
    // buffer, so that a change acknowledged while the store blinks still
    // reaches it.
    let (contacts, remote_history): (Arc<dyn ContactStore>, Option<Arc<dyn HistoryStore>>) =
        match (&redis, config.scylla.is_empty()) {
            (_, false) => {
                let durable = store::scylla::connect_with(&config.scylla_config()).await?;
                let contacts: Arc<dyn ContactStore> = match &redis {
                    // Contacts are read on every watch and presence query:
                    // from Redis, with ScyllaDB behind it when Redis misses
                    // or is down.
                    Some(_) => Arc::new(CachedContacts::new(
                        durable.contacts,
                        &config.redis_cluster,
                    )?),
                    None => durable.contacts,
                };
                (contacts, Some(durable.history))
            }
            (Some(redis), true) => (redis.contacts.clone(), Some(redis.history.clone())),
            (None, true) => (Arc::new(EmbeddedContactStore::default()), None),
        };
    let (history, history_buffer, projection): (Arc<dyn HistoryStore>, _, Arc<dyn HistoryStore>) =
        match remote_history {
            Some(remote) => {
                let buffer = BufferedHistory::start(
                    remote.clone(),
                    BufferConfig {
                        capacity: config.history_buffer,
                        ..BufferConfig::default()
                    },
                );
                (buffer.clone(), Some(buffer), remote)
            }
            None => {
                let history = EmbeddedHistoryStore::start(config.history_retention);
                (history.clone(), None, history)
            }
        };
    Ok(OpenedBackends {
        backends: Backends {
            hot,
            contacts,
            history,
            fanout,
            log,
            hub,
        },
        history_buffer,
        projection,
        fanout_gaps,
    })
}

/// How long a leaving node waits for its history projection to finish its
/// batch and leave its group.
const PROJECTION_LEAVES_WITHIN: Duration = Duration::from_secs(5);

/// How long a draining node's connections have had GOAWAY before its
/// streams are told to go away: enough for a gateway on the same network
/// to read it.
const GOAWAY_HEAD_START: Duration = Duration::from_millis(200);

/// How long after the grace period a draining node waits for clients to
/// close their last streams.
const DRAIN_STRAGGLERS: Duration = Duration::from_secs(3);

/// Serves one node on `listener` until `shutdown` resolves, then drains:
/// streams are told to go away, sessions linger through the grace period so
/// their clients can move to another node, and the remaining ones end.
/// With `--tls-cert` and `--tls-key`, the certificate is re-read on SIGHUP
/// (and, by [`run_with_tls`], when the files change).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let tls = tls::ServerTls::from_config(&config)?;
    if let Some(tls) = &tls {
        tls.reload_on_sighup()?;
    }
    run_with_tls(config, listener, tls, shutdown).await
}

/// [`run`], with the TLS state given by the caller (who can then reload it,
/// as SIGHUP does); `None` serves plaintext. The files are polled for
/// changes every `--tls-reload-interval`.
pub async fn run_with_tls(
    config: Config,
    listener: TcpListener,
    tls: Option<Arc<tls::ServerTls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    if let Some(tls) = &tls {
        tls.reload_on_change(config.tls_reload_interval);
    }
    if tls.is_none() && !listener.local_addr()?.ip().is_loopback() {
        tracing::warn!(
            "plaintext on a network address (--insecure-listen): TLS must end in front of this node"
        );
    }
    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()));
    if config.dev {
        tracing::warn!(
            "development mode (--dev): tokens signed with the public development secret are accepted; never use it in production"
        );
    }
    let auth = Arc::new(
        Authenticator::new(config.jwt_secret()?, config.limits.max_id_bytes)
            .with_issuer(config.jwt_issuer.as_deref())
            .with_audience(config.jwt_audience.as_deref()),
    );
    let opened = open_backends(&config).await?;
    let feed = Feed::new(opened.backends.log.clone(), FeedConfig::default());
    let node = Node::new(config.clone(), node_id.clone(), opened.backends);
    node.join().await?;
    // Without it the history stops growing while the log fills up: a panic
    // in it ends the process.
    let (stop_projection, projection_stopped) = signal::channel(false);
    let projection = spawn_critical(
        "history projection",
        feed::run_projection(
            feed.clone(),
            opened.projection.clone(),
            node_id.clone(),
            projection_stopped,
        ),
    );
    if let Some(gaps) = opened.fanout_gaps {
        spawn_critical(
            "fan-out gap refill",
            node.clone().refill_watchers_after_gaps(gaps),
        );
    }
    let api = Api::new(node.clone(), auth);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PresenceServiceServer<Api>>().await;
    health.set_serving::<ContactsServiceServer<Api>>().await;
    health.set_serving::<ChangeFeedServer<FeedApi>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(presence_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(presence_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let max_message = config.limits.max_message_bytes;
    let presence = PresenceServiceServer::new(api.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let contacts = ContactsServiceServer::new(api.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let change_feed =
        ChangeFeedServer::new(FeedApi::new(api, feed)).max_decoding_message_size(max_message);

    let (stop_maintenance, maintenance_stopped) = signal::channel(false);
    // Sweeps and lease renewals: without them sessions never end (ghosts)
    // and a shared hot store takes the node for lost. If the task dies, the
    // node stops serving and `run` fails, so the process exits non-zero.
    let mut maintenance = tokio::spawn(node.clone().run_maintenance(maintenance_stopped));
    let bounds = connections::Bounds::from_config(&config.connections);

    tracing::info!(
        listen = %listener.local_addr()?,
        node_id,
        hot_store = if config.redis_cluster.is_empty() { "embedded" } else { "redis-cluster" },
        durable_store = match (config.scylla.is_empty(), config.redis_cluster.is_empty()) {
            (false, _) => "scylla",
            (true, false) => "redis-cluster",
            (true, true) => "embedded",
        },
        staleness_bound_ms = config.staleness_bound().as_millis() as u64,
        max_connections = bounds.max_connections,
        tls = tls.is_some(),
        client_certs = config.tls_client_ca.is_some(),
        trusted_proxies = config.trusted_proxies.len(),
        "presence server ready"
    );

    let draining_node = node.clone();
    let drain = async move {
        shutdown.await;
        tracing::info!("draining: closing the listener, then telling streams to go away");
        // Every name a checker may ask for, "" (the whole server) included.
        for service in ["", PRESENCE_SERVICE, CONTACTS_SERVICE, FEED_SERVICE] {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        // This future's end closes the listener and sends every connection
        // GOAWAY; the streams are told to go away a moment later. A gateway
        // drops its idle connections to this node at the GOAWAY, so the
        // streams' re-opens reach other nodes, instead of a refusal it
        // cannot retry (a gRPC status) over a connection it kept.
        tokio::spawn(async move {
            tokio::time::sleep(GOAWAY_HEAD_START).await;
            draining_node.start_draining();
        });
    };

    let routes = Routes::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(presence)
        .add_service(contacts)
        .add_service(change_feed)
        .clone()
        .routes()
        .prepare();
    let proxies = Arc::new(TrustedProxies::new(&config.trusted_proxies));
    let service = tower::ServiceBuilder::new()
        .map_request(move |request| proxies.resolve(request))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(
            TraceLayer::new_for_grpc()
                .make_span_with(rpc_span)
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(cors(&config.cors_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .service(routes);
    let serving = connections::serve(listener, service, bounds, tls, drain);
    // Streams we do not own (health watches, reflection) never end by
    // themselves: past the deadline the remaining connections are dropped.
    let drained = node.drained();
    let deadline = config.grace + DRAIN_STRAGGLERS;
    tokio::select! {
        () = serving => {}
        _ = async { drained.await; tokio::time::sleep(deadline).await } => {
            tracing::warn!(?deadline, "connections still open after the drain deadline, closing them");
        }
        stopped = &mut maintenance => return Err(task_stopped("maintenance", stopped)),
    }

    // Sessions linger through the grace period; a client that reconnected
    // elsewhere took its session over, the others end now.
    node.wait_for_leases(config.grace + config.sweep_interval * 2)
        .await;
    stop_maintenance.send_replace(true);
    if let Err(error) = maintenance.await {
        return Err(task_stopped("maintenance", Err(error)));
    }
    node.leave().await;
    stop_projection.send_replace(true);
    if tokio::time::timeout(PROJECTION_LEAVES_WITHIN, projection)
        .await
        .is_err()
    {
        tracing::warn!(
            "the history projection did not leave its group in time; other nodes take its partitions when its membership expires"
        );
    }
    // Changes made while draining may still be buffered for the durable store.
    if let Some(buffer) = opened.history_buffer
        && let Err(unflushed) = buffer.flush(Duration::from_secs(10)).await
    {
        tracing::error!(%unflushed, "history left unflushed at exit");
    }
    tracing::info!(sessions_left = node.session_count(), "drained");
    Ok(())
}

const PRESENCE_SERVICE: &str = "presence.v1.PresenceService";
const CONTACTS_SERVICE: &str = "presence.v1.ContactsService";
const FEED_SERVICE: &str = "presence.v1.ChangeFeed";

/// Why a task that should run as long as the node ended early.
pub fn task_stopped(name: &str, outcome: Result<(), JoinError>) -> anyhow::Error {
    let error = match outcome {
        Ok(()) => anyhow::anyhow!("the {name} task stopped"),
        Err(error) if error.is_panic() => {
            let panic = error.into_panic();
            anyhow::anyhow!("the {name} task panicked: {}", panic_message(&*panic))
        }
        Err(error) => anyhow::anyhow!("the {name} task was cancelled: {error}"),
    };
    tracing::error!(error = %error, "a task the node depends on is gone");
    error
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Spawns a task the node cannot keep its promises without (fan-out
/// subscriptions, refills after fan-out gaps). If it panics, the process
/// aborts: a node that silently stopped receiving changes or renewing leases
/// would serve stale presence, while an aborted one is restarted by its
/// supervisor and its sessions move to other nodes.
pub fn spawn_critical<F>(name: &'static str, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(async move {
        match AssertUnwindSafe(task).catch_unwind().await {
            Ok(output) => output,
            Err(panic) => {
                tracing::error!(
                    task = name,
                    panic = panic_message(&*panic),
                    "a background task panicked, aborting the process"
                );
                std::process::abort()
            }
        }
    })
}

/// Every call gets a span with its method, request id (the caller's
/// `x-request-id`, or a fresh one, echoed in the response) and the client's
/// address, so all log lines of one call can be found together.
fn rpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map(|ClientAddr(addr)| tracing::field::display(addr));
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default();
    let method = request.uri().path();
    // A stream holds its span for as long as it is open (hours, for 100k
    // heartbeat streams): an enabled span costs ~0.5 KB each, so streams
    // get one only when debugging.
    if method.ends_with("/Heartbeat") || method.ends_with("/WatchContacts") {
        return tracing::debug_span!("rpc", method, request_id, client);
    }
    tracing::info_span!("rpc", method, request_id, client)
}

/// Cross-origin access for browsers. gRPC-web sends the status of a call
/// that fails before any message in the response headers, which a page on
/// another origin can only read when they are exposed; without them every
/// error reads as "missing trailer".
fn cors(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|origin| origin.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([http::Method::POST, http::Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            http::HeaderName::from_static("grpc-status"),
            http::HeaderName::from_static("grpc-message"),
            http::HeaderName::from_static("grpc-status-details-bin"),
            http::HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(24 * 60 * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_maintenance_task_is_reported_as_an_error() {
        let handle = tokio::spawn(async { panic!("sweep failed") });
        let error = task_stopped("maintenance", handle.await);
        assert_eq!(
            error.to_string(),
            "the maintenance task panicked: sweep failed"
        );
        let handle = tokio::spawn(async {});
        let error = task_stopped("maintenance", handle.await);
        assert_eq!(error.to_string(), "the maintenance task stopped");
    }
}
