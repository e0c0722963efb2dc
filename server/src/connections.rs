//! Serving client connections, each within bounds: nothing a client holds
//! on this node is unbounded.
//!
//! tonic's own server has no handshake, idle or request-body timeout, no
//! cap on connections and no jitter on the maximum age, so [`serve`] accepts
//! connections itself and serves each with hyper (HTTP/2, and HTTP/1.1 for
//! gRPC-web) under these rules:
//!
//! - **handshake**: a connection that has not sent its first 24 bytes (the
//!   HTTP/2 preface; any HTTP/1.1 request head is longer) within
//!   `--conn-handshake-timeout` is dropped. Later HTTP/1.1 request heads
//!   must arrive within the idle timeout (hyper's header read timeout).
//! - **idle**: a connection with no call in progress for
//!   `--conn-idle-timeout` is asked to go away (GOAWAY).
//! - **keepalive**: HTTP/2 pings every `--http2-keepalive-interval`; a peer
//!   that does not answer within `--http2-keepalive-timeout` is dropped.
//! - **max age**: after `--max-connection-age` ± 10% a connection is asked
//!   to go away; its calls in progress get `--max-connection-age-grace`, and
//!   its heartbeat streams a `go_away` at once ([`ConnectionAged`]), so
//!   sessions move to a new connection instead of being cut.
//! - **cap**: past `--max-connections`, the next
//!   `--health-connection-reserve` connections may only call
//!   `grpc.health.v1.Health/Check` (so a full node still answers its health
//!   checks) and get the handshake timeout as idle timeout; connections past
//!   that are closed as soon as they are accepted, which keeps the listen
//!   queue moving and the open files bounded.
//! - **request bodies**: every call but the client-streaming ones must have
//!   sent its whole request within `--request-body-timeout`.
//!
//! With `--tls-cert` and `--tls-key` (see `tls.rs`), the TLS handshake
//! comes first and counts against the handshake timeout; a client
//! certificate verified in it marks every request of the connection with
//! [`VerifiedClientCert`](crate::tls::VerifiedClientCert).
//!
//! Calls are counted per connection from the moment hyper hands the request
//! over until the response body is dropped, so a stream is "in progress" for
//! as long as it is open.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep, sleep_until};
use tonic::body::Body;
use tower::ServiceExt;

use crate::client_addr::PeerAddr;
use crate::config::ConnectionLimits;
use crate::tls::{ServerTls, VerifiedClientCert};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTP/2 client preface is 24 bytes.
const PREFACE_BYTES: usize = 24;

/// The only call a connection past the cap may make.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Calls whose request is a stream of messages: their bodies have no
/// deadline (the heartbeat lease bounds a silent Heartbeat).
const CLIENT_STREAMING: [&str; 4] = [
    "/presence.v1.PresenceService/Heartbeat",
    "/presence.v1.ChangeFeed/Consume",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The per-connection bounds, resolved from the configuration.
#[derive(Clone, Debug)]
pub struct Bounds {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// `None`: connections live as long as their clients keep them.
    pub max_age: Option<Duration>,
    pub max_age_grace: Duration,
    pub max_connections: usize,
    pub health_reserve: usize,
    pub request_body_timeout: Duration,
    /// HTTP/2 settings: streams per connection and flow-control windows.
    pub max_concurrent_streams: u32,
    pub initial_stream_window: u32,
    pub initial_connection_window: u32,
    /// Bytes a stream may have queued for a peer that does not take them.
    /// hyper's default, 400 KB, let 1,000 stalled watch streams grow the
    /// node by ~7 MB/s toward 400 MB plus per-frame overhead
    /// (`e2e/tests/stalled_watchers.rs`); at 4 KB they hold ~18 MB, flat.
    pub stream_send_buffer: usize,
}

impl Bounds {
    pub fn from_config(limits: &ConnectionLimits) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Bounds {
            handshake_timeout: limits.conn_handshake_timeout,
            idle_timeout: limits.conn_idle_timeout,
            keepalive_interval: nonzero(limits.http2_keepalive_interval),
            keepalive_timeout: limits.http2_keepalive_timeout,
            max_age: nonzero(limits.max_connection_age),
            max_age_grace: limits.max_connection_age_grace,
            max_connections: limits.max_connections(),
            health_reserve: limits.health_connection_reserve,
            request_body_timeout: limits.request_body_timeout,
            // No client needs more; a bound keeps one connection from
            // holding unbounded streams.
            max_concurrent_streams: 1024,
            // hyper's defaults (1 MiB per stream) let a peer park 1 MiB on
            // every stream the node is slow to read; presence messages are
            // tiny.
            initial_stream_window: 64 * 1024,
            initial_connection_window: 1024 * 1024,
            stream_send_buffer: limits.stream_send_buffer,
        }
    }
}

