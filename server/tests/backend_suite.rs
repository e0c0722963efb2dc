//! The contract of the backend traits, run against every implementation: the
//! embedded backends always, and each production backend when the test
//! environment names it (`make test` always does; see the Makefile):
//!
//! - `PRESENCE_TEST_REDIS_CLUSTER`: Redis Cluster seed URLs, comma-separated;
//! - `PRESENCE_TEST_SCYLLA_NODES`: CQL contact points, comma-separated.
//!
//! A case is written once, as an async function over `Backends`, and listed in
//! `suite!`, which instantiates it per backend set.

use std::collections::HashMap;
mod common;

use std::sync::Arc;
use std::time::Duration;

use presence_server::domain::{
    Activity, Applied, ChosenStatus, HistoryRecord, Limits, Mutation, OfflineReason, Platform,
    Session, UserRecord, Viewer, VisibleStatus,
};
use presence_server::hub::{Hub, Pending, Watcher};
use presence_server::node::{Backends, now_ms};
use presence_server::store::buffered::{BufferConfig, BufferedHistory};
use presence_server::store::cached::CachedContacts;
use presence_server::store::embedded::{
    EmbeddedContactStore, EmbeddedFanOut, EmbeddedHistoryStore, EmbeddedHotStore,
};
use presence_server::store::embedded_log::EmbeddedChangeLog;
use presence_server::store::redis::{RedisBackends, keys};
use presence_server::store::{
    BusEvent, ChoiceRecord, DurableState, FanOut, HotStore, StoreError, StoreResult,
};

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

fn open(device: &str, conn_id: u64, node: &str) -> Mutation {
    Mutation::Open {
        session: session(device, conn_id, node),
        status: None,
    }
}

fn busy(custom_message: impl Into<String>) -> Mutation {
    Mutation::SetStatus {
        chosen: ChosenStatus::Busy,
        custom_message: custom_message.into(),
    }
}

fn end_node(node: &str) -> Mutation {
    Mutation::EndNode {
        node_id: node.to_owned(),
    }
}

/// Applies a change the case expects the store to accept.
async fn apply(
    hot: &dyn HotStore,
    user: &str,
    mutation: Mutation,
    now_ms: i64,
) -> (UserRecord, Applied) {
    hot.apply(user, mutation, now_ms, LIMITS).await.unwrap()
}

/// Whether the node's lease was still running (see `HotStore::renew_node`).
async fn renew(hot: &dyn HotStore, node: &str, ttl: Duration) -> bool {
    hot.renew_node(node, ttl).await.unwrap()
}

fn presence_event(user: &str, version: u64) -> BusEvent {
    let mut record = UserRecord::default();
    record.shown.version = version;
    BusEvent::Presence {
        user_id: user.to_owned(),
        record,
    }
}

fn embedded() -> Backends {
    let hub = Arc::new(Hub::default());
    let log = Arc::new(EmbeddedChangeLog::new(
        16,
        Duration::from_secs(24 * 3600),
        100_000,
    ));
    Backends {
        hot: Arc::new(EmbeddedHotStore::new(log.clone(), hub.clone())),
        contacts: Arc::new(EmbeddedContactStore::default()),
        history: Arc::new(EmbeddedHistoryStore::new(Duration::from_secs(24 * 3600))),
        fanout: Arc::new(EmbeddedFanOut::new(hub.clone())),
        log,
        hub,
    }
}

/// The embedded backends with the history behind a [`BufferedHistory`]: the
/// buffer must keep the history contract (reads see buffered records).
fn embedded_buffered() -> Backends {
    let backends = embedded();
    Backends {
        history: BufferedHistory::start(backends.history.clone(), BufferConfig::default()),
        ..backends
    }
}

/// Keyspace of the Scylla instances; cases use unique ids, so it is shared.
const SCYLLA_TEST_KEYSPACE: &str = "presence_test";

/// Contacts and history on a real CQL server (`PRESENCE_TEST_SCYLLA_NODES`);
/// the hot store and fan-out stay embedded. `buffered` puts the history
/// behind a [`BufferedHistory`], as a node runs it.
async fn scylla(buffered: bool) -> Option<Backends> {
    let nodes = common::backend_from_env("PRESENCE_TEST_SCYLLA_NODES")?;
    let durable = presence_server::store::scylla::connect(
        &nodes,
        SCYLLA_TEST_KEYSPACE,
        Duration::from_secs(24 * 3600),
    )
    .await
    .expect("connecting to PRESENCE_TEST_SCYLLA_NODES");
    let history = match buffered {
        true => BufferedHistory::start(durable.history, BufferConfig::default()),
        false => durable.history,
    };
    Some(Backends {
        contacts: durable.contacts,
        history,
        ..embedded()
    })
}

