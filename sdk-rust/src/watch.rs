//! Watching presence: a resumable `WatchContacts` stream with version
//! filtering, and a map to fold its events into.
//!
//! The stream is a plain state machine polled by its consumer (no background
//! task, no channel): dropping it cancels the RPC at once, and a slow consumer
//! slows the reading of the HTTP/2 stream, so the server's coalescing (latest
//! state per user) takes over instead of a buffer growing on either side.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use presence_proto::v1::{Presence, PresenceEvent, WatchContactsRequest, presence_event};
use tonic::codec::Streaming;

use crate::connector::Connector;
use crate::reconnect::Reconnects;
use crate::{Backoff, Error};

/// One thing a watch reports. Fold them into a [`PresenceMap`], or match on
/// them directly.
///
/// Order on a fresh watch: one `Presence` per watched user (the snapshot),
/// `SnapshotComplete`, then `Presence` and `ContactRemoved` as things change.
/// If the connection breaks: `Reconnecting` (once per failed attempt), then
/// `Presence` for each user that changed meanwhile, then `Resumed`.
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceUpdate {
    /// A watched user's presence, newer than anything this stream delivered
    /// for that user before. Never a duplicate, never older: the SDK drops
    /// any presence whose version is not greater than the last one it
    /// delivered for the user, including across reconnects.
    Presence(Presence),
    /// The first snapshot is complete: every watched user has been reported
    /// once. Sent once per [`PresenceStream`]; after a reconnect the end of
    /// the catch-up is reported as [`PresenceUpdate::Resumed`] instead.
    SnapshotComplete {
        /// How many users the stream watches.
        watched: u32,
    },
    /// A user is no longer watched (the contact was removed); forget them.
    ContactRemoved {
        /// The user no longer watched.
        user_id: String,
    },
    /// The stream broke and the SDK is reconnecting (after a backoff delay).
    /// Presence held until the next `Resumed` may be stale.
    Reconnecting {
        /// 1 for the first attempt after the stream was lost.
        attempt: u32,
        /// Why, in words.
        reason: String,
    },
    /// The stream is back: every change missed while disconnected has been
    /// delivered (as `Presence` events before this one), and live changes
    /// follow. Users that stopped being watched while disconnected are
    /// reported as `ContactRemoved` only if the server says so on resume;
    /// users it leaves out of the catch-up are taken as unchanged.
    Resumed {
        /// How many users the stream watches.
        watched: u32,
    },
}

/// Remembers what a watch delivered, across the streams it reconnects
/// through: the filter between the server and the consumer. Pure, so its
/// rules are tested without a server.
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    /// The version of the presence last delivered per user: what the consumer
    /// holds. Sent as `known_versions` on reconnect.
    versions: HashMap<String, u64>,
    /// Whether the consumer got its `SnapshotComplete`.
    snapshot_delivered: bool,
    /// Whether the current stream's snapshot is still in progress.
    awaiting_snapshot: bool,
}

impl Delivered {
    /// A new server stream starts: its snapshot is ahead.
    pub(crate) fn new_stream(&mut self) {
        self.awaiting_snapshot = true;
    }

    /// `known_versions` for the next request.
    pub(crate) fn known_versions(&self) -> HashMap<String, u64> {
        self.versions.clone()
    }

    /// The update to hand to the consumer for a server event, if any.
    pub(crate) fn filter(&mut self, event: PresenceEvent) -> Option<PresenceUpdate> {
        match event.event? {
            presence_event::Event::Presence(presence) => {
                if presence.user_id.is_empty() {
                    return None;
                }
                if let Some(&held) = self.versions.get(&presence.user_id) {
                    if presence.version <= held {
                        return None;
                    }
                }
                self.versions
                    .insert(presence.user_id.clone(), presence.version);
                Some(PresenceUpdate::Presence(presence))
            }
            presence_event::Event::SnapshotComplete(complete) => {
                if !self.awaiting_snapshot {
                    // A second one on the same stream says nothing new.
                    return None;
                }
                self.awaiting_snapshot = false;
                let watched = complete.watched;
                if self.snapshot_delivered {
                    Some(PresenceUpdate::Resumed { watched })
                } else {
                    self.snapshot_delivered = true;
                    Some(PresenceUpdate::SnapshotComplete { watched })
                }
            }
            presence_event::Event::ContactRemoved(removed) => {
                // Only news to the consumer if it holds that user; a resumed
                // stream repeating a removal must not repeat the event.
                self.versions.remove(&removed.user_id)?;
                Some(PresenceUpdate::ContactRemoved {
                    user_id: removed.user_id,
                })
            }
        }
    }
}

