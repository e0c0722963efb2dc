//! The session's promises, against a scripted fake server (see `fake/`).

mod fake;

use std::time::Duration;

use fake::{FakeServer, eventually, within};
use presence_sdk::{
    Activity, ClientConfig, Error, Platform, PresenceClient, SessionOptions, SessionState,
    UserStatus,
};

fn config(urls: &[&str]) -> ClientConfig {
    ClientConfig {
        endpoints: urls.iter().map(|u| u.to_string()).collect(),
        token: Some("t0k3n".into()),
        device_id: "laptop-1".into(),
        platform: Platform::Desktop,
        ..ClientConfig::default()
    }
}

async fn connect(server: &FakeServer) -> PresenceClient {
    PresenceClient::connect(config(&[&server.url]))
        .await
        .unwrap()
}

/// A fake asking for a beat every `heartbeat_interval_ms`, and a client with
/// a session on it.
async fn in_session(heartbeat_interval_ms: u32) -> (FakeServer, PresenceClient) {
    let server = FakeServer::start(heartbeat_interval_ms).await;
    let client = connect(&server).await;
    client
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    (server, client)
}

async fn wait_for_an_idle_beat(server: &FakeServer) {
    eventually("an idle beat", || {
        server
            .log()
            .beats
            .iter()
            .any(|b| b.activity() == Activity::Idle)
    })
    .await;
}

async fn wait_for_the_stream_to_close(server: &FakeServer) {
    eventually("the stream closed", || {
        server.log().heartbeat_streams_ended == 1
    })
    .await;
}

