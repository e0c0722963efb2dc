//! Keeps the load generator working: a seconds-long run with tiny numbers
//! against an in-process server. Benchmarks are not tests; this only checks
//! that every phase measures something and nothing fails.

use std::time::Duration;

use clap::Parser;
use presence_e2e::loadgen::{self, Cli, Command, RunReport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_measures_every_phase_without_errors() {
    let args = [
        "presence-server",
        "--dev",
        "--heartbeat-interval",
        "1s",
        "--lease",
        "5s",
    ];
    let config = presence_server::config::Cli::parse_from(args).config;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(presence_server::run(config, listener, async {
        let _ = stopped.await;
    }));

    let pid = std::process::id().to_string();
    let target = addr.to_string();
    // 40 sessions over 8 connections; 10 watchers x 4 contacts over 20
    // watched users = 2 watchers per user; beats every 250 ms.
    let cli = Cli::parse_from([
        "loadgen",
        "run",
        "--target",
        &target,
        "--sessions",
        "40",
        "--connections",
        "8",
        "--watchers",
        "10",
        "--contacts",
        "4",
        "--watched",
        "20",
        "--change-rate",
        "40",
        "--get-rate",
        "40",
        "--get-batch",
        "1,10",
        "--beat-interval",
        "250ms",
        "--settle",
        "200ms",
        "--beats-only",
        "1s",
        "--duration",
        "2s",
        "--drain",
        "500ms",
        "--progress",
        "0s",
        "--server-pid",
        &pid,
        "--label",
        "smoke",
    ]);
    let Command::Run(cfg) = cli.command else {
        panic!("parsed as another subcommand")
    };
    let process = tokio::time::timeout(Duration::from_secs(60), loadgen::run(*cfg))
        .await
        .expect("the smoke run finishes within a minute")
        .expect("the smoke run succeeds");
    let report = RunReport::new(vec![process.clone()]).unwrap();
    println!("{}", loadgen::report::run_table(&report));

    assert!(process.errors.is_empty(), "errors: {:?}", process.errors);
    assert_eq!(process.resets, 0);
    assert_eq!(process.sessions_opened, 40);
    assert_eq!(process.connected, 8);
    assert_eq!(process.watchers_ready, 10);
    assert_eq!(process.sessions_alive_at_end, 40);
    assert!(process.beats_in_beats_window > 0, "no heartbeat acked");
    assert!(process.changes_ok > 0, "no status change went through");
    assert!(process.events_matched > 0, "no change reached a watcher");
    assert!(process.gets_ok > 0, "no GetPresence answered");
    let summary = &report.summary;
    for figure in [
        "open_p99_ms",
        "beat_rtt_p99_ms",
        "c2w_p50_ms",
        "c2w_p99_ms",
        "c2w_p999_ms",
        "c2w_max_ms",
        "get_b1_p99_ms",
        "get_b10_p99_ms",
        "server_rss_opened_mb",
        "server_cpu_per_1k_beats_per_s",
    ] {
        assert!(
            summary.contains_key(figure),
            "{figure} missing: {summary:?}"
        );
    }

    // The report survives a round trip through its JSON and a merge.
    let json = serde_json::to_string(&report).unwrap();
    let back: RunReport = serde_json::from_str(&json).unwrap();
    let merged = RunReport::new(back.processes).unwrap();
    assert_eq!(merged.summary["c2w_count"], summary["c2w_count"]);

    shutdown.send(()).unwrap();
    server.await.unwrap().unwrap();
}
