//! The cluster's rules, written once for both hosts: which slot a key belongs to, which nodes
//! are a slot's members by the ring, and which sessions must register with a moved actor
//! after a membership change. The replicated state that carries them out is `system::consensus` (placement:
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

/// Whether a session must register with its user's new actor (`SessionMsg::Rebind`) after a
/// membership change: the actor lived on `owner_then` when the session last registered and
/// now lives on `owner_now`, or lived on a node that went (`gone`: the actor died with it).
/// (A slot that gained a member moves nothing by itself: its actor's state is the log's, and
/// one that went stale is ended by `consensus::Act::Stale`, its sessions registering again.)
pub fn session_moved(owner_then: NodeId, owner_now: NodeId, gone: &[(NodeId, u64)]) -> bool {
    owner_now != owner_then || gone.iter().any(|(g, _)| *g == owner_then)
}

/// The slots whose actors moved with a membership change: the ring's owner of the slot is
/// another node, or is a node that went (its actors died with it; `gone` names them).
/// Contacts in those slots may have answered for their users before their sessions
/// registered again, so their presence is asked for again (`UserMsg::Resync`).
pub fn moved_slots(old: &Ring, new: &Ring, gone: &[NodeId], id_of: impl Fn(&str) -> NodeId, slots: u32) -> Vec<u32> {
    (0..slots)
        .filter(|s| {
            let before = slot_voters(old, *s, 1).first().map(|n| id_of(n));
            let after = slot_voters(new, *s, 1).first().map(|n| id_of(n));
            before != after || before.is_some_and(|b| gone.contains(&b))
        })
        .collect()
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
    fn slots_that_moved() {
        let id = |n: &str| n[1..].parse::<u32>().unwrap();
        let (three, four) = (ring(&["n0", "n1", "n2"]), ring(&["n0", "n1", "n2", "n3"]));
        let joined = moved_slots(&three, &four, &[], id, 64);
        assert!(!joined.is_empty() && joined.len() < 64, "{joined:?}");
        for s in &joined {
            assert_eq!(
                slot_voters(&four, *s, 1),
                vec!["n3"],
                "a join moves slots only to the newcomer"
            );
        }
        assert!(moved_slots(&three, &three, &[], id, 64).is_empty());
        // A node that restarted keeps its slots on the ring, but its actors died.
        let restarted = moved_slots(&three, &three, &[1], id, 64);
        assert!(restarted.iter().all(|s| slot_voters(&three, *s, 1) == vec!["n1"]));
        assert!(!restarted.is_empty());
    }

    #[test]
    fn sessions_that_register_again() {
        assert!(!session_moved(1, 1, &[]));
        assert!(session_moved(1, 2, &[]));
        assert!(session_moved(1, 1, &[(1, 5)]));
        assert!(!session_moved(1, 1, &[(2, 5)]));
    }
}
