//! In-process backends: the default, for one node. State lives in this
//! process's memory and is gone when it exits; fan-out reaches only this node.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::embedded_log::EmbeddedChangeLog;
use super::{
    BusEvent, ChoiceRecord, ContactStore, DurableState, FanOut, HistoryStore, HotStore, StoreError,
    StoreResult,
};
use crate::domain::{Applied, HistoryRecord, Limits, Mutation, UserRecord, apply_stepwise};
use crate::hub::Hub;

/// Hot state in a map. std-style (parking_lot) Mutex, not Tokio's: nothing
/// async runs while it is held, and each critical section is a few map
/// operations. A visible change is logged and handed to the hub under the
/// same lock, so both see each user's changes in version order.
pub struct EmbeddedHotStore {
    users: Mutex<HashMap<String, UserRecord>>,
    log: Arc<EmbeddedChangeLog>,
    hub: Arc<Hub>,
}

impl EmbeddedHotStore {
    pub fn new(log: Arc<EmbeddedChangeLog>, hub: Arc<Hub>) -> Self {
        EmbeddedHotStore {
            users: Mutex::default(),
            log,
            hub,
        }
    }
}

#[async_trait]
impl HotStore for EmbeddedHotStore {
    async fn apply(
        &self,
        user_id: &str,
        mutation: Mutation,
        now_ms: i64,
        limits: Limits,
    ) -> StoreResult<(UserRecord, Applied)> {
        let mut users = self.users.lock();
        let mut record = users.get(user_id).cloned().unwrap_or_default();
        let (applied, steps) = apply_stepwise(&mut record, mutation, now_ms, limits)?;
        if applied.record_changed {
            if record.is_empty() {
                users.remove(user_id);
            } else {
                users.insert(user_id.to_owned(), record.clone());
            }
        }
        if applied.shown_changed {
            for step in &steps {
                self.log.append(user_id, step, now_ms);
            }
            self.log.append(user_id, &record, now_ms);
            self.hub.deliver(&BusEvent::Presence {
                user_id: user_id.to_owned(),
                record: record.clone(),
            });
        }
        Ok((record, applied))
    }

    async fn get(&self, user_ids: &[String]) -> StoreResult<Vec<Option<UserRecord>>> {
        let users = self.users.lock();
        Ok(user_ids.iter().map(|id| users.get(id).cloned()).collect())
    }

    async fn seed(&self, user_id: &str, record: &UserRecord) -> StoreResult<bool> {
        let mut users = self.users.lock();
        if users.contains_key(user_id) {
            return Ok(false);
        }
        users.insert(user_id.to_owned(), record.clone());
        Ok(true)
    }

    /// One process is one node: it cannot outlive its own store.
    async fn renew_node(&self, _node_id: &str, _ttl: Duration) -> StoreResult<bool> {
        Ok(true)
    }

    async fn lost_nodes(&self) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    async fn users_of_node(&self, _node_id: &str) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }

    async fn forget_node(&self, _node_id: &str) -> StoreResult<()> {
        Ok(())
    }
}

#[derive(Default)]
pub struct EmbeddedContactStore {
    links: Mutex<HashMap<String, BTreeSet<String>>>,
}

#[async_trait]
impl ContactStore for EmbeddedContactStore {
    async fn add(
        &self,
        user_id: &str,
        contact_ids: &[String],
        max_contacts: usize,
    ) -> StoreResult<u32> {
        let mut links = self.links.lock();
        let new: BTreeSet<&String> = contact_ids
            .iter()
            .filter(|c| c.as_str() != user_id)
            .filter(|c| !links.get(user_id).is_some_and(|set| set.contains(*c)))
            .collect();
        let own = links.get(user_id).map_or(0, BTreeSet::len);
        let full_contact = new
            .iter()
            .any(|c| links.get(*c).map_or(0, BTreeSet::len) >= max_contacts);
        if own + new.len() > max_contacts || full_contact {
            return Err(StoreError::TooManyContacts(max_contacts));
        }
        for contact in &new {
            links
                .entry(user_id.to_owned())
                .or_default()
                .insert((*contact).clone());
            links
                .entry((*contact).clone())
                .or_default()
                .insert(user_id.to_owned());
        }
        Ok(new.len() as u32)
    }

    async fn remove(&self, user_id: &str, contact_ids: &[String]) -> StoreResult<u32> {
        let mut links = self.links.lock();
        let mut removed = 0;
        for contact in contact_ids {
            if links
                .get_mut(user_id)
                .is_some_and(|set| set.remove(contact))
            {
                removed += 1;
            }
            if let Some(set) = links.get_mut(contact) {
                set.remove(user_id);
            }
        }
        Ok(removed)
    }