async fn open_makes_user_visible(b: Backends) {
    let user = unique("alice");
    let (record, applied) = apply(b.hot.as_ref(), &user, open("phone", 1, "n1"), 5_000).await;
    assert!(applied.shown_changed);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    let stored = b.hot.get(&[user.clone(), unique("nobody")]).await.unwrap();
    assert_eq!(stored[0].as_ref(), Some(&record));
    assert_eq!(stored[1], None);
}

async fn concurrent_changes_of_one_user_are_all_kept(b: Backends) {
    let user = unique("bob");
    let opens = (0..4).map(|i| {
        let (hot, user) = (b.hot.clone(), user.clone());
        tokio::spawn(async move {
            let (device, at_ms) = (format!("d{i}"), 5_000 + i as i64);
            apply(hot.as_ref(), &user, open(&device, i, "n1"), at_ms).await
        })
    });
    for open in opens {
        open.await.unwrap();
    }
    let record = b.hot.get(&[user]).await.unwrap().pop().flatten().unwrap();
    assert_eq!(record.sessions.len(), 4);
}

async fn refused_change_leaves_state_untouched(b: Backends) {
    let (hot, user) = (b.hot.as_ref(), unique("carol"));
    for i in 0..4 {
        apply(hot, &user, open(&format!("d{i}"), i, "n1"), 5_000).await;
    }
    let before = hot.get(std::slice::from_ref(&user)).await.unwrap();
    let fifth = open("d4", 9, "n1");
    let error = hot.apply(&user, fifth, 6_000, LIMITS).await.unwrap_err();
    assert!(matches!(error, StoreError::Transition(_)), "{error:?}");
    assert_eq!(hot.get(&[user]).await.unwrap(), before);
}

async fn stale_connection_cannot_end_a_newer_session(b: Backends) {
    let (hot, user) = (b.hot.as_ref(), unique("dave"));
    apply(hot, &user, open("phone", 1, "n1"), 5_000).await;
    apply(hot, &user, open("phone", 2, "n1"), 6_000).await;
    let end_old = Mutation::End {
        device_id: "phone".into(),
        conn_id: Some(1),
        reason: OfflineReason::ConnectionClosed,
    };
    let (record, applied) = apply(hot, &user, end_old, 7_000).await;
    assert!(!applied.shown_changed);
    assert_eq!(record.shown.status, VisibleStatus::Online);
    assert_eq!(record.sessions[0].conn_id, 2);
}

async fn node_lease_tracks_users_of_the_node(b: Backends) {
    let hot = b.hot.as_ref();
    let node = unique("node");
    let user = unique("erin");
    renew(hot, &node, Duration::from_secs(5)).await;
    apply(hot, &user, open("phone", 1, &node), 5_000).await;
    let (record, _) = apply(hot, &user, end_node(&node), 6_000).await;
    assert_eq!(record.shown.status, VisibleStatus::Offline);
    assert_eq!(record.shown.offline_reason, Some(OfflineReason::NodeLost));
    hot.forget_node(&node).await.unwrap();
}

async fn seeding_fills_only_a_missing_record(b: Backends) {
    let user = unique("carol");
    let mut durable = UserRecord {
        chosen: ChosenStatus::Invisible,
        ..UserRecord::default()
    };
    durable.shown.version = 7_000_000;
    durable.shown.last_seen_ms = 7_000;
    assert!(b.hot.seed(&user, &durable).await.unwrap());
    let stored = b.hot.get(std::slice::from_ref(&user)).await.unwrap();
    assert_eq!(stored[0].as_ref(), Some(&durable));

    // A session opened on the seeded record keeps the user's choice.
    let (record, applied) = apply(&*b.hot, &user, open("phone", 1, "n1"), 8_000).await;
    assert!(!applied.shown_changed, "an invisible user stays unseen");
    assert_eq!(record.chosen, ChosenStatus::Invisible);

    // Anything the store knows wins over a seed.
    assert!(!b.hot.seed(&user, &durable).await.unwrap());
    let stored = b.hot.get(std::slice::from_ref(&user)).await.unwrap();
    assert_eq!(stored[0].as_ref(), Some(&record));
}

