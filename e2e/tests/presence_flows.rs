//! The product's promises, end to end: a real server on 127.0.0.1:0 with short
//! timers, real gRPC clients (the Rust SDK, and raw stubs where a test must
//! misbehave like a broken client).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use presence_proto::v1::{self as pb, presence_event};
use presence_sdk::{
    Activity, OfflineReason, PresenceUpdate, SessionOptions, UserStatus, VisibleStatus,
};
use support::*;

#[tokio::test]
async fn contacts_see_a_device_come_online_go_idle_busy_invisible_and_offline() {
    let AliceWatchesBob {
        server,
        bob,
        mut watch,
        ..
    } = AliceWatchesBob::start().await;
    assert_eq!(watch.snapshot.len(), 1);
    assert_eq!(watch.snapshot[0].status(), VisibleStatus::Offline);
    assert_eq!(watch.snapshot[0].version, 0, "never seen");

    let bob_phone = client(&server, &bob, "bob-phone").await;
    let mut latencies = Vec::new();
    bob_phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let started = Instant::now();
    let online = watch.sees(VisibleStatus::Online).await;
    latencies.push(started.elapsed());
    assert!(online.version > 0);
    assert!(online.devices.is_empty(), "contacts never see devices");

    bob_phone.set_activity(Activity::Idle).unwrap();
    let started = Instant::now();
    let idle = watch.sees(VisibleStatus::Idle).await;
    latencies.push(started.elapsed());
    assert!(idle.version > online.version);

    bob_phone
        .set_status(UserStatus::Busy, "in a meeting")
        .await
        .unwrap();
    let started = Instant::now();
    let busy = watch.sees(VisibleStatus::Busy).await;
    latencies.push(started.elapsed());
    assert_eq!(busy.custom_message, "in a meeting");

    bob_phone
        .set_status(UserStatus::Invisible, "")
        .await
        .unwrap();
    let started = Instant::now();
    let hidden = watch.sees(VisibleStatus::Offline).await;
    latencies.push(started.elapsed());
    assert_eq!(
        hidden.offline_reason(),
        OfflineReason::Logout,
        "invisible looks like a logout"
    );

    bob_phone.set_status(UserStatus::Online, "").await.unwrap();
    watch.sees(VisibleStatus::Idle).await;
    bob_phone.end_session().await.unwrap();
    let started = Instant::now();
    let offline = watch.sees(VisibleStatus::Offline).await;
    latencies.push(started.elapsed());
    assert_eq!(offline.offline_reason(), OfflineReason::Logout);
    assert!(offline.last_seen_unix_ms > 0);

    latencies.sort();
    println!(
        "change-to-watcher latency through the SDK: min {:?}, max {:?}",
        latencies[0],
        latencies[latencies.len() - 1]
    );
    server.stop().await;
}

