//! Rendezvous (highest-random-weight) hashing: every node scores every key with a stable hash
//! of (node, key); the highest score owns the key and the next ones are its replicas.
//!
//! Why rendezvous rather than a ring of virtual nodes: no tables to build or keep in sync, an
//! even spread without tuning a virtual-node count, replicas are simply the next best scores,
//! and when a node joins or leaves only the keys it wins or held move (≈ 1/N of them). The
//! cost is O(N) per lookup, which is nothing at the cluster sizes Starling targets (tens of
//! nodes); a lookup cache per shard can come if profiles ask for it.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A node's stable name (`cluster.node_name`): placement depends on names, never on addresses
/// or join order, so every member computes the same answer from the same membership.
pub type NodeName = String;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// Sorted and deduplicated: equal memberships are equal rings.
    members: Vec<NodeName>,
}

impl Ring {
    pub fn new<I: IntoIterator<Item = NodeName>>(members: I) -> Self {
        let mut members: Vec<NodeName> = members.into_iter().collect();
        members.sort();
        members.dedup();
        Ring { members }
    }

    pub fn members(&self) -> &[NodeName] {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    fn score(node: &str, key: &[u8]) -> u64 {
        // Seeded by the node's own hash, so that the score is a hash of the pair.
        xxh3_64_with_seed(key, xxhash_rust::xxh3::xxh3_64(node.as_bytes()))
    }

    /// The owner of `key`, or `None` with no members.
    pub fn owner(&self, key: &[u8]) -> Option<&str> {
        self.members
            .iter()
            .max_by_key(|n| (Self::score(n, key), std::cmp::Reverse(n.as_str())))
            .map(|n| n.as_str())
    }

    /// The owner and the next `n - 1` nodes in score order (fewer when the cluster is
    /// smaller): where `key`'s state is written.
    pub fn replicas(&self, key: &[u8], n: usize) -> Vec<&str> {
        let mut scored: Vec<(u64, &str)> = self.members.iter().map(|m| (Self::score(m, key), m.as_str())).collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        scored.into_iter().take(n).map(|(_, m)| m).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|s| s.to_string()))
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..20_000).map(|i| format!("user{i}@example.org").into_bytes())
    }

    #[test]
    fn the_same_membership_gives_the_same_answers_whatever_the_order() {
        let a = ring(&["n1", "n2", "n3"]);
        let b = ring(&["n3", "n1", "n2", "n1"]);
        assert_eq!(a, b);
        for k in keys().take(1000) {
            assert_eq!(a.owner(&k), b.owner(&k));
            assert_eq!(a.replicas(&k, 2), b.replicas(&k, 2));
        }
        // Pinned: placement must not change between builds or platforms.
        let k = b"alice@localhost";
        assert_eq!(a.replicas(k, 3), vec!["n3", "n2", "n1"]);
        assert_eq!(a.owner(k), Some("n3"));
        assert!(Ring::new(Vec::new()).owner(k).is_none());
    }

    #[test]
    fn keys_spread_evenly_and_replicas_are_distinct() {
        let r = ring(&["a", "b", "c", "d", "e"]);
        let mut count = std::collections::BTreeMap::new();
        for k in keys() {
            *count.entry(r.owner(&k).unwrap().to_string()).or_insert(0usize) += 1;
            let reps = r.replicas(&k, 3);
            assert_eq!(reps.len(), 3);
            assert!(reps[0] != reps[1] && reps[1] != reps[2] && reps[0] != reps[2]);
            assert_eq!(reps[0], r.owner(&k).unwrap());
        }
        // 20,000 keys over 5 nodes: 4,000 each expected; allow ±10%.
        for (n, c) in &count {
            assert!((3600..=4400).contains(c), "{n} owns {c}: {count:?}");
        }
    }

    #[test]
    fn a_join_or_a_leave_moves_only_the_keys_it_must() {
        let before = ring(&["a", "b", "c", "d"]);
        let after = ring(&["a", "b", "c", "d", "e"]);
        let mut moved = 0;
        for k in keys() {
            let (o1, o2) = (before.owner(&k).unwrap(), after.owner(&k).unwrap());
            if o1 != o2 {
                // A key only ever moves to the newcomer.
                assert_eq!(o2, "e");
                moved += 1;
            }
        }
        // ≈ 1/5 of the keys move to the fifth node.
        assert!((3400..=4600).contains(&moved), "{moved} moved");
        // A leave: the leaver's keys go to what were their first replicas; nothing else moves.
        let without_b = ring(&["a", "c", "d"]);
        for k in keys().take(5000) {
            let reps = before.replicas(&k, 2);
            let new_owner = without_b.owner(&k).unwrap();
            if reps[0] == "b" {
                assert_eq!(new_owner, reps[1]);
            } else {
                assert_eq!(new_owner, reps[0]);
            }
        }
    }
}