async fn status_change_is_versioned(b: Backends) {
    let (hot, user) = (b.hot.as_ref(), unique("frank"));
    let (opened, _) = apply(hot, &user, open("phone", 1, "n1"), 5_000).await;
    let (record, applied) = apply(hot, &user, busy("in a meeting"), 5_000).await;
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
    assert_eq!(
        b.contacts
            .add(&a, std::slice::from_ref(&c1), 3)
            .await
            .unwrap(),
        0
    );
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
    let now = now_ms();
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
    let watcher = b.hub.register("someone", Viewer::Contact, false);
    b.hub.watch(&watcher, &user);
    for version in 1..=3 {
        b.fanout
            .publish(presence_event(&user, version))
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

async fn latest_record_is_the_durable_presence(b: Backends) {
    let user = unique("ivan");
    let now = now_ms();
    let version = |at_ms: i64| at_ms as u64 * 1000;
    let newest = HistoryRecord {
        status: VisibleStatus::Offline,
        offline_reason: Some(OfflineReason::LeaseExpired),
        ..history(&user, now + 2, version(now + 2))
    };
    b.history
        .append(&[history(&user, now, version(now)), newest.clone()])
        .await
        .unwrap();
    // An older change arriving late (a retry, another node) must not win.
    b.history
        .append(&[history(&user, now + 1, version(now + 1))])
        .await
        .unwrap();
    let last = b.history.last(&[user, unique("nobody")]).await.unwrap();
    assert_eq!(last, vec![Some(newest), None]);
}

/// The user's choice is durable on its own: a user never visible still has
/// one, the newest choice wins whatever order writes arrive in, and the
/// choice and the visible state never overwrite each other.
async fn choices_are_durable_and_the_newest_wins(b: Backends) {
    let (hidden, seen, nobody) = (unique("jo"), unique("kim"), unique("nobody"));
    let now = now_ms();
    let stamp = |at_ms: i64| at_ms as u64 * 1000;
    let choice = |user: &str, chosen, message: &str, at_us| ChoiceRecord {
        user_id: user.to_owned(),
        chosen,
        custom_message: message.to_owned(),
        at_us,
    };
    // Invisible from the start: a choice, never a visible change.
    let invisible = choice(&hidden, ChosenStatus::Invisible, "", stamp(now + 2));
    b.history
        .save_choices(std::slice::from_ref(&invisible))
        .await
        .unwrap();
    // An older choice arriving late (a retry, another node) must not win.
    let older = choice(&hidden, ChosenStatus::Busy, "late", stamp(now + 1));
    b.history.save_choices(&[older]).await.unwrap();
    // Seen online, then busy: the visible state and the choice side by side.
    let online = history(&seen, now, stamp(now));
    b.history
        .append(std::slice::from_ref(&online))
        .await
        .unwrap();
    let busy = choice(&seen, ChosenStatus::Busy, "meeting", stamp(now + 3));
    b.history
        .save_choices(std::slice::from_ref(&busy))
        .await
        .unwrap();

    let ids = [hidden.clone(), seen.clone(), nobody];
    let states = b.history.durable(&ids).await.unwrap();
    assert_eq!(states[0].choice.as_ref(), Some(&invisible));
    assert_eq!(states[0].last, None, "never visible");
    assert_eq!(states[1].choice.as_ref(), Some(&busy));
    assert_eq!(states[1].last.as_ref(), Some(&online));
    assert_eq!(states[2], DurableState::default());
    let lasts = b.history.last(&ids).await.unwrap();
    assert_eq!(lasts, vec![None, Some(online.clone()), None]);

    // A later visible change leaves the choice alone, and the other way round.
    let offline = HistoryRecord {
        status: VisibleStatus::Offline,
        offline_reason: Some(OfflineReason::Logout),
        ..history(&seen, now + 4, stamp(now + 4))
    };
    b.history
        .append(std::slice::from_ref(&offline))
        .await
        .unwrap();
    let online_again = choice(&seen, ChosenStatus::Online, "", stamp(now + 5));
    b.history
        .save_choices(std::slice::from_ref(&online_again))
        .await
        .unwrap();
    let state = b.history.durable(&[seen]).await.unwrap().remove(0);
    assert_eq!(state.last, Some(offline));
    assert_eq!(state.choice, Some(online_again));
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
                seeding_fills_only_a_missing_record,
                contacts_are_mutual_and_bounded,
                history_pages_in_order_without_duplicates,
                fanout_delivers_to_watchers_in_order,
                latest_record_is_the_durable_presence,
                choices_are_durable_and_the_newest_wins,
            );
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                // A maker returns Backends, or Option<Backends> where None
                // means "not configured here" (the maker printed a note).
                let Some(backends): Option<Backends> = $make.into() else {
                    return;
                };
                super::$case(backends).await;
            }
        )*
    };
}

suite!(embedded_backends, embedded());
suite!(embedded_buffered_history, embedded_buffered());
suite!(scylla_backends, scylla(false).await);
suite!(scylla_buffered_history, scylla(true).await);
suite!(redis_cluster, redis_cluster().await);
suite!(scylla_cached_contacts, scylla_cached_contacts().await);