    async fn list(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let links = self.links.lock();
        Ok(links
            .get(user_id)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default())
    }
}

/// History in per-user queues, oldest first, pruned to the retention on write;
/// and each user's latest choice, kept for the life of the process (like the
/// embedded hot store's records).
pub struct EmbeddedHistoryStore {
    retention: Duration,
    users: Mutex<HashMap<String, VecDeque<HistoryRecord>>>,
    choices: Mutex<HashMap<String, ChoiceRecord>>,
}

impl EmbeddedHistoryStore {
    pub fn new(retention: Duration) -> Self {
        EmbeddedHistoryStore {
            retention,
            users: Mutex::default(),
            choices: Mutex::default(),
        }
    }

    /// A store that prunes itself every minute, for as long as it is in use.
    /// Users whose history stopped changing are pruned here; the others on
    /// every append.
    pub fn start(retention: Duration) -> Arc<Self> {
        let store = Arc::new(Self::new(retention));
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                store.prune(crate::node::now_ms());
            }
        });
        store
    }

    fn horizon(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX))
    }

    fn prune(&self, now_ms: i64) {
        let horizon = self.horizon(now_ms);
        self.users.lock().retain(|_, queue| {
            while queue.front().is_some_and(|oldest| oldest.at_ms < horizon) {
                queue.pop_front();
            }
            !queue.is_empty()
        });
    }
}

#[async_trait]
impl HistoryStore for EmbeddedHistoryStore {
    async fn append(&self, records: &[HistoryRecord]) -> StoreResult<()> {
        let mut users = self.users.lock();
        for record in records {
            let queue = users.entry(record.user_id.clone()).or_default();
            if queue.iter().any(|held| held.version == record.version) {
                continue;
            }
            // Versions of one user increase with time, so records of a user
            // arrive nearly in order: insert from the back.
            let at = queue
                .iter()
                .rposition(|held| held.version < record.version)
                .map_or(0, |i| i + 1);
            queue.insert(at, record.clone());
            let horizon = self.horizon(record.at_ms);
            while queue.front().is_some_and(|oldest| oldest.at_ms < horizon) {
                queue.pop_front();
            }
        }
        Ok(())
    }

    async fn page(
        &self,
        user_id: &str,
        from_ms: i64,
        to_ms: i64,
        after_version: u64,
        limit: usize,
    ) -> StoreResult<Vec<HistoryRecord>> {
        let users = self.users.lock();
        let Some(queue) = users.get(user_id) else {
            return Ok(Vec::new());
        };
        Ok(queue
            .iter()
            .filter(|r| r.at_ms >= from_ms && r.at_ms <= to_ms && r.version > after_version)
            .take(limit)
            .cloned()
            .collect())
    }

    /// Within the retention only: this store forgets the rest.
    async fn last(&self, user_ids: &[String]) -> StoreResult<Vec<Option<HistoryRecord>>> {
        let users = self.users.lock();
        Ok(user_ids
            .iter()
            .map(|id| users.get(id).and_then(|queue| queue.back().cloned()))
            .collect())
    }

    async fn save_choices(&self, choices: &[ChoiceRecord]) -> StoreResult<()> {
        let mut held = self.choices.lock();
        for choice in choices {
            match held.get_mut(&choice.user_id) {
                Some(newest) if newest.at_us >= choice.at_us => {}
                Some(older) => *older = choice.clone(),
                None => {
                    held.insert(choice.user_id.clone(), choice.clone());
                }
            }
        }
        Ok(())
    }

    async fn durable(&self, user_ids: &[String]) -> StoreResult<Vec<DurableState>> {
        let lasts = self.last(user_ids).await?;
        let choices = self.choices.lock();
        Ok(user_ids
            .iter()
            .zip(lasts)
            .map(|(id, last)| DurableState {
                last,
                choice: choices.get(id).cloned(),
            })
            .collect())
    }
}

/// Fan-out within this process: publishing hands the event straight to the
/// node's hub.
pub struct EmbeddedFanOut {
    hub: Arc<Hub>,
}

impl EmbeddedFanOut {
    pub fn new(hub: Arc<Hub>) -> Self {
        EmbeddedFanOut { hub }
    }
}

#[async_trait]
impl FanOut for EmbeddedFanOut {
    async fn publish(&self, event: BusEvent) -> StoreResult<()> {
        self.hub.deliver(&event);
        Ok(())
    }
}
