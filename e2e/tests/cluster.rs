//! Several real `presence-server` processes on one real Redis Cluster: changes
//! cross nodes, a killed node leaves no ghost, a draining node hands its
//! clients over, and the service survives a Redis master failover and a Redis
//! restart that lost every key.
//!
//! Needs `PRESENCE_TEST_REDIS_CLUSTER` (see `support/nodes.rs`); without it
//! every test prints a note and passes, unless `PRESENCE_REQUIRE_BACKENDS=1`.
//! The tests share the cluster and two of them disturb it (failover, restart),
//! so they run one at a time, in any order.

#[path = "support/nodes.rs"]
mod nodes;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nodes::{
    NODE_LEASE, RedisCluster, ServerNode, node_config, redis_cluster, serial, start_nodes,
};
use presence_proto::v1 as pb;
use presence_proto::v1::change_feed_client::ChangeFeedClient;
use presence_sdk::{
    Activity, Backoff, ClientConfig, OfflineReason, PresenceClient, PresenceUpdate, SessionOptions,
    SessionState, UserStatus, VisibleStatus,
};
use presence_server::store::redis::keys;
use support::{
    BeatingSession, ContactWatch, Interruptions, PROJECTED_WITHIN, RawSession, VISIBLE_WITHIN,
    admin_token, authed, token, user,
};

/// How long a node's fan-out may take to notice subscriptions Redis dropped
/// without telling (its probe round, every 10 s) and to refill its watchers.
const FANOUT_REPAIRED_WITHIN: Duration = Duration::from_secs(13);

/// The cluster, healthy, with the test holding it; `None` if not configured.
async fn setup() -> Option<(RedisCluster, tokio::sync::MutexGuard<'static, ()>)> {
    let cluster = redis_cluster()?;
    let guard = serial().await;
    // A test before this one may have failed over or restarted the cluster.
    script(&cluster, &["wait", "30"]).await;
    Some((cluster, guard))
}

/// An SDK client for `user` on `device`, going to `nodes` in this order.
async fn client_on(nodes: &[&ServerNode], user: &str, device: &str) -> PresenceClient {
    client_with_token(nodes, token(user), device).await
}

async fn client_with_token(nodes: &[&ServerNode], token: String, device: &str) -> PresenceClient {
    PresenceClient::connect(ClientConfig {
        endpoints: nodes.iter().map(|n| n.url()).collect(),
        token: Some(token),
        device_id: device.to_owned(),
        platform: presence_sdk::Platform::Desktop,
        request_timeout: Duration::from_secs(8),
        // Quick reconnects: the tests measure the server, not the backoff.
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            factor: 2.0,
        },
        ..ClientConfig::default()
    })
    .await
    .unwrap()
}

/// An admin SDK client (any user's presence and history).
async fn admin_on(node: &ServerNode) -> PresenceClient {
    client_with_token(&[node], admin_token(), "ops-console").await
}

/// Links `user` with `contacts` through the admin API of `node`.
async fn befriend_via(node: &ServerNode, user: &str, contacts: &[&str]) {
    let added = admin_on(node)
        .await
        .add_contacts(user, contacts)
        .await
        .unwrap();
    assert!(added <= contacts.len() as u32);
}

/// Alice, a client of `node`, watching her one contact, `bob`.
async fn alice_watching(node: &ServerNode, bob: &str) -> (PresenceClient, ContactWatch) {
    let alice = user("alice");
    befriend_via(node, &alice, &[bob]).await;
    let watcher = client_on(&[node], &alice, "alice-laptop").await;
    let watch = ContactWatch::open(&watcher, bob).await;
    (watcher, watch)
}

/// Bob's phone on `node`, with a session `watch` has seen come online.
async fn bob_online(node: &ServerNode, watch: &mut ContactWatch) -> (PresenceClient, pb::Presence) {
    let phone = client_on(&[node], &watch.contact, "bob-phone").await;
    phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let online = watch.sees(VisibleStatus::Online).await;
    (phone, online)
}