// ---------------------------------------------------------------- cached contacts

/// Contacts durable on the CQL store and cached in Redis, as a node with both
/// runs them; the other backends embedded.
async fn scylla_cached_contacts() -> Option<Backends> {
    let urls = redis_urls()?;
    let backends = scylla(false).await?;
    let contacts = CachedContacts::new(backends.contacts.clone(), &urls)
        .expect("a redis cluster client for the contacts cache");
    Some(Backends {
        contacts: Arc::new(contacts),
        ..backends
    })
}

/// A contacts change on this node is seen by its next read, even when the
/// list was cached just before.
#[tokio::test]
async fn cached_contacts_follow_changes_at_once() {
    let Some(b) = scylla_cached_contacts().await else {
        return;
    };
    let (a, c1, c2) = (unique("a"), unique("c1"), unique("c2"));
    b.contacts
        .add(&a, std::slice::from_ref(&c1), 10)
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(b.contacts.list(&a).await.unwrap(), vec![c1.clone()]);
        // Gives the background refill time to land.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.contacts
        .add(&a, std::slice::from_ref(&c2), 10)
        .await
        .unwrap();
    let mut both = vec![c1.clone(), c2.clone()];
    both.sort();
    assert_eq!(b.contacts.list(&a).await.unwrap(), both);
    assert_eq!(b.contacts.list(&c2).await.unwrap(), vec![a.clone()]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.contacts
        .remove(&a, std::slice::from_ref(&c1))
        .await
        .unwrap();
    assert_eq!(b.contacts.list(&a).await.unwrap(), vec![c2.clone()]);
    assert!(b.contacts.list(&c1).await.unwrap().is_empty());
    // The limit is the durable store's, whatever the cache holds.
    let too_many: Vec<String> = (0..3).map(|i| unique(&format!("x{i}"))).collect();
    assert!(matches!(
        b.contacts.add(&a, &too_many, 3).await,
        Err(StoreError::TooManyContacts(3))
    ));
    assert_eq!(b.contacts.list(&a).await.unwrap(), vec![c2]);
}

// ---------------------------------------------------------------- Redis Cluster
//
// The Redis instance of the suite, and the cases only a shared store has:
// several nodes on one cluster, lost nodes, a store that lost its data
// (FLUSHALL), a slot moving to another master (ASK, MOVED, `sunsubscribe`),
// and, with `PRESENCE_TEST_REDIS_FAILOVER=1` since it kills a master of the
// cluster under test, a master failover. Cases that wipe or reshape the
// cluster take `REDIS_EXCLUSIVE` for writing; every other Redis case holds it
// for reading, so they never overlap within this binary. They do disturb
// anyone else using the same cluster meanwhile.

static REDIS_EXCLUSIVE: std::sync::LazyLock<Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(Arc::default);

/// The seed URLs of the cluster under test; see [`common::backend_from_env`].
fn redis_urls() -> Option<Vec<String>> {
    common::backend_from_env("PRESENCE_TEST_REDIS_CLUSTER")
}

/// One node's Redis backends, with their own hub.
async fn redis_node(urls: &[String]) -> (RedisBackends, Arc<Hub>) {
    let hub = Arc::new(Hub::default());
    let backends =
        presence_server::store::redis::connect(urls, hub.clone(), Duration::from_secs(24 * 3600))
            .await
            .expect("connecting to PRESENCE_TEST_REDIS_CLUSTER");
    (backends, hub)
}

/// A fan-out that holds the shared side of `REDIS_EXCLUSIVE` for as long as
/// the case's backends live.
struct Shared {
    fanout: Arc<dyn FanOut>,
    _hold: tokio::sync::OwnedRwLockReadGuard<()>,
}

#[async_trait::async_trait]
impl FanOut for Shared {
    async fn publish(&self, event: BusEvent) -> StoreResult<()> {
        self.fanout.publish(event).await
    }
}

/// Every backend on the Redis Cluster of `PRESENCE_TEST_REDIS_CLUSTER`.
async fn redis_cluster() -> Option<Backends> {
    let urls = redis_urls()?;
    let hold = REDIS_EXCLUSIVE.clone().read_owned().await;
    let (redis, hub) = redis_node(&urls).await;
    Some(Backends {
        hot: redis.hot,
        contacts: redis.contacts,
        history: redis.history,
        fanout: Arc::new(Shared {
            fanout: redis.fanout,
            _hold: hold,
        }),
        log: redis.log,
        hub,
    })
}

/// Waits until the watcher holds something for every one of `users`.
async fn pending_for(watcher: &Watcher, users: &[String]) -> HashMap<String, Pending> {
    let mut seen = HashMap::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !users.iter().all(|u| seen.contains_key(u)) {
            seen.extend(watcher.next_batch().await);
        }
    })
    .await
    .unwrap_or_else(|_| {
        let missing: Vec<_> = users.iter().filter(|u| !seen.contains_key(*u)).collect();
        panic!("no event arrived for {missing:?}")
    });
    seen
}

