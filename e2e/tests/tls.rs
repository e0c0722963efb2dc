//! TLS on the node's own listener: native gRPC (the SDK, tonic) and gRPC-web
//! (HTTP/1.1) over TLS, plaintext refused on the TLS port, optional client
//! certificates (mTLS) and the admin rule tied to them, certificate reload
//! (on demand and when the files change) without dropping open streams,
//! and no plaintext on a network address unless asked for. Certificates are
//! made here, with rcgen.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http_body_util::{BodyExt, Full};
use presence_proto::v1 as pb;
use presence_proto::v1::contacts_service_client::ContactsServiceClient;
use presence_proto::v1::presence_event;
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use presence_sdk::{ClientConfig, PresenceClient, SessionOptions, TlsConfig};
use presence_server::config::{Cli, ConfigError};
use presence_server::tls::ServerTls;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{VISIBLE_WITHIN, admin_token, authed, grpc_frame, timer_flags, token, user};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

type Ca = CertifiedIssuer<'static, KeyPair>;

fn new_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate and its key, both PEM, and the certificate's DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn leaf(ca: &Ca, name: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> Leaf {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.serial_number = Some(SerialNumber::from(serial));
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn server_leaf(ca: &Ca, serial: u64) -> Leaf {
    leaf(ca, "localhost", serial, ExtendedKeyUsagePurpose::ServerAuth)
}

