//! Connections and codecs: raw tonic channels whose sockets bind a chosen
//! source address, and a prost codec with small buffers for the long-lived
//! streams.

use std::future::Future;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::{TcpSocket, TcpStream};
use tonic::codec::{BufferSettings, Codec};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Connects to one server address from an optional local address.
///
/// tonic's `Endpoint` cannot pick the source address, and one source address
/// has only ~28k ephemeral ports towards one server, so 100k connections
/// need several: the socket is bound before it connects.
#[derive(Clone, Debug)]
pub struct BoundConnector {
    pub target: SocketAddr,
    pub local: Option<IpAddr>,
}

impl tower::Service<Uri> for BoundConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (target, local) = (self.target, self.local);
        Box::pin(async move {
            let socket = if target.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(ip) = local {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let stream = socket.connect(target).await?;
            // Heartbeats and acks are tiny frames: Nagle would hold them back
            // behind the peer's delayed ACK.
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// One HTTP/2 connection (a tonic channel; clones share the connection).
pub async fn connect(
    target: SocketAddr,
    local: Option<IpAddr>,
    timeout: Duration,
) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(timeout)
        // The server never pushes big messages: no need for windows that
        // grow, and a fixed window keeps the client's own memory flat.
        .http2_adaptive_window(false);
    Ok(endpoint
        .connect_with_connector(BoundConnector { target, local })
        .await?)
}

/// The prost codec with explicit buffer settings. tonic allocates
/// `buffer_size` per stream eagerly in each direction (8 KiB by default);
/// presence messages are a few dozen bytes, so a 100k-stream client would
/// spend 1.6 GB on buffers it never fills.
#[derive(Debug)]
pub struct SmallCodec<E, D> {
    settings: BufferSettings,
    _types: PhantomData<fn(E) -> D>,
}

impl<E, D> SmallCodec<E, D> {
    pub fn new(buffer_size: usize) -> Self {
        SmallCodec {
            settings: BufferSettings::new(buffer_size.max(64), buffer_size.max(64) * 4),
            _types: PhantomData,
        }
    }
}

impl<E, D> Codec for SmallCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(self.settings)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(self.settings)
    }
}