#[tokio::test]
async fn redis_change_on_one_node_reaches_watchers_on_another() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _shared = REDIS_EXCLUSIVE.read().await;
    let (a, _hub_a) = redis_node(&urls).await;
    let (_b, hub_b) = redis_node(&urls).await;
    let users = user_per_partition("remote");
    let watcher = hub_b.register("watcher", Viewer::Contact, false);
    for user in &users {
        hub_b.watch(&watcher, user);
    }
    for user in &users {
        for version in 1..=3 {
            a.fanout
                .publish(presence_event(user, version))
                .await
                .unwrap();
        }
    }
    let seen = pending_for(&watcher, &users).await;
    for user in &users {
        // Versions arrive in order, so the last one is what stays pending.
        assert!(
            matches!(&seen[user], Pending::Presence(r) if r.shown.version == 3),
            "{user}: {:?}",
            seen[user]
        );
    }

    // Contacts changes go by owner.
    let owner = unique("owner");
    let added = unique("added");
    let follower = hub_b.register(&owner, Viewer::Contact, true);
    a.fanout
        .publish(BusEvent::Contacts {
            user_id: owner.clone(),
            added: vec![added.clone()],
            removed: Vec::new(),
        })
        .await
        .unwrap();
    let seen = pending_for(&follower, std::slice::from_ref(&added)).await;
    assert_eq!(seen[&added], Pending::Added);
}

#[tokio::test]
async fn redis_unwatched_events_are_skipped_unread() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _shared = REDIS_EXCLUSIVE.read().await;
    let (a, _) = redis_node(&urls).await;
    let (b, hub_b) = redis_node(&urls).await;
    let watched = unique("watched");
    let watcher = hub_b.register("watcher", Viewer::Contact, false);
    hub_b.watch(&watcher, &watched);
    let (_, skipped_before) = b.fanout.received();
    a.fanout
        .publish(presence_event(&unique("nobody-watches"), 1))
        .await
        .unwrap();
    a.fanout.publish(presence_event(&watched, 1)).await.unwrap();
    pending_for(&watcher, std::slice::from_ref(&watched)).await;
    let (_, skipped_after) = b.fanout.received();
    assert!(skipped_after > skipped_before);
}

async fn open_on(hot: &dyn HotStore, user: &str, node: &str) {
    apply(hot, user, open("phone", 1, node), now_ms()).await;
}

#[tokio::test]
async fn redis_lost_node_is_found_with_its_users_and_reclaimed_once() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _shared = REDIS_EXCLUSIVE.read().await;
    let (dying, _) = redis_node(&urls).await;
    let (reclaimer, _) = redis_node(&urls).await;
    let (bystander, _) = redis_node(&urls).await;
    let node = unique("dying-node");
    assert!(renew(dying.hot.as_ref(), &node, Duration::from_millis(300)).await);
    let mut users: Vec<String> = (0..20).map(|i| unique(&format!("u{i}"))).collect();
    users.sort();
    for user in &users {
        open_on(dying.hot.as_ref(), user, &node).await;
    }
    // A user whose session moved to another node is no longer the node's.
    let moved = users.pop().unwrap();
    open_on(dying.hot.as_ref(), &moved, "elsewhere").await;
    let logout = Mutation::End {
        device_id: "phone".into(),
        conn_id: None,
        reason: OfflineReason::Logout,
    };
    apply(dying.hot.as_ref(), &moved, logout, now_ms()).await;
    assert!(!reclaimer.hot.lost_nodes().await.unwrap().contains(&node));
    tokio::time::sleep(Duration::from_millis(600)).await;

    assert!(reclaimer.hot.lost_nodes().await.unwrap().contains(&node));
    // Claimed: another live node leaves it to the first one.
    assert!(!bystander.hot.lost_nodes().await.unwrap().contains(&node));
    assert_eq!(reclaimer.hot.users_of_node(&node).await.unwrap(), users);
    for user in &users {
        let (record, _) = apply(reclaimer.hot.as_ref(), user, end_node(&node), now_ms()).await;
        assert_eq!(record.shown.offline_reason, Some(OfflineReason::NodeLost));
    }
    assert!(reclaimer.hot.users_of_node(&node).await.unwrap().is_empty());
    reclaimer.hot.forget_node(&node).await.unwrap();
    assert!(!reclaimer.hot.lost_nodes().await.unwrap().contains(&node));
    assert!(!bystander.hot.lost_nodes().await.unwrap().contains(&node));
}