/// A stream of [`PresenceUpdate`]s that reconnects by itself, returned by
/// [`PresenceClient::watch_contacts`](crate::PresenceClient::watch_contacts)
/// and [`PresenceClient::watch_users`](crate::PresenceClient::watch_users).
///
/// On a broken connection it yields [`PresenceUpdate::Reconnecting`], waits
/// (exponential backoff with full jitter), moves to the next endpoint, and
/// asks for only what changed by sending the versions it delivered. It ends
/// with one `Err` on an error retrying cannot fix (`Unauthenticated`,
/// `PermissionDenied`, `InvalidArgument`); otherwise it never ends. Drop it to
/// stop watching.
pub struct PresenceStream {
    inner: BoxStream<'static, Result<PresenceUpdate, Error>>,
}

impl std::fmt::Debug for PresenceStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceStream").finish_non_exhaustive()
    }
}

impl Stream for PresenceStream {
    type Item = Result<PresenceUpdate, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The state the stream carries from one item to the next.
struct WatchLoop {
    connector: Arc<Connector>,
    user_ids: Vec<String>,
    delivered: Delivered,
    /// The open server stream and the channel generation it runs on.
    inbound: Option<(Streaming<PresenceEvent>, u64)>,
    reconnects: Reconnects,
}

impl PresenceStream {
    pub(crate) fn new(connector: Arc<Connector>, backoff: Backoff, user_ids: Vec<String>) -> Self {
        let state = WatchLoop {
            connector,
            user_ids,
            delivered: Delivered::default(),
            inbound: None,
            reconnects: Reconnects::new(backoff),
        };
        let inner = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl WatchLoop {
    async fn next(&mut self) -> Option<Result<PresenceUpdate, Error>> {
        loop {
            if self.reconnects.finished() {
                return None;
            }
            let Some((inbound, generation)) = &mut self.inbound else {
                self.reconnects.pause().await;
                let lease = self.connector.lease();
                let request = WatchContactsRequest {
                    user_ids: self.user_ids.clone(),
                    known_versions: self.delivered.known_versions(),
                };
                match self
                    .connector
                    .presence(&lease)
                    .watch_contacts(request)
                    .await
                {
                    Ok(response) => {
                        self.delivered.new_stream();
                        self.inbound = Some((response.into_inner(), lease.generation));
                    }
                    Err(status) => return Some(self.failed(status.into(), lease.generation).await),
                }
                continue;
            };
            let generation = *generation;
            match inbound.message().await {
                Ok(Some(event)) => {
                    let Some(update) = self.delivered.filter(event) else {
                        continue;
                    };
                    if matches!(
                        update,
                        PresenceUpdate::SnapshotComplete { .. } | PresenceUpdate::Resumed { .. }
                    ) {
                        self.reconnects.served();
                    }
                    return Some(Ok(update));
                }
                Ok(None) => {
                    let error = Error::Unavailable("server closed the watch stream".to_owned());
                    return Some(self.failed(error, generation).await);
                }
                Err(status) => return Some(self.failed(status.into(), generation).await),
            }
        }
    }

    /// The item to yield for a failed attempt or a broken stream; a fresh
    /// token brings the watch back at once, resuming from the versions held.
    async fn failed(&mut self, error: Error, generation: u64) -> Result<PresenceUpdate, Error> {
        self.inbound = None;
        let (attempt, reason) = self
            .reconnects
            .after(&self.connector, error, generation, "presence watch")
            .await?;
        Ok(PresenceUpdate::Reconnecting { attempt, reason })
    }
}

/// The latest presence per watched user, kept by folding a watch's events:
///
/// ```no_run
/// # async fn example(client: presence_sdk::PresenceClient) -> Result<(), presence_sdk::Error> {
/// use futures::StreamExt;
/// use presence_sdk::PresenceMap;
///
/// let mut map = PresenceMap::new();
/// let mut updates = client.watch_contacts();
/// while let Some(update) = updates.next().await {
///     map.apply(&update?);
///     if let Some(alice) = map.get("alice") {
///         println!("alice is {:?}", alice.status());
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct PresenceMap {
    users: HashMap<String, Presence>,
    complete: bool,
    stale: bool,
}

impl PresenceMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one update in. Returns whether the map changed. A presence not
    /// newer than the one held is ignored, so feeding the map from several
    /// sources (a watch and a [`get_presence`](crate::PresenceClient::get_presence))
    /// is safe too.
    pub fn apply(&mut self, update: &PresenceUpdate) -> bool {
        match update {
            PresenceUpdate::Presence(presence) => {
                if let Some(held) = self.users.get(&presence.user_id) {
                    if presence.version <= held.version {
                        return false;
                    }
                }
                self.users
                    .insert(presence.user_id.clone(), presence.clone());
                true
            }
            PresenceUpdate::ContactRemoved { user_id } => self.users.remove(user_id).is_some(),
            PresenceUpdate::SnapshotComplete { .. } => {
                self.complete = true;
                false
            }
            PresenceUpdate::Reconnecting { .. } => {
                self.stale = true;
                false
            }
            PresenceUpdate::Resumed { .. } => {
                self.stale = false;
                false
            }
        }
    }

    /// The latest presence of `user_id`, if watched.
    pub fn get(&self, user_id: &str) -> Option<&Presence> {
        self.users.get(user_id)
    }

    /// Every watched user's latest presence, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Presence> {
        self.users.values()
    }

