//! The contract of the backend traits, run against every implementation: the
//! embedded backends always, and each production backend when the test
//! environment names it (`make test` always does; see the Makefile):
//!
//! - `PRESENCE_TEST_REDIS_CLUSTER`: Redis Cluster seed URLs, comma-separated;
//! - `PRESENCE_TEST_SCYLLA_NODES`: CQL contact points, comma-separated.
//!
//! A case is written once, as an async function over `Backends`, and listed in
//! `suite!`, which instantiates it per backend set.

use std::sync::Arc;
use std::time::Duration;

use presence_server::domain::{
    Activity, ChosenStatus, HistoryRecord, Limits, Mutation, OfflineReason, Platform, Session,
    VisibleStatus,
};
use presence_server::hub::{Hub, Pending};
use presence_server::node::Backends;
use presence_server::store::embedded::{
    EmbeddedContactStore, EmbeddedFanOut, EmbeddedHistoryStore, EmbeddedHotStore,
};
use presence_server::store::{BusEvent, StoreError};

const LIMITS: Limits = Limits {
    max_sessions_per_user: 4,
};

/// A fresh id per test, so cases can share one real backend without seeing
/// each other's data.
fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

fn session(device: &str, conn_id: u64, node: &str) -> Session {
    Session {
        device_id: device.to_owned(),
        platform: Platform::Desktop,
        activity: Activity::Active,
        connected_since_ms: 1_000,
        conn_id,
        node_id: node.to_owned(),
    }
}

fn embedded() -> Backends {
    let hub = Arc::new(Hub::default());
    Backends {
        hot: Arc::new(EmbeddedHotStore::default()),
        contacts: Arc::new(EmbeddedContactStore::default()),
        history: Arc::new(EmbeddedHistoryStore::new(Duration::from_secs(24 * 3600))),
        fanout: Arc::new(EmbeddedFanOut::new(hub.clone())),
        hub,
    }
}

async fn open_makes_user_visible(b: Backends) {
    let user = unique("alice");
    let (record, applied) = b
        .hot
        .apply(
            &user,
            Mutation::Open {
                session: session("phone", 1, "n1"),
                status: None,
            },
            5_000,
            LIMITS,
        )
        .await
        .unwrap();
    assert!(applied.shown_changed);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    let stored = b.hot.get(&[user.clone(), unique("nobody")]).await.unwrap();
    assert_eq!(stored[0].as_ref(), Some(&record));
    assert_eq!(stored[1], None);
}

async fn concurrent_changes_of_one_user_are_all_kept(b: Backends) {
    let user = unique("bob");
    let hot = b.hot.clone();
    let opens = (0..4).map(|i| {
        let (hot, user) = (hot.clone(), user.clone());
        tokio::spawn(async move {
            let open = Mutation::Open {
                session: session(&format!("d{i}"), i, "n1"),
                status: None,
            };
            hot.apply(&user, open, 5_000 + i as i64, LIMITS)
                .await
                .unwrap()
        })
    });
    for open in opens {
        open.await.unwrap();
    }
    let record = b.hot.get(&[user]).await.unwrap().pop().flatten().unwrap();
    assert_eq!(record.sessions.len(), 4);
}

async fn refused_change_leaves_state_untouched(b: Backends) {
    let user = unique("carol");
    for i in 0..4 {
        let open = Mutation::Open {
            session: session(&format!("d{i}"), i, "n1"),
            status: None,
        };
        b.hot.apply(&user, open, 5_000, LIMITS).await.unwrap();
    }
    let before = b.hot.get(&[user.clone()]).await.unwrap();
    let fifth = Mutation::Open {
        session: session("d4", 9, "n1"),
        status: None,
    };
    let error = b.hot.apply(&user, fifth, 6_000, LIMITS).await.unwrap_err();
    assert!(matches!(error, StoreError::Transition(_)), "{error:?}");
    assert_eq!(b.hot.get(&[user]).await.unwrap(), before);
}

async fn stale_connection_cannot_end_a_newer_session(b: Backends) {
    let user = unique("dave");
    b.hot
        .apply(
            &user,
            Mutation::Open {
                session: session("phone", 1, "n1"),
                status: None,
            },
            5_000,
            LIMITS,
        )
        .await
        .unwrap();
    b.hot
        .apply(
            &user,
            Mutation::Open {
                session: session("phone", 2, "n1"),
                status: None,
            },
            6_000,
            LIMITS,
        )
        .await
        .unwrap();
    let end_old = Mutation::End {
        device_id: "phone".into(),
        conn_id: Some(1),
        reason: OfflineReason::ConnectionClosed,
    };
    let (record, applied) = b.hot.apply(&user, end_old, 7_000, LIMITS).await.unwrap();
    assert!(!applied.shown_changed);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    assert_eq!(record.sessions[0].conn_id, 2);
}