#[tokio::test]
async fn redis_forgetting_a_node_with_sessions_leaves_them_to_reclaim() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _shared = REDIS_EXCLUSIVE.read().await;
    let (leaving, _) = redis_node(&urls).await;
    let (other, _) = redis_node(&urls).await;
    let node = unique("leaving-node");
    let user = unique("still-online");
    assert!(renew(leaving.hot.as_ref(), &node, Duration::from_secs(30)).await);
    open_on(leaving.hot.as_ref(), &user, &node).await;
    leaving.hot.forget_node(&node).await.unwrap();
    assert!(other.hot.lost_nodes().await.unwrap().contains(&node));
    assert_eq!(
        other.hot.users_of_node(&node).await.unwrap(),
        vec![user.clone()]
    );
    reclaim(other.hot.as_ref(), &node, &[user]).await;
}

/// Ends the node's sessions of `users` and forgets the node, as a reclaiming
/// node does, so that cases leave no lost node behind.
async fn reclaim(hot: &dyn HotStore, node: &str, users: &[String]) {
    for user in users {
        apply(hot, user, end_node(node), now_ms()).await;
    }
    hot.forget_node(node).await.unwrap();
    assert!(!hot.lost_nodes().await.unwrap().contains(&node.to_owned()));
}

#[tokio::test]
async fn redis_renew_reports_a_lease_that_ran_out() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _shared = REDIS_EXCLUSIVE.read().await;
    let (redis, _) = redis_node(&urls).await;
    let node = unique("slow-node");
    assert!(renew(redis.hot.as_ref(), &node, Duration::from_millis(200)).await);
    assert!(renew(redis.hot.as_ref(), &node, Duration::from_millis(200)).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!renew(redis.hot.as_ref(), &node, Duration::from_secs(5)).await);
    assert!(renew(redis.hot.as_ref(), &node, Duration::from_secs(5)).await);
    redis.hot.forget_node(&node).await.unwrap();
}

#[tokio::test]
async fn redis_renew_reports_a_store_that_lost_its_data() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _exclusive = REDIS_EXCLUSIVE.write().await;
    let (redis, _) = redis_node(&urls).await;
    let node = unique("node");
    let user = unique("user");
    // A fresh store knows no node: the first renew is not a loss.
    assert!(renew(redis.hot.as_ref(), &node, Duration::from_secs(30)).await);
    open_on(redis.hot.as_ref(), &user, &node).await;
    flushall(&urls).await;
    assert!(!renew(redis.hot.as_ref(), &node, Duration::from_secs(30)).await);
    assert!(renew(redis.hot.as_ref(), &node, Duration::from_secs(30)).await);
    // What a node does next: re-assert its sessions. The index comes back
    // with them, so the node's users can be reclaimed again.
    let reassert = Mutation::Update {
        session: session("phone", 1, &node),
        activity: None,
        status: None,
    };
    apply(redis.hot.as_ref(), &user, reassert, now_ms()).await;
    assert_eq!(
        redis.hot.users_of_node(&node).await.unwrap(),
        vec![user.clone()]
    );
    reclaim(redis.hot.as_ref(), &node, &[user]).await;
}

async fn flushall(urls: &[String]) {
    let client = redis::cluster::ClusterClient::new(urls.to_vec()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    // Routed to every master by the cluster client.
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

/// A plain connection to one cluster node.
async fn node_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|port| port.trim_end_matches('/').parse().ok())
        .expect("seed urls look like redis://host:port")
}

/// The port of the master serving `slot`, and the ports of the other masters.
async fn masters_for(urls: &[String], slot: u16) -> (u16, Vec<u16>) {
    let mut conn = node_conn(port_of(&urls[0])).await;
    let ranges: Vec<(i64, i64, (String, i64))> = {
        let value: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        let redis::Value::Array(ranges) = value else {
            panic!("CLUSTER SLOTS answered {value:?}")
        };
        ranges
            .into_iter()
            .map(|range| {
                let redis::Value::Array(mut fields) = range else {
                    panic!("unexpected CLUSTER SLOTS entry")
                };
                fields.truncate(3);
                let master: Vec<redis::Value> =
                    redis::from_redis_value(fields.pop().unwrap()).unwrap();
                let host: String = redis::from_redis_value(master[0].clone()).unwrap();
                let port: i64 = redis::from_redis_value(master[1].clone()).unwrap();
                let end: i64 = redis::from_redis_value(fields.pop().unwrap()).unwrap();
                let start: i64 = redis::from_redis_value(fields.pop().unwrap()).unwrap();
                (start, end, (host, port))
            })
            .collect()
    };
    let mut masters: Vec<u16> = ranges
        .iter()
        .map(|(_, _, (_, port))| *port as u16)
        .collect();
    masters.sort_unstable();
    masters.dedup();
    let owner = ranges
        .iter()
        .find(|(start, end, _)| (*start..=*end).contains(&i64::from(slot)))
        .map(|(_, _, (_, port))| *port as u16)
        .expect("every slot is served");
    masters.retain(|port| *port != owner);
    (owner, masters)
}

