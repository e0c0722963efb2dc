//! Watchers whose reader stalls cost the server a bounded amount of memory:
//! once a stream's bytes in flight reach their cap the server stops pulling
//! it, and the hub coalesces what it would have sent (one pending state per
//! watched user), however fast the watched user changes.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use presence_proto::v1 as pb;
use presence_server::config::DEV_JWT_SECRET;
use support::{TestServer, authed, token, user};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WATCHERS: usize = 1000;
const CHANGES_PER_SECOND: u64 = 300;
const CHANGING_FOR: Duration = Duration::from_secs(8);

/// A TCP proxy in front of `upstream` whose server-to-client direction can
/// be frozen: the client then reads nothing more, as a client that stopped
/// reading its socket.
async fn freezable_proxy(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let freeze = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(upstream).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let frozen = freeze.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                loop {
                    if frozen.load(Ordering::Relaxed) {
                        // Hold both halves open, reading nothing.
                        std::future::pending::<()>().await;
                    }
                    let Ok(n) = server_read.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 || client_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, frozen)
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_watch_streams_hold_bounded_memory() {
    let server = TestServer::start_with(support::UNLIMITED_CHANGES).await;
    let (proxy, frozen) = freezable_proxy(server.addr).await;
    // A client with windows as large as HTTP/2 allows: the server may send
    // as much as it likes, as far as flow control goes.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .initial_stream_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .connect()
        .await
        .unwrap();
    let mut stalled = pb::presence_service_client::PresenceServiceClient::new(channel);
    let bob = user("bob");
    let mut streams = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let watcher = presence_server::auth::mint(
            DEV_JWT_SECRET,
            &format!("ops-{i}"),
            true,
            Duration::from_secs(3600),
        );
        let request = pb::WatchContactsRequest {
            user_ids: vec![bob.clone()],
            ..Default::default()
        };
        streams.push(
            stalled
                .watch_contacts(authed(request, &watcher))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    frozen.store(true, Ordering::Relaxed);
    let before = resident_bytes();

    let mut bob_client = server.presence().await;
    let touch = || {
        authed(
            pb::TouchRequest {
                device_id: "laptop".into(),
                ..Default::default()
            },
            &token(&bob),
        )
    };
    let started = Instant::now();
    let mut changes = 0u64;
    let mut touched = Instant::now() - support::HEARTBEAT;
    let mut halfway = None;
    while started.elapsed() < CHANGING_FOR {
        if halfway.is_none() && started.elapsed() >= CHANGING_FOR / 2 {
            halfway = Some(resident_bytes());
        }
        // Online, so that each change of his message is a visible one.
        if touched.elapsed() >= support::HEARTBEAT {
            bob_client.touch(touch()).await.unwrap();
            touched = Instant::now();
        }
        let due = started.elapsed().as_millis() as u64 * CHANGES_PER_SECOND / 1000;
        while changes < due {
            bob_client
                .set_status(authed(
                    pb::SetStatusRequest {
                        status: pb::UserStatus::Busy as i32,
                        custom_message: format!("change {changes} {}", "x".repeat(200)),
                    },
                    &token(&bob),
                ))
                .await
                .unwrap();
            changes += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = resident_bytes();
    let grown = end.saturating_sub(before);
    let second_half = end.saturating_sub(halfway.unwrap());
    println!(
        "{WATCHERS} stalled watch streams, {changes} changes of their user in {CHANGING_FOR:?}: \
         resident memory grew {:.1} MB, {:.1} MB of it in the second half",
        grown as f64 / 1e6,
        second_half as f64 / 1e6
    );
    // Unbounded, this is every change times every stream (~250 bytes each):
    // 250 KB per change, past 75 MB after 300 changes and growing all along
    // (hyper's own cap, 400 KB per stream, is 400 MB here). Bounded, it is
    // the capped bytes in flight per stream and their frames: ~20 MB.
    assert!(
        changes >= 300,
        "only {changes} changes: the test proves nothing"
    );
    assert!(
        grown < 64_000_000,
        "memory grew {grown} bytes with stalled watchers"
    );
    drop(streams);
    server.stop().await;
}
