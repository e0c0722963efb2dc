//! A heartbeat stream owns its device's session until something takes it:
//! a newer connection of the device, a logout, or a lease that ran out. The
//! stream is then ended at once, saying why, and nothing it sends later can
//! bring the session back. And no user can hold streams or cause visible
//! changes without bound.

mod support;

use std::time::Duration;

use presence_proto::v1 as pb;
use support::{AliceWatchesBob, RawSession, TestServer, authed, session_beat, token, user};
use tonic::Code;

async fn ended_with(session: &mut RawSession) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), session.inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => return status,
            Err(_) => panic!("the stream was not ended"),
        }
    }
}

#[tokio::test]
async fn a_reopened_device_ends_its_older_stream_and_keeps_the_newer_one() {
    let server = TestServer::start().await;
    let alice = user("alice");
    let mut old = RawSession::open(server.presence().await, &alice, "phone").await;
    let mut new = RawSession::open(server.presence().await, &alice, "phone").await;
    let status = ended_with(&mut old).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("newer connection"), "{status:?}");
    // The newer stream still holds the session: its beats are acknowledged.
    new.outbound.send(session_beat(1)).await.unwrap();
    let ack = new.inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        ack.response,
        Some(pb::heartbeat_response::Response::Ack(_))
    ));
    server.stop().await;
}

#[tokio::test]
async fn logout_ends_the_device_stream_and_a_late_beat_cannot_undo_it() {
    let mut fixture = AliceWatchesBob::start().await;
    let mut stream =
        RawSession::open(fixture.server.presence().await, &fixture.bob, "laptop").await;
    fixture.watch.sees(pb::VisibleStatus::Online).await;
    fixture
        .server
        .presence()
        .await
        .disconnect(authed(
            pb::DisconnectRequest {
                device_id: "laptop".into(),
            },
            &token(&fixture.bob),
        ))
        .await
        .unwrap();
    // A beat already on its way when the logout landed.
    let _ = stream.outbound.send(session_beat(1)).await;
    let status = ended_with(&mut stream).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let offline = fixture.watch.sees(pb::VisibleStatus::Offline).await;
    assert_eq!(offline.offline_reason(), pb::OfflineReason::Logout);
    fixture.watch.assert_quiet(Duration::from_millis(500)).await;
    fixture.server.stop().await;
}

#[tokio::test]
async fn a_stream_whose_lease_ran_out_is_ended_and_stays_offline() {
    let mut fixture = AliceWatchesBob::start().await;
    let mut stream =
        RawSession::open(fixture.server.presence().await, &fixture.bob, "laptop").await;
    fixture.watch.sees(pb::VisibleStatus::Online).await;
    // The client keeps its stream but stops beating.
    let status = ended_with(&mut stream).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let offline = fixture.watch.sees(pb::VisibleStatus::Offline).await;
    assert_eq!(offline.offline_reason(), pb::OfflineReason::LeaseExpired);
    fixture.server.stop().await;
}

#[tokio::test]
async fn a_user_cannot_hold_more_heartbeat_streams_than_the_cap() {
    let server = TestServer::start_with(&[
        "--max-heartbeat-streams-per-user",
        "2",
        "--max-sessions-per-user",
        "10",
    ])
    .await;
    let alice = user("alice");
    let _one = RawSession::open(server.presence().await, &alice, "one").await;
    let _two = RawSession::open(server.presence().await, &alice, "two").await;
    let (outbound, rx) = tokio::sync::mpsc::channel(1);
    outbound.send(support::session_open("three")).await.unwrap();
    let refused = server
        .presence()
        .await
        .heartbeat(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &token(&alice),
        ))
        .await;
    let status = match refused {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Another user is not affected.
    let _bob = RawSession::open(server.presence().await, &user("bob"), "one").await;
    server.stop().await;
}