/// Serves `service` to the connections `listener` accepts until `shutdown`
/// resolves; then stops accepting, asks every connection to go away, and
/// returns once all of them have closed. With `tls`, each connection is
/// served after its TLS handshake, made with the configuration current when
/// it was accepted.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    bounds: Bounds,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let bounds = Arc::new(bounds);
    let builder = Arc::new(http_builder(&bounds));
    let open = Arc::new(AtomicUsize::new(0));
    // Every connection holds a receiver: `true` asks it to go away, and the
    // sender sees all receivers dropped once every connection has closed.
    let (drain, draining) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of files (EMFILE) or buffers: accepting again at
                    // once would spin. Existing connections keep being served.
                    tracing::warn!(%error, "cannot accept a connection");
                    metrics::counter!("presence_connections_refused_total", "reason" => "accept_error").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let count = open.load(Ordering::Relaxed);
        let restricted = if count < bounds.max_connections {
            false
        } else if count < bounds.max_connections + bounds.health_reserve {
            true
        } else {
            metrics::counter!("presence_connections_refused_total", "reason" => "cap").increment(1);
            tracing::debug!(%peer, open = count, "connection refused: at --max-connections and the health reserve");
            drop(stream);
            continue;
        };
        if let Err(error) = tune(&stream) {
            tracing::debug!(%error, %peer, "cannot set socket options");
        }
        let slot = Slot::take(open.clone());
        tokio::spawn(serve_connection(
            stream,
            tls.as_ref().map(|tls| tls.acceptor()),
            peer,
            builder.clone(),
            service.clone(),
            bounds.clone(),
            restricted,
            draining.clone(),
            slot,
        ));
    }
    // Dropping the listener closes the port at once: new clients are
    // refused instead of completing TCP and hanging.
    drop(listener);
    drain.send_replace(true);
    drop(draining);
    drain.closed().await;
}

/// The number of open connections, as a gauge and for the cap.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: Arc<AtomicUsize>) -> Self {
        let now = open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("presence_connections_open").set(now as f64);
        Slot(open)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("presence_connections_open").set(now as f64);
    }
}

fn http_builder(bounds: &Bounds) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper times every request head from the end of the previous response,
    // so this is also how long an HTTP/1.1 connection may wait between
    // calls: the idle timeout, not the handshake one. The first request's
    // head is bounded by the handshake rule.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(bounds.max_concurrent_streams)
        .initial_stream_window_size(bounds.initial_stream_window)
        .initial_connection_window_size(bounds.initial_connection_window)
        .max_send_buf_size(bounds.stream_send_buffer)
        .keep_alive_interval(bounds.keepalive_interval)
        .keep_alive_timeout(bounds.keepalive_timeout);
    builder
}

/// TCP_NODELAY: acks, events and replies are small frames, and Nagle would
/// hold each one back until the peer's delayed ACK (~40 ms on Linux), which
/// showed as the p99 of every latency. TCP keepalive reclaims the sockets of
/// peers that vanished without a FIN on HTTP/1.1 connections, which have no
/// pings.
fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    socket2::SockRef::from(stream)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)))
}