    /// How many users the map holds.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the map holds no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether the first snapshot arrived: until then, users may be missing.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Whether the watch is reconnecting: entries may be out of date until it
    /// resumes.
    pub fn is_stale(&self) -> bool {
        self.stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence_proto::v1::{ContactRemoved, SnapshotComplete, VisibleStatus};

    fn presence(user: &str, version: u64, status: VisibleStatus) -> PresenceEvent {
        PresenceEvent {
            event: Some(presence_event::Event::Presence(Presence {
                user_id: user.into(),
                status: status as i32,
                version,
                ..Presence::default()
            })),
        }
    }

    fn complete(watched: u32) -> PresenceEvent {
        PresenceEvent {
            event: Some(presence_event::Event::SnapshotComplete(SnapshotComplete {
                watched,
            })),
        }
    }

    fn removed(user: &str) -> PresenceEvent {
        PresenceEvent {
            event: Some(presence_event::Event::ContactRemoved(ContactRemoved {
                user_id: user.into(),
            })),
        }
    }

    fn versions(updates: &[Option<PresenceUpdate>]) -> Vec<(String, u64)> {
        updates
            .iter()
            .flatten()
            .filter_map(|u| match u {
                PresenceUpdate::Presence(p) => Some((p.user_id.clone(), p.version)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_resumed_stream_delivers_neither_duplicates_nor_older_versions() {
        let mut delivered = Delivered::default();
        delivered.new_stream();
        let first: Vec<_> = [
            presence("alice", 3, VisibleStatus::Online),
            presence("bob", 7, VisibleStatus::Offline),
            complete(2),
            presence("alice", 4, VisibleStatus::Idle),
        ]
        .into_iter()
        .map(|e| delivered.filter(e))
        .collect();
        assert_eq!(
            versions(&first),
            [("alice".into(), 3), ("bob".into(), 7), ("alice".into(), 4)]
        );
        assert_eq!(
            delivered.known_versions(),
            HashMap::from([("alice".into(), 4), ("bob".into(), 7)])
        );

        // The connection breaks; the new stream's catch-up repeats alice's
        // version 4, has an older bob (a lagging node), and one real change.
        delivered.new_stream();
        let second: Vec<_> = [
            presence("alice", 4, VisibleStatus::Idle),
            presence("bob", 6, VisibleStatus::Online),
            presence("bob", 8, VisibleStatus::Busy),
            complete(2),
        ]
        .into_iter()
        .map(|e| delivered.filter(e))
        .collect();
        assert_eq!(versions(&second), [("bob".into(), 8)]);
        assert_eq!(
            second.last(),
            Some(&Some(PresenceUpdate::Resumed { watched: 2 }))
        );
    }

    #[test]
    fn snapshot_complete_reaches_the_consumer_once() {
        let mut delivered = Delivered::default();
        delivered.new_stream();
        assert_eq!(
            delivered.filter(complete(0)),
            Some(PresenceUpdate::SnapshotComplete { watched: 0 })
        );
        assert_eq!(delivered.filter(complete(0)), None);
        delivered.new_stream();
        assert_eq!(
            delivered.filter(complete(0)),
            Some(PresenceUpdate::Resumed { watched: 0 })
        );
        delivered.new_stream();
        assert_eq!(
            delivered.filter(complete(1)),
            Some(PresenceUpdate::Resumed { watched: 1 })
        );
    }

    #[test]
    fn a_removed_contact_is_forgotten_and_comes_back_fresh() {
        let mut delivered = Delivered::default();
        delivered.new_stream();
        assert!(
            delivered
                .filter(presence("carol", 5, VisibleStatus::Online))
                .is_some()
        );
        assert_eq!(
            delivered.filter(removed("carol")),
            Some(PresenceUpdate::ContactRemoved {
                user_id: "carol".into()
            })
        );
        // Repeated after a resume: not news.
        assert_eq!(delivered.filter(removed("carol")), None);
        assert!(!delivered.known_versions().contains_key("carol"));
        // Re-added with an unchanged version: the consumer dropped her, so
        // she is delivered again.
        assert!(
            delivered
                .filter(presence("carol", 5, VisibleStatus::Online))
                .is_some()
        );
    }

    #[test]
    fn malformed_server_events_are_dropped_not_fatal() {
        let mut delivered = Delivered::default();
        delivered.new_stream();
        assert_eq!(delivered.filter(PresenceEvent { event: None }), None);
        assert_eq!(
            delivered.filter(presence("", 1, VisibleStatus::Online)),
            None
        );
        assert_eq!(delivered.filter(removed("never-seen")), None);
    }

    #[test]
    fn an_unknown_user_at_version_zero_is_delivered_once() {
        let mut delivered = Delivered::default();
        delivered.new_stream();
        assert!(
            delivered
                .filter(presence("ghost", 0, VisibleStatus::Offline))
                .is_some()
        );
        assert!(
            delivered
                .filter(presence("ghost", 0, VisibleStatus::Offline))
                .is_none()
        );
    }

    #[test]
    fn the_map_keeps_the_latest_presence_and_tracks_staleness() {
        let mut map = PresenceMap::new();
        let update = |user: &str, version| {
            let Some(presence_event::Event::Presence(p)) =
                presence(user, version, VisibleStatus::Online).event
            else {
                unreachable!()
            };
            PresenceUpdate::Presence(p)
        };
        assert!(map.apply(&update("alice", 2)));
        assert!(!map.apply(&update("alice", 1)));
        assert!(!map.is_complete());
        map.apply(&PresenceUpdate::SnapshotComplete { watched: 1 });
        assert!(map.is_complete());
        assert_eq!(map.get("alice").map(|p| p.version), Some(2));
        map.apply(&PresenceUpdate::Reconnecting {
            attempt: 1,
            reason: "x".into(),
        });
        assert!(map.is_stale());
        map.apply(&PresenceUpdate::Resumed { watched: 1 });
        assert!(!map.is_stale());
        assert!(map.apply(&PresenceUpdate::ContactRemoved {
            user_id: "alice".into()
        }));
        assert!(map.is_empty());
    }
}
