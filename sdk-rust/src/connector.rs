//! Connections: which endpoint we talk to, moving to the next one, and the
//! interceptor that puts the bearer token on every call.
//!
//! The [`Connector`] is shared (behind an `Arc`) by the client handle and by
//! the background session task and watch streams. It never refers back to the
//! client, so those tasks do not keep the client alive: dropping the last
//! [`PresenceClient`](crate::PresenceClient) still stops them.

use std::sync::{Arc, Mutex, RwLock};

use presence_proto::v1::change_feed_client::ChangeFeedClient;
use presence_proto::v1::contacts_service_client::ContactsServiceClient;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{ClientConfig, Error, TlsConfig, TokenProvider};

/// The generated presence stub over our channel and interceptor.
pub(crate) type PresenceStub = PresenceServiceClient<InterceptedService<Channel, Auth>>;
/// The generated contacts stub over our channel and interceptor.
pub(crate) type ContactsStub = ContactsServiceClient<InterceptedService<Channel, Auth>>;
/// The generated change feed stub over our channel and interceptor.
pub(crate) type FeedStub = ChangeFeedClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub(crate) struct Auth {
    /// The header value, shared with every stub so that
    /// [`Connector::set_token`] reaches calls made after it, including the
    /// next reconnect of the session and of watches. A std lock, not Tokio's:
    /// it is held only to clone a small value, never across an await.
    header: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        // A poisoned lock only means another thread panicked while swapping
        // the token; the value inside is still a whole `Option`.
        let header = self
            .header
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(value) = header {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

fn bearer(token: Option<&str>) -> Result<Option<MetadataValue<Ascii>>, Error> {
    token
        .map(|t| {
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| Error::Config("token is not a valid header value".to_owned()))
        })
        .transpose()
}

/// The rustls settings of `https://` endpoints: the configured CA instead of
/// the system's roots, and the client identity for mTLS.
fn client_tls(tls: &TlsConfig) -> Result<ClientTlsConfig, Error> {
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_cert_pem {
        Some(pem) => {
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(Error::Config("the CA certificate is not PEM".to_owned()));
            }
            config.ca_certificate(Certificate::from_pem(pem))
        }
        None => config.with_native_roots(),
    };
    match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "mTLS needs both a client certificate and its key".to_owned(),
            ));
        }
    }
    if let Some(name) = &tls.domain_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// The channel in use and where it points.
struct Current {
    /// Index into `Connector::endpoints`.
    index: usize,
    /// Bumped on every rotation, so two failures noticed at once (the session
    /// and a watch both lose the same node) move on only one endpoint.
    generation: u64,
    channel: Channel,
}

/// Owns the endpoints and the channel currently in use.
pub(crate) struct Connector {
    endpoints: Vec<Endpoint>,
    /// A std mutex, not Tokio's: held only to clone or swap a `Channel`, never
    /// across an await.
    current: Mutex<Current>,
    auth: Auth,
    token_provider: Option<TokenProvider>,
}

/// A channel handed out by [`Connector::channel`], remembering which
/// generation it belongs to so a failure on it can trigger one rotation.
#[derive(Clone)]
pub(crate) struct Lease {
    pub(crate) channel: Channel,
    pub(crate) generation: u64,
    pub(crate) endpoint: String,
}

