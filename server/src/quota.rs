//! Per-user bounds on what one user can make this node hold or do: open
//! streams of each kind, and how fast their visible state may change (every
//! visible change fans out to all their watchers and is a history row).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::api::error::ApiError;

/// A token bucket: `rate` tokens per second, at most `burst` held.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token if there is one.
    pub fn admit(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// The kinds of long-lived streams a user may hold on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Heartbeat,
    Watch,
    Feed,
}

impl StreamKind {
    fn name(self) -> &'static str {
        match self {
            StreamKind::Heartbeat => "heartbeat streams",
            StreamKind::Watch => "watches",
            StreamKind::Feed => "feed streams",
        }
    }
}

/// The user's budget of visible changes: a short burst, and an hourly
/// budget that bounds their history rows.
struct ChangeBudget {
    per_second: TokenBucket,
    per_hour: TokenBucket,
}

#[derive(Clone, Copy, Debug)]
pub struct QuotaLimits {
    pub max_heartbeat_streams: usize,
    pub max_watches: usize,
    pub max_feed_streams: usize,
    pub changes_per_second: u32,
    pub changes_per_hour: u32,
}

pub struct Quotas {
    limits: QuotaLimits,
    /// std-style Mutexes: held only to count.
    streams: Mutex<HashMap<(String, StreamKind), usize>>,
    changes: Mutex<HashMap<String, ChangeBudget>>,
    pruned_at: Mutex<Instant>,
}

/// Budgets untouched this long are full again and forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

impl Quotas {
    pub fn new(limits: QuotaLimits) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits,
            streams: Mutex::default(),
            changes: Mutex::default(),
            pruned_at: Mutex::new(Instant::now()),
        })
    }

    /// Counts a new stream of `user_id`, refusing past the limit. The
    /// returned slot uncounts it when dropped.
    pub fn admit_stream(
        self: &Arc<Self>,
        user_id: &str,
        kind: StreamKind,
    ) -> Result<StreamSlot, ApiError> {
        let limit = match kind {
            StreamKind::Heartbeat => self.limits.max_heartbeat_streams,
            StreamKind::Watch => self.limits.max_watches,
            StreamKind::Feed => self.limits.max_feed_streams,
        };
        let key = (user_id.to_owned(), kind);
        let mut streams = self.streams.lock();
        let count = streams.entry(key.clone()).or_default();
        if *count >= limit {
            return Err(ApiError::ResourceExhausted(format!(
                "a user may have at most {limit} open {} on a node",
                kind.name()
            )));
        }
        *count += 1;
        Ok(StreamSlot {
            quotas: self.clone(),
            key,
        })
    }

    /// Takes one visible change from `user_id`'s budget, refusing past it.
    pub fn admit_change(&self, user_id: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let limits = self.limits;
        let mut changes = self.changes.lock();
        let budget = changes
            .entry(user_id.to_owned())
            .or_insert_with(|| ChangeBudget {
                per_second: TokenBucket::new(
                    f64::from(limits.changes_per_second),
                    f64::from(limits.changes_per_second) * 2.0,
                ),
                per_hour: TokenBucket::new(
                    f64::from(limits.changes_per_hour) / 3600.0,
                    f64::from(limits.changes_per_hour),
                ),
            });
        if !budget.per_second.admit(now) {
            return Err(ApiError::ResourceExhausted(format!(
                "more than {} presence changes per second for this user",
                limits.changes_per_second
            )));
        }
        if !budget.per_hour.admit(now) {
            return Err(ApiError::ResourceExhausted(format!(
                "more than {} presence changes per hour for this user",
                limits.changes_per_hour
            )));
        }
        Ok(())
    }

    /// Forgets the budgets that are full again (their users are quiet), at
    /// most every few seconds, so the map holds only recently busy users.
    pub fn prune(&self) {
        let now = Instant::now();
        {
            let mut pruned_at = self.pruned_at.lock();
            if now.duration_since(*pruned_at) < PRUNE_EVERY {
                return;
            }
            *pruned_at = now;
        }
        self.changes
            .lock()
            .retain(|_, budget| !(budget.per_second.is_full(now) && budget.per_hour.is_full(now)));
    }

    /// Users with a change budget in use, for tests of the bound.
    pub fn budgets_held(&self) -> usize {
        self.changes.lock().len()
    }
}

/// One admitted stream; dropping it frees the slot.
pub struct StreamSlot {
    quotas: Arc<Quotas>,
    key: (String, StreamKind),
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.quotas.streams.lock();
        if let Some(count) = streams.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Arc<Quotas> {
        Quotas::new(QuotaLimits {
            max_heartbeat_streams: 2,
            max_watches: 1,
            max_feed_streams: 1,
            changes_per_second: 2,
            changes_per_hour: 6,
        })
    }

    #[test]
    fn streams_past_the_limit_are_refused_until_one_closes() {
        let quotas = quotas();
        let first = quotas.admit_stream("u", StreamKind::Heartbeat).unwrap();
        let _second = quotas.admit_stream("u", StreamKind::Heartbeat).unwrap();
        assert!(quotas.admit_stream("u", StreamKind::Heartbeat).is_err());
        // Kinds and users are counted apart.
        let _watch = quotas.admit_stream("u", StreamKind::Watch).unwrap();
        assert!(quotas.admit_stream("u", StreamKind::Watch).is_err());
        let _other = quotas.admit_stream("v", StreamKind::Heartbeat).unwrap();
        drop(first);
        assert!(quotas.admit_stream("u", StreamKind::Heartbeat).is_ok());
    }

    #[test]
    fn changes_past_the_burst_are_refused() {
        let quotas = quotas();
        // A burst of twice the rate, then refused; users are counted apart.
        for _ in 0..4 {
            quotas.admit_change("u").unwrap();
        }
        let refused = quotas.admit_change("u").unwrap_err();
        assert!(refused.to_string().contains("per second"), "{refused}");
        assert!(quotas.admit_change("v").is_ok());
    }

    #[test]
    fn changes_past_the_hourly_budget_are_refused() {
        let quotas = Quotas::new(QuotaLimits {
            changes_per_second: 100,
            changes_per_hour: 6,
            ..quotas().limits
        });
        for _ in 0..6 {
            quotas.admit_change("u").unwrap();
        }
        let refused = quotas.admit_change("u").unwrap_err();
        assert!(refused.to_string().contains("per hour"), "{refused}");
    }
}
