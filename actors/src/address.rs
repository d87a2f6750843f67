//! Location-transparent addresses and placement (DESIGN.md "Addresses and placement").
//!
//! A placed actor is addressed by its key ([`ActorKey`]: its kind and which one) wherever it
//! lives; a session by the shard that accepted its connection. The [`Placement`] answers where
//! a key lives; with one node it always answers "this node" and a stable hash of the key picks
//! the shard; in a cluster, the ring's owner of the key.

use jid::BareJid;

pub type NodeId = u32;
pub type ShardId = u16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionAddr {
    pub node: NodeId,
    /// The incarnation of `node` that accepted the session: its membership generation (0 on a
    /// single node). A node that restarts or rejoins under a new generation starts numbering
    /// sessions again, so an address names one session ever only with it; `NodeDown` ends the
    /// sessions of the generations gone, not those the node accepted since.
    pub node_gen: u64,
    pub shard: ShardId,
    pub id: u64,
}

/// A placed actor: its kind, and which one of that kind. It lives where [`Placement`] puts
/// its [`ActorKey::ring_key`], is activated by its first message, passivated when idle and
/// handed to its new owner when the ring changes (ARCHITECTURE.md "Adding an actor kind":
/// a new kind is a new variant here, and the compiler shows every place that must learn it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActorKey {
    /// A user's actor (`crate::user`): its sessions, presence, roster and offline messages.
    User(BareJid),
}

impl ActorKey {
    /// The bytes the ring and the shard hash place it by.
    pub fn ring_key(&self) -> &[u8] {
        match self {
            ActorKey::User(j) => j.as_str().as_bytes(),
        }
    }
}

impl std::fmt::Display for ActorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActorKey::User(j) => write!(f, "user {j}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    User(BareJid),
    Session(SessionAddr),
}

/// One mailbox on a shard, as a map key (hosts keep envelopes held for a full mailbox by it;
/// `Envelope::mailbox_key`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MailboxKey {
    Actor(ActorKey),
    Session(u64),
}

impl MailboxKey {
    /// A user actor's mailbox.
    pub fn user(jid: &BareJid) -> Self {
        MailboxKey::Actor(ActorKey::User(jid.clone()))
    }
}

pub trait Placement {
    /// The (node, shard) hosting the placed actor whose ring key is `key`
    /// ([`ActorKey::ring_key`]).
    fn place(&self, key: &[u8]) -> (NodeId, ShardId);

    /// The (node, shard) hosting the actor for `user`.
    fn place_user(&self, user: &BareJid) -> (NodeId, ShardId) {
        self.place(user.as_str().as_bytes())
    }
}

/// One node: every key is local, on the shard of its slot (`consensus::shard_of_slot`; the
/// slot a stable hash of the key — xxh3, the same on every platform and run, unlike std's
/// `RandomState`).
#[derive(Clone, Debug)]
pub struct SingleNode {
    pub node: NodeId,
    pub shards: ShardId,
    /// `cluster.slots`.
    pub slots: u32,
}

impl Placement for SingleNode {
    fn place(&self, key: &[u8]) -> (NodeId, ShardId) {
        let slot = crate::system::cluster::slot_of(key, self.slots);
        (self.node, crate::system::consensus::shard_of_slot(slot, self.shards))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_and_spreads() {
        let p = SingleNode {
            node: 0,
            shards: 4,
            slots: 64,
        };
        let mut seen = [0usize; 4];
        for i in 0..400 {
            let j: BareJid = format!("user{i}@localhost").parse().unwrap();
            let (n, s) = p.place_user(&j);
            assert_eq!(n, 0);
            assert_eq!(p.place_user(&j), (n, s));
            seen[s as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
        // Fixed value: placement must not change between builds or platforms.
        let j: BareJid = "alice@localhost".parse().unwrap();
        let slot = crate::system::cluster::slot_of(b"alice@localhost", 64);
        assert_eq!(p.place_user(&j).1, (slot % 4) as u16);
    }
}
