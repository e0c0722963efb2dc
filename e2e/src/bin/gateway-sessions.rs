//! `gateway-sessions`: raw heartbeat sessions through the gateway, one
//! client process of `e2e/tests/gateway.rs`'s deploy test. Several of them,
//! each from its own 127.0.0.x source address, hold the test's raw
//! sessions, so that 2,000 devices are not one process's TLS and HTTP/2 work
//! on the same cores as the watchers it checks.
//!
//!   gateway-sessions --url https://127.0.0.1:54443 --ca ca.pem --source 127.0.0.2 \
//!       --users gw1234-u --first 200 --count 450
//!
//! Each session opens `<user>-raw`, beats at the interval the node gives,
//! and re-opens at once after a `go_away` or a broken stream, timing each
//! move. Talks to the test on stdio, one line each:
//! - prints `open` once every session has opened;
//! - reads `vanish`: from now on a broken stream is a device gone with its
//!   node, and its session is not re-opened;
//! - reads `report`: prints one JSON [`Report`] of what it saw since the
//!   last one;
//! - exits at the end of its input.

use std::io::BufRead;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use parking_lot::Mutex;
use presence_e2e::beating::{Report, StreamEnd, beat_until_end, session_open};
use presence_proto::v1::presence_service_client::PresenceServiceClient;
use presence_proto::v1::{self as pb, heartbeat_response};
use presence_server::config::DEV_JWT_SECRET;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Args {
    /// The gateway, `https://HOST:PORT`.
    #[arg(long)]
    url: String,
    /// The CA (PEM file) the gateway's certificate chains to.
    #[arg(long)]
    ca: std::path::PathBuf,
    /// Local address the connections come from.
    #[arg(long)]
    source: IpAddr,
    /// User ids are this prefix and a number.
    #[arg(long)]
    users: String,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    /// TLS connections the sessions are multiplexed over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Sessions started per second at the start (devices come online over
    /// a while, not in one instant).
    #[arg(long, default_value_t = 1000)]
    opens_per_second: usize,
}

#[derive(Default)]
struct Shared {
    report: Mutex<Report>,
    open: AtomicUsize,
    vanish: AtomicBool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Two threads: the test runs several of these next to the nodes.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared::default());
    runtime.block_on(open_all(&args, shared.clone()))?;
    println!("open");
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "vanish" => shared.vanish.store(true, Ordering::SeqCst),
            "report" => println!(
                "{}",
                serde_json::to_string(&std::mem::take(&mut *shared.report.lock()))?
            ),
            other => anyhow::bail!("unknown command {other:?}"),
        }
    }
    runtime.shutdown_background();
    Ok(())
}

async fn open_all(args: &Args, shared: Arc<Shared>) -> anyhow::Result<()> {
    let ca = std::fs::read_to_string(&args.ca)?;
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Endpoint::from_shared(args.url.clone())?
            .local_address(Some(args.source))
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)))?
            .connect()
            .await?;
        channels.push(channel);
    }
    let pause = Duration::from_secs(1) / args.opens_per_second.max(1) as u32;
    for (i, n) in (args.first..args.first + args.count).enumerate() {
        tokio::spawn(session(
            channels[i % channels.len()].clone(),
            format!("{}{n}", args.users),
            shared.clone(),
        ));
        tokio::time::sleep(pause).await;
    }
    let started = Instant::now();
    while shared.open.load(Ordering::SeqCst) < args.count {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {} sessions opened",
            shared.open.load(Ordering::SeqCst),
            args.count
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One device: open, beat until the stream ends, open again.
async fn session(channel: Channel, user: String, shared: Arc<Shared>) {
    let device = format!("{user}-raw");
    let token =
        presence_server::auth::mint(DEV_JWT_SECRET, &user, false, Duration::from_secs(24 * 3600));
    let mut lost_at: Option<Instant> = None;
    let mut first = true;
    loop {
        let (outbound, rx) = tokio::sync::mpsc::channel(4);
        outbound.send(session_open(&device)).await.unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut presence = PresenceServiceClient::new(channel.clone());
        let opened = match presence.heartbeat(request).await {
            Ok(response) => {
                let mut inbound = response.into_inner();
                match inbound.message().await {
                    Ok(Some(pb::HeartbeatResponse {
                        response: Some(heartbeat_response::Response::Opened(opened)),
                    })) => Ok((inbound, opened)),
                    Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
                    Ok(other) => Err(format!("first response {other:?}")),
                }
            }
            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
        };
        let (inbound, opened) = match opened {
            Ok(opened) => opened,
            Err(why) => {
                // A draining node or a gateway with no node to offer: try
                // again (the session lingers through the grace).
                *shared.report.lock().refused.entry(why).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if let Some(lost) = lost_at.take() {
            let took = lost.elapsed().as_micros() as u64;
            shared.report.lock().reconnects_us.push(took);
        }
        if first {
            shared.open.fetch_add(1, Ordering::SeqCst);
            first = false;
        }
        let interval = Duration::from_millis(opened.heartbeat_interval_ms.into());
        let end = beat_until_end(outbound, inbound, interval).await;
        if end == StreamEnd::Broken && shared.vanish.load(Ordering::SeqCst) {
            shared.report.lock().vanished.push(user);
            return;
        }
        lost_at = Some(Instant::now());
    }
}
