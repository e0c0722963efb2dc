//! Contacts in the `contacts` table: each mutual link is two rows, one per
//! direction, written together in a logged batch.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt};
use futures::{StreamExt, TryStreamExt, stream};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::{Queries, unavailable};
use crate::store::{ContactStore, StoreError, StoreResult};

/// Contacts per logged batch. A batch holds two statements per contact; 25
/// keeps even a batch of maximal ids well under the server's batch size
/// failure threshold (50 KiB by default), which would refuse it outright.
const LINKS_PER_BATCH: usize = 25;

/// Ids per `contact_id IN ?` lookup.
const IDS_PER_LOOKUP: usize = 100;

/// Concurrent single-partition reads when counting the contacts of the users
/// being linked.
const READS_IN_FLIGHT: usize = 32;

/// Contacts on a CQL store.
///
/// `add` checks the limit, then writes: the check and the write are not one
/// atomic step (that would need an LWT per link), so concurrent adds to the
/// same user may pass `max_contacts` by the size of the racing calls. Contacts
/// are managed by internal services, one call at a time per user in practice;
/// the limit bounds honest use, it is not a security boundary.
pub struct ScyllaContactStore {
    session: Arc<Session>,
    insert: PreparedStatement,
    delete: PreparedStatement,
    list: PreparedStatement,
    count: PreparedStatement,
    existing: PreparedStatement,
}

impl ScyllaContactStore {
    /// Prepares the queries of `contacts.cql` on `session`, in `keyspace`
    /// (whose schema must exist).
    pub async fn prepare(session: Arc<Session>, keyspace: &str) -> anyhow::Result<Self> {
        let queries = Queries::new(session.clone(), keyspace, include_str!("contacts.cql"))?;
        Ok(ScyllaContactStore {
            insert: queries.prepare("insert").await?,
            delete: queries.prepare("delete").await?,
            list: queries.prepare("list").await?,
            count: queries.prepare("count").await?,
            existing: queries.prepare("existing").await?,
            session,
        })
    }

    /// Which of `ids` are contacts of `user_id` already.
    async fn existing(&self, user_id: &str, ids: &[&String]) -> StoreResult<BTreeSet<String>> {
        let mut found = BTreeSet::new();
        for chunk in ids.chunks(IDS_PER_LOOKUP) {
            let result = self
                .session
                .execute_unpaged(&self.existing, (user_id, chunk))
                .await
                .map_err(unavailable("contacts lookup"))?
                .into_rows_result()
                .map_err(unavailable("contacts lookup"))?;
            for row in result
                .rows::<(String,)>()
                .map_err(unavailable("contacts lookup"))?
            {
                found.insert(row.map_err(unavailable("contacts lookup"))?.0);
            }
        }
        Ok(found)
    }

    async fn count(&self, user_id: &str) -> StoreResult<usize> {
        let (count,): (i64,) = self
            .session
            .execute_unpaged(&self.count, (user_id,))
            .await
            .map_err(unavailable("contacts count"))?
            .into_rows_result()
            .map_err(unavailable("contacts count"))?
            .single_row()
            .map_err(unavailable("contacts count"))?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// Runs `statement` for `(user_id, contact)` and `(contact, user_id)` of
    /// every contact, a logged batch per chunk. Logged: the server's batch log
    /// makes both directions of a link land even if the coordinator fails
    /// half-way, so a link is never left one-sided.
    async fn write_both_ways(
        &self,
        statement: &PreparedStatement,
        user_id: &str,
        contacts: &[&String],
        what: &'static str,
    ) -> StoreResult<()> {
        for chunk in contacts.chunks(LINKS_PER_BATCH) {
            let mut batch = Batch::new(BatchType::Logged);
            let mut values = Vec::with_capacity(chunk.len() * 2);
            for contact in chunk {
                batch.append_statement(statement.clone());
                batch.append_statement(statement.clone());
                values.push((user_id, contact.as_str()));
                values.push((contact.as_str(), user_id));
            }
            batch.set_is_idempotent(true);
            self.session
                .batch(&batch, values)
                .await
                .map_err(unavailable(what))?;
        }
        Ok(())
    }
}

#[async_trait]
impl ContactStore for ScyllaContactStore {
    async fn add(
        &self,
        user_id: &str,
        contact_ids: &[String],
        max_contacts: usize,
    ) -> StoreResult<u32> {
        let requested: BTreeSet<&String> = contact_ids
            .iter()
            .filter(|c| c.as_str() != user_id)
            .collect();
        if requested.is_empty() {
            return Ok(0);
        }
        let requested: Vec<&String> = requested.into_iter().collect();
        let existing = self.existing(user_id, &requested).await?;
        let new: Vec<&String> = requested
            .into_iter()
            .filter(|c| !existing.contains(*c))
            .collect();
        if new.is_empty() {
            return Ok(0);
        }
        if self.count(user_id).await? + new.len() > max_contacts {
            return Err(StoreError::TooManyContacts(max_contacts));
        }
        let counts: Vec<BoxFuture<'_, StoreResult<usize>>> = new
            .iter()
            .map(|contact| self.count(contact).boxed())
            .collect();
        let full_contact = stream::iter(counts)
            .buffer_unordered(READS_IN_FLIGHT)
            .try_any(|count| std::future::ready(count >= max_contacts))
            .await?;
        if full_contact {
            return Err(StoreError::TooManyContacts(max_contacts));
        }
        self.write_both_ways(&self.insert, user_id, &new, "contacts add")
            .await?;
        Ok(u32::try_from(new.len()).unwrap_or(u32::MAX))
    }

    async fn remove(&self, user_id: &str, contact_ids: &[String]) -> StoreResult<u32> {
        let requested: Vec<&String> = contact_ids
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if requested.is_empty() {
            return Ok(0);
        }
        let existing = self.existing(user_id, &requested).await?;
        // Delete both directions of every id asked for, not only the links
        // found: that also repairs a link left one-sided by hand.
        self.write_both_ways(&self.delete, user_id, &requested, "contacts remove")
            .await?;
        Ok(u32::try_from(existing.len()).unwrap_or(u32::MAX))
    }

    async fn list(&self, user_id: &str) -> StoreResult<Vec<String>> {
        // Paged: a user may have more contacts than one page holds.
        let mut contacts: Vec<String> = self
            .session
            .execute_iter(self.list.clone(), (user_id,))
            .await
            .map_err(unavailable("contacts list"))?
            .rows_stream::<(String,)>()
            .map_err(unavailable("contacts list"))?
            .map_ok(|(contact,)| contact)
            .try_collect()
            .await
            .map_err(unavailable("contacts list"))?;
        // The clustering order already sorts them (text compares as UTF-8
        // bytes, as Rust strings do); this only guards the contract.
        if !contacts.is_sorted() {
            contacts.sort();
        }
        Ok(contacts)
    }
}
