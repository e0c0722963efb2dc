//! One WatchContacts stream: register with the hub, send the snapshot, then
//! every change in version order per user. The stream is pulled by the
//! transport, so a slow client simply pulls less often while the hub keeps
//! coalescing: memory stays bounded by the number of watched users.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::Stream;

use crate::api::error::ApiError;
use crate::auth::Caller;
use crate::domain::{View, Viewer};
use crate::hub::{Pending, Watcher};
use crate::node::Node;
use crate::quota::{StreamKind, StreamSlot};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Presence(View),
    SnapshotComplete { watched: u32 },
    Removed { user_id: String },
}

pub struct WatchRequest {
    /// Admin callers only: these users instead of the caller's contacts.
    pub user_ids: Vec<String>,
    /// Versions the client holds from an earlier stream.
    pub known_versions: HashMap<String, u64>,
}

/// Unregisters the watcher from the hub however the stream ends (client gone,
/// error, drain).
struct Registration {
    node: Arc<Node>,
    watcher: Arc<Watcher>,
    watched: HashSet<String>,
    _slot: StreamSlot,
}

impl Registration {
    fn watch(&mut self, user_id: &str) {
        self.node.backends.hub.watch(&self.watcher, user_id);
        self.watched.insert(user_id.to_owned());
    }

    fn unwatch(&mut self, user_id: &str) {
        self.node.backends.hub.unwatch(&self.watcher, user_id);
        self.watched.remove(user_id);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.node
            .backends
            .hub
            .unregister(&self.watcher, &self.watched);
    }
}

pub fn watch(
    node: Arc<Node>,
    caller: Caller,
    request: WatchRequest,
) -> Result<impl Stream<Item = Result<WatchEvent, ApiError>> + Send + 'static, ApiError> {
    node.check_serving()?;
    let named = !request.user_ids.is_empty();
    if named && !caller.admin {
        return Err(ApiError::PermissionDenied(
            "only admin callers may name the users to watch".into(),
        ));
    }
    let slot = node.admit_stream(&caller.user_id, StreamKind::Watch)?;
    let viewer = if caller.admin {
        Viewer::Admin
    } else {
        Viewer::Contact
    };
    let watcher = node.backends.hub.register(&caller.user_id, viewer, !named);
    let drained = node.drained();
    let expired = tokio::time::sleep(caller.valid_for());
    Ok(async_stream::try_stream! {
        let mut registration = Registration { node: node.clone(), watcher: watcher.clone(), watched: HashSet::new(), _slot: slot };
        let users = if named {
            request.user_ids
        } else {
            node.backends.contacts.list(&caller.user_id).await?
        };
        // Register before reading, so that no change between the read and
        // the registration is missed; duplicates are dropped by version.
        for user in &users {
            registration.watch(user);
        }
        let records = node.presence_records(&users).await?;
        let mut delivered: HashMap<String, u64> = HashMap::with_capacity(users.len());
        for (user, record) in users.iter().zip(records) {
            let view = View::of(user, record.as_ref(), viewer);
            delivered.insert(user.clone(), view.version);
            if request.known_versions.get(user) != Some(&view.version) {
                yield WatchEvent::Presence(view);
            }
        }
        // Users the client held from an earlier stream that are no longer
        // watched (the contact was removed meanwhile) are said to be gone.
        for user in request.known_versions.keys().filter(|user| !registration.watched.contains(*user)) {
            yield WatchEvent::Removed { user_id: user.clone() };
        }
        crate::metrics::snapshot(users.len());
        yield WatchEvent::SnapshotComplete { watched: users.len() as u32 };
        tokio::pin!(drained);
        tokio::pin!(expired);

        loop {
            let batch = tokio::select! {
                batch = watcher.next_batch() => Ok(batch),
                _ = &mut drained => Err(ApiError::Unavailable("this node is draining, reconnect to another".into())),
                () = &mut expired => Err(ApiError::Unauthenticated("token expired".into())),
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(end) => {
                    Err::<(), _>(end)?;
                    return;
                }
            };
            for (user, pending) in batch {
                match pending {
                    Pending::Presence(record) => {
                        if !registration.watched.contains(&user) {
                            continue;
                        }
                        let view = View::of(&user, Some(&record), viewer);
                        let held = delivered.entry(user).or_default();
                        if view.version > *held {
                            *held = view.version;
                            yield WatchEvent::Presence(view);
                        }
                    }
                    Pending::Added => {
                        registration.watch(&user);
                        let record = node.presence_records(std::slice::from_ref(&user)).await?.pop().flatten();
                        let view = View::of(&user, record.as_ref(), viewer);
                        let held = delivered.entry(user).or_default();
                        // A new contact is announced even with version 0, so
                        // the client learns it is watched now.
                        if view.version > *held || view.version == 0 {
                            *held = view.version;
                            yield WatchEvent::Presence(view);
                        }
                    }
                    Pending::Removed => {
                        if registration.watched.contains(&user) {
                            registration.unwatch(&user);
                            delivered.remove(&user);
                            yield WatchEvent::Removed { user_id: user };
                        }
                    }
                }
            }
        }
    })
}
