//! The cluster protocol's rules, written once for both hosts: where a user's actor lives and
//! who keeps copies of its state, how many copies a write or a read needs, who hands a user to
//! a node that joined its replica set, which copy a handoff or a read repair keeps, and which
//! sessions must reconnect after a membership change. The request and answer plumbing around
//! them (links, timeouts, the storage calls) is still each host's (`node/src/cluster/link.rs`,
//! `sim/src/cluster.rs`); the Raft issue replaces the protocol itself.
//!
//! Nodes are named on the ring; each host maps a name to its `NodeId` (the node hashes the
//! name, the simulator numbers its nodes), so the rules speak names and take that map.

use starling_gossip::Ring;
use starling_storage::Write;

use crate::address::{NodeId, ShardId};

/// Copies a write needs to be acknowledged, and a read to be served: a majority of
/// `replication`, counted against `replication` and not against the members seen just now,
/// so a node cut off from the others acknowledges nothing alone (with the default 2: both).
pub fn copies_needed(replication: usize) -> usize {
    replication / 2 + 1
}

/// Whether a write is durable: this node's copy (unless it refused) and the replicas that
/// took it make a majority.
pub fn durable(local_ok: bool, remote_ok: usize, replication: usize) -> bool {
    local_ok && 1 + remote_ok >= copies_needed(replication)
}

/// The shard of this node a placed actor lives on: a stable hash of its ring key (for a user,
/// the bare JID; xxh3, the same on every platform and run).
pub fn shard_of(key: &[u8], shards: ShardId) -> ShardId {
    let h = xxhash_rust::xxh3::xxh3_64(key);
    (h % shards.max(1) as u64) as ShardId
}

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

/// Where the placed actor with ring key `key` lives (`ActorKey::ring_key`): on the ring's
/// owner of the key (`id` maps a name to a node), on the shard [`shard_of`] when that is this
/// node (`me`); another node's shard is that node's business (0). `alone`: no other member is
/// up, every key is here.
pub fn place(
    ring: &Ring,
    me: NodeId,
    alone: bool,
    shards: ShardId,
    key: &[u8],
    id: impl Fn(&str) -> Option<NodeId>,
) -> (NodeId, ShardId) {
    if !alone {
        if let Some(owner) = ring.owner(key).and_then(id) {
            if owner != me {
                return (owner, 0);
            }
        }
    }
    (me, shard_of(key, shards))
}

/// The other nodes that keep copies of `user`'s state: the next `replication - 1` in the
/// ring's order for the key (none when `alone`).
pub fn other_replicas<'r>(ring: &'r Ring, me: &str, alone: bool, user: &str, replication: usize) -> Vec<&'r str> {
    if alone {
        return Vec::new();
    }
    ring.replicas(user.as_bytes(), replication)
        .into_iter()
        .filter(|n| *n != me)
        .collect()
}

/// After a ring change, the nodes `me` hands `user`'s state to: those its replica set
/// gained, when `me` is the first of the previous replicas still up (one sender per user).
/// So a newcomer gets the users it now owns, the next node after a death becomes a full
/// replica, and a node back from the dead gets the newer copies.
pub fn handoff_targets<'r>(old: &Ring, new: &'r Ring, me: &str, user: &str, replication: usize) -> Vec<&'r str> {
    let key = user.as_bytes();
    let before = old.replicas(key, replication);
    let sender = before.iter().find(|n| new.members().iter().any(|m| m == *n));
    if sender.copied() != Some(me) {
        return Vec::new();
    }
    new.replicas(key, replication)
        .into_iter()
        .filter(|n| *n != me && !before.contains(n))
        .collect()
}

/// Whether `user`'s replica set gained a node with the ring change (that node may have
/// served the user meanwhile: its actor must reload, with read repair).
pub fn replicas_gained(old: &Ring, new: &Ring, user: &str, replication: usize) -> bool {
    let key = user.as_bytes();
    let before = old.replicas(key, replication);
    new.replicas(key, replication).iter().any(|n| !before.contains(n))
}

/// Whether a session must be closed (its client reconnects and binds again) after a
/// membership change: its user's actor lived on `owner_then` when it bound and now lives on
/// `owner_now`, or lived on a node that went (`gone`: the actor died with it), or the user's
/// replica set gained a node (`gained`), or this node itself rejoined.
pub fn session_moved(
    rejoined: bool,
    owner_then: NodeId,
    owner_now: NodeId,
    gone: &[(NodeId, u64)],
    gained: bool,
) -> bool {
    rejoined || owner_now != owner_then || gone.iter().any(|(g, _)| *g == owner_then) || gained
}

/// Whether a copy offered at `offered` (a handoff, the newest copy of a read repair)
/// replaces the one here, at `here` (`None`: no account here).
pub fn replaces(here: Option<u64>, offered: u64) -> bool {
    here.is_none_or(|v| v < offered)
}

/// The writes that replace `user`'s copy here (at version `have`) with another's whole state
/// (`state`, at `version`), in one batch: on condition that the copy is still at `have` (a
/// replicated batch landing in between makes it fail, and the caller compares again).
pub fn replacement(user: &str, have: u64, state: impl IntoIterator<Item = Write>, version: u64) -> Vec<Write> {
    let mut all = vec![
        Write::NextVersion {
            user: user.to_string(),
            base: have,
        },
        Write::DeleteUser { user: user.to_string() },
    ];
    all.extend(state);
    all.push(Write::SetVersion {
        user: user.to_string(),
        version,
    });
    all
}

