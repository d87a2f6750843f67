//! The cluster: membership (a ractor actor driving foca over UDP, `driver.rs`), each shard's
//! view of it (`View`: the ring and where every member's transport listens), and the
//! node-to-node links between shards of different nodes (`link.rs`); `starling cluster
//! status` (`status.rs`) and `starling cluster leave` (`leave.rs`).
//!
//! The driver pushes every membership change to every shard; a shard's `route` asks its view
//! which node owns a user, and an envelope for another node goes over this shard's link to
//! that node, which routes it on as if it had been sent locally.

pub mod driver;
pub mod leave;
pub mod link;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use jid::BareJid;
use starling_actors::address::{NodeId, ShardId};
use starling_gossip::{node_id, NodeIdentity, Ring};

/// What a shard is told at start and on every membership change.
pub type Members = Arc<MemberList>;

/// The members up (this node included) and those of them leaving (`cluster leave`: off the
/// ring, still reachable).
#[derive(Clone, Debug, Default)]
pub struct MemberList {
    pub up: Vec<NodeIdentity>,
    pub leaving: Vec<String>,
}

/// A shard's part of the cluster configuration.
#[derive(Clone)]
pub struct ClusterParams {
    pub name: String,
    pub generation: u64,
    pub transport: SocketAddr,
    /// `cluster.replication`: members of each slot's group.
    pub replication: usize,
    /// The store had no Raft state and this node may start a cluster (no seeds but its own
    /// gossip address): it bootstraps every slot with itself as the only member.
    pub bootstrap: bool,
    /// The members up; replaced by the driver on every change.
    pub latest: Arc<std::sync::Mutex<Members>>,
    /// One wake-up receiver per shard, indexed by shard id.
    pub updates: Vec<flume::Receiver<()>>,
    /// The slots this node hosts, as its shards last saw them (`/cluster/slots`).
    pub slot_table: status::SlotTable,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub transport: SocketAddr,
    pub generation: u64,
}

/// One shard's view of the membership: the ring over the names of members up, and how to
/// reach each.
#[derive(Clone, Debug)]
pub struct View {
    pub me: NodeId,
    /// This node's name on the ring; empty on a single node.
    pub name: String,
    pub shards: ShardId,
    /// `cluster.slots`.
    pub slots: u32,
    pub ring: Ring,
    pub peers: HashMap<NodeId, Peer>,
    /// Members leaving (`cluster leave`), this node included when it is.
    pub leaving: std::collections::HashSet<NodeId>,
}

impl starling_actors::system::consensus::Members for View {
    fn name(&self) -> &str {
        &self.name
    }
    fn me(&self) -> NodeId {
        self.me
    }
    fn ring(&self) -> &Ring {
        &self.ring
    }
    fn alone(&self) -> bool {
        self.peers.is_empty()
    }
    fn node_id(&self, name: &str) -> Option<NodeId> {
        Some(node_id(name))
    }
    fn leaving(&self, node: NodeId) -> bool {
        self.leaving.contains(&node)
    }
}

impl starling_actors::address::Placement for View {
    fn place(&self, key: &[u8]) -> (NodeId, ShardId) {
        View::place(self, key)
    }
}

impl View {
    /// This node alone (a single node: `name` empty): the ring has only this node.
    pub fn single(me: NodeId, name: &str, shards: ShardId, slots: u32) -> Self {
        View {
            me,
            name: name.to_string(),
            shards,
            slots,
            ring: Ring::new([name.to_string()]),
            peers: HashMap::new(),
            leaving: Default::default(),
        }
    }

    pub fn update(&mut self, members: &MemberList) {
        self.ring = Ring::new(
            members
                .up
                .iter()
                .filter(|m| !members.leaving.contains(&m.name))
                .map(|m| m.name.clone()),
        );
        self.leaving = members.leaving.iter().map(|n| node_id(n)).collect();
        self.peers = members
            .up
            .iter()
            .filter(|m| node_id(&m.name) != self.me)
            .filter_map(|m| {
                let transport = m.transport.parse().ok()?;
                Some((
                    node_id(&m.name),
                    Peer {
                        name: m.name.clone(),
                        transport,
                        generation: m.generation,
                    },
                ))
            })
            .collect();
    }

    /// The node that hosts the placed actor with ring key `key` — the ring's owner of its
    /// slot — and the slot's shard (`consensus::place_slot`).
    pub fn place(&self, key: &[u8]) -> (NodeId, ShardId) {
        let slot = starling_actors::system::cluster::slot_of(key, self.slots);
        starling_actors::system::consensus::place_slot(self, slot, self.shards)
    }

    /// The node that owns `user`'s actor, and the shard when it is this node.
    pub fn place_user(&self, user: &BareJid) -> (NodeId, ShardId) {
        self.place(user.as_str().as_bytes())
    }
}

/// What `serve` needs to run a cluster member.
pub struct Setup {
    pub node: NodeId,
    pub params: ClusterParams,
    me: NodeIdentity,
    seeds: Vec<String>,
    wakeups: Vec<flume::Sender<()>>,
}

/// `None` when `cluster.node_name` is empty (a single node).
pub fn setup(cfg: &crate::config::Config, shards: usize) -> Result<Option<Setup>, String> {
    let c = &cfg.cluster;
    if c.node_name.is_empty() {
        return Ok(None);
    }
    // A restarted process must be told from the old one: its start time in ms.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1);
    let me = NodeIdentity {
        name: c.node_name.clone(),
        gossip: c.gossip.clone(),
        transport: c.transport.clone(),
        generation,
    };
    let (wakeups, updates): (Vec<_>, Vec<_>) = (0..shards).map(|_| flume::bounded(1)).unzip();
    let transport = c.transport.parse().map_err(|e| format!("cluster.transport: {e}"))?;
    Ok(Some(Setup {
        node: node_id(&c.node_name),
        params: ClusterParams {
            name: c.node_name.clone(),
            generation,
            transport,
            replication: c.replication,
            bootstrap: c.seeds.iter().all(|s| *s == c.gossip),
            latest: Arc::new(std::sync::Mutex::new(Arc::new(MemberList {
                up: vec![me.clone()],
                leaving: Vec::new(),
            }))),
            updates,
            slot_table: status::SlotTable::default(),
        },
        me,
        seeds: c.seeds.clone(),
        wakeups,
    }))
}

impl Setup {
    /// `stop` is told when a `cluster leave` has finished.
    pub fn driver_args(
        self,
        status: crate::metrics::ClusterStatus,
        stop: std::sync::Arc<tokio::sync::Notify>,
    ) -> driver::DriverArgs {
        driver::DriverArgs {
            me: self.me,
            seeds: self.seeds,
            shards: self.wakeups,
            latest: self.params.latest,
            status,
            slot_table: self.params.slot_table,
            stop,
        }
    }
}