#[tokio::test]
async fn an_idle_phone_and_an_active_laptop_make_the_user_online() {
    let AliceWatchesBob {
        server,
        bob,
        mut watch,
        ..
    } = AliceWatchesBob::start().await;

    let phone = client(&server, &bob, "phone").await;
    phone
        .start_session(SessionOptions {
            activity: Activity::Idle,
            ..Default::default()
        })
        .await
        .unwrap();
    watch.sees(VisibleStatus::Idle).await;
    let laptop = client(&server, &bob, "laptop").await;
    laptop
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    watch.sees(VisibleStatus::Online).await;

    let own = laptop.get_one(&bob).await.unwrap();
    assert_eq!(own.devices.len(), 2, "the user sees their own devices");

    laptop.end_session().await.unwrap();
    watch.sees(VisibleStatus::Idle).await;
    phone.end_session().await.unwrap();
    watch.sees(VisibleStatus::Offline).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_vanishes_goes_offline_after_its_lease() {
    let AliceWatchesBob {
        server,
        bob,
        mut watch,
        ..
    } = AliceWatchesBob::start().await;

    // The stream stays open but no beat ever comes: a frozen client.
    let frozen = RawSession::open(server.presence().await, &bob, "phone").await;
    let started = Instant::now();
    watch.sees(VisibleStatus::Online).await;
    let bound = LEASE + SWEEP;
    let offline = watch
        .sees_within(VisibleStatus::Offline, bound + VISIBLE_WITHIN)
        .await;
    let took = started.elapsed();
    assert_eq!(offline.offline_reason(), OfflineReason::LeaseExpired);
    assert!(took >= LEASE, "not before the lease ran out ({took:?})");
    assert!(
        took <= bound + Duration::from_millis(500),
        "within the staleness bound ({took:?})"
    );
    drop(frozen);
    server.stop().await;
}

#[tokio::test]
async fn a_dropped_stream_goes_offline_after_the_grace_period() {
    let AliceWatchesBob {
        server,
        bob,
        mut watch,
        ..
    } = AliceWatchesBob::start().await;

    let session = RawSession::open(server.presence().await, &bob, "phone").await;
    watch.sees(VisibleStatus::Online).await;
    let dropped = Instant::now();
    drop(session);
    let offline = watch.sees(VisibleStatus::Offline).await;
    assert_eq!(offline.offline_reason(), OfflineReason::ConnectionClosed);
    assert!(dropped.elapsed() >= GRACE, "not before the grace period");
    server.stop().await;
}

#[tokio::test]
async fn a_reconnect_within_the_grace_period_causes_no_offline_event() {
    let AliceWatchesBob {
        server,
        bob,
        mut watch,
        ..
    } = AliceWatchesBob::start().await;

    let first = RawSession::open(server.presence().await, &bob, "phone").await;
    watch.sees(VisibleStatus::Online).await;
    drop(first);
    tokio::time::sleep(GRACE / 4).await;
    let second = RawSession::open(server.presence().await, &bob, "phone").await;
    watch.assert_quiet((GRACE + SWEEP) * 3).await;
    drop(second);
    server.stop().await;
}

#[tokio::test]
async fn touch_keeps_a_browser_session_and_disconnect_ends_it_at_once() {
    let AliceWatchesBob {
        server,
        bob,
        mut watch,
        ..
    } = AliceWatchesBob::start().await;

    let browser = client(&server, &bob, "tab").await;
    let answer = browser.touch(Activity::Active).await.unwrap();
    assert_eq!(u128::from(answer.lease_ms), LEASE.as_millis());
    watch.sees(VisibleStatus::Online).await;
    // Touching at the interval keeps it online past the lease.
    for _ in 0..4 {
        tokio::time::sleep(HEARTBEAT).await;
        browser.touch(Activity::Unspecified).await.unwrap();
    }
    watch.assert_quiet(Duration::from_millis(50)).await;
    browser.disconnect().await.unwrap();
    let started = Instant::now();
    let offline = watch.sees(VisibleStatus::Offline).await;
    let took = started.elapsed();
    assert_eq!(offline.offline_reason(), OfflineReason::Logout);
    assert!(
        took < GRACE,
        "a logout does not wait for the grace period ({took:?})"
    );

    // A browser that stops touching expires with its lease.
    browser.touch(Activity::Idle).await.unwrap();
    watch.sees(VisibleStatus::Idle).await;
    let expired = watch
        .sees_within(VisibleStatus::Offline, LEASE + VISIBLE_WITHIN)
        .await;
    assert_eq!(expired.offline_reason(), OfflineReason::LeaseExpired);
    server.stop().await;
}

#[tokio::test]
async fn invisible_users_leak_nothing_to_contacts() {
    let AliceWatchesBob {
        server,
        bob,
        watcher,
        mut watch,
    } = AliceWatchesBob::start().await;

    let phone = client(&server, &bob, "phone").await;
    phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    watch.sees(VisibleStatus::Online).await;
    phone
        .set_status(UserStatus::Invisible, "hiding")
        .await
        .unwrap();
    let hidden = watch.sees(VisibleStatus::Offline).await;

    // While invisible, bob does everything a user does.
    phone.set_activity(Activity::Idle).unwrap();
    let laptop = client(&server, &bob, "laptop").await;
    laptop
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    phone
        .set_status(UserStatus::Invisible, "still hiding")
        .await
        .unwrap();
    laptop.end_session().await.unwrap();
    watch.assert_quiet(Duration::from_millis(800)).await;

    // Nothing moved for alice: status, message, last seen, version, reason.
    let seen = watcher.get_one(&bob).await.unwrap();
    assert_eq!(seen, hidden);
    assert_eq!(seen.offline_reason(), OfflineReason::Logout);
    assert!(seen.devices.is_empty());
    assert_eq!(seen.chosen_status(), UserStatus::Unspecified);
    let history: Vec<_> = watcher
        .get_history(&bob, None, None)
        .collect::<Vec<_>>()
        .await;
    let last = history.last().unwrap().as_ref().unwrap();
    assert_eq!(
        last.version, hidden.version,
        "no history entry while invisible"
    );
    assert_eq!(last.offline_reason(), OfflineReason::Logout);

    // Bob himself sees the truth.
    let own = phone.get_one(&bob).await.unwrap();
    assert_eq!(own.chosen_status(), UserStatus::Invisible);
    assert_eq!(own.offline_reason(), OfflineReason::Invisible);
    assert_eq!(own.devices.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn non_contacts_learn_nothing() {
    let server = TestServer::start().await;
    let (bob, carol) = (user("bob"), user("carol"));
    let phone = client(&server, &bob, "phone").await;
    phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    phone
        .set_status(UserStatus::Busy, "secret plans")
        .await
        .unwrap();

    let stranger = client(&server, &carol, "c").await;
    let seen = stranger.get_one(&bob).await.unwrap();
    assert_eq!(seen.status(), VisibleStatus::Offline);
    assert_eq!((seen.version, seen.last_seen_unix_ms), (0, 0));
    assert!(seen.custom_message.is_empty());
    let unknown = stranger.get_one(&user("nobody")).await.unwrap();
    assert_eq!(
        (seen.status, seen.version),
        (unknown.status, unknown.version),
        "indistinguishable from a user who does not exist"
    );
    assert!(matches!(
        stranger.get_history(&bob, None, None).next().await,
        Some(Err(presence_sdk::Error::PermissionDenied(_)))
    ));
    let mut watch = ContactWatch::open(&stranger, &bob).await;
    assert!(watch.snapshot.is_empty());
    phone.set_status(UserStatus::Online, "").await.unwrap();
    watch.assert_quiet(Duration::from_millis(500)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_resumed_watch_gets_only_what_it_missed() {
    let server = TestServer::start().await;
    let (alice, bob, dave, erin) = (user("alice"), user("bob"), user("dave"), user("erin"));
    befriend(&server, &alice, &[&bob, &dave, &erin]).await;
    for (who, status) in [(&bob, UserStatus::Online), (&dave, UserStatus::Busy)] {
        let device = client(&server, who, "d").await;
        device.touch(Activity::Active).await.unwrap();
        device.set_status(status, "").await.unwrap();
    }
    let mut presence = server.presence().await;
    let watch = |known: HashMap<String, u64>| {
        authed(
            pb::WatchContactsRequest {
                user_ids: vec![],
                known_versions: known,
            },
            &token(&alice),
        )
    };
    let mut first = presence
        .watch_contacts(watch(HashMap::new()))
        .await
        .unwrap()
        .into_inner();
    let mut held = HashMap::new();
    while let Some(event) = first.message().await.unwrap() {
        match event.event.unwrap() {
            presence_event::Event::Presence(p) => {
                held.insert(p.user_id, p.version);
            }
            presence_event::Event::SnapshotComplete(done) => {
                assert_eq!(done.watched, 3);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    drop(first);

    // While disconnected: bob changes, dave does not, erin is no contact any more.
    client(&server, &bob, "d")
        .await
        .set_status(UserStatus::Busy, "back soon")
        .await
        .unwrap();
    unfriend(&server, &alice, &[&erin]).await;

    let mut resumed = presence
        .watch_contacts(watch(held))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = resumed.message().await.unwrap() {
        match event.event.unwrap() {
            presence_event::Event::SnapshotComplete(done) => {
                assert_eq!(done.watched, 2);
                break;
            }
            event => events.push(event),
        }
    }
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().any(|e| matches!(e, presence_event::Event::Presence(p) if p.user_id == bob && p.custom_message == "back soon")));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, presence_event::Event::ContactRemoved(r) if r.user_id == erin))
    );
    server.stop().await;
}

#[tokio::test]
async fn contacts_added_or_removed_join_or_leave_open_watches() {
    let server = TestServer::start().await;
    let (alice, bob) = (user("alice"), user("bob"));
    let bob_device = client(&server, &bob, "d").await;
    bob_device
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let alice_client = client(&server, &alice, "a").await;
    let mut watch = ContactWatch::open(&alice_client, &bob).await;
    assert!(watch.snapshot.is_empty());

    befriend(&server, &alice, &[&bob]).await;
    watch.sees(VisibleStatus::Online).await;
    bob_device.set_activity(Activity::Idle).unwrap();
    watch.sees(VisibleStatus::Idle).await;

    unfriend(&server, &bob, &[&alice]).await;
    let removed = tokio::time::timeout(VISIBLE_WITHIN, watch.updates.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        removed,
        PresenceUpdate::ContactRemoved {
            user_id: bob.clone()
        }
    );
    bob_device.set_activity(Activity::Active).unwrap();
    watch.assert_quiet(Duration::from_millis(500)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_slow_watcher_gets_coalesced_updates_not_a_growing_buffer() {
    let server = TestServer::start_with(support::UNLIMITED_CHANGES).await;
    let (alice, bob) = (user("alice"), user("bob"));
    befriend(&server, &alice, &[&bob]).await;
    // A watcher with a small HTTP/2 window that stops reading.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(4096)
        .connect()
        .await
        .unwrap();
    let mut slow = pb::presence_service_client::PresenceServiceClient::new(channel);
    let mut stream = slow
        .watch_contacts(authed(pb::WatchContactsRequest::default(), &token(&alice)))
        .await
        .unwrap()
        .into_inner();

    let bob_device = client(&server, &bob, "d").await;
    bob_device
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    const CHANGES: usize = 2000;
    for i in 0..CHANGES {
        bob_device
            .set_status(UserStatus::Busy, format!("change {i}"))
            .await
            .unwrap();
    }
    let last = format!("change {}", CHANGES - 1);

    let mut received = 0;
    loop {
        let event = tokio::time::timeout(VISIBLE_WITHIN, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(presence_event::Event::Presence(p)) = event.event {
            received += 1;
            if p.custom_message == last {
                break;
            }
        }
    }
    println!("slow watcher: {received} events for {CHANGES} changes");
    assert!(
        received < CHANGES / 4,
        "coalesced: {received} events for {CHANGES} changes"
    );
    server.stop().await;
}

#[tokio::test]
async fn history_lists_visible_changes_with_reasons_page_by_page() {
    let server = TestServer::start().await;
    let (alice, bob) = (user("alice"), user("bob"));
    befriend(&server, &alice, &[&bob]).await;
    let phone = client(&server, &bob, "phone").await;
    phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    phone.set_status(UserStatus::Busy, "lunch").await.unwrap();
    phone.end_session().await.unwrap();

    let watcher = client(&server, &alice, "a").await;
    let entries: Vec<_> = watcher
        .get_history(&bob, None, None)
        .map(Result::unwrap)
        .collect()
        .await;
    let statuses: Vec<_> = entries
        .iter()
        .map(|e| (e.status(), e.custom_message.as_str(), e.offline_reason()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (VisibleStatus::Online, "", OfflineReason::Unspecified),
            (VisibleStatus::Busy, "lunch", OfflineReason::Unspecified),
            (VisibleStatus::Offline, "", OfflineReason::Logout),
        ]
    );
    assert!(entries.windows(2).all(|w| w[0].version < w[1].version));

    let first = watcher
        .get_history_page(&bob, None, None, 2, "")
        .await
        .unwrap();
    assert_eq!(first.entries.len(), 2);
    let second = watcher
        .get_history_page(&bob, None, None, 2, &first.next_page_token)
        .await
        .unwrap();
    assert_eq!(second.entries.len(), 1);
    assert!(second.next_page_token.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn draining_tells_streams_to_go_away() {
    let mut server = TestServer::start().await;
    let (alice, bob) = (user("alice"), user("bob"));
    befriend(&server, &alice, &[&bob]).await;
    let mut session = RawSession::open(server.presence().await, &bob, "phone").await;
    let mut watch = raw_watch(server.presence().await, &alice).await;

    server.drain();
    let go_away = tokio::time::timeout(VISIBLE_WITHIN, session.inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            go_away.response,
            Some(pb::heartbeat_response::Response::GoAway(_))
        ),
        "{go_away:?}"
    );
    let ended = tokio::time::timeout(VISIBLE_WITHIN, watch.message())
        .await
        .unwrap();
    assert_eq!(ended.unwrap_err().code(), tonic::Code::Unavailable);
    drop(session.outbound);
    server.stop().await;
}