/// `max_age` ± 10%, so that connections opened together (after a restart)
/// do not all move at once.
fn jittered(max_age: Duration) -> Duration {
    max_age.mul_f64(rand::random_range(0.9..=1.1))
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S, B>(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    bounds: Arc<Bounds>,
    restricted: bool,
    draining: watch::Receiver<bool>,
    slot: Slot,
) where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let accepted = Instant::now();
    let Some(acceptor) = tls else {
        return serve_io(
            stream, accepted, false, peer, builder, service, bounds, restricted, draining, slot,
        )
        .await;
    };
    let handshake =
        tokio::time::timeout_at(accepted + bounds.handshake_timeout, acceptor.accept(stream));
    let stream = match handshake.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            metrics::counter!("presence_connections_closed_total", "reason" => "tls_handshake")
                .increment(1);
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!("presence_connections_closed_total", "reason" => "handshake_timeout")
                .increment(1);
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // The verifier refuses any certificate not from --tls-client-ca, so one
    // that is there was verified.
    let client_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|certs| !certs.is_empty());
    serve_io(
        stream,
        accepted,
        client_cert,
        peer,
        builder,
        service,
        bounds,
        restricted,
        draining,
        slot,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve_io<IO, S, B>(
    stream: IO,
    accepted: Instant,
    client_cert: bool,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    bounds: Arc<Bounds>,
    restricted: bool,
    mut draining: watch::Receiver<bool>,
    _slot: Slot,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let greeted = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(Greeting {
        inner: stream,
        read: 0,
        greeted: greeted.clone(),
    });
    let (calls, mut calls_changed) = watch::channel(0usize);
    let (aging, aged) = watch::channel(false);
    let service = ConnectionService {
        aged: ConnectionAged(aged),
        inner: service,
        calls: Arc::new(calls),
        restricted,
        client_cert,
        peer,
        body_timeout: bounds.request_body_timeout,
    };
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);

    let idle_timeout = if restricted {
        bounds.handshake_timeout
    } else {
        bounds.idle_timeout
    };
    let handshake_deadline = accepted + bounds.handshake_timeout;
    let mut handshake_pending = true;
    let mut idle_deadline = Some(accepted + idle_timeout);
    let age_deadline = bounds.max_age.map(|age| accepted + jittered(age));
    // Set once the connection was asked to go away: past it, it is dropped.
    let mut close_deadline: Option<Instant> = None;
    let mut counting = true;
    let mut going_away = false;
    let close = |reason: &'static str| {
        metrics::counter!("presence_connections_closed_total", "reason" => reason).increment(1);
        tracing::debug!(%peer, reason, age = ?accepted.elapsed(), "closing connection");
    };
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%peer, error = %error, "connection ended with an error");
                }
                return;
            }
            () = sleep_until(handshake_deadline), if handshake_pending => {
                if !greeted.load(Ordering::Relaxed) {
                    close("handshake_timeout");
                    return;
                }
                handshake_pending = false;
            }
            changed = calls_changed.changed(), if counting => {
                if changed.is_err() {
                    counting = false;
                    continue;
                }
                let in_progress = *calls_changed.borrow_and_update();
                idle_deadline = (in_progress == 0).then(|| Instant::now() + idle_timeout);
            }
            () = sleep_until(idle_deadline.unwrap_or(accepted)), if idle_deadline.is_some() && !going_away => {
                close("idle");
                connection.as_mut().graceful_shutdown();
                going_away = true;
                close_deadline = Some(Instant::now() + bounds.max_age_grace);
            }
            () = sleep_until(age_deadline.unwrap_or(accepted)), if age_deadline.is_some() && !going_away => {
                close("max_age");
                // Heartbeat streams move at once with a `go_away`, rather
                // than be cut at the end of the grace.
                aging.send_replace(true);
                connection.as_mut().graceful_shutdown();
                going_away = true;
                close_deadline = Some(Instant::now() + bounds.max_age_grace);
            }
            () = sleep_until(close_deadline.unwrap_or(accepted)), if close_deadline.is_some() => {
                tracing::debug!(%peer, "calls still open past the grace, dropping the connection");
                return;
            }
            // The node drains: `run` decides how long connections may take.
            _ = draining.changed(), if !*draining.borrow() => {
                if !going_away {
                    connection.as_mut().graceful_shutdown();
                    going_away = true;
                }
            }
        }
    }
}

