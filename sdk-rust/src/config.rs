//! The client's configuration: one struct, every option with its default.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use presence_proto::v1::Platform;

use crate::{Backoff, Error};

/// The endpoint used when none is configured.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// Everything [`PresenceClient::connect`](crate::PresenceClient::connect)
/// needs. Build it from [`Default`] and override what differs:
///
/// ```
/// use std::time::Duration;
/// use presence_sdk::{ClientConfig, Platform};
///
/// let config = ClientConfig {
///     endpoints: vec!["http://10.0.0.1:50051".into(), "http://10.0.0.2:50051".into()],
///     token: Some("eyJhbGciOi...".into()),
///     device_id: "chat-worker-7".into(),
///     platform: Platform::Service,
///     request_timeout: Duration::from_secs(3),
///     ..ClientConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server URLs: `http://host:port` for plaintext, `https://host:port` for
    /// TLS (to a gateway that terminates it, or to a server with TLS). Calls go to one at a time; whenever
    /// the session or a watch has to reconnect (the node failed or sent a
    /// go-away because it drains) the client moves on to the next one, round
    /// robin. Default: `["http://127.0.0.1:50051"]`.
    pub endpoints: Vec<String>,
    /// The bearer token (a JWT) sent as `authorization: Bearer <token>` on
    /// every call; `None` sends no `authorization` header. Can be replaced
    /// later with [`PresenceClient::set_token`](crate::PresenceClient::set_token).
    /// Default: `None`.
    pub token: Option<String>,
    /// Where a fresh token comes from when the server says the current one
    /// expired (streams end with UNAUTHENTICATED "token expired" when their
    /// token does). The session and watches then fetch one and reconnect at
    /// once, within the server's grace period, so contacts see no offline
    /// flicker; without a provider they end with
    /// [`Error::Unauthenticated`]. Default: `None`.
    pub token_provider: Option<TokenProvider>,
    /// This device's id for the session, [`touch`](crate::PresenceClient::touch)
    /// and [`disconnect`](crate::PresenceClient::disconnect): 1 to 128 bytes,
    /// stable across reconnects (and ideally across restarts) of the same
    /// device, so a reconnect resumes the same session instead of creating a
    /// second one. Default: empty, which those calls reject; queries and
    /// watches do not need it.
    pub device_id: String,
    /// The kind of device, shown to the user themself and to admin callers.
    /// Default: [`Platform::Service`].
    pub platform: Platform,
    /// How long setting up a connection to one endpoint may take.
    /// Default: 5 s.
    pub connect_timeout: Duration,
    /// How long a unary call may take, and how long opening a stream may take
    /// until the server answers with its headers; an open stream itself has
    /// no deadline. Default: 10 s.
    pub request_timeout: Duration,
    /// HTTP/2 ping interval while streams are open, so a connection to a
    /// vanished node is noticed (and the watch reconnects) even when no
    /// presence changes flow. `None` disables pings. Default: 30 s.
    pub keepalive_interval: Option<Duration>,
    /// The delay between reconnect attempts of the session and of watches.
    /// Default: 100 ms initial, 10 s max, factor 2, full jitter.
    pub backoff: Backoff,
    /// [`get_presence`](crate::PresenceClient::get_presence) splits longer id
    /// lists into requests of at most this many ids; match the server's
    /// `max-batch`. Default: 100.
    pub max_batch: usize,
    /// TLS settings for `https://` endpoints; ignored for `http://` ones.
    /// Default: the system's root certificates, no client certificate.
    pub tls: TlsConfig,
}

/// How `https://` endpoints are verified, and how this client proves who it
/// is when the server asks (mTLS). All certificates and keys are PEM text,
/// not paths, so they can come from a file, a secret store or a test.
///
/// ```
/// use presence_sdk::{ClientConfig, TlsConfig};
///
/// # let ca_pem = String::new();
/// let config = ClientConfig {
///     endpoints: vec!["https://presence.example.com:443".into()],
///     tls: TlsConfig {
///         ca_cert_pem: Some(ca_pem),        // e.g. std::fs::read_to_string("ca.pem")?
///         ..TlsConfig::default()
///     },
///     ..ClientConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// The CA certificate(s) (PEM, one or more) that `https://` endpoints
    /// must chain to, **instead of** the system's roots: a private CA at the
    /// gateway, or a test CA. A private PKI is not widened to every public
    /// CA, and a minimal container without a CA bundle still works.
    /// Default: `None` (the system's roots).
    pub ca_cert_pem: Option<String>,
    /// The client certificate chain (PEM) for mutual TLS, sent when the
    /// server asks for one. Needs [`client_key_pem`](Self::client_key_pem).
    /// Default: `None`.
    pub client_cert_pem: Option<String>,
    /// The private key (PEM) of [`client_cert_pem`](Self::client_cert_pem).
    /// Default: `None`.
    pub client_key_pem: Option<String>,
    /// The name the server's certificate must carry, when it differs from
    /// the endpoint's host (e.g. connecting to an IP address). Default:
    /// `None` (the endpoint's host).
    pub domain_name: Option<String>,
}

// Manual, so that a key never ends up in a log line.
impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|_| "<pem>"))
            .field(
                "client_cert_pem",
                &self.client_cert_pem.as_ref().map(|_| "<pem>"),
            )
            .field(
                "client_key_pem",
                &self.client_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            token: None,
            token_provider: None,
            device_id: String::new(),
            platform: Platform::Service,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Some(Duration::from_secs(30)),
            backoff: Backoff::default(),
            max_batch: 100,
            tls: TlsConfig::default(),
        }
    }
}

type FetchToken =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, Error>> + Send>> + Send + Sync;

/// A source of fresh tokens, e.g. a call to the identity provider:
///
/// ```
/// use presence_sdk::{ClientConfig, TokenProvider};
///
/// let config = ClientConfig {
///     token_provider: Some(TokenProvider::new(|| async {
///         Ok(std::env::var("PRESENCE_TOKEN").unwrap_or_default())
///     })),
///     ..ClientConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct TokenProvider(Arc<FetchToken>);

impl TokenProvider {
    /// A provider calling `fetch` for every fresh token.
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, Error>> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(fetch())))
    }

    pub(crate) async fn fetch(&self) -> Result<String, Error> {
        (self.0)().await
    }
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenProvider")
    }
}

impl ClientConfig {
    /// The default config pointed at one server.
    pub fn with_endpoint(endpoint: impl Into<String>) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            ..Self::default()
        }
    }
}
