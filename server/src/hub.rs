//! The node-local index of watchers: who on this node watches whom. Events
//! from the fan-out land here and are queued per watcher, coalesced per
//! watched user, so a slow watcher costs at most one pending entry per
//! contact however fast its contacts change.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use indexmap::IndexMap;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};

use crate::domain::{UserRecord, Viewer};
use crate::store::BusEvent;

/// What a watcher has yet to send about one watched user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// The latest state; replaces any older pending state.
    Presence(Box<UserRecord>),
    /// Became a contact: the stream loads the state and starts watching.
    Added,
    /// No longer a contact: the stream stops watching and says so.
    Removed,
}

/// One open WatchContacts stream.
pub struct Watcher {
    id: u64,
    pub owner: String,
    pub viewer: Viewer,
    /// Whether contacts changes of `owner` add and remove watched users
    /// (false for admin streams that named their users).
    pub follows_contacts: bool,
    /// std-style Mutex: held only to move entries in or out.
    pending: Mutex<IndexMap<String, Pending>>,
    notify: Notify,
}

impl Watcher {
    /// Waits until something is pending, then takes all of it, in arrival
    /// order of the first event per user.
    pub async fn next_batch(&self) -> IndexMap<String, Pending> {
        loop {
            let notified = self.notify.notified();
            {
                let mut pending = self.pending.lock();
                if !pending.is_empty() {
                    return std::mem::take(&mut *pending);
                }
            }
            notified.await;
        }
    }

    fn push(&self, user_id: &str, event: Pending) {
        let mut pending = self.pending.lock();
        match pending.get_mut(user_id) {
            // A removal stays a removal until the stream has seen it; a later
            // presence event for a removed contact must not resurrect it.
            Some(Pending::Removed) if matches!(event, Pending::Presence(_)) => {}
            // A presence update after an addition is still an addition: the
            // stream loads the latest state anyway.
            Some(Pending::Added) if matches!(event, Pending::Presence(_)) => {}
            // Two nodes changing one user at once may publish out of order:
            // a late older state must not replace a newer pending one.
            Some(Pending::Presence(held)) if matches!(&event, Pending::Presence(new) if new.shown.version < held.shown.version) =>
                {}
            Some(slot) => *slot = event,
            None => {
                pending.insert(user_id.to_owned(), event);
            }
        }
        drop(pending);
        self.notify.notify_one();
    }
}

#[derive(Default)]
struct Index {
    by_watched: HashMap<String, Vec<Arc<Watcher>>>,
    by_owner: HashMap<String, Vec<Arc<Watcher>>>,
}

#[derive(Default)]
pub struct Hub {
    next_id: AtomicU64,
    streams: AtomicUsize,
    index: Mutex<Index>,
    /// Where `DeviceTaken` notices go: the node, which owns the leases.
    devices_taken: Mutex<Option<mpsc::Sender<DeviceTaken>>>,
}

/// A device taken over or logged out through some node (see
/// [`BusEvent::DeviceTaken`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTaken {
    pub user_id: String,
    pub device_id: String,
    pub logged_out: bool,
    pub node_id: String,
}

/// Notices queued for the node at most; past it they are dropped (logged),
/// and an old stream lingers as it would without them.
const DEVICES_TAKEN_QUEUE: usize = 4096;

impl Hub {
    /// The notices of devices taken over or logged out, for the node.
    pub fn devices_taken(&self) -> mpsc::Receiver<DeviceTaken> {
        let (sender, receiver) = mpsc::channel(DEVICES_TAKEN_QUEUE);
        *self.devices_taken.lock() = Some(sender);
        receiver
    }

    pub fn register(&self, owner: &str, viewer: Viewer, follows_contacts: bool) -> Arc<Watcher> {
        let watcher = Arc::new(Watcher {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            owner: owner.to_owned(),
            viewer,
            follows_contacts,
            pending: Mutex::default(),
            notify: Notify::new(),
        });
        self.streams.fetch_add(1, Ordering::Relaxed);
        if follows_contacts {
            self.index
                .lock()
                .by_owner
                .entry(owner.to_owned())
                .or_default()
                .push(watcher.clone());
        }
        watcher
    }

    /// Removes the watcher from every index; `watched` lists what it watches.
    pub fn unregister<'a>(&self, watcher: &Watcher, watched: impl IntoIterator<Item = &'a String>) {
        let mut index = self.index.lock();
        for user in watched {
            remove_from(&mut index.by_watched, user, watcher.id);
        }
        remove_from(&mut index.by_owner, &watcher.owner, watcher.id);
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn watch(&self, watcher: &Arc<Watcher>, user_id: &str) {
        let mut index = self.index.lock();
        let list = index.by_watched.entry(user_id.to_owned()).or_default();
        if !list.iter().any(|w| w.id == watcher.id) {
            list.push(watcher.clone());
        }
    }

    pub fn unwatch(&self, watcher: &Watcher, user_id: &str) {
        remove_from(&mut self.index.lock().by_watched, user_id, watcher.id);
    }

    /// Every user some watcher on this node watches.
    pub fn watched_users(&self) -> Vec<String> {
        self.index.lock().by_watched.keys().cloned().collect()
    }

    /// Whether any watcher on this node watches `user_id`.
    pub fn is_watched(&self, user_id: &str) -> bool {
        self.index.lock().by_watched.contains_key(user_id)
    }

    /// How many watch streams are open on this node, and how many distinct
    /// users they watch.
    pub fn sizes(&self) -> (usize, usize) {
        (
            self.streams.load(Ordering::Relaxed),
            self.index.lock().by_watched.len(),
        )
    }

    pub fn deliver(&self, event: &BusEvent) {
        match event {
            BusEvent::Presence { user_id, record } => {
                let watchers = self.watchers(|index| index.by_watched.get(user_id));
                crate::metrics::fanout(watchers.len());
                for watcher in watchers {
                    watcher.push(user_id, Pending::Presence(Box::new(record.clone())));
                }
            }
            BusEvent::DeviceTaken {
                user_id,
                device_id,
                logged_out,
                node_id,
            } => {
                let notice = DeviceTaken {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    logged_out: *logged_out,
                    node_id: node_id.clone(),
                };
                if let Some(node) = &*self.devices_taken.lock()
                    && node.try_send(notice).is_err()
                {
                    tracing::warn!(
                        user_id,
                        "device takeover notice dropped: the node is behind"
                    );
                }
            }
            BusEvent::Contacts {
                user_id,
                added,
                removed,
            } => {
                for watcher in self.watchers(|index| index.by_owner.get(user_id)) {
                    for contact in added {
                        watcher.push(contact, Pending::Added);
                    }
                    for contact in removed {
                        watcher.push(contact, Pending::Removed);
                    }
                }
            }
        }
    }

    /// Copies the watcher list out so that pushing (which notifies tasks)
    /// happens without the index lock.
    fn watchers(
        &self,
        pick: impl FnOnce(&Index) -> Option<&Vec<Arc<Watcher>>>,
    ) -> Vec<Arc<Watcher>> {
        pick(&self.index.lock()).cloned().unwrap_or_default()
    }
}

fn remove_from(map: &mut HashMap<String, Vec<Arc<Watcher>>>, key: &str, id: u64) {
    if let Some(list) = map.get_mut(key) {
        list.retain(|w| w.id != id);
        if list.is_empty() {
            map.remove(key);
        }
    }
}
