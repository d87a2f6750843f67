//! The cluster's rules, written once for both hosts: which slot a key belongs to, which nodes
//! are a slot's members by the ring, and which sessions must reconnect after a membership
//! change. The replicated state that carries them out is `system::consensus` (placement:
//! `consensus::place_slot`).
//!
//! Nodes are named on the ring; each host maps a name to its `NodeId` (the node hashes the
//! name, the simulator numbers its nodes), so the rules speak names and take that map.

use starling_gossip::Ring;

use crate::address::NodeId;

/// The slot a placed actor's state belongs to (issue 17: each slot one Raft group): a stable
/// hash of its ring key, over `slots` (`cluster.slots`, fixed when the cluster is made —
/// changing it would move every key). A different hash from the shard's, so a node's shards
/// do not each get a fixed subset of slots.
pub fn slot_of(key: &[u8], slots: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64_with_seed(key, SLOT_SEED) % slots.max(1) as u64) as u32
}

const SLOT_SEED: u64 = 0x5107_5107;

/// The voters of a slot's group: the ring's first `replication` members for the slot (by
/// its number, so every key of a slot has the same voters).
pub fn slot_voters(ring: &Ring, slot: u32, replication: usize) -> Vec<&str> {
    ring.replicas(&slot.to_be_bytes(), replication)
}

/// Whether a session must be closed (its client reconnects and binds again) after a
/// membership change: its user's actor lived on `owner_then` when it bound and now lives on
/// `owner_now`, or lived on a node that went (`gone`: the actor died with it), or this node
/// itself rejoined. (A slot that gained a member needs no reconnect: its actor's state is
/// the log's, and one that went stale is ended by `consensus::Act::Stale`.)
pub fn session_moved(rejoined: bool, owner_then: NodeId, owner_now: NodeId, gone: &[(NodeId, u64)]) -> bool {
    rejoined || owner_now != owner_then || gone.iter().any(|(g, _)| *g == owner_then)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| n.to_string()))
    }

    #[test]
    fn slots_spread_keys_and_their_voters_follow_the_ring() {
        let mut seen = vec![0usize; 64];
        for i in 0..6400 {
            seen[slot_of(format!("u{i}@x").as_bytes(), 64) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
        assert_eq!(slot_of(b"alice@localhost", 64), slot_of(b"alice@localhost", 64));
        let three = ring(&["n0", "n1", "n2"]);
        let four = ring(&["n0", "n1", "n2", "n3"]);
        let mut moved = 0;
        for slot in 0..64 {
            let v = slot_voters(&three, slot, 2);
            assert_eq!(v.len(), 2);
            assert_ne!(v[0], v[1]);
            let w = slot_voters(&four, slot, 2);
            // A join changes a slot's voters only by taking the newcomer in.
            if v != w {
                moved += 1;
                assert!(w.contains(&"n3"), "{v:?} -> {w:?}");
            }
        }
        assert!(moved > 0 && moved < 64, "{moved}");
        assert_eq!(slot_voters(&ring(&["n0"]), 5, 3), vec!["n0"]);
    }

    #[test]
    fn sessions_that_must_reconnect() {
        assert!(!session_moved(false, 1, 1, &[]));
        assert!(session_moved(true, 1, 1, &[]));
        assert!(session_moved(false, 1, 2, &[]));
        assert!(session_moved(false, 1, 1, &[(1, 5)]));
    }
}