async fn node_lease_tracks_users_of_the_node(b: Backends) {
    let node = unique("node");
    let user = unique("erin");
    b.hot
        .renew_node(&node, Duration::from_secs(5))
        .await
        .unwrap();
    b.hot
        .apply(
            &user,
            Mutation::Open {
                session: session("phone", 1, &node),
                status: None,
            },
            5_000,
            LIMITS,
        )
        .await
        .unwrap();
    let (record, _) = b
        .hot
        .apply(
            &user,
            Mutation::EndNode {
                node_id: node.clone(),
            },
            6_000,
            LIMITS,
        )
        .await
        .unwrap();
    assert_eq!(record.shown.status, VisibleStatus::Offline);
    assert_eq!(record.shown.offline_reason, Some(OfflineReason::NodeLost));
    b.hot.forget_node(&node).await.unwrap();
}

async fn status_change_is_versioned(b: Backends) {
    let user = unique("frank");
    let (opened, _) = b
        .hot
        .apply(
            &user,
            Mutation::Open {
                session: session("phone", 1, "n1"),
                status: None,
            },
            5_000,
            LIMITS,
        )
        .await
        .unwrap();
    let busy = Mutation::SetStatus {
        chosen: ChosenStatus::Busy,
        custom_message: "in a meeting".into(),
    };
    let (record, applied) = b.hot.apply(&user, busy, 5_000, LIMITS).await.unwrap();
    assert!(applied.shown_changed);
    assert!(record.shown.version > opened.shown.version);
    assert_eq!(record.shown.custom_message, "in a meeting");
}

async fn contacts_are_mutual_and_bounded(b: Backends) {
    let (a, c1, c2) = (unique("a"), unique("c1"), unique("c2"));
    assert_eq!(
        b.contacts
            .add(&a, &[c1.clone(), c2.clone(), a.clone()], 3)
            .await
            .unwrap(),
        2
    );
    assert_eq!(b.contacts.add(&a, &[c1.clone()], 3).await.unwrap(), 0);
    let mut expected = vec![c1.clone(), c2.clone()];
    expected.sort();
    assert_eq!(b.contacts.list(&a).await.unwrap(), expected);
    assert_eq!(b.contacts.list(&c1).await.unwrap(), vec![a.clone()]);
    let too_many: Vec<String> = (0..2).map(|i| unique(&format!("x{i}"))).collect();
    assert!(matches!(
        b.contacts.add(&a, &too_many, 3).await,
        Err(StoreError::TooManyContacts(3))
    ));
    assert_eq!(b.contacts.list(&a).await.unwrap().len(), 2);
    assert_eq!(
        b.contacts
            .remove(&a, &[c1.clone(), unique("never")])
            .await
            .unwrap(),
        1
    );
    assert_eq!(b.contacts.list(&a).await.unwrap(), vec![c2]);
    assert!(b.contacts.list(&c1).await.unwrap().is_empty());
}

fn history(user: &str, at_ms: i64, version: u64) -> HistoryRecord {
    HistoryRecord {
        user_id: user.to_owned(),
        at_ms,
        status: VisibleStatus::Online,
        custom_message: String::new(),
        offline_reason: None,
        version,
    }
}

async fn history_pages_in_order_without_duplicates(b: Backends) {
    let user = unique("gina");
    let now = presence_server::node::now_ms();
    let records: Vec<_> = (0..5)
        .map(|i| history(&user, now + i, (now + i) as u64 * 1000))
        .collect();
    b.history.append(&records[3..]).await.unwrap();
    b.history.append(&records[..4]).await.unwrap();
    let all = b.history.page(&user, now, now + 10, 0, 100).await.unwrap();
    assert_eq!(all, records);
    let first = b.history.page(&user, now, now + 10, 0, 2).await.unwrap();
    assert_eq!(first, records[..2]);
    let next = b
        .history
        .page(&user, now, now + 10, first[1].version, 2)
        .await
        .unwrap();
    assert_eq!(next, records[2..4]);
    let window = b
        .history
        .page(&user, now + 1, now + 2, 0, 100)
        .await
        .unwrap();
    assert_eq!(window, records[1..3]);
}

async fn fanout_delivers_to_watchers_in_order(b: Backends) {
    let user = unique("hana");
    let watcher = b
        .hub
        .register("someone", presence_server::domain::Viewer::Contact, false);
    b.hub.watch(&watcher, &user);
    let mut record = presence_server::domain::UserRecord::default();
    for version in 1..=3 {
        record.shown.version = version;
        b.fanout
            .publish(BusEvent::Presence {
                user_id: user.clone(),
                record: record.clone(),
            })
            .await
            .unwrap();
    }
    let batch = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let batch = watcher.next_batch().await;
            if let Some(Pending::Presence(r)) = batch.get(&user)
                && r.shown.version == 3
            {
                return batch;
            }
        }
    })
    .await
    .expect("the last event arrives");
    assert_eq!(batch.len(), 1, "coalesced per user");
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            suite!(@cases $make;
                open_makes_user_visible,
                concurrent_changes_of_one_user_are_all_kept,
                refused_change_leaves_state_untouched,
                stale_connection_cannot_end_a_newer_session,
                node_lease_tracks_users_of_the_node,
                status_change_is_versioned,
                contacts_are_mutual_and_bounded,
                history_pages_in_order_without_duplicates,
                fanout_delivers_to_watchers_in_order,
            );
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                super::$case($make).await;
            }
        )*
    };
}

suite!(embedded_backends, embedded());