fn client_leaf(ca: &Ca, name: &str) -> Leaf {
    leaf(ca, name, 7, ExtendedKeyUsagePurpose::ClientAuth)
}

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "presence-tls-{test}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A node serving TLS with the certificate and key in `dir`.
struct TlsServer {
    addr: SocketAddr,
    tls: Arc<ServerTls>,
    ca_pem: String,
    dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TlsServer {
    /// Writes `cert` (from `ca`) and, when given, the client CA into a
    /// scratch directory and serves TLS from them with `extra` flags.
    async fn start(
        test: &str,
        ca: &Ca,
        cert: &Leaf,
        client_ca: Option<&Ca>,
        extra: &[&str],
    ) -> TlsServer {
        let dir = scratch(test);
        write_leaf(&dir, cert);
        let mut args: Vec<String> = vec!["presence-server".into(), "--dev".into()];
        args.extend(timer_flags());
        for (flag, file) in [("--tls-cert", "server.pem"), ("--tls-key", "server.key")] {
            args.push(flag.into());
            args.push(dir.join(file).display().to_string());
        }
        if let Some(client_ca) = client_ca {
            std::fs::write(dir.join("client-ca.pem"), client_ca.pem()).unwrap();
            args.push("--tls-client-ca".into());
            args.push(dir.join("client-ca.pem").display().to_string());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let config = Cli::parse_from(args).config;
        let tls = ServerTls::from_config(&config)
            .unwrap()
            .expect("TLS is configured");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(presence_server::run_with_tls(
            config,
            listener,
            Some(tls.clone()),
            async {
                let _ = stopped.await;
            },
        ));
        TlsServer {
            addr,
            tls,
            ca_pem: ca.pem(),
            dir,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn tls_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost")
    }

    /// A tonic channel over TLS, with `identity` as client certificate.
    async fn channel(&self, identity: Option<&Leaf>) -> Result<Channel, tonic::transport::Error> {
        let mut tls = self.tls_config();
        if let Some(leaf) = identity {
            tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
        }
        Channel::from_shared(self.https())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    fn sdk_config(&self, user: &str) -> ClientConfig {
        ClientConfig {
            endpoints: vec![self.https()],
            token: Some(token(user)),
            device_id: "laptop".into(),
            platform: presence_sdk::Platform::Desktop,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            tls: TlsConfig {
                ca_cert_pem: Some(self.ca_pem.clone()),
                domain_name: Some("localhost".into()),
                ..TlsConfig::default()
            },
            ..ClientConfig::default()
        }
    }

    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn write_leaf(dir: &Path, cert: &Leaf) {
    std::fs::write(dir.join("server.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &cert.key_pem).unwrap();
}

/// A TLS connection by hand (rustls on ring), offering `alpn`, trusting
/// `ca_pem`, presenting `identity` when given.
async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<&Leaf>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presented on `stream`.
fn served_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn befriend(channel: Channel, user: &str, contacts: &[&str]) -> Result<(), tonic::Status> {
    let request = pb::AddContactsRequest {
        user_id: user.to_owned(),
        contact_ids: contacts.iter().map(|c| c.to_string()).collect(),
    };
    ContactsServiceClient::new(channel)
        .add_contacts(authed(request, &admin_token()))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn native_grpc_and_grpc_web_are_served_over_tls() {
    let ca = new_ca("presence test CA");
    let server = TlsServer::start("serve", &ca, &server_leaf(&ca, 1), None, &[]).await;
    let alice = user("alice");

    // The SDK, https:// with the test CA.
    let client = PresenceClient::connect(server.sdk_config(&alice))
        .await
        .unwrap();
    client
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let me = client.get_one(&alice).await.unwrap();
    assert_eq!(me.status(), presence_sdk::VisibleStatus::Online, "{me:?}");

    // ALPN: h2 is offered for native gRPC.
    let h2 = tls_connect(server.addr, &server.ca_pem, &[b"h2"], None)
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(h2);

    // gRPC-web over HTTP/1.1 inside TLS, as a browser calls.
    let stream = tls_connect(server.addr, &server.ca_pem, &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = pb::GetPresenceRequest {
        user_ids: vec![alice.clone()],
    };
    let call = http::Request::builder()
        .method("POST")
        .uri("/presence.v1.PresenceService/GetPresence")
        .header("host", "localhost")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {}", token(&alice)))
        .body(Full::new(grpc_frame(&request)))
        .unwrap();
    let response = sender.send_request(call).await.unwrap();
    assert!(response.status().is_success(), "{response:?}");
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/grpc-web+proto"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("grpc-status:0"), "{text:?}");
    assert!(text.contains(&alice), "the reply names alice: {text:?}");

    client.end_session().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_plaintext_client_is_refused_on_the_tls_port() {
    let ca = new_ca("presence test CA");
    let server = TlsServer::start("plaintext", &ca, &server_leaf(&ca, 1), None, &[]).await;
    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        PresenceServiceClient::new(channel)
            .get_presence(authed(
                pb::GetPresenceRequest {
                    user_ids: vec!["bob".into()],
                },
                &token("bob"),
            ))
            .await
            .map_err(|e| e.to_string())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), plaintext)
        .await
        .expect("a plaintext call fails fast");
    assert!(outcome.is_err(), "plaintext was served: {outcome:?}");

    // A raw HTTP/2 preface gets no HTTP/2 answer: the connection is closed.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection");
    // Either a TLS alert (content type 21) or nothing, never an HTTP/2 frame.
    assert!(
        read.is_err() || buf.is_empty() || buf[0] == 21,
        "{read:?} {buf:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn client_certificates_are_verified_and_admin_calls_need_one() {
    let ca = new_ca("presence test CA");
    let clients = new_ca("presence client CA");
    let stranger = new_ca("someone else's CA");
    let server = TlsServer::start(
        "mtls",
        &ca,
        &server_leaf(&ca, 1),
        Some(&clients),
        &["--tls-require-client-cert-for-admin"],
    )
    .await;
    let (alice, bob) = (user("alice"), user("bob"));

    // A certificate from the client CA: admin calls are served.
    let ops = client_leaf(&clients, "ops-service");
    let with_cert = server.channel(Some(&ops)).await.unwrap();
    befriend(with_cert, &alice, &[&bob]).await.unwrap();

    // Without a certificate: tokens still work, but not an admin one.
    let without = server.channel(None).await.unwrap();
    let refused = befriend(without.clone(), &alice, &[&bob])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );
    let presence = PresenceServiceClient::new(without)
        .get_presence(authed(
            pb::GetPresenceRequest {
                user_ids: vec![bob.clone()],
            },
            &token(&alice),
        ))
        .await
        .unwrap();
    assert_eq!(presence.into_inner().presences.len(), 1);
    // The SDK without a certificate too.
    let sdk = PresenceClient::connect(server.sdk_config(&alice))
        .await
        .unwrap();
    assert_eq!(sdk.list_contacts(None).await.unwrap(), vec![bob.clone()]);

    // A certificate from another CA is refused at the handshake: TLS 1.3
    // clients learn it on their first read, as an alert.
    let forged = client_leaf(&stranger, "ops-service");
    match tls_connect(server.addr, &server.ca_pem, &[b"h2"], Some(&forged)).await {
        Err(_) => {}
        Ok(mut stream) => {
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the server answers the forged certificate");
            assert!(
                matches!(read, Err(_) | Ok(0)),
                "a foreign client certificate was accepted: {read:?}"
            );
        }
    }
    // And the tonic client with it cannot call.
    let forged_call = async {
        let channel = server
            .channel(Some(&forged))
            .await
            .map_err(|e| e.to_string())?;
        befriend(channel, &alice, &[&bob])
            .await
            .map_err(|e| e.to_string())
    };
    assert!(forged_call.await.is_err());
    // A certificate from the client CA, by hand: the handshake completes.
    let mut good = tls_connect(server.addr, &server.ca_pem, &[b"h2"], Some(&ops))
        .await
        .unwrap();
    good.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 9];
    // The server's SETTINGS frame (type 4).
    tokio::time::timeout(Duration::from_secs(5), good.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf[3], 4, "{buf:?}");

    server.stop().await;
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_and_open_streams_stay() {
    let ca = new_ca("presence test CA");
    let first = server_leaf(&ca, 1);
    let server = TlsServer::start("reload", &ca, &first, None, &[]).await;
    let (alice, bob) = (user("alice"), user("bob"));
    let channel = server.channel(None).await.unwrap();
    befriend(channel.clone(), &alice, &[&bob]).await.unwrap();
    // alice's watch, open on a connection made with the first certificate.
    let mut watch = support::raw_watch(PresenceServiceClient::new(channel), &alice).await;
    let seen = tls_connect(server.addr, &server.ca_pem, &[b"h2"], None)
        .await
        .unwrap();
    assert_eq!(served_cert(&seen), first.der);

    // The files change and the node reloads them (as on SIGHUP).
    let second = server_leaf(&ca, 2);
    write_leaf(&server.dir, &second);
    server.tls.reload().unwrap();
    let seen = tls_connect(server.addr, &server.ca_pem, &[b"h2"], None)
        .await
        .unwrap();
    assert_eq!(
        served_cert(&seen),
        second.der,
        "a new connection gets the new certificate"
    );

    // A broken file is refused and the node keeps serving the last good one.
    std::fs::write(server.dir.join("server.pem"), "not a certificate").unwrap();
    let error = server.tls.reload().unwrap_err();
    assert!(format!("{error:#}").contains("--tls-cert"), "{error:#}");
    let seen = tls_connect(server.addr, &server.ca_pem, &[b"h2"], None)
        .await
        .unwrap();
    assert_eq!(served_cert(&seen), second.der);

    // bob comes online over a new connection; alice's stream from before
    // the reload is still open and sees it.
    let bob_client = PresenceClient::connect(server.sdk_config(&bob))
        .await
        .unwrap();
    bob_client
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let online = tokio::time::timeout(VISIBLE_WITHIN, async {
        loop {
            let event = watch
                .message()
                .await
                .expect("the watch from before the reload stays open")
                .expect("the watch from before the reload stays open");
            if let Some(presence_event::Event::Presence(p)) = event.event
                && p.user_id == bob
                && p.status() == pb::VisibleStatus::Online
            {
                return p;
            }
        }
    })
    .await
    .expect("bob's change reaches the open watch");
    assert_eq!(online.user_id, bob);
    bob_client.end_session().await.unwrap();
    server.stop().await;
}

/// The certificate a new connection to `server` is served, once it is
/// `expected`; panics if that takes more than `within`.
async fn served_within(server: &TlsServer, expected: &[u8], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen = tls_connect(server.addr, &server.ca_pem, &[b"h2"], None)
            .await
            .unwrap();
        if served_cert(&seen) == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the certificate on disk was not served within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_certificate_renewed_on_disk_is_served_without_a_signal() {
    let ca = new_ca("presence test CA");
    let first = server_leaf(&ca, 1);
    let server = TlsServer::start(
        "renewed",
        &ca,
        &first,
        None,
        &["--tls-reload-interval", "100ms"],
    )
    .await;
    served_within(&server, &first.der, Duration::ZERO).await;

    // A Kubernetes Secret volume: the files are symlinks, swapped at once
    // to a directory with the renewed pair.
    let second = server_leaf(&ca, 2);
    let renewed = server.dir.join("renewed");
    std::fs::create_dir(&renewed).unwrap();
    write_leaf(&renewed, &second);
    for file in ["server.pem", "server.key"] {
        let link = server.dir.join(format!("{file}.link"));
        std::os::unix::fs::symlink(renewed.join(file), &link).unwrap();
        std::fs::rename(&link, server.dir.join(file)).unwrap();
    }
    let polls = Duration::from_secs(5);
    served_within(&server, &second.der, polls).await;

    // A tool that rewrites the files in place, one at a time: the new
    // certificate with the old key does not load and the last good pair
    // is served until the key follows.
    let third = server_leaf(&ca, 3);
    std::fs::write(renewed.join("server.pem"), &third.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    served_within(&server, &second.der, Duration::ZERO).await;
    std::fs::write(renewed.join("server.key"), &third.key_pem).unwrap();
    served_within(&server, &third.der, polls).await;
    server.stop().await;
}

#[tokio::test]
async fn plaintext_on_a_network_address_needs_insecure_listen() {
    let secret = "an-e2e-secret-that-is-long-enough-32b";
    let config = |extra: &[&str]| {
        let mut args = vec![
            "presence-server",
            "--jwt-secret",
            secret,
            "--listen",
            "0.0.0.0:50051",
        ];
        args.extend_from_slice(extra);
        Cli::parse_from(args).config
    };
    let error = config(&[]).validate().unwrap_err();
    assert!(
        matches!(error, ConfigError::PlaintextOnNetwork(_)),
        "{error}"
    );
    assert!(error.to_string().contains("--insecure-listen"), "{error}");
    config(&["--insecure-listen"]).validate().unwrap();
    config(&["--tls-cert", "cert.pem", "--tls-key", "key.pem"])
        .validate()
        .unwrap();
    // `run` refuses before serving anything.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = presence_server::run(config(&[]), listener, std::future::pending()).await;
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("plaintext refused")
    );
    // A certificate file that does not load stops `run` too.
    let dir = scratch("badfiles");
    std::fs::write(dir.join("cert.pem"), "nope").unwrap();
    std::fs::write(dir.join("key.pem"), "nope").unwrap();
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = presence_server::run(
        config(&["--tls-cert", &cert, "--tls-key", &key]),
        listener,
        std::future::pending(),
    )
    .await;
    assert!(refused.unwrap_err().to_string().contains("--tls-cert"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_tls_handshake_counts_against_the_handshake_timeout() {
    let ca = new_ca("presence test CA");
    let server = TlsServer::start(
        "handshake",
        &ca,
        &server_leaf(&ca, 1),
        None,
        &["--conn-handshake-timeout", "500ms"],
    )
    .await;
    // A client that connects and never starts its handshake.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // One that completes its handshake but then says nothing: also closed.
    let mut quiet = tls_connect(server.addr, &server.ca_pem, &[b"h2"], None)
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), quiet.read(&mut buf))
        .await
        .expect("the quiet TLS connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.stop().await;
}
