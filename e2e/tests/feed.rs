//! The change feed end to end, through the SDK: consumer groups see every
//! change in order per user, redelivery after a consumer vanished,
//! rebalancing, Tail and the start positions, exactly one log entry per
//! version under concurrent changes from two nodes, and a stuck group that
//! does not slow presence.
//!
//! Every test runs on the embedded backends, then on Redis Cluster (and
//! Cassandra for the history) when `PRESENCE_TEST_REDIS_CLUSTER` (and
//! `PRESENCE_TEST_SCYLLA_NODES`) are set. Groups and users are fresh per
//! test, so the tests share the services and run in parallel.

#[path = "support/nodes.rs"]
mod nodes;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};
use presence_sdk::{
    ChangeEvent, ConsumeOptions, Consumer, FeedBatch, FeedStart, FeedUpdate, PresenceClient,
    PresenceUpdate, SessionOptions, UserStatus,
};
use support::{
    ContactWatch, TestServer, UNLIMITED_CHANGES, VISIBLE_WITHIN, admin_token, befriend, client,
    user,
};

/// A group's member gets what it waits for within this: a batch read
/// (a second at most) or a membership change (a renewal, a third of the
/// member expiry of 3 s), on a loaded machine.
const DELIVERED_WITHIN: Duration = Duration::from_secs(8);

/// The ack timeout of the redelivery tests.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// The backends a test runs on: the embedded ones, and the real services
/// when the environment names them.
#[derive(Clone, Debug)]
enum Backend {
    Embedded,
    Real {
        redis: nodes::RedisCluster,
        scylla: Option<Vec<String>>,
    },
}

fn backends() -> Vec<Backend> {
    let mut all = vec![Backend::Embedded];
    if let Some(redis) = nodes::redis_cluster() {
        let scylla = nodes::backend_from_env("PRESENCE_TEST_SCYLLA_NODES", "cassandra.sh");
        all.push(Backend::Real { redis, scylla });
    }
    all
}

impl Backend {
    /// A server on this backend; on the real services, each call is
    /// another node of the same deployment.
    async fn start(&self) -> TestServer {
        let mut flags: Vec<String> = UNLIMITED_CHANGES.iter().map(|f| f.to_string()).collect();
        if let Backend::Real { redis, scylla } = self {
            flags.extend([
                "--redis-cluster".into(),
                redis.seeds(),
                "--node-lease".into(),
                support::duration_flag(nodes::NODE_LEASE),
                // Keeps what an `oldest` group reads in these tests short.
                "--log-retention".into(),
                "10m".into(),
            ]);
            if let Some(scylla) = scylla {
                flags.extend([
                    "--scylla".into(),
                    scylla.join(","),
                    "--scylla-keyspace".into(),
                    "presence_e2e_feed".into(),
                ]);
            }
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        TestServer::start_with(&flags).await
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Real { .. } => "redis cluster",
        }
    }

    fn is_real(&self) -> bool {
        matches!(self, Backend::Real { .. })
    }
}

/// An SDK client with the admin scope on `server`.
async fn admin(server: &TestServer) -> PresenceClient {
    PresenceClient::connect(presence_sdk::ClientConfig {
        token: Some(admin_token()),
        ..presence_sdk::ClientConfig::with_endpoint(server.url())
    })
    .await
    .unwrap()
}