/// A read repair in progress: the newest copy the other replicas answered with, and the
/// version each answered (0: no account there).
#[derive(Debug)]
pub struct Repair<W> {
    pub best: Option<(u64, W)>,
    pub seen: Vec<(NodeId, u64)>,
}

impl<W> Default for Repair<W> {
    fn default() -> Self {
        Repair {
            best: None,
            seen: Vec::new(),
        }
    }
}

impl<W> Repair<W> {
    /// `from` answered with its copy.
    pub fn copy(&mut self, from: NodeId, version: u64, state: W) {
        self.seen.push((from, version));
        if self.best.as_ref().is_none_or(|(v, _)| version > *v) {
            self.best = Some((version, state));
        }
    }

    /// `from` has no account for the user (yet): any copy is newer.
    pub fn none_there(&mut self, from: NodeId) {
        self.seen.push((from, 0));
    }

    /// Enough replicas answered for a read (`copies_needed`, this node's copy included).
    pub fn enough(&self, replication: usize) -> bool {
        self.seen.len() + 1 >= copies_needed(replication)
    }

    /// The replicas that answered with a copy older than `version` (they get it, so the
    /// actor's first write finds them at its base).
    pub fn behind(&self, version: u64) -> Vec<NodeId> {
        self.seen
            .iter()
            .filter(|(_, v)| *v < version)
            .map(|(n, _)| *n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jid::BareJid;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| n.to_string()))
    }

    fn id(n: &str) -> Option<NodeId> {
        n.strip_prefix('n')?.parse().ok()
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
    fn quorum() {
        assert_eq!(copies_needed(1), 1);
        assert_eq!(copies_needed(2), 2);
        assert_eq!(copies_needed(3), 2);
        assert!(durable(true, 1, 3));
        assert!(!durable(false, 2, 3), "a refused local copy fails the write");
        assert!(!durable(true, 0, 2));
    }

    #[test]
    fn placement_and_replicas() {
        let r = ring(&["n0", "n1", "n2"]);
        let users: Vec<BareJid> = (0..60).map(|i| format!("u{i}@x").parse().unwrap()).collect();
        let mut owners = [0usize; 3];
        for u in &users {
            let k = u.as_str().as_bytes();
            let (n, s) = place(&r, 0, false, 4, k, id);
            owners[n as usize] += 1;
            if n == 0 {
                assert_eq!(s, shard_of(k, 4));
            } else {
                assert_eq!(s, 0);
            }
            assert_eq!(
                place(&r, 0, true, 4, k, id),
                (0, shard_of(k, 4)),
                "alone: every key here"
            );
            let others = other_replicas(&r, "n0", false, u.as_str(), 2);
            let mine = r.replicas(u.as_str().as_bytes(), 2).contains(&"n0");
            assert_eq!(others.len(), if mine { 1 } else { 2 });
            assert!(!others.contains(&"n0"));
            assert!(other_replicas(&r, "n0", true, u.as_str(), 2).is_empty());
        }
        assert!(owners.iter().all(|&c| c > 5), "{owners:?}");
    }

    #[test]
    fn a_joiner_gets_the_users_it_now_keeps_from_exactly_one_sender() {
        let old = ring(&["n0", "n1"]);
        let new = ring(&["n0", "n1", "n2"]);
        for i in 0..100 {
            let u = format!("u{i}@x");
            let gained = new.replicas(u.as_bytes(), 2).contains(&"n2");
            let senders: Vec<&str> = ["n0", "n1"]
                .into_iter()
                .filter(|me| !handoff_targets(&old, &new, me, &u, 2).is_empty())
                .collect();
            assert_eq!(senders.len(), usize::from(gained), "{u}");
            if gained {
                assert_eq!(handoff_targets(&old, &new, senders[0], &u, 2), vec!["n2"]);
                assert!(replicas_gained(&old, &new, &u, 2));
            }
        }
    }

    #[test]
    fn sessions_that_must_reconnect() {
        assert!(!session_moved(false, 1, 1, &[], false));
        assert!(session_moved(true, 1, 1, &[], false));
        assert!(session_moved(false, 1, 2, &[], false));
        assert!(session_moved(false, 1, 1, &[(1, 5)], false));
        assert!(session_moved(false, 1, 1, &[], true));
    }

    #[test]
    fn repair_keeps_the_newest_and_levels_the_rest() {
        assert!(replaces(None, 0));
        assert!(replaces(Some(3), 4));
        assert!(!replaces(Some(4), 4));
        let mut r: Repair<&str> = Repair::default();
        assert!(!r.enough(3));
        r.copy(1, 5, "five");
        r.none_there(2);
        r.copy(3, 7, "seven");
        r.copy(4, 6, "six");
        assert_eq!(r.best, Some((7, "seven")));
        assert!(r.enough(3));
        assert_eq!(r.behind(7), vec![1, 2, 4]);
        let w = replacement(
            "a@x",
            5,
            [Write::DeleteOffline {
                user: "a@x".into(),
                upto: 1,
            }],
            9,
        );
        assert!(matches!(w.first(), Some(Write::NextVersion { base: 5, .. })));
        assert!(matches!(w.last(), Some(Write::SetVersion { version: 9, .. })));
    }
}