impl Connector {
    fn endpoints(config: &ClientConfig) -> Result<Vec<Endpoint>, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no endpoint configured".to_owned()));
        }
        config.backoff.validate().map_err(Error::Config)?;
        config
            .endpoints
            .iter()
            .map(|url| {
                let mut endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| Error::Config(format!("bad endpoint {url:?}: {e}")))?
                    .connect_timeout(config.connect_timeout)
                    .timeout(config.request_timeout)
                    .tcp_nodelay(true);
                if endpoint.uri().scheme_str() == Some("https") {
                    endpoint = endpoint
                        .tls_config(client_tls(&config.tls)?)
                        .map_err(|e| Error::Config(format!("bad TLS settings for {url:?}: {e}")))?;
                } else if config.tls.client_cert_pem.is_some() {
                    return Err(Error::Config(format!(
                        "a client certificate is configured but {url:?} is not https://"
                    )));
                }
                if let Some(interval) = config.keepalive_interval {
                    endpoint = endpoint
                        .http2_keep_alive_interval(interval)
                        .keep_alive_timeout(config.request_timeout)
                        // Pings matter only while a stream is open; an idle
                        // connection may as well be found dead at next use.
                        .keep_alive_while_idle(false);
                }
                Ok(endpoint)
            })
            .collect()
    }

    /// Connects to the first endpoint that answers, trying each once in
    /// order.
    pub(crate) async fn connect(config: &ClientConfig) -> Result<Self, Error> {
        let endpoints = Self::endpoints(config)?;
        let auth = Auth {
            header: Arc::new(RwLock::new(bearer(config.token.as_deref())?)),
        };
        let mut last_error = None;
        for (index, endpoint) in endpoints.iter().enumerate() {
            match endpoint.connect().await {
                Ok(channel) => {
                    let current = Mutex::new(Current {
                        index,
                        generation: 0,
                        channel,
                    });
                    return Ok(Self {
                        endpoints,
                        current,
                        auth,
                        token_provider: config.token_provider.clone(),
                    });
                }
                Err(e) => {
                    tracing::debug!(endpoint = %endpoint.uri(), error = %e, "endpoint did not answer");
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) => Err(e.into()),
            None => Err(Error::Config("no endpoint configured".to_owned())),
        }
    }

    /// Points at the first endpoint without connecting; the first call
    /// connects. Must run inside a Tokio runtime.
    pub(crate) fn connect_lazy(config: &ClientConfig) -> Result<Self, Error> {
        let endpoints = Self::endpoints(config)?;
        let auth = Auth {
            header: Arc::new(RwLock::new(bearer(config.token.as_deref())?)),
        };
        let channel = endpoints[0].connect_lazy();
        let current = Mutex::new(Current {
            index: 0,
            generation: 0,
            channel,
        });
        Ok(Self {
            endpoints,
            current,
            auth,
            token_provider: config.token_provider.clone(),
        })
    }

    /// After the server refused the token: fetches a fresh one from the
    /// configured provider and uses it from now on. False without a
    /// provider.
    pub(crate) async fn refresh_token(&self) -> Result<bool, Error> {
        let Some(provider) = &self.token_provider else {
            return Ok(false);
        };
        let token = provider.fetch().await?;
        self.set_token(Some(&token))?;
        Ok(true)
    }

    /// Replaces the bearer token for all later calls.
    pub(crate) fn set_token(&self, token: Option<&str>) -> Result<(), Error> {
        let value = bearer(token)?;
        *self.auth.header.write().unwrap_or_else(|e| e.into_inner()) = value;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // Nothing that can panic runs under this lock, but if it ever did the
        // `Current` inside would still be consistent: every field is assigned
        // whole.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel to use now.
    pub(crate) fn lease(&self) -> Lease {
        let current = self.lock();
        Lease {
            channel: current.channel.clone(),
            generation: current.generation,
            endpoint: self.endpoints[current.index].uri().to_string(),
        }
    }

    /// Moves on to the next endpoint after a failure of (or go-away on) a
    /// channel of generation `failed`. Does nothing if someone else already
    /// rotated away from it, or if there is only one endpoint (its channel
    /// reconnects by itself).
    pub(crate) fn rotate(&self, failed: u64) {
        if self.endpoints.len() < 2 {
            return;
        }
        let mut current = self.lock();
        if current.generation != failed {
            return;
        }
        current.index = (current.index + 1) % self.endpoints.len();
        current.generation += 1;
        // Lazy: the connect happens on the next call, inside whichever task
        // makes it, with that task's timeout and backoff. The old channel
        // closes when its last user drops it.
        current.channel = self.endpoints[current.index].connect_lazy();
        tracing::debug!(endpoint = %self.endpoints[current.index].uri(), "moved to the next endpoint");
    }

    pub(crate) fn presence(&self, lease: &Lease) -> PresenceStub {
        PresenceServiceClient::with_interceptor(lease.channel.clone(), self.auth.clone())
    }

    pub(crate) fn contacts(&self, lease: &Lease) -> ContactsStub {
        ContactsServiceClient::with_interceptor(lease.channel.clone(), self.auth.clone())
    }

    pub(crate) fn feed(&self, lease: &Lease) -> FeedStub {
        ChangeFeedClient::with_interceptor(lease.channel.clone(), self.auth.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_becomes_a_bearer_header() {
        let mut auth = Auth {
            header: Arc::new(RwLock::new(bearer(Some("abc")).unwrap())),
        };
        let request = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc"
        );

        let mut none = Auth {
            header: Arc::new(RwLock::new(None)),
        };
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn a_token_with_a_newline_is_a_config_error() {
        assert!(matches!(bearer(Some("a\nb")), Err(Error::Config(_))));
    }

    #[test]
    fn bad_configs_fail_before_any_io() {
        let empty = ClientConfig {
            endpoints: vec![],
            ..ClientConfig::default()
        };
        assert!(matches!(
            Connector::endpoints(&empty),
            Err(Error::Config(_))
        ));
        let bad_url = ClientConfig::with_endpoint("not a url");
        assert!(matches!(
            Connector::endpoints(&bad_url),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn tls_settings_are_checked_before_any_io() {
        let https = |tls: TlsConfig| ClientConfig {
            tls,
            ..ClientConfig::with_endpoint("https://127.0.0.1:1")
        };
        let not_pem = https(TlsConfig {
            ca_cert_pem: Some("hello".into()),
            ..TlsConfig::default()
        });
        assert!(matches!(
            Connector::endpoints(&not_pem),
            Err(Error::Config(_))
        ));
        let cert_without_key = https(TlsConfig {
            client_cert_pem: Some("-----BEGIN CERTIFICATE-----".into()),
            ..TlsConfig::default()
        });
        assert!(matches!(
            Connector::endpoints(&cert_without_key),
            Err(Error::Config(_))
        ));
        let mtls_over_plaintext = ClientConfig {
            tls: TlsConfig {
                client_cert_pem: Some("c".into()),
                client_key_pem: Some("k".into()),
                ..TlsConfig::default()
            },
            ..ClientConfig::with_endpoint("http://127.0.0.1:1")
        };
        assert!(matches!(
            Connector::endpoints(&mtls_over_plaintext),
            Err(Error::Config(_))
        ));
    }

    #[tokio::test]
    async fn rotation_goes_round_robin_once_per_failed_generation() {
        let config = ClientConfig {
            endpoints: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            ..ClientConfig::default()
        };
        let connector = Connector::connect_lazy(&config).unwrap();
        let first = connector.lease();
        assert_eq!(first.endpoint, "http://127.0.0.1:1/");
        // Two tasks notice the same failure: only one rotation happens.
        connector.rotate(first.generation);
        connector.rotate(first.generation);
        let second = connector.lease();
        assert_eq!(second.endpoint, "http://127.0.0.1:2/");
        connector.rotate(second.generation);
        assert_eq!(connector.lease().endpoint, "http://127.0.0.1:1/");
    }
}