fn group_name(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

/// Joins `group` as `member` with a short ack timeout.
async fn join(server: &TestServer, group: &str, member: &str, start: FeedStart) -> Consumer {
    join_reading(server, group, member, start, 1000).await
}

/// Like [`join`], with batches of at most `max_batch` changes.
async fn join_reading(
    server: &TestServer,
    group: &str,
    member: &str,
    start: FeedStart,
    max_batch: u32,
) -> Consumer {
    let options = ConsumeOptions {
        consumer: member.to_owned(),
        start,
        max_batch,
        ack_timeout: ACK_TIMEOUT,
        ..ConsumeOptions::new(group)
    };
    admin(server).await.consume(options).await.unwrap()
}

/// The next update of `consumer`, at most [`DELIVERED_WITHIN`] away.
async fn next(consumer: &mut Consumer) -> FeedUpdate {
    tokio::time::timeout(DELIVERED_WITHIN, consumer.next())
        .await
        .expect("the consumer delivers")
        .expect("the consumer goes on")
        .expect("the consumer has no error")
}

/// The next batch of `consumer`, skipping assignments.
async fn next_batch(consumer: &mut Consumer) -> FeedBatch {
    loop {
        match next(consumer).await {
            FeedUpdate::Batch(batch) => return batch,
            FeedUpdate::Assigned(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The user and version of a logged change.
fn change(event: &ChangeEvent) -> (String, u64) {
    let presence = event.presence.as_ref().expect("a change has a presence");
    (presence.user_id.clone(), presence.version)
}

/// The versions each of some users' changes took, as their callers saw them.
#[derive(Debug, Default)]
struct Expected(BTreeMap<String, BTreeSet<u64>>);

impl Expected {
    fn add(&mut self, user: &str, version: u64) {
        self.0.entry(user.to_owned()).or_default().insert(version);
    }

    fn merged(sets: &[&Expected]) -> Expected {
        let mut merged = Expected::default();
        for (user, version) in sets.iter().flat_map(|set| set.all()) {
            merged.add(&user, version);
        }
        merged
    }

    fn users(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    fn all(&self) -> BTreeSet<(String, u64)> {
        self.0
            .iter()
            .flat_map(|(user, versions)| versions.iter().map(|v| (user.clone(), *v)))
            .collect()
    }

    fn max(&self, user: &str) -> u64 {
        self.0[user].last().copied().unwrap_or_default()
    }
}

/// Users with a session each, changing their custom message (each change
/// is visible, so each has a version).
struct Changers {
    clients: Vec<(String, PresenceClient)>,
}

impl Changers {
    async fn start(server: &TestServer, count: usize) -> Changers {
        let mut clients = Vec::new();
        for _ in 0..count {
            let id = user("changer");
            let device = client(server, &id, "phone").await;
            device
                .start_session(SessionOptions::default())
                .await
                .unwrap();
            clients.push((id, device));
        }
        Changers { clients }
    }

    /// `rounds` changes of every user, users concurrently.
    async fn change(&self, rounds: usize) -> Expected {
        let mut expected = Expected::default();
        let each = self.clients.iter().map(|(id, device)| async move {
            let mut versions = Vec::new();
            for round in 0..rounds {
                let presence = device
                    .set_status(UserStatus::Online, format!("round {round}"))
                    .await
                    .unwrap()
                    .expect("the caller's presence");
                versions.push(presence.version);
            }
            (id, versions)
        });
        for (id, versions) in futures::future::join_all(each).await {
            for version in versions {
                expected.add(id, version);
            }
        }
        expected
    }
}

/// The changes of `users` in the order they came, from anything that
/// yields logged changes.
#[derive(Debug, Default)]
struct Seen(Vec<(String, u64)>);

impl Seen {
    fn record<'a>(&mut self, events: impl IntoIterator<Item = &'a ChangeEvent>, users: &Expected) {
        for event in events {
            let (user, version) = change(event);
            if users.0.contains_key(&user) {
                self.0.push((user, version));
            }
        }
    }

    fn set(&self) -> BTreeSet<(String, u64)> {
        self.0.iter().cloned().collect()
    }

    fn has_all(&self, expected: &Expected) -> bool {
        self.set().is_superset(&expected.all())
    }

    /// Each user's changes came in version order; a change that came again
    /// (at least once) came with the same version, which is all a repeat is.
    fn assert_in_order(&self, what: &str) {
        let mut last: HashMap<&str, u64> = HashMap::new();
        let mut delivered: BTreeSet<(&str, u64)> = BTreeSet::new();
        for (user, version) in &self.0 {
            if !delivered.insert((user, *version)) {
                continue;
            }
            let previous = last.insert(user, *version).unwrap_or(0);
            assert!(
                *version > previous,
                "{what}: {user} v{version} came after v{previous}"
            );
        }
    }

    fn assert_no_repeat(&self, what: &str) {
        assert_eq!(
            self.set().len(),
            self.0.len(),
            "{what}: a version was logged twice: {:?}",
            self.0
        );
    }
}

/// Reads `consumer`, acknowledging each batch, until it delivered every
/// expected change.
async fn consume_all(consumer: &mut Consumer, expected: &Expected, what: &str) -> Seen {
    let mut seen = Seen::default();
    consume_into(consumer, expected, &mut seen, what).await;
    seen
}

/// Like [`consume_all`], adding to what `seen` holds.
async fn consume_into(consumer: &mut Consumer, expected: &Expected, seen: &mut Seen, what: &str) {
    let deadline = Instant::now() + DELIVERED_WITHIN;
    while !seen.has_all(expected) {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, consumer.next())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<_> = expected.all().difference(&seen.set()).cloned().collect();
                panic!("{what}: {} changes missing: {missing:?}", missing.len())
            })
            .expect("the consumer goes on")
            .expect("the consumer has no error");
        match update {
            FeedUpdate::Batch(batch) => {
                seen.record(&batch.events, expected);
                assert!(consumer.ack(&batch).await, "{what}: the ack was sent");
            }
            FeedUpdate::Reconnecting { reason, .. } => panic!("{what}: the stream broke: {reason}"),
            FeedUpdate::Assigned(_) => {}
        }
    }
}

/// Reads a Tail stream until it delivered every expected change, then for
/// `settle` more, for anything that should not come.
async fn tail_all(
    events: &mut (impl Stream<Item = Result<ChangeEvent, presence_sdk::Error>> + Unpin),
    expected: &Expected,
    settle: Duration,
    what: &str,
) -> Seen {
    let mut seen = Seen::default();
    let deadline = Instant::now() + DELIVERED_WITHIN;
    while !seen.has_all(expected) {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: not every change came: {seen:?}"))
            .expect("the tail goes on")
            .expect("the tail has no error");
        seen.record([&event], expected);
    }
    while let Ok(Some(event)) = tokio::time::timeout(settle, events.next()).await {
        seen.record([&event.unwrap()], expected);
    }
    seen
}

#[tokio::test]
async fn two_groups_each_see_every_change_in_order_per_user() {
    for backend in backends() {
        let what = backend.name();
        let server = backend.start().await;
        let changers = Changers::start(&server, 6).await;
        let (first, second) = (group_name("notify"), group_name("analytics"));
        let mut a = join(&server, &first, "a", FeedStart::Latest).await;
        let mut b = join(&server, &second, "b", FeedStart::Latest).await;

        let expected = changers.change(50).await;
        assert_eq!(expected.all().len(), 300);

        let (what_a, what_b) = (format!("{what}, {first}"), format!("{what}, {second}"));
        let (seen_a, seen_b) = tokio::join!(
            consume_all(&mut a, &expected, &what_a),
            consume_all(&mut b, &expected, &what_b),
        );
        seen_a.assert_in_order(&what_a);
        seen_b.assert_in_order(&what_b);
        server.stop().await;
    }
}

#[tokio::test]
async fn each_version_is_logged_once_under_concurrent_changes_from_two_nodes() {
    for backend in backends() {
        let what = backend.name();
        let first = backend.start().await;
        // Two nodes of one deployment on the real services; on the embedded
        // backends (one node by design) two clients of the one node.
        let second = if backend.is_real() {
            Some(backend.start().await)
        } else {
            None
        };
        let other = second.as_ref().unwrap_or(&first);
        let carol = user("carol");
        let laptop = client(&first, &carol, "laptop").await;
        let phone = client(other, &carol, "phone").await;
        let mut tail = admin(&first).await.tail(None).await.unwrap();
        for device in [&laptop, &phone] {
            device
                .start_session(SessionOptions::default())
                .await
                .unwrap();
        }

        let changes = |device: PresenceClient, name: &'static str| async move {
            let mut versions = Vec::new();
            for round in 0..40 {
                let presence = device
                    .set_status(UserStatus::Online, format!("{name} {round}"))
                    .await
                    .unwrap()
                    .expect("the caller's presence");
                versions.push(presence.version);
            }
            versions
        };
        let (from_laptop, from_phone) = tokio::join!(
            changes(laptop.clone(), "laptop"),
            changes(phone.clone(), "phone")
        );
        let mut expected = Expected::default();
        for version in from_laptop.iter().chain(&from_phone) {
            expected.add(&carol, *version);
        }
        assert_eq!(
            expected.all().len(),
            80,
            "{what}: every accepted change has its own version"
        );

        let seen = tail_all(&mut tail, &expected, Duration::from_millis(500), what).await;
        seen.assert_no_repeat(what);
        seen.assert_in_order(what);
        drop(tail);
        if let Some(second) = second {
            second.stop().await;
        }
        first.stop().await;
    }
}

#[tokio::test]
async fn a_batch_a_vanished_member_never_acknowledged_goes_to_another_member() {
    for backend in backends() {
        let what = backend.name();
        let server = backend.start().await;
        let changers = Changers::start(&server, 1).await;
        let group = group_name("redelivery");
        let mut first = join_reading(&server, &group, "first", FeedStart::Latest, 3).await;
        assert!(matches!(next(&mut first).await, FeedUpdate::Assigned(_)));
        // The batch is read from the log after this, possibly well before
        // the test gets to look at it.
        let before_read = Instant::now();
        let expected = changers.change(8).await;

        let taken = next_batch(&mut first).await;
        let held: Vec<_> = taken.events.iter().map(change).collect();
        assert!(!held.is_empty(), "{what}: a batch holds changes");
        // Killed mid-batch: the stream goes without an ack.
        drop(first);

        let mut second = join_reading(&server, &group, "second", FeedStart::Latest, 3).await;
        let mut seen = Seen::default();
        let redelivered = loop {
            let batch = next_batch(&mut second).await;
            seen.record(&batch.events, &expected);
            assert!(second.ack(&batch).await);
            let changes: Vec<_> = batch.events.iter().map(change).collect();
            if changes.iter().any(|c| held.contains(c)) {
                assert_eq!(changes, held, "{what}: the same changes, same versions");
                break Instant::now();
            }
        };
        assert!(
            redelivered - before_read >= ACK_TIMEOUT,
            "{what}: redelivered after {:?}, before the ack timeout",
            redelivered - before_read
        );
        consume_into(&mut second, &expected, &mut seen, what).await;
        server.stop().await;
    }
}

/// A redelivered change comes before the newer changes of the same user,
/// as the proto promises ("a user's changes ... stay in version order").
#[tokio::test]
async fn a_redelivery_keeps_each_users_changes_in_order() {
    for backend in backends() {
        let what = backend.name();
        let server = backend.start().await;
        let changers = Changers::start(&server, 1).await;
        let group = group_name("redelivery-order");
        let mut first = join_reading(&server, &group, "first", FeedStart::Latest, 3).await;
        assert!(matches!(next(&mut first).await, FeedUpdate::Assigned(_)));
        let expected = changers.change(8).await;
        next_batch(&mut first).await;
        drop(first);

        let mut second = join_reading(&server, &group, "second", FeedStart::Latest, 3).await;
        let seen = consume_all(&mut second, &expected, what).await;
        seen.assert_in_order(what);
        server.stop().await;
    }
}

/// The next assignment `consumer` reports.
async fn next_assignment(consumer: &mut Consumer) -> presence_sdk::Assignment {
    loop {
        match next(consumer).await {
            FeedUpdate::Assigned(assignment) => return assignment,
            FeedUpdate::Batch(batch) => assert!(consumer.ack(&batch).await),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until `consumer` reports an assignment shared by `members`.
async fn assignment_among(consumer: &mut Consumer, members: u32) -> BTreeSet<u32> {
    loop {
        let assignment = next_assignment(consumer).await;
        if assignment.members == members {
            return assignment.partitions.into_iter().collect();
        }
    }
}

#[tokio::test]
async fn partitions_are_shared_when_a_member_joins_and_handed_back_when_it_leaves() {
    for backend in backends() {
        let what = backend.name();
        let server = backend.start().await;
        let group = group_name("rebalance");
        let mut first = join(&server, &group, "first", FeedStart::Latest).await;
        let alone = next_assignment(&mut first).await;
        assert_eq!(alone.members, 1, "{what}");
        let count = alone.partition_count;
        assert_eq!(alone.partitions, (0..count).collect::<Vec<_>>(), "{what}");

        let mut second = join(&server, &group, "second", FeedStart::Latest).await;
        let (mine, theirs) = tokio::join!(
            assignment_among(&mut first, 2),
            assignment_among(&mut second, 2)
        );
        assert!(!mine.is_empty() && !theirs.is_empty(), "{what}: both read");
        assert!(mine.is_disjoint(&theirs), "{what}: {mine:?} and {theirs:?}");
        assert_eq!(mine.len() + theirs.len(), usize::try_from(count).unwrap());

        drop(second);
        let back = assignment_among(&mut first, 1).await;
        assert_eq!(
            back,
            (0..count).collect(),
            "{what}: all back with the first"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn tail_and_new_groups_start_where_they_are_told() {
    for backend in backends() {
        let what = backend.name();
        let server = backend.start().await;
        let changers = Changers::start(&server, 2).await;
        let admin = admin(&server).await;
        let early = changers.change(3).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let since = SystemTime::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let middle = changers.change(3).await;

        let mut from_since = admin.tail(Some(since)).await.unwrap();
        let mut from_now = admin.tail(None).await.unwrap();
        let mut latest = join(&server, &group_name("latest"), "m", FeedStart::Latest).await;
        let mut oldest = join(&server, &group_name("oldest"), "m", FeedStart::Oldest).await;
        let mut timed = join(&server, &group_name("time"), "m", FeedStart::At(since)).await;
        let late = changers.change(3).await;

        let all = Expected::merged(&[&early, &middle, &late]);
        let after_since = Expected::merged(&[&middle, &late]);
        let not_before = |seen: &Seen, bound: &Expected, which: &str| {
            for (user, version) in &seen.0 {
                assert!(
                    *version > bound.max(user),
                    "{what}: {which} delivered {user} v{version}, older than its start"
                );
            }
        };
        let settle = Duration::from_millis(300);
        let seen = tail_all(&mut from_since, &after_since, settle, what).await;
        not_before(&seen, &early, "tail from a time");
        let seen = tail_all(&mut from_now, &late, settle, what).await;
        not_before(&seen, &middle, "tail from now");

        let seen = consume_all(&mut latest, &late, what).await;
        not_before(&seen, &middle, "a group from latest");
        let seen = consume_all(&mut timed, &after_since, what).await;
        not_before(&seen, &early, "a group from a time");
        let seen = consume_all(&mut oldest, &all, what).await;
        seen.assert_in_order(what);
        for user in early.users() {
            let first = early.0[user].first().copied().unwrap_or_default();
            assert!(
                seen.0.iter().any(|(u, v)| u == user && *v == first),
                "{what}: a group from the oldest sees the early changes"
            );
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_group_that_never_acknowledges_does_not_slow_presence() {
    for backend in backends() {
        let what = backend.name();
        let server = backend.start().await;
        let changers = Changers::start(&server, 4).await;
        let (alice, bob) = (user("alice"), user("bob"));
        befriend(&server, &alice, &[&bob]).await;
        let watcher = client(&server, &alice, "alice-laptop").await;
        let mut watch = ContactWatch::open(&watcher, &bob).await;
        let bob_device = client(&server, &bob, "bob-phone").await;
        bob_device
            .start_session(SessionOptions::default())
            .await
            .unwrap();

        let options = ConsumeOptions {
            max_batch: 1,
            ack_timeout: Duration::from_secs(3600),
            ..ConsumeOptions::new(group_name("stuck"))
        };
        let mut stuck = admin(&server).await.consume(options).await.unwrap();
        changers.change(1).await;
        next_batch(&mut stuck).await;

        for round in 0..20 {
            // The log grows behind the stuck group meanwhile.
            changers.change(5).await;
            let changed_at = Instant::now();
            let version = bob_device
                .set_status(UserStatus::Online, format!("round {round}"))
                .await
                .unwrap()
                .expect("bob's presence")
                .version;
            tokio::time::timeout(VISIBLE_WITHIN, async {
                while let Some(update) = watch.updates.next().await {
                    if let PresenceUpdate::Presence(p) = update.unwrap()
                        && p.user_id == bob
                        && p.version >= version
                    {
                        return;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: round {round} not seen within {VISIBLE_WITHIN:?} ({:?})",
                    changed_at.elapsed()
                )
            });
        }
        drop(stuck);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_consumer_moves_on_when_its_node_drains_and_misses_nothing() {
    // One node holds the embedded log: there is nowhere to move to.
    for backend in backends().into_iter().filter(Backend::is_real) {
        let what = backend.name();
        let (draining, staying) = (backend.start().await, backend.start().await);
        let changers = Changers::start(&staying, 3).await;
        let admin = PresenceClient::connect(presence_sdk::ClientConfig {
            endpoints: vec![draining.url(), staying.url()],
            token: Some(admin_token()),
            backoff: presence_sdk::Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                factor: 2.0,
            },
            ..presence_sdk::ClientConfig::default()
        })
        .await
        .unwrap();
        let options = ConsumeOptions {
            consumer: "mover".into(),
            ack_timeout: ACK_TIMEOUT,
            ..ConsumeOptions::new(group_name("mover"))
        };
        let mut consumer = admin.consume(options).await.unwrap();
        let before = changers.change(10).await;
        // Read and never acknowledged on the draining node.
        next_batch(&mut consumer).await;
        draining.stop().await;
        let after = changers.change(10).await;

        let mut reconnected = false;
        let expected = Expected::merged(&[&before, &after]);
        let mut seen = Seen::default();
        while !seen.has_all(&expected) {
            match next(&mut consumer).await {
                FeedUpdate::Reconnecting { .. } => reconnected = true,
                FeedUpdate::Assigned(_) => {}
                FeedUpdate::Batch(batch) => {
                    seen.record(&batch.events, &expected);
                    // False for a batch the draining node sent just before
                    // it ended the stream: that one comes again.
                    consumer.ack(&batch).await;
                }
            }
        }
        assert!(reconnected, "{what}: the consumer said it reconnected");
        staying.stop().await;
    }
}

/// A member that has nothing to acknowledge sends nothing: its stream must
/// not be held to the deadline of unary request bodies.
#[tokio::test]
async fn a_quiet_member_outlives_the_request_body_timeout() {
    let server = TestServer::start_with(&["--request-body-timeout", "1s"]).await;
    let options = ConsumeOptions {
        ack_timeout: ACK_TIMEOUT,
        ..ConsumeOptions::new(group_name("quiet"))
    };
    let mut consumer = admin(&server).await.consume(options).await.unwrap();
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while let Ok(update) = tokio::time::timeout_at(quiet_until.into(), consumer.next()).await {
        match update.expect("the consumer goes on").expect("no error") {
            FeedUpdate::Reconnecting { reason, .. } => panic!("the stream broke: {reason}"),
            FeedUpdate::Assigned(_) | FeedUpdate::Batch(_) => {}
        }
    }
    server.stop().await;
}