/// `e2e/scripts/redis-cluster.sh ARGS`, aimed at the cluster under test
/// unless `REDIS_CLUSTER_BASE_PORT` already names one.
fn cluster_command(urls: &[String], args: &[&str]) -> std::process::Command {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/scripts/redis-cluster.sh"
    );
    let mut command = std::process::Command::new(script);
    command.args(args);
    if std::env::var_os("REDIS_CLUSTER_BASE_PORT").is_none()
        && let Some(base) = urls.iter().map(|url| port_of(url)).min()
    {
        command.env("REDIS_CLUSTER_BASE_PORT", base.to_string());
    }
    command
}

async fn cluster_script(urls: &[String], args: &[&str]) {
    let status = tokio::process::Command::from(cluster_command(urls, args))
        .status()
        .await
        .expect("running redis-cluster.sh");
    assert!(status.success(), "redis-cluster.sh {args:?} failed");
}

/// One fresh user per partition: between them they live on every master
/// and use every channel.
fn user_per_partition(name: &str) -> Vec<String> {
    let keys = keys::Keys::new(16);
    let mut users = HashMap::new();
    while users.len() < usize::from(keys.partitions()) {
        let user = unique(name);
        users.entry(keys.partition_of(&user)).or_insert(user);
    }
    users.into_values().collect()
}

async fn set_busy(hot: &dyn HotStore, user: &str) -> StoreResult<()> {
    let change = busy(rand::random::<u32>().to_string());
    hot.apply(user, change, now_ms(), LIMITS).await.map(|_| ())
}

/// Kills the master serving the node registry (and a third of the users and
/// fan-out channels), then checks that changes, node leases and cross-node
/// fan-out all work again once a replica took over, with no restart of the
/// clients. Disturbs the cluster, so only with `PRESENCE_TEST_REDIS_FAILOVER=1`;
/// the killed node is started again (as a replica) at the end.
#[tokio::test]
async fn redis_store_and_fanout_survive_a_master_failover() {
    let Some(urls) = redis_urls() else {
        return;
    };
    if std::env::var("PRESENCE_TEST_REDIS_FAILOVER").as_deref() != Ok("1") {
        eprintln!("note: PRESENCE_TEST_REDIS_FAILOVER is not 1; skipping the failover case");
        return;
    }
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let _exclusive = REDIS_EXCLUSIVE.write().await;
    // Every master must have a replica to fail over to.
    cluster_script(&urls, &["start"]).await;
    let (a, _) = redis_node(&urls).await;
    let (b, hub_b) = redis_node(&urls).await;
    let node = unique("node");
    assert!(renew(a.hot.as_ref(), &node, Duration::from_secs(60)).await);
    let users = user_per_partition("everywhere");
    for user in &users {
        set_busy(a.hot.as_ref(), user).await.unwrap();
    }
    let mut gaps = b.fanout.gaps();
    gaps.mark_unchanged();
    let (victim, _) = masters_for(&urls, keys::slot_of(keys::node_registry().as_bytes())).await;

    cluster_script(&urls, &["kill-master", &victim.to_string()]).await;
    let _restart = RestartOnDrop(victim, urls.clone());
    let killed = std::time::Instant::now();
    // The same clients keep changing users on every master until a whole
    // round succeeds.
    let mut failed_calls = 0;
    loop {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no recovery within 60 s"
        );
        let mut failed = 0;
        for user in &users {
            if set_busy(a.hot.as_ref(), user).await.is_err() {
                failed += 1;
            }
        }
        failed_calls += failed;
        if failed == 0 {
            break;
        }
    }
    eprintln!(
        "failover: every change succeeds again {:?} after the kill ({failed_calls} calls failed meanwhile)",
        killed.elapsed()
    );
    cluster_script(&urls, &["wait", "30"]).await;
    renew(a.hot.as_ref(), &node, Duration::from_secs(60)).await;
    assert!(a.hot.lost_nodes().await.is_ok());

    // B noticed the loss of its subscriptions and restored them.
    tokio::time::timeout(Duration::from_secs(30), async {
        gaps.changed().await.unwrap();
        while !b.fanout.fully_subscribed() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("subscriptions restored within 30 s");
    let watcher = hub_b.register("watcher", Viewer::Contact, false);
    let (received_before, _) = b.fanout.received();
    for user in &users {
        hub_b.watch(&watcher, user);
        a.fanout.publish(presence_event(user, 7)).await.unwrap();
    }
    pending_for(&watcher, &users).await;
    // Exactly once: no channel is subscribed twice after the failover.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (received_after, _) = b.fanout.received();
    assert_eq!(received_after - received_before, users.len() as u64);
    a.hot.forget_node(&node).await.unwrap();
}

/// Starts a killed node again however the case ends, so that a failing case
/// does not leave the cluster without a replica for the next one.
struct RestartOnDrop(u16, Vec<String>);

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let mut command = cluster_command(&self.1, &["restart-node", &self.0.to_string()]);
        if !command.status().is_ok_and(|status| status.success()) {
            eprintln!("could not restart redis node {}", self.0);
        }
    }
}

