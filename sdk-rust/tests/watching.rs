//! The watch stream's promises, against a scripted fake server (see `fake/`)
//! that replays its whole snapshot on every reconnect, ignoring
//! `known_versions`: the worst a server may do.

mod fake;

use std::collections::HashMap;

use fake::{FakeServer, within};
use futures::StreamExt;
use presence_sdk::{
    ClientConfig, Error, PresenceClient, PresenceMap, PresenceStream, PresenceUpdate, VisibleStatus,
};

async fn next(updates: &mut PresenceStream) -> PresenceUpdate {
    within("the next update", updates.next())
        .await
        .expect("stream ended")
        .expect("stream failed")
}

fn presence(update: PresenceUpdate) -> (String, u64) {
    match update {
        PresenceUpdate::Presence(p) => (p.user_id, p.version),
        other => panic!("expected a presence, got {other:?}"),
    }
}

/// A fake that knows alice (online, version 1) and bob (offline, version 4),
/// and a watch of a client's contacts on it.
async fn watching_alice_and_bob() -> (FakeServer, PresenceStream) {
    let server = FakeServer::start(50).await;
    server.publish("alice", VisibleStatus::Online, 1);
    server.publish("bob", VisibleStatus::Offline, 4);
    let updates = server.client().await.watch_contacts();
    (server, updates)
}

#[tokio::test]
async fn a_watch_delivers_the_snapshot_then_changes() {
    let (server, mut updates) = watching_alice_and_bob().await;

    assert_eq!(presence(next(&mut updates).await), ("alice".into(), 1));
    assert_eq!(presence(next(&mut updates).await), ("bob".into(), 4));
    assert_eq!(
        next(&mut updates).await,
        PresenceUpdate::SnapshotComplete { watched: 2 }
    );
    server.publish("alice", VisibleStatus::Idle, 2);
    assert_eq!(presence(next(&mut updates).await), ("alice".into(), 2));
}

#[tokio::test]
async fn a_resumed_watch_sends_known_versions_and_shows_only_what_changed() {
    let (server, mut updates) = watching_alice_and_bob().await;
    let mut map = PresenceMap::new();
    for _ in 0..3 {
        map.apply(&next(&mut updates).await);
    }
    assert!(map.is_complete());

    server.kill_streams();
    let update = next(&mut updates).await;
    assert!(
        matches!(update, PresenceUpdate::Reconnecting { attempt: 1, .. }),
        "{update:?}"
    );
    map.apply(&update);
    assert!(map.is_stale());
    // Changed while we were away.
    server.publish("bob", VisibleStatus::Online, 5);

    // The fake replays alice v1 and bob v5; only bob is news.
    let update = next(&mut updates).await;
    map.apply(&update);
    assert_eq!(presence(update), ("bob".into(), 5));
    let update = next(&mut updates).await;
    assert_eq!(update, PresenceUpdate::Resumed { watched: 2 });
    map.apply(&update);
    assert!(!map.is_stale());
    assert_eq!(
        map.get("bob").map(|p| p.status()),
        Some(VisibleStatus::Online)
    );

    let requests = &server.log().watch_requests;
    assert_eq!(requests.len(), 2);
    assert!(requests[0].known_versions.is_empty());
    assert_eq!(
        requests[1].known_versions,
        HashMap::from([("alice".into(), 1), ("bob".into(), 4)])
    );
}

#[tokio::test]
async fn a_watch_started_before_the_server_is_up_keeps_trying() {
    let client =
        PresenceClient::connect_lazy(ClientConfig::with_endpoint("http://127.0.0.1:1")).unwrap();
    let mut updates = client.watch_contacts();
    for attempt in 1..=3 {
        let update = next(&mut updates).await;
        assert!(
            matches!(update, PresenceUpdate::Reconnecting { attempt: a, .. } if a == attempt),
            "{update:?}"
        );
    }
}

#[tokio::test]
async fn a_rejected_token_ends_the_watch_with_the_error() {
    let server = FakeServer::start(50).await;
    let config = ClientConfig {
        token: Some("bad".into()),
        ..ClientConfig::with_endpoint(&server.url)
    };
    let client = PresenceClient::connect(config).await.unwrap();
    let mut updates = client.watch_contacts();
    let first = within("an error", updates.next()).await;
    assert!(
        matches!(first, Some(Err(Error::Unauthenticated(_)))),
        "{first:?}"
    );
    assert!(within("the end", updates.next()).await.is_none());
}

#[tokio::test]
async fn an_admin_watch_names_its_users() {
    let server = FakeServer::start(50).await;
    server.publish("alice", VisibleStatus::Online, 1);
    server.publish("bob", VisibleStatus::Online, 1);
    let mut updates = server.client().await.watch_users(["bob"]);
    assert_eq!(presence(next(&mut updates).await), ("bob".into(), 1));
    assert_eq!(
        next(&mut updates).await,
        PresenceUpdate::SnapshotComplete { watched: 1 }
    );
    assert_eq!(server.log().watch_requests[0].user_ids, ["bob"]);
}
