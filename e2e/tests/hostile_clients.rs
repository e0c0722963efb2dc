//! A node holds against clients that hold on: silent or idle connections,
//! connections that never go away, more connections than it can serve,
//! stalled request bodies, and responses too big for one message. Each test
//! runs a real server on 127.0.0.1:0 with short bounds and prints what it
//! measured.

mod support;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use presence_proto::v1 as pb;
use support::{TestServer, admin_token, authed, grpc_frame, token, user};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long `stream` stays open without sending anything, up to `limit`.
async fn time_until_closed(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((start + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A request body the test feeds frame by frame.
type FedBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

type Sender = hyper::client::conn::http2::SendRequest<FedBody>;

/// A raw HTTP/2 connection; the returned task ends when the server closes it.
async fn http2(server: &TestServer) -> (Sender, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let closed = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, closed)
}

type Http1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A raw HTTP/1.1 connection; the returned task ends when the connection does.
async fn http1(
    server: &TestServer,
) -> (
    Http1Sender,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

/// A gRPC-web health check, its whole body at once, as a browser sends it.
fn grpc_web_health_check_request() -> http::Request<Full<Bytes>> {
    http::Request::post("/grpc.health.v1.Health/Check")
        .header("host", "localhost")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(grpc_frame(&HealthCheckRequest {
            service: String::new(),
        })))
        .unwrap()
}

/// A health check whose body the test sends when it likes.
fn health_check_request() -> (
    http::Request<FedBody>,
    mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
) {
    let (body, frames) = mpsc::channel(4);
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(ReceiverStream::new(frames)))
        .unwrap();
    (request, body)
}

fn health_check_frame() -> Frame<Bytes> {
    Frame::data(grpc_frame(&HealthCheckRequest {
        service: String::new(),
    }))
}

/// The grpc-status of a response, from its headers or its trailers.
async fn grpc_status<B>(response: http::Response<B>) -> Option<String>
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    if let Some(status) = response.headers().get("grpc-status") {
        return Some(status.to_str().unwrap().to_owned());
    }
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers()?;
    Some(trailers.get("grpc-status")?.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let server = TestServer::start_with(&["--conn-handshake-timeout", "500ms"]).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Half a preface is not a preface.
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    silent.push(partial);
    let closes = futures::future::join_all(
        silent
            .into_iter()
            .map(|stream| time_until_closed(stream, Duration::from_secs(5))),
    )
    .await;
    let closes: Vec<Duration> = closes
        .into_iter()
        .map(|closed| closed.expect("a silent connection still open after 5 s"))
        .collect();
    let slowest = closes.iter().max().unwrap();
    let fastest = closes.iter().min().unwrap();
    println!(
        "{} silent connections closed after {fastest:?} to {slowest:?} (--conn-handshake-timeout 500ms)",
        closes.len()
    );
    assert!(*fastest >= Duration::from_millis(400), "{fastest:?}");
    assert!(*slowest < Duration::from_millis(1500), "{slowest:?}");
    server.stop().await;
}

#[tokio::test]
async fn idle_http2_connections_are_asked_to_go_away() {
    let server = TestServer::start_with(&["--conn-idle-timeout", "700ms"]).await;
    let (mut sender, closed) = http2(&server).await;
    let (request, body) = health_check_request();
    body.send(Ok(health_check_frame())).await.unwrap();
    drop(body);
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(grpc_status(response).await.as_deref(), Some("0"));
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("an idle connection still open after 5 s")
        .unwrap();
    let idle = idle_since.elapsed();
    println!(
        "idle HTTP/2 connection closed {idle:?} after its last call (--conn-idle-timeout 700ms)"
    );
    assert!(idle >= Duration::from_millis(600), "{idle:?}");
    assert!(idle < Duration::from_millis(2000), "{idle:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_does_not_answer_pings_is_dropped() {
    let server = TestServer::start_with(&[
        "--http2-keepalive-interval",
        "300ms",
        "--http2-keepalive-timeout",
        "300ms",
    ])
    .await;
    // A client that greets like HTTP/2 and then never reads nor acks.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let start = Instant::now();
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    let dropped = start.elapsed();
    assert!(read.is_ok(), "a silent peer still connected after 5 s");
    // Frame headers: 3 bytes length, 1 byte type (6 = PING).
    let mut pinged = false;
    let mut at = 0;
    while at + 9 <= received.len() {
        let len = usize::from(received[at]) << 16
            | usize::from(received[at + 1]) << 8
            | usize::from(received[at + 2]);
        pinged |= received[at + 3] == 6;
        at += 9 + len;
    }
    println!("peer silent to pings dropped after {dropped:?} (keepalive 300ms + 300ms)");
    assert!(pinged, "the server never pinged");
    assert!(dropped < Duration::from_secs(2), "{dropped:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_connection_past_its_max_age_goes_away_after_its_calls_complete() {
    let server = TestServer::start_with(&[
        "--max-connection-age",
        "1s",
        "--max-connection-age-grace",
        "5s",
    ])
    .await;
    let (mut sender, closed) = http2(&server).await;
    let opened = Instant::now();
    // A call in flight across the max age: its body comes after it.
    let (request, body) = health_check_request();
    let response = tokio::spawn(sender.send_request(request));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // GOAWAY received: the connection takes no new calls.
    let (late, _late_body) = health_check_request();
    assert!(
        sender.send_request(late).await.is_err(),
        "a new call accepted past the max age"
    );
    body.send(Ok(health_check_frame())).await.unwrap();
    drop(body);
    let response = response
        .await
        .unwrap()
        .expect("the call in flight completes");
    assert_eq!(grpc_status(response).await.as_deref(), Some("0"));
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the connection closes once its calls completed")
        .unwrap();
    println!(
        "connection with max age 1s (±10%) closed after {:?}, its call in flight answered",
        opened.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn sessions_and_watches_outlive_their_connections_max_age_without_flicker() {
    let server = TestServer::start_with(&[
        "--max-connection-age",
        "1s",
        "--max-connection-age-grace",
        "200ms",
    ])
    .await;
    let (alice, bob) = (user("alice"), user("bob"));
    support::befriend(&server, &alice, &[&bob]).await;
    let watcher = support::client(&server, &alice, "alice-laptop").await;
    let mut watch = support::ContactWatch::open(&watcher, &bob).await;
    let bob_phone = support::client(&server, &bob, "bob-phone").await;
    bob_phone
        .start_session(presence_sdk::SessionOptions::default())
        .await
        .unwrap();
    watch.sees(presence_sdk::VisibleStatus::Online).await;
    let reconnects = support::Interruptions::watch(&bob_phone);
    // Three max ages: every connection, the session's and the watch's, is
    // cut at least twice; the SDK moves on and alice sees nothing.
    watch.assert_quiet(Duration::from_millis(3500)).await;
    let reconnects = reconnects.seen();
    println!("bob's session moved to a new connection: {reconnects:?}");
    assert!(
        !reconnects.is_empty(),
        "the max age never cut the session's stream"
    );
    // Told to move before the connection closed, not cut by it.
    assert!(
        reconnects
            .iter()
            .all(|reconnect| reconnect.contains("connection max age")),
        "the session's stream was cut without a go_away: {reconnects:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn past_the_connection_cap_only_health_checks_are_answered() {
    let server =
        TestServer::start_with(&["--max-connections", "3", "--health-connection-reserve", "2"])
            .await;
    let mut full = Vec::new();
    for _ in 0..3 {
        full.push(server.channel().await);
    }
    let get_presence = |channel| async move {
        let mut client = pb::presence_service_client::PresenceServiceClient::new(channel);
        let request = pb::GetPresenceRequest {
            user_ids: vec![user("bob")],
        };
        client.get_presence(authed(request, &token("alice"))).await
    };
    for channel in &full {
        get_presence(channel.clone()).await.unwrap();
    }
    // Past the cap: health checks only.
    let reserve = server.channel().await;
    let health = HealthClient::new(reserve.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);
    let refused = get_presence(reserve.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    println!("past the cap: {}", refused.message());
    // The last connection of the reserve, then one past it: closed at once.
    let _last_reserved = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let beyond = TcpStream::connect(server.addr).await.unwrap();
    let closed = time_until_closed(beyond, Duration::from_secs(2))
        .await
        .expect("a connection past the reserve is closed");
    println!("a connection past cap + reserve closed after {closed:?}");
    // A full connection closing makes room for a full one again.
    drop(full);
    drop(reserve);
    tokio::time::sleep(Duration::from_millis(300)).await;
    get_presence(server.channel().await).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_grpc_web_body_is_cut_after_its_timeout() {
    let server = TestServer::start_with(&["--request-body-timeout", "500ms"]).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /grpc.health.v1.Health/Check HTTP/1.1\r\n\
                Host: localhost\r\n\
                Content-Type: application/grpc-web+proto\r\n\
                X-Grpc-Web: 1\r\n\
                Content-Length: 100\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[0, 0, 0, 0, 95]).await.unwrap();
    let start = Instant::now();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("a stalled body still held after 5 s");
    let cut = start.elapsed();
    assert!(read.is_ok());
    let response = String::from_utf8_lossy(&response);
    println!("stalled HTTP/1.1 gRPC-web body cut after {cut:?} (--request-body-timeout 500ms)");
    assert!(cut >= Duration::from_millis(400), "{cut:?}");
    assert!(cut < Duration::from_millis(2000), "{cut:?}");
    // tonic-web reports a failed request body as INTERNAL, naming the cause;
    // over native gRPC the same call ends with DEADLINE_EXCEEDED.
    assert!(response.contains("grpc-status: 13"), "{response}");
    assert!(
        response.contains("the%20request%20body%20did%20not%20arrive%20in%20time"),
        "{response}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_unary_body_over_http2_ends_with_deadline_exceeded() {
    let server = TestServer::start_with(&["--request-body-timeout", "500ms"]).await;
    let (mut sender, _closed) = http2(&server).await;
    let (request, _stalled_body) = health_check_request();
    let start = Instant::now();
    let response = sender.send_request(request).await.unwrap();
    let status = grpc_status(response).await;
    let cut = start.elapsed();
    println!("stalled HTTP/2 unary body cut after {cut:?} (--request-body-timeout 500ms)");
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert!(cut >= Duration::from_millis(400), "{cut:?}");
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_streams_are_not_cut_by_the_request_body_timeout() {
    let server = TestServer::start_with(&["--request-body-timeout", "300ms"]).await;
    let mut session =
        support::RawSession::open(server.presence().await, &user("bob"), "laptop").await;
    for seq in 1..=4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        session
            .outbound
            .send(support::session_beat(seq))
            .await
            .unwrap();
        let ack = session.inbound.message().await;
        assert!(matches!(ack, Ok(Some(_))), "beat {seq}: {ack:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_whole_body_that_arrives_in_time_is_answered_over_http1() {
    let server = TestServer::start_with(&["--request-body-timeout", "500ms"]).await;
    let (mut sender, _connection) = http1(&server).await;
    let response = sender
        .send_request(grpc_web_health_check_request())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("grpc-status:0"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn an_http1_keep_alive_connection_lives_until_the_idle_timeout() {
    let server = TestServer::start_with(&[
        "--conn-handshake-timeout",
        "300ms",
        "--conn-idle-timeout",
        "1500ms",
    ])
    .await;
    let (mut sender, closed) = http1(&server).await;
    let response = sender
        .send_request(grpc_web_health_check_request())
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("an idle HTTP/1.1 connection still open after 5 s")
        .unwrap()
        .unwrap();
    let idle = start.elapsed();
    println!(
        "idle HTTP/1.1 keep-alive connection closed after {idle:?} (--conn-idle-timeout 1500ms, handshake 300ms)"
    );
    assert!(
        idle >= Duration::from_millis(1400),
        "closed by the handshake timeout: {idle:?}"
    );
    assert!(idle < Duration::from_millis(2500), "{idle:?}");
}

#[tokio::test]
async fn health_marks_every_service_not_serving_while_draining() {
    let mut server = TestServer::start().await;
    let mut watches = Vec::new();
    for service in [
        "",
        "presence.v1.PresenceService",
        "presence.v1.ContactsService",
    ] {
        let mut watch = HealthClient::new(server.channel().await)
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push((service, watch));
    }
    server.drain();
    for (service, mut watch) in watches {
        let update = tokio::time::timeout(Duration::from_secs(2), watch.next())
            .await
            .expect("an update while draining");
        assert_eq!(
            update.unwrap().unwrap().status(),
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_thousand_long_contact_ids_are_listed_in_pages() {
    let server = TestServer::start().await;
    let owner = user("popular");
    let contacts: Vec<String> = (0..1000)
        .map(|i| format!("{i:04}-{}", "x".repeat(123)))
        .collect();
    assert_eq!(contacts[0].len(), 128);
    let mut admin = server.contacts().await;
    for batch in contacts.chunks(100) {
        let request = pb::AddContactsRequest {
            user_id: owner.clone(),
            contact_ids: batch.to_vec(),
        };
        admin
            .add_contacts(authed(request, &admin_token()))
            .await
            .unwrap();
    }
    // One raw page: as many as fit in a message, and a token for the rest.
    let first = admin
        .list_contacts(authed(
            pb::ListContactsRequest {
                user_id: owner.clone(),
                ..Default::default()
            },
            &admin_token(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(first.contact_ids.len() < 1000);
    assert_eq!(
        first.next_page_token,
        *first.contact_ids.last().unwrap(),
        "the token names the last id"
    );
    let small = admin
        .list_contacts(authed(
            pb::ListContactsRequest {
                user_id: owner.clone(),
                page_size: 10,
                page_token: first.next_page_token.clone(),
            },
            &admin_token(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(small.contact_ids, contacts[first.contact_ids.len()..][..10]);
    // The SDK follows the pages.
    let sdk = presence_sdk::PresenceClient::connect(presence_sdk::ClientConfig {
        endpoints: vec![server.url()],
        token: Some(admin_token()),
        device_id: "ops".into(),
        ..presence_sdk::ClientConfig::default()
    })
    .await
    .unwrap();
    let listed = sdk.list_contacts(Some(&owner)).await.unwrap();
    println!(
        "1,000 contacts of 128 bytes: {} per page, {} listed by the SDK",
        first.contact_ids.len(),
        listed.len()
    );
    assert_eq!(listed, contacts);
    server.stop().await;
}