/// Reads `updates` for `span`, failing on any OFFLINE presence of `user`;
/// returns what arrived for `user`.
async fn assert_never_offline<S>(updates: &mut S, user: &str, span: Duration) -> Vec<pb::Presence>
where
    S: futures::Stream<Item = Result<PresenceUpdate, presence_sdk::Error>> + Unpin,
{
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(span, async {
        while let Some(update) = updates.next().await {
            if let PresenceUpdate::Presence(p) = update.unwrap()
                && p.user_id == user
            {
                assert_ne!(
                    p.status(),
                    VisibleStatus::Offline,
                    "{user} flickered offline: {p:?}"
                );
                seen.push(p);
            }
        }
    })
    .await;
    seen
}

/// Like `wait_for`, but tells on timeout everything the watch did meanwhile
/// (reconnects, removals, other presences).
async fn next_matching<S>(
    updates: &mut S,
    user: &str,
    within: Duration,
    wanted: impl Fn(&pb::Presence) -> bool,
) -> pb::Presence
where
    S: futures::Stream<Item = Result<PresenceUpdate, presence_sdk::Error>> + Unpin,
{
    let started = Instant::now();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(within, async {
        while let Some(update) = updates.next().await {
            match update {
                Ok(PresenceUpdate::Presence(p)) if p.user_id == user && wanted(&p) => {
                    return Some(p);
                }
                other => seen.push(format!("{:?} {other:?}", started.elapsed())),
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(presence)) => presence,
        Ok(None) => panic!("the watch ended; it delivered {seen:?}"),
        Err(_) => {
            panic!("no matching presence of {user} within {within:?}; the watch delivered {seen:?}")
        }
    }
}

/// Runs the cluster script off the async threads.
async fn script(cluster: &RedisCluster, args: &[&str]) -> String {
    let cluster = cluster.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        cluster.script(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

/// Retries `call` until it succeeds, at most `within`; returns the value and
/// how long it took.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut call: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match tokio::time::timeout(Duration::from_secs(3), call()).await {
            Ok(Ok(value)) => return (value, started.elapsed()),
            Ok(Err(error)) => last = error,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {within:?} (last: {last})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_one_node_sees_a_device_on_another_come_online_change_and_go_offline() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    let nodes = start_nodes(&cluster, "cross-node-changes", &["node1", "node2", "node3"]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let (alice, bob) = (user("alice"), user("bob"));
    befriend_via(n3, &alice, &[&bob]).await;

    let watcher = client_on(&[n1], &alice, "alice-laptop").await;
    let mut watch = ContactWatch::open(&watcher, &bob).await;
    assert_eq!(watch.snapshot.len(), 1);
    assert_eq!(watch.snapshot[0].status(), VisibleStatus::Offline);

    let phone = client_on(&[n2], &bob, "bob-phone").await;
    let mut latencies = Vec::new();

    let started = Instant::now();
    phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let online = watch.sees(VisibleStatus::Online).await;
    latencies.push(("online", started.elapsed()));
    assert!(online.version > 0);
    assert!(online.devices.is_empty(), "contacts never see devices");

    let started = Instant::now();
    phone.set_activity(Activity::Idle).unwrap();
    let idle = watch.sees(VisibleStatus::Idle).await;
    latencies.push(("idle", started.elapsed()));
    assert!(idle.version > online.version);

    let started = Instant::now();
    phone
        .set_status(UserStatus::Busy, "on node 2")
        .await
        .unwrap();
    let busy = watch.sees(VisibleStatus::Busy).await;
    latencies.push(("busy", started.elapsed()));
    assert_eq!(busy.custom_message, "on node 2");
    assert!(busy.version > idle.version);

    let started = Instant::now();
    phone.end_session().await.unwrap();
    let offline = watch.sees(VisibleStatus::Offline).await;
    latencies.push(("offline", started.elapsed()));
    assert_eq!(offline.offline_reason(), OfflineReason::Logout);
    assert!(offline.version > busy.version);

    println!(
        "cross-node change-to-watcher latency (bob on node 2 -> alice on node 1, incl. the call): {}",
        latencies
            .iter()
            .map(|(what, took)| format!("{what} {took:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (what, took) in &latencies {
        assert!(*took <= VISIBLE_WITHIN, "FR4: {what} took {took:?}");
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_contact_added_through_a_third_node_joins_open_watches() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    let nodes = start_nodes(&cluster, "contact-added", &["node1", "node2", "node3"]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let (alice, bob) = (user("alice"), user("bob"));

    let bob_device = client_on(&[n2], &bob, "bob-desktop").await;
    bob_device
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    let watcher = client_on(&[n1], &alice, "alice-laptop").await;
    let mut watch = ContactWatch::open(&watcher, &bob).await;
    assert!(watch.snapshot.is_empty(), "no contacts yet");

    let started = Instant::now();
    befriend_via(n3, &alice, &[&bob]).await;
    let joined = watch.sees(VisibleStatus::Online).await;
    println!(
        "contact added on node 3 reached the watch on node 1 in {:?}",
        started.elapsed()
    );
    assert!(joined.version > 0);

    let started = Instant::now();
    bob_device.set_activity(Activity::Idle).unwrap();
    watch.sees(VisibleStatus::Idle).await;
    bob_device
        .set_status(UserStatus::Busy, "joined")
        .await
        .unwrap();
    let busy = watch.sees(VisibleStatus::Busy).await;
    assert_eq!(busy.custom_message, "joined");
    println!(
        "bob's two changes on node 2 reached alice on node 1 in {:?}",
        started.elapsed()
    );
    assert_eq!(
        watcher.get_one(&bob).await.unwrap().status(),
        VisibleStatus::Busy
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_leaves_no_ghost_online() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    let mut nodes = start_nodes(&cluster, "killed-node", &["node1", "node2"]).await;
    let bound = node_config(&cluster).staleness_bound();
    let bob = user("bob");
    let (watcher, mut watch) = alice_watching(&nodes[0], &bob).await;

    let session = BeatingSession::open(nodes[1].url(), &bob, "bob-phone").await;
    watch.sees(VisibleStatus::Online).await;
    // Let a few beats and node lease renewals go by.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let killed = Instant::now();
    nodes[1].kill();
    let offline = watch
        .sees_within(VisibleStatus::Offline, bound + VISIBLE_WITHIN)
        .await;
    let took = killed.elapsed();
    println!(
        "node 2 killed: bob offline (NODE_LOST) for alice after {took:?}; staleness bound {bound:?}"
    );
    assert_eq!(offline.offline_reason(), OfflineReason::NodeLost);
    assert!(
        took <= bound + Duration::from_secs(1),
        "within the staleness bound {bound:?} (+1 s): {took:?}"
    );
    // The dead node renewed its lease at most a third of it before dying, so
    // the lease cannot have run out sooner than two thirds of it after.
    let earliest = NODE_LEASE * 2 / 3 - Duration::from_millis(50);
    assert!(
        took >= earliest,
        "not before the node lease could run out ({earliest:?}): {took:?}"
    );
    drop(session);

    let now = watcher.get_one(&bob).await.unwrap();
    assert_eq!(now.status(), VisibleStatus::Offline, "no ghost online");
    assert_eq!(now.offline_reason(), OfflineReason::NodeLost);
    eventually(PROJECTED_WITHIN, "NODE_LOST in bob's history", || async {
        let history: Vec<pb::HistoryEntry> = watcher
            .get_history(&bob, None, None)
            .map(Result::unwrap)
            .collect()
            .await;
        let last = history
            .last()
            .map(|last| (last.status(), last.offline_reason(), last.version));
        match last {
            Some(last)
                if last
                    == (
                        VisibleStatus::Offline,
                        OfflineReason::NodeLost,
                        offline.version,
                    ) =>
            {
                Ok(())
            }
            _ => Err(format!("history: {history:?}")),
        }
    })
    .await;
    watch.assert_quiet(Duration::from_millis(300)).await;
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_node_hands_its_clients_over_without_offline_flicker() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    let mut nodes = start_nodes(&cluster, "draining-node", &["node1", "node2", "node3"]).await;
    let bob = user("bob");
    let (watcher, mut watch) = alice_watching(&nodes[0], &bob).await;

    let phone = client_on(&[&nodes[1], &nodes[2]], &bob, "bob-phone").await;
    let state = phone.session_state();
    phone
        .start_session(SessionOptions::default())
        .await
        .unwrap();
    watch.sees(VisibleStatus::Online).await;
    let on = |state: &SessionState| match state {
        SessionState::Connected { endpoint, .. } => Some(endpoint.trim_end_matches('/').to_owned()),
        _ => None,
    };
    assert_eq!(
        on(&state.borrow()),
        Some(nodes[1].url()),
        "bob starts on node 2"
    );

    let sigterm = Instant::now();
    nodes[1].terminate();
    let mut moved = state.clone();
    let third = nodes[2].url();
    let seen = assert_never_offline(&mut watch.updates, &bob, Duration::from_secs(3)).await;
    assert!(
        tokio::time::timeout(
            Duration::from_secs(1),
            moved.wait_for(|s| on(s).as_deref() == Some(&third))
        )
        .await
        .is_ok(),
        "bob's session moved to node 3: {:?}",
        *state.borrow()
    );
    println!(
        "node 2 drained: bob's session reopened on node 3; alice saw {} events for bob, none offline",
        seen.len()
    );

    let now = watcher.get_one(&bob).await.unwrap();
    assert_eq!(
        now.status(),
        VisibleStatus::Online,
        "bob stays online: {now:?}"
    );
    let status = nodes[1].wait_exit(Duration::from_secs(10)).await;
    println!("node 2 exited {:?} after SIGTERM", sigterm.elapsed());
    assert!(
        status.is_some_and(|s| s.success()),
        "node 2 drains and exits cleanly: {status:?}"
    );
    assert!(
        nodes[1].log_text().contains("drained"),
        "node 2 logged its drain"
    );

    // The session lives on node 3 now: a change there still reaches alice.
    phone.set_activity(Activity::Idle).unwrap();
    watch.sees(VisibleStatus::Idle).await;
    drop(nodes);
}

/// Restarts a killed Redis node however the test ends, so the cluster is whole
/// for the tests after.
struct RestartNode {
    cluster: RedisCluster,
    port: u16,
}

impl Drop for RestartNode {
    fn drop(&mut self) {
        let port = self.port.to_string();
        // A panic here while unwinding would abort; report instead.
        let restarted = std::panic::catch_unwind(|| self.cluster.script(&["restart-node", &port]));
        if restarted.is_err() {
            eprintln!("could not restart redis node {port}; the cluster is missing a node");
        }
    }
}

/// A unique consumer group name.
fn unique_group(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

/// What a consumer group received.
#[derive(Default)]
struct Consumed {
    /// (user, version) to the custom message of every change received.
    changes: HashMap<(String, u64), String>,
    /// Changes received twice with different contents.
    conflicts: Vec<String>,
}

/// Consumes `group` (new, from now on) on `node` in the background,
/// acknowledging every batch, until the test ends.
async fn consume_all(node: &ServerNode, group: &str) -> Arc<parking_lot::Mutex<Consumed>> {
    let mut client = ChangeFeedClient::connect(node.url()).await.unwrap();
    let (requests, outgoing) = tokio::sync::mpsc::channel(16);
    requests
        .send(pb::ConsumeRequest {
            request: Some(pb::consume_request::Request::Start(pb::ConsumeStart {
                group: group.to_owned(),
                ack_timeout_ms: 2_000,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut responses = client
        .consume(authed(
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
            &admin_token(),
        ))
        .await
        .expect("Consume opens")
        .into_inner();
    // The first assignment: the member reads its partitions from now on.
    match responses.message().await.unwrap() {
        Some(pb::ConsumeResponse {
            response: Some(pb::consume_response::Response::Assignment(_)),
        }) => {}
        other => panic!("expected an assignment first, got {other:?}"),
    }
    let consumed = Arc::new(parking_lot::Mutex::new(Consumed::default()));
    let seen = consumed.clone();
    tokio::spawn(async move {
        while let Ok(Some(response)) = responses.message().await {
            let Some(pb::consume_response::Response::Batch(batch)) = response.response else {
                continue;
            };
            for presence in batch.events.into_iter().filter_map(|e| e.presence) {
                let key = (presence.user_id.clone(), presence.version);
                let mut seen = seen.lock();
                let earlier = seen.changes.insert(key, presence.custom_message.clone());
                if earlier.is_some_and(|earlier| earlier != presence.custom_message) {
                    seen.conflicts.push(format!("{presence:?}"));
                }
            }
            let ack = pb::ConsumeRequest {
                request: Some(pb::consume_request::Request::Ack(pb::ConsumeAck {
                    batch_id: batch.batch_id,
                })),
            };
            if requests.send(ack).await.is_err() {
                return;
            }
        }
    });
    consumed
}

/// What one writer's acknowledged and failed status changes were.
#[derive(Debug, Default)]
struct Written {
    /// Every acknowledged change (its message) and when, in order.
    acked: Vec<(String, Instant)>,
    /// The last acknowledged change (its message).
    last_acked: Option<String>,
    /// Changes after the last acknowledged one that failed: they may or may
    /// not have been applied.
    unsure: Vec<String>,
    acks: u64,
    errors: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_over_redis_master_leaves_the_service_answering() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    // Changes are acknowledged once a replica holds them: without that,
    // what the master acknowledged in its last moment may be lost with it.
    let wait = [("--redis-wait-replicas", "1".to_owned())];
    let nodes = futures::future::join_all(
        ["node1", "node2"]
            .map(|name| ServerNode::start_with(&cluster, "redis-failover", name, None, &wait)),
    )
    .await;
    let (n1, n2) = (&nodes[0], &nodes[1]);

    // The master we kill holds the node leases (the `{nodes}` slot), the
    // most consequential one, and the records of the writers.
    let victim = cluster.master_of_slot(keys::slot_of(keys::node_registry().as_bytes()));
    assert!(cluster.is_master(victim), "{victim} is a master");
    let mut writers = Vec::new();
    while writers.len() < 4 {
        let candidate = user("writer");
        if cluster.master_of_slot(keys::Keys::new(16).user_slot(&candidate)) == victim {
            writers.push(candidate);
        }
    }
    // Each writer has a session (on node 1), so its status and message show.
    let mut clients = Vec::new();
    for writer in &writers {
        let client = client_on(&[n1], writer, "worker").await;
        client
            .start_session(SessionOptions::default())
            .await
            .unwrap();
        clients.push(client);
    }
    // An observer: bob's session on node 2 as alice on node 1 sees it.
    let bob = user("bob");
    let (watcher, mut watch) = alice_watching(n1, &bob).await;
    let (phone, _) = bob_online(n2, &mut watch).await;
    // Bob's device keeps its session stream to node 2 (heartbeats need no
    // Redis): any reconnect is noted.
    let reconnects = Interruptions::watch(&phone);
    // Read all the time, so that the server has nothing to coalesce away.
    let observed = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let observer = {
        let (observed, bob) = (observed.clone(), bob.clone());
        tokio::spawn(async move {
            while let Some(update) = watch.updates.next().await {
                match update {
                    Ok(PresenceUpdate::Presence(p)) if p.user_id == bob => {
                        observed.lock().push(format!(
                            "{:?}/{:?} v{}",
                            p.status(),
                            p.offline_reason(),
                            p.version
                        ));
                    }
                    Ok(PresenceUpdate::Presence(_)) => {}
                    other => observed.lock().push(format!("{other:?}")),
                }
            }
        })
    };

    // A consumer group reads the change log on node 2 through the failover.
    let consumed = consume_all(n2, &unique_group("failover")).await;

    // Traffic: each writer changes its status in a loop, one call at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let traffic: Vec<_> = writers
        .iter()
        .zip(clients.iter().cloned())
        .map(|(writer, client)| {
            let (writer, stop, acks) = (writer.clone(), stop.clone(), acks.clone());
            tokio::spawn(async move {
                let mut written = Written::default();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let message = format!("{writer} change {i}");
                    match client.set_status(UserStatus::Busy, &message).await {
                        Ok(_) => {
                            written.acked.push((message.clone(), Instant::now()));
                            written.last_acked = Some(message);
                            written.unsure.clear();
                            written.acks += 1;
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            written.unsure.push(message);
                            written.errors += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                written
            })
        })
        .collect();
    let warm = tokio::time::timeout(Duration::from_secs(10), async {
        while acks.load(Ordering::Relaxed) < 100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(
        warm.await.is_ok(),
        "100 status changes within 10 s before the failover"
    );

    // However the test ends, the killed node comes back (as a replica).
    let _restart = RestartNode {
        cluster: cluster.clone(),
        port: victim,
    };
    let killed = Instant::now();
    script(&cluster, &["kill-master", &victim.to_string()]).await;
    // A little traffic against the dead master, then stop writing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for task in traffic {
        written.push(task.await.unwrap());
    }
    script(&cluster, &["wait", "30"]).await;
    println!(
        "killed master {victim}; failover done after {:?}; before/at the kill: {} acks, {} errors",
        killed.elapsed(),
        written.iter().map(|w| w.acks).sum::<u64>(),
        written.iter().map(|w| w.errors).sum::<u64>()
    );

    // Every change acknowledged before the kill survived the failover.
    let admin = admin_on(n1).await;
    let (after, took) = eventually(
        Duration::from_secs(15),
        "GetPresence after the failover",
        || async {
            admin
                .get_presence(&writers)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    println!("GetPresence answered {took:?} after the failover");
    let survived = |presence: &pb::Presence, w: &Written| {
        let shown = &presence.custom_message;
        presence.status() == VisibleStatus::Busy
            && (Some(shown) == w.last_acked.as_ref() || w.unsure.contains(shown))
    };
    for ((writer, w), presence) in writers.iter().zip(&written).zip(&after) {
        assert!(w.last_acked.is_some(), "{writer} got acks before the kill");
        if !survived(presence, w) {
            // Told apart below: a change lost, or a live session wrongly
            // ended for a while (then re-asserted by its node).
            println!(
                "{writer} right after the failover: {presence:?}; acknowledged {:?}",
                w.last_acked
            );
        }
    }
    let (after, _) = eventually(Duration::from_secs(5), "the acknowledged changes", || async {
        let after = admin.get_presence(&writers).await.map_err(|e| e.to_string())?;
        match writers.iter().zip(&written).zip(&after).find(|((_, w), p)| !survived(p, w)) {
            None => Ok(after),
            Some(((writer, w), p)) => Err(format!(
                "{writer} shows {:?} {:?}, but {:?} was acknowledged (later unacknowledged: {:?})",
                p.status(),
                p.custom_message,
                w.last_acked,
                w.unsure
            )),
        }
    })
    .await;
    assert_eq!(after.len(), writers.len());

    // Changes are accepted again, on both nodes, without restarting them, and
    // the last acknowledged one is what everyone reads.
    for (writer, client) in writers.iter().zip(&clients) {
        let message = format!("{writer} after the failover");
        let (_, took) = eventually(
            Duration::from_secs(15),
            "SetStatus after the failover",
            || async {
                client
                    .set_status(UserStatus::Busy, &message)
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await;
        println!(
            "{writer}: SetStatus accepted again ({took:?} of retrying, {:?} after the kill)",
            killed.elapsed()
        );
    }
    let shows_the_last_changes =
        |shown: Vec<pb::Presence>| match writers.iter().zip(shown).find(|(writer, presence)| {
            presence.status() != VisibleStatus::Busy
                || presence.custom_message != format!("{writer} after the failover")
        }) {
            None => Ok(()),
            Some((writer, presence)) => Err(format!("{writer} shows {presence:?}")),
        };
    // The node that acknowledged the changes shows them at once, even if it
    // took them while it took Redis for down and has not replayed them yet.
    let shown = admin_on(n1).await.get_presence(&writers).await.unwrap();
    if let Err(stale) = shows_the_last_changes(shown) {
        panic!("node 1 acknowledged a change it does not show: {stale}");
    }
    // Another node reads Redis, which has them once node 1 replayed them (a
    // failover may have lost the last writes the old master acknowledged).
    let admin2 = admin_on(n2).await;
    let (_, took) = eventually(
        VISIBLE_WITHIN,
        "node 2 showing the last changes",
        || async {
            shows_the_last_changes(
                admin2
                    .get_presence(&writers)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        },
    )
    .await;
    println!("node 2 showed the last changes after {took:?}");

    // The change log: every acknowledged change reached the consumer group,
    // and a change that came twice came with the same version. Those
    // acknowledged before the kill were held by a replica; those
    // acknowledged after it were taken the degraded way (Redis did not
    // answer in time), and each is an event of its own in the replay.
    let in_feed = |message: &str| {
        consumed
            .lock()
            .changes
            .values()
            .any(|consumed| consumed == message)
    };
    let (_, took) = eventually(
        PROJECTED_WITHIN,
        "every acknowledged change in the change feed",
        || async {
            let mut missing: Vec<String> = written
                .iter()
                .flat_map(|w| &w.acked)
                .filter(|(message, _)| !in_feed(message))
                .map(|(message, at)| match at.checked_duration_since(killed) {
                    Some(after) => format!("{message} (acknowledged {after:?} after the kill)"),
                    None => format!(
                        "{message} (acknowledged {:?} before the kill)",
                        killed - *at
                    ),
                })
                .collect();
            missing.extend(
                writers
                    .iter()
                    .map(|writer| format!("{writer} after the failover"))
                    .filter(|message| !in_feed(message)),
            );
            match missing.first() {
                None => Ok(()),
                Some(first) => Err(format!("{} missing, e.g. {first:?}", missing.len())),
            }
        },
    )
    .await;
    let degraded = written
        .iter()
        .flat_map(|w| &w.acked)
        .filter(|(_, at)| *at >= killed)
        .count();
    println!(
        "the change feed held every acknowledged change ({took:?}), {degraded} of them acknowledged while the master was gone"
    );
    assert_eq!(consumed.lock().conflicts, Vec::<String>::new());

    // Bob's session on node 2 is still there for alice, and never seemed
    // gone: a Redis failover is no reason for a live node's users to go
    // offline, nor for a device to lose its session stream.
    tokio::time::sleep(NODE_LEASE).await;
    let bob_now = watcher.get_one(&bob).await.unwrap();
    observer.abort();
    let observed = observed.lock().clone();
    let reconnects = reconnects.seen();
    println!("alice's watch on node 1 during the failover, about bob on node 2: {observed:?}");
    println!("bob's device session during the failover: {reconnects:?}");
    let mut problems = Vec::new();
    if bob_now.status() != VisibleStatus::Online {
        problems.push(format!(
            "bob's device is connected to node 2, but alice reads {bob_now:?}"
        ));
    }
    if observed.iter().any(|event| event.starts_with("Offline")) {
        let reclaims = |node: &ServerNode| {
            node.log_text()
                .lines()
                .filter(|l| {
                    l.contains("node lost, ending its sessions") && l.contains("redis-failover-")
                })
                .count()
        };
        problems.push(format!(
            "bob, whose session on node 2 never ended, flickered offline while Redis failed over: {observed:?} \
             (node 1 took a live node of this test for lost {} times, node 2 {} times)",
            reclaims(n1),
            reclaims(n2)
        ));
    }
    if !reconnects.is_empty() {
        problems.push(format!(
            "bob's device had to reconnect to node 2, which never went away, while Redis failed over: {reconnects:?}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_is_rebuilt_after_redis_restarts_empty() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    let nodes = start_nodes(&cluster, "redis-restart-empty", &["node1", "node2"]).await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let bob = user("bob");
    let (_watcher, mut watch) = alice_watching(n1, &bob).await;
    let (phone, before) = bob_online(n2, &mut watch).await;
    let mut session = phone.session_state();
    session.mark_unchanged();

    let restarting = cluster.clone();
    let restart = tokio::task::spawn_blocking(move || restarting.try_script(&["restart-empty"]))
        .await
        .unwrap();
    // The script checks that the cluster came back with no keys, but the
    // nodes under test write theirs (node leases, re-asserted sessions) as
    // soon as it serves again, which may be before that check.
    if let Err(failure) = restart {
        assert!(
            failure.contains("cluster restarted with") && failure.contains("keys, expected none"),
            "redis-cluster.sh restart-empty failed: {failure}"
        );
        println!(
            "note: the presence nodes wrote to the cluster before restart-empty counted its keys"
        );
    }
    let restarted = Instant::now();
    let admin = admin_on(n1).await;
    // Until node 2 re-asserts bob's session, a read may be answered from the
    // history (its write buffer still holds bob's last row): ONLINE at the
    // version before. The rebuilt record is a new change, a newer version.
    let (rebuilt, took) = eventually(
        NODE_LEASE * 4,
        "bob ONLINE again after the restart, rebuilt",
        || async {
            match admin.get_one(&bob).await {
                Ok(p) if p.status() == VisibleStatus::Online && p.version > before.version => Ok(p),
                Ok(p) => Err(format!("{:?} v{}", p.status(), p.version)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    println!("bob ONLINE again through node 1 {took:?} after Redis came back empty");

    // The watch on node 1 learns it through the fan-out, whose subscriptions
    // the restart dropped: a node notices a lost channel at once when Redis
    // says so, else at its next probe round (every 10 s), then reads again
    // what its watchers watch.
    let seen = next_matching(&mut watch.updates, &bob, FANOUT_REPAIRED_WITHIN, |p| {
        p.status() == VisibleStatus::Online && p.version > before.version
    })
    .await;
    let took = restarted.elapsed();
    println!("alice's watch saw bob online again {took:?} after the restart");
    if took > VISIBLE_WITHIN {
        println!(
            "note: that is longer than FR4's {VISIBLE_WITHIN:?}: node 1's fan-out was repaired by its periodic probe"
        );
    }
    assert!(
        seen.version >= rebuilt.version,
        "{seen:?} after {rebuilt:?}"
    );
    // It was node 2 that put bob back: his device's session stream never
    // broke (heartbeats need no Redis), so it did not reopen the session.
    assert!(
        !session.has_changed().unwrap(),
        "bob's device had to reconnect to node 2, which never went away, while Redis restarted: now {:?}",
        *session.borrow()
    );
    drop(nodes);
}

/// How a raw stream ends, waiting at most `within`.
async fn stream_end(session: &mut RawSession, within: Duration) -> tonic::Status {
    tokio::time::timeout(within, async {
        loop {
            match session.inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the old stream was not ended")
}

#[tokio::test]
async fn a_device_taken_over_or_logged_out_through_another_node_ends_its_old_stream() {
    let Some((cluster, _serial)) = setup().await else {
        return;
    };
    let nodes = start_nodes(&cluster, "device-taken", &["node1", "node2"]).await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let stub = |node: &ServerNode| {
        let url = node.url();
        async move {
            pb::presence_service_client::PresenceServiceClient::connect(url)
                .await
                .unwrap()
        }
    };
    let bob = user("bob");

    // The device reconnects through node 2 while its stream on node 1 lives.
    let mut old = RawSession::open(stub(n1).await, &bob, "phone").await;
    let _new = RawSession::open(stub(n2).await, &bob, "phone").await;
    // Well within the old stream's lease, which alone would end it too.
    let status = stream_end(&mut old, Duration::from_secs(1)).await;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("newer connection"), "{status:?}");

    // The device logs out through node 1 while its stream lives on node 2.
    let mut stream = RawSession::open(stub(n2).await, &bob, "tablet").await;
    stub(n1)
        .await
        .disconnect(authed(
            pb::DisconnectRequest {
                device_id: "tablet".into(),
            },
            &token(&bob),
        ))
        .await
        .unwrap();
    let status = stream_end(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
}
