//! [`RedisContactStore`]: contacts as one set per user.
//!
//! A link lives in two sets, on two slots, so adding or removing it is two
//! scripts, not one. `add` first adds to the caller's set (refusing the whole
//! call past the limit), then to each contact's set, each within its limit,
//! and undoes what it added if one of those is full. Consistency: a crash or
//! a Redis error between the two halves can leave a link one-sided (the user
//! lists the contact, not the other way round) until the same call is
//! retried, which completes it: every step is idempotent. The limit is
//! enforced by the scripts themselves, so concurrent calls never take a set
//! past it.

use std::sync::Arc;

use async_trait::async_trait;

use super::scripts::{CONTACTS_ADD, CONTACTS_LINK};
use super::{Error, Redis, keys};
use crate::store::{ContactStore, StoreError, StoreResult};

pub struct RedisContactStore {
    redis: Arc<Redis>,
}

impl RedisContactStore {
    pub(super) fn new(redis: Arc<Redis>) -> Self {
        RedisContactStore { redis }
    }
}

enum Added {
    Links(Vec<String>),
    TooMany,
}

impl RedisContactStore {
    async fn add_links(
        &self,
        user_id: &str,
        contact_ids: &[String],
        max_contacts: usize,
    ) -> Result<Added, Error> {
        let mut candidates: Vec<&String> = contact_ids
            .iter()
            .filter(|c| c.as_str() != user_id)
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        if candidates.is_empty() {
            return Ok(Added::Links(Vec::new()));
        }
        let mut conn = self.redis.conn().await?;
        let mut add = CONTACTS_ADD.prepare_invoke();
        add.key(keys::contacts(user_id)).arg(max_contacts);
        for contact in &candidates {
            add.arg(contact.as_str());
        }
        let (ok, new): (i64, Vec<String>) = add.invoke_async(&mut conn).await?;
        if ok != 1 {
            return Ok(Added::TooMany);
        }

        // The other halves, for every candidate (not only the new ones: a
        // retry completes a link an earlier attempt left one-sided).
        let links = candidates.iter().map(|contact| {
            let mut conn = conn.clone();
            async move {
                CONTACTS_LINK
                    .key(keys::contacts(contact))
                    .arg(user_id)
                    .arg(max_contacts)
                    .invoke_async::<i64>(&mut conn)
                    .await
            }
        });
        let outcomes = futures::future::try_join_all(links).await?;
        // Only a new link may be refused; an old one-sided link whose other
        // side filled up meanwhile stays as it was.
        let refused = candidates
            .iter()
            .zip(&outcomes)
            .any(|(contact, linked)| *linked < 0 && new.contains(*contact));
        if !refused {
            return Ok(Added::Links(new));
        }
        // A contact is full: undo this call's own changes, both halves.
        let mut undo = redis::cmd("SREM");
        undo.arg(keys::contacts(user_id)).arg(&new);
        if !new.is_empty() {
            undo.query_async::<()>(&mut conn).await?;
        }
        for (contact, linked) in candidates.iter().zip(&outcomes) {
            if *linked == 1 {
                redis::cmd("SREM")
                    .arg(keys::contacts(contact))
                    .arg(user_id)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
        Ok(Added::TooMany)
    }
}

#[async_trait]
impl ContactStore for RedisContactStore {
    async fn add(
        &self,
        user_id: &str,
        contact_ids: &[String],
        max_contacts: usize,
    ) -> StoreResult<u32> {
        match self
            .redis
            .run(self.add_links(user_id, contact_ids, max_contacts))
            .await?
        {
            Added::Links(new) => Ok(u32::try_from(new.len()).unwrap_or(u32::MAX)),
            Added::TooMany => Err(StoreError::TooManyContacts(max_contacts)),
        }
    }

    async fn remove(&self, user_id: &str, contact_ids: &[String]) -> StoreResult<u32> {
        if contact_ids.is_empty() {
            return Ok(0);
        }
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                let removed: u32 = redis::cmd("SREM")
                    .arg(keys::contacts(user_id))
                    .arg(contact_ids)
                    .query_async(&mut conn)
                    .await?;
                let others = contact_ids.iter().map(|contact| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("SREM")
                            .arg(keys::contacts(contact))
                            .arg(user_id)
                            .query_async::<()>(&mut conn)
                            .await
                    }
                });
                futures::future::try_join_all(others).await?;
                Ok(removed)
            })
            .await
    }

    async fn list(&self, user_id: &str) -> StoreResult<Vec<String>> {
        self.redis
            .run(async {
                let mut conn = self.redis.conn().await?;
                let mut contacts: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(keys::contacts(user_id))
                    .query_async(&mut conn)
                    .await?;
                contacts.sort_unstable();
                Ok(contacts)
            })
            .await
    }
}
