//! Every Redis key and channel the service uses, built here and nowhere else.
//!
//! | key | type | slot | holds |
//! |---|---|---|---|
//! | `presence:{u:<user>}` | hash `r`, `d` | the user's | revision and serialized [`UserRecord`](crate::domain::UserRecord) |
//! | `presence:{u:<user>}:contacts` | set | the user's | the user's contacts |
//! | `presence:{u:<user>}:history` | sorted set | the user's | history records, scored by version |
//! | `presence:{u:<user>}:choice` | hash `at`, `d` | the user's | the user's latest durable choice: its stamp and the serialized [`ChoiceRecord`](crate::store::ChoiceRecord) |
//! | `presence:{t<n>}:node:<node>` | set | the user's (see below) | users of that slot with a session on `<node>` |
//! | `presence:{nodes}:registry` | hash | `{nodes}` | every node that registered, and when |
//! | `presence:{nodes}:lease:<node>` | string, TTL | `{nodes}` | the node's lease |
//! | `presence:{nodes}:claim:<node>` | string, TTL | `{nodes}` | which store instance reclaims a lost node |
//! | `presence:{nodes}:slots:<node>` | bitmap | `{nodes}` | the slots whose node index for `<node>` may hold users |
//! | channel `presence:bus:{t<n>}` | sharded pub/sub | spread evenly | fan-out events of one bucket of users |
//!
//! Keys of one user share the hash tag `{u:<user>}`, so one Lua script can
//! change them together. The node index is the one structure indexed by
//! something else (the node), and it still has to change in the same script
//! as the user's record, or a crash between two writes could leave a session
//! the index does not know about (a ghost nobody reclaims). So the index is
//! split per slot: the part for the users of slot `s` is tagged `{t<n>}`, the
//! shortest tag of that form that hashes to `s` itself ([`slot_tag`]). Redis
//! only requires the keys of a script to be in one slot, not to share a tag.

use std::sync::OnceLock;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Sharded pub/sub channels of the fan-out. 256 spreads them evenly over any
/// number of masters up to a few dozen (each owns contiguous slot ranges and
/// channel `b` sits at slot `b * 64`) while keeping what every node subscribes
/// to, and resubscribes after a failover, small.
pub const BUS_BUCKETS: u16 = 256;

const PREFIX: &str = "presence:";

/// The hash of one user's record: fields `r` (revision) and `d` (the record).
pub fn user(user_id: &str) -> String {
    format!("{PREFIX}{{u:{user_id}}}")
}

/// The set of the user's contacts.
pub fn contacts(user_id: &str) -> String {
    format!("{PREFIX}{{u:{user_id}}}:contacts")
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

/// A user's cached contact list (the durable list is in ScyllaDB).
pub fn contacts_cache(user_id: &str) -> String {
    format!("{}:contacts-cache", user(user_id))
}

/// The slot every key of `user_id` lives in.
pub fn user_slot(user_id: &str) -> u16 {
    slot_of(user(user_id).as_bytes())
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

/// The fan-out bucket of a user: users of neighbouring slots share one.
pub fn bus_bucket(user_id: &str) -> u16 {
    user_slot(user_id) / (SLOTS / BUS_BUCKETS)
}

/// The sharded channel of a fan-out bucket.
pub fn bus_channel(bucket: u16) -> String {
    format!(
        "{PREFIX}bus:{{{}}}",
        slot_tag(bucket * (SLOTS / BUS_BUCKETS))
    )
}

/// The channel every event about `user_id` goes through.
pub fn bus_channel_of(user_id: &str) -> String {
    bus_channel(bus_bucket(user_id))
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
    fn keys_of_a_user_share_a_slot_with_its_node_index() {
        for user in ["alice", "bob", "x}y", "{weird}", ""] {
            let slot = user_slot(user);
            assert_eq!(slot_of(contacts(user).as_bytes()), slot);
            assert_eq!(slot_of(history(user).as_bytes()), slot);
            assert_eq!(slot_of(choice(user).as_bytes()), slot);
            assert_eq!(slot_of(node_index(slot, "node-1").as_bytes()), slot);
        }
    }

    #[test]
    fn every_slot_has_a_tag() {
        for slot in (0..SLOTS).step_by(97).chain([0, SLOTS - 1]) {
            assert_eq!(slot_of(slot_tag(slot).as_bytes()), slot);
        }
    }

    #[test]
    fn bus_channels_spread_over_the_slots() {
        for bucket in 0..BUS_BUCKETS {
            assert_eq!(
                slot_of(bus_channel(bucket).as_bytes()),
                bucket * (SLOTS / BUS_BUCKETS)
            );
        }
        assert!(bus_bucket("anyone") < BUS_BUCKETS);
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