/// Moves one slot to another master and back, the way resharding does, while
/// a user of that slot changes: the clients follow ASK during the migration
/// and MOVED after it, and the fan-out channel of that slot, which Redis
/// unsubscribes when its slot leaves, is subscribed again on the new owner.
#[tokio::test]
async fn redis_follows_a_slot_to_another_master() {
    let Some(urls) = redis_urls() else {
        return;
    };
    let _exclusive = REDIS_EXCLUSIVE.write().await;
    let (a, _) = redis_node(&urls).await;
    let (b, hub_b) = redis_node(&urls).await;
    // Slot 0 holds partition 0 and its channel; find a user in it.
    let user = std::iter::repeat_with(|| unique("mover"))
        .find(|user| keys::Keys::new(16).user_slot(user) == 0)
        .unwrap();
    let node = unique("node");
    open_on(a.hot.as_ref(), &user, &node).await;
    let watcher = hub_b.register("watcher", Viewer::Contact, false);
    hub_b.watch(&watcher, &user);

    let (source, others) = masters_for(&urls, 0).await;
    let target = others[0];
    for (from, to) in [(source, target), (target, source)] {
        let mut gaps = b.fanout.gaps();
        gaps.mark_unchanged();
        migrate_slot(0, from, to, || async {
            // Mid-migration: the keys are on `to` already, the slot still
            // belongs to `from`, which answers ASK.
            set_busy(a.hot.as_ref(), &user).await.unwrap();
        })
        .await;
        // The slot map of the clients is stale now: MOVED.
        set_busy(a.hot.as_ref(), &user).await.unwrap();
        assert_eq!(
            a.hot.users_of_node(&node).await.unwrap(),
            vec![user.clone()]
        );
        tokio::time::timeout(Duration::from_secs(10), gaps.changed())
            .await
            .expect("bucket 0 subscribed again on its new master")
            .unwrap();
        // The change's own publication, from the script that writes it,
        // reaches the other node on the channel's new master.
        let message = format!("after {to}");
        a.hot
            .apply(&user, busy(&message), now_ms(), LIMITS)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let batch = watcher.next_batch().await;
                if matches!(batch.get(&user), Some(Pending::Presence(r)) if r.shown.custom_message == message) {
                    return;
                }
            }
        })
        .await
        .expect("the change published on the moved slot's channel");
    }
    reclaim(a.hot.as_ref(), &node, &[user]).await;
}

/// Migrates `slot` from the master on port `from` to the one on `to`, running
/// `during` once its keys moved but before the slot changes hands.
async fn migrate_slot<F: std::future::Future<Output = ()>>(
    slot: u16,
    from: u16,
    to: u16,
    during: impl FnOnce() -> F,
) {
    let mut source = node_conn(from).await;
    let mut target = node_conn(to).await;
    let source_id = cluster_myid(&mut source).await;
    let target_id = cluster_myid(&mut target).await;
    cluster_setslot(&mut target, slot, "IMPORTING", &source_id).await;
    cluster_setslot(&mut source, slot, "MIGRATING", &target_id).await;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(1000)
            .query_async(&mut source)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async::<()>(&mut source)
            .await
            .unwrap();
    }
    during().await;
    cluster_setslot(&mut target, slot, "NODE", &target_id).await;
    cluster_setslot(&mut source, slot, "NODE", &target_id).await;
}

async fn cluster_myid(conn: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(conn)
        .await
        .unwrap()
}

async fn cluster_setslot(
    conn: &mut redis::aio::MultiplexedConnection,
    slot: u16,
    state: &str,
    node_id: &str,
) {
    redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(state)
        .arg(node_id)
        .query_async::<()>(conn)
        .await
        .unwrap();
}