async fn wait_connected(client: &PresenceClient) -> String {
    let mut state = client.session_state();
    let state = within(
        "connected",
        state.wait_for(|s| matches!(s, SessionState::Connected { .. })),
    )
    .await
    .unwrap()
    .clone();
    match state {
        SessionState::Connected { endpoint, .. } => endpoint,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_session_opens_with_the_device_and_beats_at_the_interval_the_server_chose() {
    let server = FakeServer::start(50).await;
    let client = connect(&server).await;
    let options = SessionOptions {
        status: UserStatus::Busy,
        custom_message: "focus".into(),
        ..SessionOptions::default()
    };
    client.start_session(options).await.unwrap();

    eventually("three beats", || server.log().beats.len() >= 3).await;
    let log = server.log();
    assert_eq!(log.opens.len(), 1);
    let open = &log.opens[0];
    assert_eq!(open.device_id, "laptop-1");
    assert_eq!(open.platform(), Platform::Desktop);
    assert_eq!(open.activity(), Activity::Active);
    assert_eq!(open.status(), UserStatus::Busy);
    assert_eq!(open.custom_message, "focus");
    assert!(
        log.authorization.iter().all(|h| h == "Bearer t0k3n"),
        "{:?}",
        log.authorization
    );
    let seqs: Vec<u64> = log.beats.iter().map(|b| b.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[tokio::test]
async fn an_activity_change_is_sent_at_once_not_at_the_next_beat() {
    // Beats every 10 s: an idle beat within a second can only be the change.
    let (server, client) = in_session(10_000).await;
    client.set_activity(Activity::Idle).unwrap();
    wait_for_an_idle_beat(&server).await;
}

#[tokio::test]
async fn quick_activity_flips_coalesce_into_few_beats_carrying_the_latest() {
    let (server, client) = in_session(10_000).await;
    let started = std::time::Instant::now();
    for i in 0..30 {
        let activity = if i % 2 == 0 {
            Activity::Active
        } else {
            Activity::Idle
        };
        client.set_activity(activity).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 30 flips over ~300 ms (longer on a busy machine), ending on idle.
    let flipping = started.elapsed();
    eventually("an idle beat", || {
        server
            .log()
            .beats
            .last()
            .is_some_and(|b| b.activity() == Activity::Idle)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // At most one beat per 250 ms while flipping, plus the trailing one.
    let allowed = (flipping.as_millis() / 250) as usize + 2;
    let beats = server.log().beats.len();
    assert!(
        beats <= allowed,
        "{beats} beats for 30 flips in {flipping:?}"
    );
    assert_eq!(
        server.log().beats.last().map(|b| b.activity()),
        Some(Activity::Idle)
    );
}

#[tokio::test]
async fn a_broken_stream_reopens_the_same_device_with_the_current_activity_and_status() {
    let (server, client) = in_session(50).await;
    client.set_activity(Activity::Idle).unwrap();
    client.set_status(UserStatus::Busy, "lunch").await.unwrap();
    wait_for_an_idle_beat(&server).await;

    let mut state = client.session_state();
    server.kill_streams();
    within(
        "reconnecting",
        state.wait_for(|s| matches!(s, SessionState::Reconnecting { attempt: 1, .. })),
    )
    .await
    .unwrap();
    eventually("a second open", || server.log().opens.len() == 2).await;
    wait_connected(&client).await;

    let log = server.log();
    let reopen = &log.opens[1];
    assert_eq!(reopen.device_id, "laptop-1");
    assert_eq!(reopen.activity(), Activity::Idle);
    assert_eq!(reopen.status(), UserStatus::Busy);
    assert_eq!(reopen.custom_message, "lunch");
}

#[tokio::test]
async fn a_go_away_moves_the_session_to_the_next_endpoint_after_the_requested_delay() {
    let draining = FakeServer::start(50).await;
    let other = FakeServer::start(50).await;
    let client = PresenceClient::connect(config(&[&draining.url, &other.url]))
        .await
        .unwrap();
    client
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    assert!(wait_connected(&client).await.starts_with(&draining.url));

    let asked = std::time::Instant::now();
    draining.go_away(200);
    eventually("an open on the other node", || other.log().opens.len() == 1).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(200),
        "reconnected after {:?}",
        asked.elapsed()
    );
    assert!(wait_connected(&client).await.starts_with(&other.url));
    assert_eq!(other.log().opens[0].device_id, "laptop-1");
    // The draining node kept getting beats while we waited, and was then left.
    eventually("the old stream closed", || {
        draining.log().heartbeat_streams_ended == 1
    })
    .await;
    assert_eq!(draining.log().opens.len(), 1);
}

#[tokio::test]
async fn end_session_stops_beating_and_logs_the_device_out() {
    let (server, client) = in_session(50).await;
    eventually("a beat", || !server.log().beats.is_empty()).await;

    client.end_session().await.unwrap();
    assert_eq!(server.log().disconnects, ["laptop-1"]);
    assert!(matches!(
        *client.session_state().borrow(),
        SessionState::Closed { error: None }
    ));
    wait_for_the_stream_to_close(&server).await;
    let beats = server.log().beats.len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.log().beats.len(),
        beats,
        "beats continued after end_session"
    );
    assert_eq!(server.log().opens.len(), 1);
    assert!(matches!(
        client.set_activity(Activity::Idle),
        Err(Error::NoSession)
    ));

    // A new session can start on the same client.
    client
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    assert_eq!(server.log().opens.len(), 2);
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_session_task() {
    let (server, client) = in_session(50).await;
    let clone = client.clone();
    let mut state = client.session_state();
    drop(client);
    eventually("a beat", || !server.log().beats.is_empty()).await;
    assert_eq!(
        server.log().heartbeat_streams_ended,
        0,
        "a clone still holds the session"
    );

    drop(clone);
    within(
        "closed",
        state.wait_for(|s| matches!(s, SessionState::Closed { error: None })),
    )
    .await
    .unwrap();
    wait_for_the_stream_to_close(&server).await;
    // No Disconnect: the server's grace period decides.
    assert!(server.log().disconnects.is_empty());
}

#[tokio::test]
async fn a_rejected_token_fails_start_session_and_nothing_keeps_retrying() {
    let server = FakeServer::start(50).await;
    let client = PresenceClient::connect(ClientConfig {
        token: Some("bad".into()),
        ..config(&[&server.url])
    })
    .await
    .unwrap();
    let error = client
        .start_session(SessionOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Unauthenticated(_)), "{error}");
    let calls = server.log().authorization.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.log().authorization.len(), calls);
    assert!(matches!(
        *client.session_state().borrow(),
        SessionState::Closed {
            error: Some(Error::Unauthenticated(_))
        }
    ));
}

#[tokio::test]
async fn a_second_session_on_the_same_client_is_refused() {
    let (_server, client) = in_session(50).await;
    assert!(matches!(
        client.start_session(SessionOptions::default()).await,
        Err(Error::SessionAlreadyStarted)
    ));
}

#[tokio::test]
async fn set_status_works_without_a_session_and_reports_rejections_to_the_caller() {
    let server = FakeServer::start(50).await;
    let client = connect(&server).await;
    let presence = client
        .set_status(UserStatus::Busy, "away")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(presence.custom_message, "away");
    let error = client
        .set_status(UserStatus::Busy, "x".repeat(300))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
}

#[tokio::test]
async fn touch_renews_the_device_lease_without_a_stream() {
    let server = FakeServer::start(50).await;
    let client = connect(&server).await;
    let response = client.touch(Activity::Idle).await.unwrap();
    assert_eq!(response.heartbeat_interval_ms, 50);
    let log = server.log();
    assert_eq!(log.touches[0].device_id, "laptop-1");
    assert_eq!(log.touches[0].activity(), Activity::Idle);
}
