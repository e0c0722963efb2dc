//! Every Redis key and channel the service uses, built here and nowhere else.
//!
//! | key | type | slot | holds |
//! |---|---|---|---|
//! | `presence:{t<n>}:u:<user>` | hash `r`, `d` | the user's partition's | revision and serialized [`UserRecord`](crate::domain::UserRecord) |
//! | `presence:{t<n>}:log` | stream | the partition's | the change log of the partition's users |
//! | channel `presence:bus:{t<n>}` | sharded pub/sub | the partition's | fan-out events of the partition's users |
//! | `presence:{t<n>}:node:<node>` | set | the partition's | users of that slot with a session on `<node>` |
//! | `presence:{u:<user>}:contacts` | set | the user's own | the user's contacts |
//! | `presence:{u:<user>}:contacts-cache` | set | the user's own | the user's cached contacts (the durable list is in ScyllaDB) |
//! | `presence:{u:<user>}:history` | sorted set | the user's own | history records, scored by version (without ScyllaDB) |
//! | `presence:{u:<user>}:choice` | hash `at`, `d` | the user's own | the user's latest durable choice (without ScyllaDB): its stamp and the serialized [`ChoiceRecord`](crate::store::ChoiceRecord) |
//! | `presence:{nodes}:registry` | hash | `{nodes}` | every node that registered, and when |
//! | `presence:{nodes}:lease:<node>` | string, TTL | `{nodes}` | the node's lease |
//! | `presence:{nodes}:claim:<node>` | string, TTL | `{nodes}` | which store instance reclaims a lost node |
//! | `presence:{nodes}:slots:<node>` | bitmap | `{nodes}` | the slots whose node index for `<node>` may hold users |
//! | `presence:{nodes}:partitions` | string | `{nodes}` | the partition count every node must share |
//! | `presence:{feed}:members:<group>` | hash | `{feed}` | a consumer group's members, each with the deadline of its last sign of life |
//!
//! Users are spread over P **partitions** (`--log-partitions`), a user always
//! in the same one. A user's record, the partition's change log and its
//! fan-out channel share one slot, so the one script that applies a change
//! also appends it to the log and publishes it: no crash can separate the
//! three. Partition `p` sits at slot `p * 16384 / P`, spreading the
//! partitions evenly over the masters, which own contiguous slot ranges. The
//! tag of a slot is `t<n>`, the shortest tag of that form that hashes to it
//! ([`slot_tag`]); the node index, kept per slot for the same reason (a
//! session the index misses would be a ghost nobody reclaims), uses the same
//! tags. Redis only requires the keys of a script to be in one slot. A user's
//! other keys are read and written on their own, so they keep a tag of the
//! user's own (`{u:<user>}`), which spreads them over every slot.

use std::sync::OnceLock;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The most partitions: enough for a cluster of a few hundred masters.
pub const MAX_PARTITIONS: u16 = 1024;

const PREFIX: &str = "presence:";

/// The keys of users, which depend on how many partitions spread them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys {
    partitions: u16,
}