/// The socket, noting when the client has sent enough to have greeted.
struct Greeting<IO> {
    inner: IO,
    read: usize,
    greeted: Arc<AtomicBool>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Greeting<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.read < PREFACE_BYTES {
            self.read += buf.filled().len() - before;
            if self.read >= PREFACE_BYTES {
                self.greeted.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Greeting<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// In every request's extensions: whether the request's connection reached
/// its maximum age and is going away, so that long calls can move their
/// client before the connection is cut.
#[derive(Clone)]
pub struct ConnectionAged(watch::Receiver<bool>);

impl ConnectionAged {
    /// Resolves once the connection reached its maximum age (never if the
    /// connection's task ended without).
    pub async fn reached(mut self) {
        if self.0.wait_for(|aged| *aged).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The node's service as one connection sees it: calls counted, request
/// bodies timed, and only health checks past the cap.
#[derive(Clone)]
struct ConnectionService<S> {
    inner: S,
    aged: ConnectionAged,
    /// Calls in progress on this connection; the connection's task watches
    /// it to know when the connection is idle.
    calls: Arc<watch::Sender<usize>>,
    restricted: bool,
    /// The client presented a certificate verified against --tls-client-ca.
    client_cert: bool,
    peer: SocketAddr,
    body_timeout: Duration,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnectionService<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<CountedBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if self.client_cert {
            request.extensions_mut().insert(VerifiedClientCert);
        }
        request.extensions_mut().insert(PeerAddr(self.peer));
        request.extensions_mut().insert(self.aged.clone());
        let call = CallInProgress::start(self.calls.clone());
        let path = request.uri().path();
        if self.restricted && path != HEALTH_CHECK {
            let refused = tonic::Status::resource_exhausted(
                "this node is at its connection limit: retry, or call another node",
            )
            .into_http::<Body>();
            return Box::pin(std::future::ready(Ok(
                refused.map(|body| CountedBody { body, _call: call })
            )));
        }
        let timed = !CLIENT_STREAMING.contains(&path);
        let request = if timed {
            let deadline = self.body_timeout;
            request.map(|body| Body::new(TimedBody::new(body, deadline)))
        } else {
            request.map(Body::new)
        };
        let service = self.inner.clone();
        Box::pin(async move {
            let response = service.oneshot(request).await.map_err(Into::into)?;
            Ok(response.map(|body| CountedBody {
                body: Body::new(body),
                _call: call,
            }))
        })
    }
}

/// One call in progress on a connection, until its response body is dropped.
struct CallInProgress(Arc<watch::Sender<usize>>);

impl CallInProgress {
    fn start(calls: Arc<watch::Sender<usize>>) -> Self {
        calls.send_modify(|n| *n += 1);
        CallInProgress(calls)
    }
}

impl Drop for CallInProgress {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its call counted while it is open.
pub struct CountedBody {
    body: Body,
    _call: CallInProgress,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that must have arrived in full by its deadline. Past it,
/// the call fails with DEADLINE_EXCEEDED (tonic passes a `Status` found in a
/// body error on as the call's status).
struct TimedBody {
    body: Incoming,
    /// `None` once the body ended: a finished body has nothing to time.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    fn new(body: Incoming, timeout: Duration) -> Self {
        TimedBody {
            body,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            if frame.is_none() || self.body.is_end_stream() {
                self.deadline = None;
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        ready!(deadline.as_mut().poll(cx));
        self.deadline = None;
        metrics::counter!("presence_request_body_timeouts_total").increment(1);
        Poll::Ready(Some(Err(Box::new(tonic::Status::deadline_exceeded(
            "the request body did not arrive in time",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