#[tokio::test]
async fn a_user_changing_their_presence_too_fast_is_refused() {
    let server = TestServer::start_with(&["--max-user-changes-per-second", "2"]).await;
    let alice = user("alice");
    let mut presence = server.presence().await;
    let set = |n: u32| {
        authed(
            pb::SetStatusRequest {
                status: pb::UserStatus::Busy as i32,
                custom_message: format!("change {n}"),
            },
            &token(&alice),
        )
    };
    // A burst of twice the rate is allowed.
    for n in 0..4 {
        presence.set_status(set(n)).await.unwrap();
    }
    let status = presence.set_status(set(4)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    presence.set_status(set(5)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn streams_end_when_their_token_expires_and_a_fresh_token_keeps_the_session() {
    let mut fixture = AliceWatchesBob::start().await;
    // Valid for a second, plus the server's leeway for clock skew.
    let short = presence_server::auth::mint(
        presence_server::config::DEV_JWT_SECRET,
        &fixture.bob,
        false,
        Duration::from_secs(1),
    );
    let mut stream =
        RawSession::open_with_token(fixture.server.presence().await, &short, "laptop").await;
    fixture.watch.sees(pb::VisibleStatus::Online).await;
    let beating = {
        let outbound = stream.outbound.clone();
        tokio::spawn(async move {
            for seq in 1.. {
                tokio::time::sleep(support::HEARTBEAT).await;
                if outbound.send(session_beat(seq)).await.is_err() {
                    return;
                }
            }
        })
    };
    let status = ended_with(&mut stream).await;
    beating.abort();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "token expired");
    // Back at once with a fresh token: the session lingered, contacts saw
    // nothing.
    let _again = RawSession::open(fixture.server.presence().await, &fixture.bob, "laptop").await;
    fixture.watch.assert_quiet(support::GRACE * 2).await;
    fixture.server.stop().await;
}

/// A client whose tokens live a second (plus the server's leeway) and that
/// fetches a fresh one from its provider whenever the server refuses one.
async fn short_lived_client(server: &TestServer, user: &str) -> presence_sdk::PresenceClient {
    let mint = {
        let user = user.to_owned();
        move || {
            presence_server::auth::mint(
                presence_server::config::DEV_JWT_SECRET,
                &user,
                false,
                Duration::from_secs(1),
            )
        }
    };
    presence_sdk::PresenceClient::connect(presence_sdk::ClientConfig {
        endpoints: vec![server.url()],
        token: Some(mint()),
        token_provider: Some(presence_sdk::TokenProvider::new(move || {
            let token = mint();
            async move { Ok(token) }
        })),
        device_id: "laptop".to_owned(),
        ..presence_sdk::ClientConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_sdk_outlives_its_tokens_without_a_flicker() {
    let server = TestServer::start().await;
    let (alice, bob) = (user("alice"), user("bob"));
    support::befriend(&server, &alice, &[&bob]).await;
    let bob_device = short_lived_client(&server, &bob).await;
    bob_device
        .start_session(presence_sdk::SessionOptions::default())
        .await
        .unwrap();
    let watcher = short_lived_client(&server, &alice).await;
    let mut watch = support::ContactWatch::open(&watcher, &bob).await;
    assert_eq!(watch.snapshot[0].status(), pb::VisibleStatus::Online);
    // Past both tokens' expiry (1 s plus the server's 5 s leeway): both
    // streams were ended and reopened with fresh tokens meanwhile.
    let mut states = bob_device.session_state();
    let mut reconnected = false;
    let quiet = tokio::time::timeout(Duration::from_secs(9), async {
        loop {
            states.changed().await.unwrap();
            if let presence_sdk::SessionState::Reconnecting { reason, .. } = &*states.borrow() {
                assert!(reason.contains("token expired"), "{reason}");
                reconnected = true;
            }
        }
    });
    let (_, ()) = tokio::join!(quiet, watch.assert_quiet(Duration::from_secs(9)));
    assert!(reconnected, "the session's token never expired");
    // Still live both ways: a change reaches the watcher.
    bob_device
        .set_status(pb::UserStatus::Busy, "after the refresh")
        .await
        .unwrap();
    watch.sees(pb::VisibleStatus::Busy).await;
    server.stop().await;
}
