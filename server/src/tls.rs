//! TLS on the node's own listener (`--tls-cert`, `--tls-key`), with optional
//! client certificates (`--tls-client-ca`), reloaded on SIGHUP and when the
//! files change.
//!
//! Every accepted connection does its rustls handshake in
//! `connections::serve`, within `--conn-handshake-timeout`, before hyper
//! serves it. ALPN offers `h2` (native gRPC) and `http/1.1` (gRPC-web).
//!
//! Client certificates are optional for clients: a browser or phone with a
//! token only still connects. One that presents a certificate must chain to
//! `--tls-client-ca`, else the handshake fails. A connection whose client
//! presented a verified certificate carries [`VerifiedClientCert`] in every
//! request's extensions; with `--tls-require-client-cert-for-admin`, calls
//! made with an admin-scoped token are refused without it.
//!
//! On reload ([`ServerTls::reload`], run on SIGHUP, or when a poll every
//! `--tls-reload-interval` finds the files' contents changed) the files are
//! read again and new handshakes use the new configuration; connections
//! already open keep theirs, so no stream is dropped. A file that does not
//! load is logged and the previous configuration stays. Polling the contents
//! rather than waiting for a signal serves renewals nobody signals: a
//! Kubernetes Secret volume swaps its files behind a symlink, and a
//! certificate tool may rewrite them in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// Marks a request that came over a connection whose client presented a
/// certificate verified against `--tls-client-ca`.
#[derive(Clone, Copy, Debug)]
pub struct VerifiedClientCert;

/// Where the certificate, key and client CA are read from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files the configuration names; `None` when TLS is off.
    pub fn from_config(config: &Config) -> Option<TlsFiles> {
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
            }),
            _ => None,
        }
    }

    /// The files' bytes, `None` for one that cannot be read.
    fn contents(&self) -> Vec<Option<Vec<u8>>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| std::fs::read(path).ok())
            .collect()
    }

    /// Reads the files into a server configuration.
    pub fn load(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs(&self.cert, "--tls-cert")?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("--tls-key {}: no PEM private key", self.key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path, "--tls-client-ca")? {
                    roots.add(cert).with_context(|| {
                        format!("--tls-client-ca {}: not a CA certificate", path.display())
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .context("--tls-client-ca: building the client verifier")?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "--tls-cert {} and --tls-key {} do not make a usable pair",
                self.cert.display(),
                self.key.display()
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {}: bad PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{flag} {}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The node's TLS: the configuration new handshakes use, and where to
/// reload it from.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' contents when last loaded (or tried), so that a poll
    /// reloads only files that changed, and reports a bad file once.
    loaded_contents: Mutex<Vec<Option<Vec<u8>>>>,
}

impl ServerTls {
    /// Loads the files the configuration names; `Ok(None)` when TLS is off.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<ServerTls>>> {
        TlsFiles::from_config(config)
            .map(|files| ServerTls::new(files).map(Arc::new))
            .transpose()
    }

    pub fn new(files: TlsFiles) -> anyhow::Result<ServerTls> {
        let loaded_contents = Mutex::new(files.contents());
        let config = files.load()?;
        Ok(ServerTls {
            files,
            current: RwLock::new(config),
            loaded_contents,
        })
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("TLS config lock").clone())
    }

    /// Reads the files again; new handshakes use them from now on, open
    /// connections keep the configuration they were made with. On error the
    /// current configuration stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        *self.loaded_contents.lock().expect("TLS contents lock") = self.files.contents();
        let config = self.files.load()?;
        *self.current.write().expect("TLS config lock") = config;
        Ok(())
    }

    /// [`ServerTls::reload`] if the files' contents differ from those last
    /// loaded; `None` if they do not.
    fn reload_if_changed(&self) -> Option<anyhow::Result<()>> {
        let changed =
            self.files.contents() != *self.loaded_contents.lock().expect("TLS contents lock");
        changed.then(|| self.reload())
    }

    fn log_reload(&self, trigger: &str, outcome: anyhow::Result<()>) {
        match outcome {
            Ok(()) => tracing::info!(
                cert = %self.files.cert.display(),
                trigger,
                "TLS certificate reloaded"
            ),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                trigger,
                "TLS reload failed, keeping the previous certificate"
            ),
        }
    }

    /// Reloads on every SIGHUP, logging the outcome.
    pub fn reload_on_sighup(self: &Arc<Self>) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(tls) = tls.upgrade() else { return };
                tls.log_reload("SIGHUP", tls.reload());
            }
        });
        Ok(())
    }

    /// Reads the files every `every` (never if zero) and reloads them when
    /// their contents changed, logging the outcome.
    pub fn reload_on_change(self: &Arc<Self>, every: Duration) {
        if every.is_zero() {
            return;
        }
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut polls = tokio::time::interval(every);
            polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            polls.tick().await;
            loop {
                polls.tick().await;
                let Some(tls) = tls.upgrade() else { return };
                if let Some(outcome) = tls.reload_if_changed() {
                    tls.log_reload("the files changed", outcome);
                }
            }
        });
    }
}