impl Keys {
    /// `partitions` is clamped to 1..=[`MAX_PARTITIONS`].
    pub fn new(partitions: u16) -> Self {
        Keys {
            partitions: partitions.clamp(1, MAX_PARTITIONS),
        }
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The partition of `user_id`: the same on every node for a given
    /// partition count.
    pub fn partition_of(&self, user_id: &str) -> u16 {
        partition_of(user_id, self.partitions)
    }

    /// The slot of `partition`, and of every key of its users.
    pub fn partition_slot(&self, partition: u16) -> u16 {
        let slot = u32::from(partition) * u32::from(SLOTS) / u32::from(self.partitions);
        u16::try_from(slot).unwrap_or(SLOTS - 1)
    }

    /// The slot every key of `user_id` lives in.
    pub fn user_slot(&self, user_id: &str) -> u16 {
        self.partition_slot(self.partition_of(user_id))
    }

    /// The hash of one user's record: fields `r` (revision) and `d` (the
    /// record).
    pub fn user(&self, user_id: &str) -> String {
        format!(
            "{PREFIX}{{{}}}:u:{user_id}",
            slot_tag(self.user_slot(user_id))
        )
    }

    /// The change log of `partition`.
    pub fn log(&self, partition: u16) -> String {
        format!(
            "{PREFIX}{{{}}}:log",
            slot_tag(self.partition_slot(partition))
        )
    }

    /// The sharded fan-out channel of `partition`.
    pub fn bus_channel(&self, partition: u16) -> String {
        format!(
            "{PREFIX}bus:{{{}}}",
            slot_tag(self.partition_slot(partition))
        )
    }

    /// The channel every event about `user_id` goes through.
    pub fn bus_channel_of(&self, user_id: &str) -> String {
        self.bus_channel(self.partition_of(user_id))
    }
}

/// The users of `slot` with a session on `node_id`; in `slot` itself.
pub fn node_index(slot: u16, node_id: &str) -> String {
    format!("{PREFIX}{{{}}}:node:{node_id}", slot_tag(slot))
}

/// Every node that ever registered (field: node id).
pub fn node_registry() -> String {
    format!("{PREFIX}{{nodes}}:registry")
}

/// Exists while the node is alive.
pub fn node_lease(node_id: &str) -> String {
    format!("{PREFIX}{{nodes}}:lease:{node_id}")
}

/// Names the store instance reclaiming a lost node.
pub fn node_claim(node_id: &str) -> String {
    format!("{PREFIX}{{nodes}}:claim:{node_id}")
}

/// Bit `s` set: the node index of `node_id` in slot `s` may hold users.
pub fn node_slots(node_id: &str) -> String {
    format!("{PREFIX}{{nodes}}:slots:{node_id}")
}

/// The set of the user's contacts.
pub fn contacts(user_id: &str) -> String {
    format!("{PREFIX}{{u:{user_id}}}:contacts")
}

/// A user's cached contact list (the durable list is in ScyllaDB).
pub fn contacts_cache(user_id: &str) -> String {
    format!("{PREFIX}{{u:{user_id}}}:contacts-cache")
}

/// The sorted set of the user's history.
pub fn history(user_id: &str) -> String {
    format!("{PREFIX}{{u:{user_id}}}:history")
}

/// The hash of the user's latest durable choice (when Redis is the history
/// store): fields `at` (its stamp) and `d` (the choice).
pub fn choice(user_id: &str) -> String {
    format!("{PREFIX}{{u:{user_id}}}:choice")
}

/// The partition count every node of a deployment must share.
pub fn partitions_setting() -> String {
    format!("{PREFIX}{{nodes}}:partitions")
}

/// The members of consumer group `group`, each with the deadline of its
/// last sign of life (Unix ms).
pub fn feed_members(group: &str) -> String {
    format!("{PREFIX}{{feed}}:members:{group}")
}

/// The partition of `user_id` among `partitions`, in every backend.
pub fn partition_of(user_id: &str, partitions: u16) -> u16 {
    crc16(user_id.as_bytes()) % partitions.max(1)
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole
/// key when it has none, as Redis computes it.
pub fn slot_of(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

/// What Redis hashes: the part between the first `{` and the next `}` when
/// that is not empty, else the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|b| *b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|b| *b == b'}') {
        Some(0) | None => key,
        Some(len) => &key[open + 1..open + 1 + len],
    }
}

fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |mut crc, byte| {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
        crc
    })
}

/// The hash tag `t<n>` with the smallest `n` that lands in `slot`. The table
/// is a pure function of the hash, so every node computes the same one; it
/// takes a few milliseconds, once.
pub fn slot_tag(slot: u16) -> String {
    static TABLE: OnceLock<Vec<u32>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = vec![u32::MAX; usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n = 0u32;
        while missing > 0 {
            let s = usize::from(slot_of(format!("t{n}").as_bytes()));
            if table[s] == u32::MAX {
                table[s] = n;
                missing -= 1;
            }
            n += 1;
        }
        table
    });
    format!("t{}", table[usize::from(slot % SLOTS)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT on a real server.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"foo{}{bar}"), 8363);
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn a_record_shares_its_slot_with_its_log_channel_and_node_index() {
        for partitions in [1, 3, 16, MAX_PARTITIONS] {
            let keys = Keys::new(partitions);
            for user in ["alice", "bob", "x}y", "{weird}", ""] {
                let slot = keys.user_slot(user);
                let partition = keys.partition_of(user);
                for key in [
                    keys.user(user),
                    keys.log(partition),
                    keys.bus_channel_of(user),
                    node_index(slot, "node-1"),
                ] {
                    assert_eq!(slot_of(key.as_bytes()), slot, "{key}");
                }
            }
        }
    }

    #[test]
    fn every_slot_has_a_tag() {
        for slot in (0..SLOTS).step_by(97).chain([0, SLOTS - 1]) {
            assert_eq!(slot_of(slot_tag(slot).as_bytes()), slot);
        }
    }

    #[test]
    fn partitions_spread_over_the_slots() {
        let keys = Keys::new(16);
        for partition in 0..16 {
            assert_eq!(
                slot_of(keys.log(partition).as_bytes()),
                partition * (SLOTS / 16)
            );
        }
        let mut users_per_partition = [0u32; 16];
        for n in 0..16_000 {
            users_per_partition[usize::from(keys.partition_of(&format!("user-{n}")))] += 1;
        }
        assert!(users_per_partition.iter().all(|n| (800..1200).contains(n)));
        assert_eq!(Keys::new(0).partitions(), 1);
        assert_eq!(Keys::new(u16::MAX).partitions(), MAX_PARTITIONS);
    }

    #[test]
    fn node_keys_share_one_slot() {
        let slot = slot_of(node_registry().as_bytes());
        for key in [
            node_lease("n"),
            node_claim("n"),
            node_slots("n"),
            node_lease("other"),
        ] {
            assert_eq!(slot_of(key.as_bytes()), slot);
        }
    }
}
