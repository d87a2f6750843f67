//! The cluster: membership (a ractor actor driving foca over UDP, `driver.rs`), each shard's
//! view of it (`View`: the ring and where every member's transport listens), and the
//! node-to-node links between shards of different nodes (`link.rs`).
//!
//! The driver pushes every membership change to every shard; a shard's `route` asks its view
//! which node owns a user, and an envelope for another node goes over this shard's link to
//! that node, which routes it on as if it had been sent locally.

pub mod driver;
pub mod link;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use jid::BareJid;
use starling_actors::address::{NodeId, ShardId};
use starling_gossip::{node_id, NodeIdentity, Ring};

/// What a shard is told at start and on every membership change.
pub type Members = Arc<Vec<NodeIdentity>>;

/// A shard's part of the cluster configuration.
#[derive(Clone)]
pub struct ClusterParams {
    pub name: String,
    pub generation: u64,
    pub transport: SocketAddr,
    /// `cluster.replication`: copies of each user's state, the owner's included.
    pub replication: usize,
    /// The members up; replaced by the driver on every change.
    pub latest: Arc<std::sync::Mutex<Members>>,
    /// One wake-up receiver per shard, indexed by shard id.
    pub updates: Vec<flume::Receiver<()>>,
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
    pub shards: ShardId,
    pub ring: Ring,
    pub peers: HashMap<NodeId, Peer>,
}

impl starling_actors::address::Placement for View {
    fn place(&self, key: &[u8]) -> (NodeId, ShardId) {
        View::place(self, key)
    }
}

impl View {
    /// One node, no cluster: the ring has only this node.
    pub fn single(me: NodeId, name: &str, shards: ShardId) -> Self {
        View {
            me,
            shards,
            ring: Ring::new([name.to_string()]),
            peers: HashMap::new(),
        }
    }

    pub fn update(&mut self, members: &[NodeIdentity]) {
        self.ring = Ring::new(members.iter().map(|m| m.name.clone()));
        self.peers = members
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

    /// The node that owns the placed actor with ring key `key`, and the shard when it is this
    /// node (another node picks its own shard).
    pub fn place(&self, key: &[u8]) -> (NodeId, ShardId) {
        let (ring, alone) = (&self.ring, self.peers.is_empty());
        starling_actors::system::cluster::place(ring, self.me, alone, self.shards, key, |n| Some(node_id(n)))
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
            latest: Arc::new(std::sync::Mutex::new(Arc::new(vec![me.clone()]))),
            updates,
        },
        me,
        seeds: c.seeds.clone(),
        wakeups,
    }))
}

impl Setup {
    pub fn driver_args(self, status: crate::metrics::ClusterStatus) -> driver::DriverArgs {
        driver::DriverArgs {
            me: self.me,
            seeds: self.seeds,
            shards: self.wakeups,
            latest: self.params.latest,
            status,
        }
    }
}
