//! The cluster in the simulator (`--nodes N`, N > 1), mirroring node/src/cluster: each node
//! runs the real foca membership (`starling_gossip::Membership`) over simulated UDP (delay,
//! reordering, loss, duplication, partitions), routes by its own view of the ring, and talks
//! to the other nodes over simulated links with the node's semantics (link.rs): envelopes
//! encoded with the real wire codec, account reads at the owner, writes replicated to the
//! next `REPLICATION - 1` nodes and acknowledged on a majority of copies, handoffs on ring
//! changes, `NodeDown` to the actors when a node dies or restarts, sessions whose user moved
//! closed so that their clients reconnect.
//!
//! A link is one TCP connection per (sending node, sending shard, receiving node): frames
//! arrive in order. While a partition separates the two nodes its frames wait (TCP
//! retransmits); they arrive after the heal if the sender still sees the receiver as the same
//! member, and are lost when the sender drops it from its view (the node closes the link)
//! or the receiver restarts. Gossip datagrams have no such care: lost, duplicated, reordered.

use std::collections::{BTreeMap, VecDeque};

use jid::BareJid;
use starling_actors::address::{NodeId, Placement, SessionAddr, ShardId};
use starling_actors::c2s::Input;
use starling_actors::msg::{Envelope, SessionMsg, UserMsg};
use starling_actors::system::cluster as rules;
use starling_actors::wire;
use starling_gossip::{Membership, NodeIdentity, Output, Ring, Timer, Timings};
use starling_storage::{Account, Storage, Write};

use crate::host::{Origin, Waiter};
use crate::world::{Ev, World};

/// `cluster.replication` in the simulated deployment (the node's default).
pub const REPLICATION: usize = 2;
/// How long a node waits for another node's answer (link.rs `ACCOUNT_TIMEOUT`).
pub const ACCOUNT_TIMEOUT_US: u64 = starling_actors::system::limits::ACCOUNT_TIMEOUT_MS * 1000;
/// Frames a link holds while its peer is unreachable (link.rs `LINK_QUEUE`).
pub const LINK_QUEUE: usize = starling_actors::system::limits::LINK_QUEUE;
/// The driver's membership tick.
const TICK_US: u64 = 1_000_000;

pub fn name(i: u32) -> String {
    format!("n{i}")
}

pub fn index(name: &str) -> Option<u32> {
    name.strip_prefix('n')?.parse().ok()
}

fn identity(i: u32, generation: u64) -> NodeIdentity {
    NodeIdentity {
        name: name(i),
        gossip: name(i),
        transport: name(i),
        generation,
    }
}

/// A node's cluster state (node/src/cluster: `View` and `Links`).
pub struct NodeCluster {
    pub id: u32,
    /// Bumped by every start of the process (its TCP connections die with it).
    pub generation: u64,
    pub member: Option<Membership>,
    /// The ring over the members this node sees up (itself included).
    pub ring: Ring,
    /// The other members up, with their generations.
    pub peers: BTreeMap<u32, u64>,
    pub pending: BTreeMap<u64, Pending>,
    next_req: u64,
    /// Replicated writes waiting for their copies.
    pub writes: BTreeMap<u64, RepWrite>,
    next_write: u64,
    /// User actors waiting for the other replicas' versions before they start.
    pulls: BTreeMap<u64, PullState>,
}

/// A read repair in progress: the newest copy seen so far, and the versions the replicas
/// answered with (0: no account there).
pub struct PullState {
    epoch: u64,
    shard: u16,
    jid: BareJid,
    left: usize,
    repair: rules::Repair<Vec<Write>>,
    /// Bringing the replicas found older level before the actor starts.
    pushing: bool,
}

impl NodeCluster {
    pub fn new(id: u32) -> Self {
        NodeCluster {
            id,
            generation: 0,
            member: None,
            ring: Ring::new([name(id)]),
            peers: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_req: 1,
            writes: BTreeMap::new(),
            next_write: 1,
            pulls: BTreeMap::new(),
        }
    }

    pub fn crash(&mut self) {
        self.member = None;
        self.ring = Ring::new([name(self.id)]);
        self.peers.clear();
        self.pending.clear();
        self.writes.clear();
        self.pulls.clear();
    }

    /// `View::place_user`: the owner node, and the shard when it is this one.
    pub fn place_user(&self, user: &BareJid, shards: ShardId) -> (NodeId, ShardId) {
        rules::place_user(&self.ring, self.id, self.peers.is_empty(), shards, user, index)
    }
}

/// What a node waits an answer for.
pub enum Pending {
    /// A session's SASL account lookup at the owner.
    Account { shard: u16, sid: u64 },
    /// One copy of a replicated write.
    Replicate { write: u64 },
    /// A user's state handed to a new replica.
    Handoff,
    /// Another replica's copy, for a read repair.
    Pull { pull: u64, from: u32 },
}

/// A user actor's write batch on its way to the owner's storage and the replicas
/// (`Shard::write_replicated`).
pub struct RepWrite {
    epoch: u64,
    shard: u16,
    shard_epoch: u64,
    jid: BareJid,
    writes: Vec<Write>,
    /// The offline messages its `DeleteOffline` removes (oracle: redelivery excused while
    /// the deletion is not acknowledged).
    deleting: Vec<String>,
    /// The batch went to this node's storage (after the replicas took it).
    local_sent: bool,
    local_done: bool,
    /// This node's copy refused it: another base (a handoff or repair replaced it).
    local_failed: bool,
    remote_left: usize,
    remote_ok: usize,
}

/// Where an answer goes: the requesting node (in the life that asked) and shard.
pub struct Reply {
    to: u32,
    to_gen: u64,
    from_shard: u16,
    id: u64,
}

#[derive(Debug)]
pub enum Op {
    Load {
        user: String,
    },
    Replicate {
        writes: Vec<Write>,
    },
    Handoff {
        user: String,
        version: u64,
        writes: Vec<Write>,
    },
    /// The whole state of a user, if this node has its account.
    Pull {
        user: String,
    },
}

#[derive(Debug)]
pub enum Res {
    Loaded(Option<Account>),
    Snapshot {
        version: u64,
        writes: Vec<Write>,
    },
    Done,
    #[allow(dead_code)] // read through Debug in the trace
    Failed(String),
}

#[derive(Debug)]
pub enum Frame {
    /// An envelope in the node's wire format, with the test message id it carries (if any).
    Env {
        bytes: Vec<u8>,
        msg: Option<String>,
        /// For a session's `OfflineDelivered`: the messages it confirms. Lost with the link,
        /// they stay stored and come again (at-least-once).
        confirms: Vec<String>,
    },
    Req {
        id: u64,
        from_gen: u64,
        op: Op,
    },
    Resp {
        id: u64,
        res: Res,
    },
}

/// One TCP connection from a shard to a node.
pub struct Link {
    /// The member generation it was opened for (closed when the view changes it).
    to_gen: u64,
    /// The receiving process it is connected to (`None`: the connect failed).
    to_life: Option<u64>,
    last_at: u64,
    /// Frames sent while a partition separates the two nodes.
    held: VecDeque<Frame>,
}

/// A test message's id inside an envelope, if it carries one.
impl Frame {
    /// The test message an envelope frame carries, if any.
    pub fn msg_id(&self) -> Option<String> {
        match self {
            Frame::Env { msg, .. } => msg.clone(),
            _ => None,
        }
    }
}

impl Link {
    pub fn held_msg_ids(&self) -> impl Iterator<Item = String> + '_ {
        self.held.iter().filter_map(Frame::msg_id)
    }
}

pub fn env_msg_id(env: &Envelope) -> Option<String> {
    match env {
        Envelope::User {
            msg: UserMsg::Inbound { stanza } | UserMsg::Outbound { stanza, .. },
            ..
        }
        | Envelope::Session {
            msg: SessionMsg::Stanza(stanza) | SessionMsg::Offline(stanza),
            ..
        } => (stanza.name == "message")
            .then(|| stanza.attr("id"))
            .flatten()
            .filter(|i| i.starts_with('m'))
            .map(str::to_string),
        _ => None,
    }
}

impl World {
    pub fn clustered(&self) -> bool {
        self.cfg.nodes > 1
    }

    /// The (node, shard) of `user`'s actor as `node` sees it.
    pub fn place_user(&self, node: u32, user: &BareJid) -> (NodeId, ShardId) {
        let n = &self.nodes[node as usize];
        if self.clustered() {
            n.cluster.place_user(user, self.cfg.shards)
        } else {
            n.placement.place_user(user)
        }
    }

    /// The node holding `user`'s account when it is not `node`.
    pub fn account_home(&self, node: u32, user: &str) -> Option<u32> {
        let bare: BareJid = user.parse().ok()?;
        let (n, _) = self.place_user(node, &bare);
        (n != node).then_some(n)
    }

    pub fn separated(&self, a: u32, b: u32) -> bool {
        self.cut_pairs.contains(&(a.min(b), a.max(b)))
    }

    // ---- membership -------------------------------------------------------------------

    /// The node's membership generation now (`Links::generation`; 0 on a single node): new
    /// sessions' addresses carry it.
    pub fn node_gen(&self, n: u32) -> u64 {
        self.nodes[n as usize]
            .cluster
            .member
            .as_ref()
            .map_or(0, |m| m.me().generation)
    }

    /// A node's process starts (first start, late join or restart): a new generation joins
    /// through the other nodes as seeds.
    pub fn node_start(&mut self, n: u32) {
        let seed = self.rng.u64();
        let c = &mut self.nodes[n as usize].cluster;
        c.generation += 1;
        let seeds = (0..self.cfg.nodes).filter(|i| *i != n).map(name).collect();
        // As the node's start time in ms: far above the +1 of a renewal after a rejoin.
        let mut m = Membership::new(identity(n, c.generation * 1000), seeds, &Timings::default(), seed);
        let out = m.join();
        c.member = Some(m);
        self.gossip_out(n, out);
        let epoch = self.nodes[n as usize].epoch;
        self.after(TICK_US, Ev::GossipTick { node: n, epoch });
    }

    fn gossip_out(&mut self, n: u32, out: Output) {
        let epoch = self.nodes[n as usize].epoch;
        for (addr, bytes) in out.send {
            if let Some(to) = index(&addr) {
                self.datagram(n, to, bytes);
            }
        }
        for (d, timer) in out.timers {
            self.after(d.as_micros() as u64, Ev::GossipTimer { node: n, epoch, timer });
        }
        if out.rejoined {
            self.trace
                .record(self.now_us, format!("n{n} was declared down and rejoined"));
            self.rejoined(n);
        }
        if !out.changes.is_empty() {
            let what = format!("n{n} membership: {:?}", out.changes);
            self.trace.record(self.now_us, what);
            self.apply_view(n);
        }
    }

    fn datagram(&mut self, from: u32, to: u32, bytes: Vec<u8>) {
        // Loss and duplication are faults: they stop with the others at quiescence.
        let (loss, dup) = if self.quiescing {
            (0.0, 0.0)
        } else {
            (self.faults.gossip_loss, self.faults.gossip_dup)
        };
        if self.separated(from, to) || self.rng.chance(loss) {
            self.stats.datagrams_lost += 1;
            return;
        }
        let copies = if self.rng.chance(dup) { 2 } else { 1 };
        for _ in 0..copies {
            let d = self.rng.exp(self.faults.gossip_delay_us) + 1;
            self.after(
                d,
                Ev::Datagram {
                    to,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    pub fn datagram_arrives(&mut self, to: u32, bytes: Vec<u8>) {
        let Some(m) = self.nodes[to as usize].cluster.member.as_mut() else {
            return;
        };
        let out = m.handle_data(&bytes);
        self.gossip_out(to, out);
    }

    pub fn gossip_timer(&mut self, n: u32, epoch: u64, timer: Timer<NodeIdentity>) {
        if !self.live(n, epoch) {
            return;
        }
        let Some(m) = self.nodes[n as usize].cluster.member.as_mut() else {
            return;
        };
        let out = m.handle_timer(timer);
        self.gossip_out(n, out);
    }

    pub fn gossip_tick(&mut self, n: u32, epoch: u64) {
        if !self.live(n, epoch) {
            return;
        }
        let Some(m) = self.nodes[n as usize].cluster.member.as_mut() else {
            return;
        };
        let out = m.tick();
        self.gossip_out(n, out);
        self.after(TICK_US, Ev::GossipTick { node: n, epoch });
    }

    /// The driver pushed a membership to the shards (`follow_membership`): the ring changes,
    /// links to nodes gone close, the actors learn which nodes died, sessions whose user
    /// moved are closed, and users whose replica set gained a node are handed to it.
    fn apply_view(&mut self, n: u32) {
        let Some(m) = self.nodes[n as usize].cluster.member.as_ref() else {
            return;
        };
        let up = m.up();
        let new_ring = m.ring();
        let peers: BTreeMap<u32, u64> = up
            .iter()
            .filter_map(|i| Some((index(&i.name)?, i.generation)))
            .filter(|(i, _)| *i != n)
            .collect();
        let c = &mut self.nodes[n as usize].cluster;
        let old_peers = std::mem::replace(&mut c.peers, peers);
        let old_ring = std::mem::replace(&mut c.ring, new_ring.clone());
        let gone: Vec<(u32, u64)> = old_peers
            .iter()
            .filter(|(i, g)| c.peers.get(i) != Some(g))
            .map(|(i, g)| (*i, *g))
            .collect();
        // Links to nodes gone (or restarted) close: what they still held is lost.
        let closed: Vec<(u32, u16, u32)> = self
            .links
            .iter()
            .filter(|((from, _, to), l)| *from == n && self.nodes[n as usize].cluster.peers.get(to) != Some(&l.to_gen))
            .map(|(k, _)| *k)
            .collect();
        for k in closed {
            if let Some(l) = self.links.remove(&k) {
                for f in l.held {
                    self.frame_lost(f);
                }
            }
        }
        // NodeDown to every user actor here.
        for s in 0..self.cfg.shards {
            let at = self.now_us;
            self.nodes[n as usize].shards[s as usize].core.node_down(&gone, at);
            self.drive(n, s);
        }
        // A moment later, `Resync` to the actors then here (link.rs `after_change`).
        if !gone.is_empty() {
            let epoch = self.nodes[n as usize].epoch;
            self.after(
                starling_actors::msg::RESYNC_AFTER_MS * 1000,
                Ev::Resync { node: n, epoch },
            );
        }
        // Sessions whose user's actor now lives on another node than when they bound, or
        // lived on a node that died or restarted (the actor died with it), or whose replica
        // set gained a node (after a heal or a rejoin, that node may have
        // served the user meanwhile: the actor must reload, with read repair).
        let gained = |user: &BareJid| rules::replicas_gained(&old_ring, &new_ring, user.as_str(), REPLICATION);
        for s in 0..self.cfg.shards {
            // A rejoin is handled before (`rejoined`), every session then closed.
            let owner_now = |u: &BareJid| self.place_user(n, u).0;
            let moved = self.nodes[n as usize].shards[s as usize]
                .core
                .moved_sessions(false, &gone, owner_now, gained);
            for id in moved {
                self.stats.moved_kicks += 1;
                let env = Envelope::to_session(
                    SessionAddr {
                        node: n,
                        node_gen: self.node_gen(n),
                        shard: s,
                        id,
                    },
                    SessionMsg::Kick {
                        condition: "undefined-condition",
                        text: "this account's cluster node changed; please reconnect".into(),
                    },
                );
                let _ = self.deliver_local(n, s, env, Origin::Actor);
            }
        }
        if new_ring != old_ring && !old_ring.is_empty() {
            self.handoff(n, &old_ring, &new_ring);
        }
    }

    /// `Resync` to every user actor on the node (`Ev::Resync`).
    pub fn resync(&mut self, n: u32, epoch: u64) {
        if !self.live(n, epoch) {
            return;
        }
        for s in 0..self.cfg.shards {
            let at = self.now_us;
            self.nodes[n as usize].shards[s as usize].core.resync(at);
            self.drive(n, s);
        }
    }

    /// Declared down by the others, this node rejoined: they unbound its sessions and may
    /// have served its users meanwhile. Like a restarted node, it closes every session (the
    /// clients reconnect and bind again; user actors here go idle and reload).
    fn rejoined(&mut self, n: u32) {
        self.stats.rejoins += 1;
        for s in 0..self.cfg.shards {
            let ids: Vec<u64> = self.nodes[n as usize].shards[s as usize]
                .core
                .binding_sessions()
                .collect();
            for id in ids {
                let env = Envelope::to_session(
                    SessionAddr {
                        node: n,
                        node_gen: self.node_gen(n),
                        shard: s,
                        id,
                    },
                    SessionMsg::Kick {
                        condition: "undefined-condition",
                        text: "this cluster node rejoined; please reconnect".into(),
                    },
                );
                let _ = self.deliver_local(n, s, env, Origin::Actor);
            }
        }
    }

    /// `link.rs handoff`: for every user stored here whose replica set gained a node, the
    /// first previous replica still up sends it the whole state.
    fn handoff(&mut self, n: u32, old: &Ring, new: &Ring) {
        let me = name(n);
        let users = self.nodes[n as usize].storage.list_accounts().unwrap_or_default();
        let mut jobs = Vec::new();
        for user in users {
            for to in rules::handoff_targets(old, new, &me, &user, REPLICATION)
                .into_iter()
                .filter_map(index)
            {
                jobs.push((user.clone(), to));
            }
        }
        for (user, to) in jobs {
            let Some((version, writes)) = self.snapshot(n, &user) else {
                continue;
            };
            self.stats.handoffs += 1;
            let op = Op::Handoff { user, version, writes };
            self.request(n, 0, to, op, Pending::Handoff);
        }
    }

    /// A user's whole state here as writes (`hand_one`), with its version.
    fn snapshot(&self, n: u32, user: &str) -> Option<(u64, Vec<Write>)> {
        let st = &self.nodes[n as usize].storage;
        let account = st.account(user).ok()??;
        let data = st.load_user(user).ok()?;
        let version = data.version;
        Some((version, data.into_writes(user, account)))
    }

    /// The version stored here for `user` (0 when nothing is).
    fn stored_version(&self, n: u32, user: &str) -> u64 {
        self.nodes[n as usize].storage.load_user(user).map_or(0, |d| d.version)
    }

    /// This node's version of `user`, if it has the account.
    fn version_here(&self, n: u32, user: &str) -> Option<u64> {
        let st = &self.nodes[n as usize].storage;
        match st.account(user) {
            Ok(Some(_)) => st.load_user(user).ok().map(|d| d.version),
            _ => None,
        }
    }

    /// The other nodes of `user`'s replica set as `node` sees it.
    fn other_replicas(&self, node: u32, user: &str) -> Vec<u32> {
        let c = &self.nodes[node as usize].cluster;
        rules::other_replicas(&c.ring, &name(node), c.peers.is_empty(), user, REPLICATION)
            .into_iter()
            .filter_map(index)
            .collect()
    }

    /// Read repair before a user actor starts: the other replicas' copies are asked for, and
    /// the newest (by version) replaces this node's if it is newer. A node that owns a user
    /// after a join, a heal or a death thus serves the latest acknowledged state even before
    /// its handoff arrives.
    ///
    /// A read needs as many copies as a write (`pull_newest`): too few reachable or
    /// answering, and the actor does not start.
    pub fn pull(&mut self, node: u32, shard: u16, jid: BareJid) {
        let others = self.other_replicas(node, jid.as_str());
        if others.len() + 1 < rules::copies_needed(REPLICATION) {
            return self.activation_failed(node, shard, &jid);
        }
        if others.is_empty() {
            return self.activate_user(node, shard, jid);
        }
        let epoch = self.nodes[node as usize].epoch;
        let c = &mut self.nodes[node as usize].cluster;
        let id = c.next_write;
        c.next_write += 1;
        if let Some(h) = self.nodes[node as usize].shards[shard as usize].users.get_mut(&jid) {
            h.pulling = Some(id);
        }
        let c = &mut self.nodes[node as usize].cluster;
        c.pulls.insert(
            id,
            PullState {
                epoch,
                shard,
                jid: jid.clone(),
                left: others.len(),
                repair: rules::Repair::default(),
                pushing: false,
            },
        );
        for o in others {
            let op = Op::Pull { user: jid.to_string() };
            self.request(node, shard, o, op, Pending::Pull { pull: id, from: o });
        }
    }

    fn pulled(&mut self, node: u32, id: u64, from: u32, res: Res) {
        let Some(p) = self.nodes[node as usize].cluster.pulls.get_mut(&id) else {
            return;
        };
        p.left -= 1;
        if !p.pushing {
            match res {
                Res::Snapshot { version, writes } => p.repair.copy(from, version, writes),
                Res::Done => p.repair.none_there(from),
                _ => {}
            }
        }
        if p.left > 0 {
            return;
        }
        let mut p = self.nodes[node as usize].cluster.pulls.remove(&id).expect("present");
        if !self.live(node, p.epoch) {
            return;
        }
        // The incarnation that asked may have ended (its shard crashed, it failed otherwise)
        // and another be waiting on its own read repair, or running.
        let current = self.nodes[node as usize].shards[p.shard as usize]
            .users
            .get(&p.jid)
            .is_some_and(|h| h.pulling == Some(id) && h.runner.is_none());
        if !current {
            return;
        }
        if p.pushing {
            return self.activate_user(node, p.shard, p.jid);
        }
        if !p.repair.enough(REPLICATION) {
            return self.activation_failed(node, p.shard, &p.jid);
        }
        let user = p.jid.to_string();
        if let Some((version, writes)) = p.repair.best.take() {
            if rules::replaces(self.version_here(node, &user), version) {
                self.stats.repairs += 1;
                let all = rules::replacement(&user, self.stored_version(node, &user), writes, version);
                // Applied at once (later reads see it); durable with the next flush.
                self.submit(node, all, None);
            }
        }
        // The replicas found older get the newest copy before the actor's first write,
        // which they would refuse on its base (`pull_newest`).
        let Some((version, writes)) = self.snapshot(node, &user) else {
            return self.activate_user(node, p.shard, p.jid);
        };
        let behind = p.repair.behind(version);
        if behind.is_empty() {
            return self.activate_user(node, p.shard, p.jid);
        }
        self.stats.level_pushes += behind.len() as u64;
        let shard = p.shard;
        p.pushing = true;
        p.left = behind.len();
        self.nodes[node as usize].cluster.pulls.insert(id, p);
        for to in behind {
            let op = Op::Handoff {
                user: user.clone(),
                version,
                writes: writes.clone(),
            };
            self.request(node, shard, to, op, Pending::Pull { pull: id, from: to });
        }
    }

    // ---- links --------------------------------------------------------------------------

    /// `Shard::send_remote`: an envelope for an actor or session on another node.
    pub fn send_remote(&mut self, node: u32, shard: u16, to: u32, env: Envelope) {
        let msg = env_msg_id(&env);
        let mut bytes = Vec::new();
        if let Err(e) = wire::encode(&wire::Frame::Envelope(wire::envelope_out(&env)), &mut bytes) {
            return self.fail(0, format!("an envelope could not be encoded: {e} {env:?}"));
        }
        let confirms = match &env {
            Envelope::User {
                msg: UserMsg::OfflineDelivered { session, upto },
                ..
            } => self.confirming.get(&(session.id, *upto)).cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        if !self.link_send(
            node,
            shard,
            to,
            Frame::Env {
                bytes,
                msg,
                confirms: confirms.clone(),
            },
        ) {
            self.msgs.allow_redelivery(&confirms);
            self.undeliverable(node, shard, env, "remote-server-not-found");
        }
    }

    /// Queues a frame on this shard's link to `to`; `false` (and the frame dropped) when `to`
    /// is not a member here.
    fn link_send(&mut self, from: u32, shard: u16, to: u32, frame: Frame) -> bool {
        let Some(&gen) = self.nodes[from as usize].cluster.peers.get(&to) else {
            return false;
        };
        let key = (from, shard, to);
        let to_life = {
            let t = &self.nodes[to as usize];
            t.up.then_some(t.cluster.generation)
        };
        let fresh = Link {
            to_gen: gen,
            to_life,
            last_at: 0,
            held: VecDeque::new(),
        };
        match self.links.get_mut(&key) {
            None => {
                self.links.insert(key, fresh);
            }
            Some(link) if link.to_gen != gen => {
                let old = std::mem::replace(link, fresh);
                for f in old.held {
                    self.frame_lost(f);
                }
            }
            Some(_) => {}
        }
        let cut = self.separated(from, to);
        let link = self.links.get_mut(&key).expect("present");
        if cut || !link.held.is_empty() {
            if link.held.len() >= LINK_QUEUE {
                self.frame_lost(frame);
            } else {
                link.held.push_back(frame);
            }
            return true;
        }
        self.link_schedule(key, frame);
        true
    }

    fn link_schedule(&mut self, key: (u32, u16, u32), frame: Frame) {
        let d = self.rng.exp(self.faults.link_delay_us) + 1;
        let Some(link) = self.links.get_mut(&key) else { return };
        let t = link.last_at.max(self.now_us + d);
        link.last_at = t;
        let (from, shard, to) = key;
        let Some(to_gen) = link.to_life else {
            // The connect failed: `give_up` drops what was queued.
            return self.frame_lost(frame);
        };
        let from_gen = self.nodes[from as usize].cluster.generation;
        self.at(
            t,
            Ev::Link {
                from,
                from_gen,
                shard,
                to,
                to_gen,
                frame,
            },
        );
    }

    /// A partition healed: links still open send what they held, in order.
    pub fn release_held(&mut self) {
        let keys: Vec<(u32, u16, u32)> = self
            .links
            .iter()
            .filter(|((a, _, b), l)| !l.held.is_empty() && !self.separated(*a, *b))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let held = std::mem::take(&mut self.links.get_mut(&k).expect("present").held);
            for f in held {
                self.link_schedule(k, f);
            }
        }
    }

    /// A frame that will never arrive: a stanza in it is lost with the link (the node logs
    /// and counts it: `starling_cluster_envelopes_lost_total`).
    fn frame_lost(&mut self, f: Frame) {
        self.stats.frames_lost += 1;
        if let Frame::Env { msg, confirms, .. } = f {
            if let Some(id) = msg {
                self.stats.messages_lost_with_link += self.msgs.lost(&id) as u64;
            }
            self.msgs.allow_redelivery(&confirms);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn link_arrives(&mut self, from: u32, from_gen: u64, shard: u16, to: u32, to_gen: u64, frame: Frame) {
        let n = &self.nodes[to as usize];
        if !n.up || n.cluster.generation != to_gen {
            return self.frame_lost(frame);
        }
        // SO_REUSEPORT: the connection landed on some shard of the receiver.
        let rshard = ((from as u64 * 7 + shard as u64) % self.cfg.shards as u64) as u16;
        match frame {
            Frame::Env { bytes, .. } => {
                let decoded = wire::frame_len([bytes[0], bytes[1], bytes[2], bytes[3]])
                    .and_then(|len| wire::decode(&bytes[4..4 + len]));
                let env = match decoded {
                    Ok(wire::Frame::Envelope(w)) => wire::envelope_in(w),
                    Ok(other) => return self.fail(0, format!("link carried {other:?} for an envelope")),
                    Err(e) => Err(e),
                };
                match env {
                    Ok(env) => {
                        let _ = self.route(to, rshard, env, Origin::Actor);
                    }
                    Err(e) => self.fail(0, format!("an envelope did not survive the wire: {e}")),
                }
            }
            Frame::Req { id, from_gen: g, op } => {
                debug_assert_eq!(g, from_gen);
                let reply = Reply {
                    to: from,
                    to_gen: from_gen,
                    from_shard: shard,
                    id,
                };
                self.serve(to, reply, op);
            }
            Frame::Resp { id, res } => {
                let _ = from_gen;
                if let Some(p) = self.nodes[to as usize].cluster.pending.remove(&id) {
                    self.answered(to, p, res);
                }
            }
        }
    }

    // ---- requests between nodes ---------------------------------------------------------

    /// `ask_remote`: a request with a timeout.
    fn request(&mut self, node: u32, shard: u16, to: u32, op: Op, p: Pending) {
        let c = &mut self.nodes[node as usize].cluster;
        let id = c.next_req;
        c.next_req += 1;
        let from_gen = c.generation;
        let frame = Frame::Req { id, from_gen, op };
        if !self.link_send(node, shard, to, frame) {
            // Not a member: the node fails at once.
            return self.answered(node, p, Res::Failed("not a member".into()));
        }
        self.nodes[node as usize].cluster.pending.insert(id, p);
        let epoch = self.nodes[node as usize].epoch;
        self.after(ACCOUNT_TIMEOUT_US, Ev::ReqTimeout { node, epoch, id });
    }

    pub fn req_timeout(&mut self, node: u32, epoch: u64, id: u64) {
        if !self.live(node, epoch) {
            return;
        }
        if let Some(p) = self.nodes[node as usize].cluster.pending.remove(&id) {
            self.answered(node, p, Res::Failed("timed out".into()));
        }
    }

    /// Answers go back on the connection the request came on.
    pub fn answer(&mut self, node: u32, r: Reply, res: Res) {
        if self.separated(node, r.to) {
            return; // the requester times out
        }
        let key = (node, u16::MAX - r.from_shard, r.to);
        let d = self.rng.exp(self.faults.link_delay_us) + 1;
        let link = self.links.entry(key).or_insert(Link {
            to_gen: r.to_gen,
            to_life: Some(r.to_gen),
            last_at: 0,
            held: VecDeque::new(),
        });
        link.to_life = Some(r.to_gen);
        let t = link.last_at.max(self.now_us + d);
        link.last_at = t;
        let from_gen = self.nodes[node as usize].cluster.generation;
        self.at(
            t,
            Ev::Link {
                from: node,
                from_gen,
                shard: r.from_shard,
                to: r.to,
                to_gen: r.to_gen,
                frame: Frame::Resp { id: r.id, res },
            },
        );
    }

    /// `serve_account`: another node's request against this node's storage.
    fn serve(&mut self, node: u32, r: Reply, op: Op) {
        match op {
            Op::Load { user } => {
                let acc = self.nodes[node as usize].storage.account(&user).ok().flatten();
                self.answer(node, r, Res::Loaded(acc));
            }
            Op::Replicate { writes } => {
                // Only from the node this one sees as the user's owner (`serve_account`).
                let owner = writes
                    .first()
                    .and_then(|w| w.user().parse::<BareJid>().ok())
                    .map(|j| self.place_user(node, &j).0);
                if owner != Some(r.to) {
                    return self.answer(node, r, Res::Failed("not the owner here".into()));
                }
                self.submit(node, writes, Some(Waiter::Answer(r)))
            }
            Op::Pull { user } => {
                let res = match self.snapshot(node, &user) {
                    Some((version, writes)) => Res::Snapshot { version, writes },
                    None => Res::Done,
                };
                self.answer(node, r, res);
            }
            Op::Handoff { user, version, writes } => {
                if !rules::replaces(self.version_here(node, &user), version) {
                    return self.answer(node, r, Res::Done);
                }
                let all = rules::replacement(&user, self.stored_version(node, &user), writes, version);
                self.submit(node, all, Some(Waiter::Answer(r)));
            }
        }
    }

    fn answered(&mut self, node: u32, p: Pending, res: Res) {
        match p {
            Pending::Account { shard, sid } => {
                if self.session_mut(node, shard, sid).is_none() {
                    return;
                }
                match res {
                    Res::Loaded(acc) => self.session_input(node, shard, sid, Input::Account(acc)),
                    _ => {
                        let h = self.session_mut(node, shard, sid).expect("present");
                        h.stream_error("internal-server-error", "storage unavailable");
                        self.session_flush(node, shard, sid);
                    }
                }
                self.carry_out(node, shard, sid);
            }
            Pending::Replicate { write } => {
                let ok = matches!(res, Res::Done);
                if !ok {
                    self.stats.replicas_refused += 1;
                }
                if let Some(w) = self.nodes[node as usize].cluster.writes.get_mut(&write) {
                    w.remote_left -= 1;
                    w.remote_ok += ok as usize;
                }
                self.replicated_step(node, write);
            }
            Pending::Handoff => {}
            Pending::Pull { pull, from } => self.pulled(node, pull, from, res),
        }
    }

    /// A session's account lookup at the owner (`Shard::load_account`).
    pub fn load_account_remote(&mut self, node: u32, shard: u16, sid: u64, home: u32, user: String) {
        self.request(node, shard, home, Op::Load { user }, Pending::Account { shard, sid });
    }

    // ---- replicated writes ------------------------------------------------------------

    /// `Shard::write_replicated` for a user actor's `Persist`: the batch (on the actor's
    /// version, `base`) goes to the other replicas, then to this node's storage; it is
    /// acknowledged when durable on a majority of all copies, this one included.
    pub fn persist_replicated(
        &mut self,
        node: u32,
        shard: u16,
        shard_epoch: u64,
        jid: BareJid,
        mut writes: Vec<Write>,
        base: u64,
    ) {
        writes.push(Write::NextVersion {
            user: jid.to_string(),
            base,
        });
        let deleting = self.offline_ids_upto(node, &writes);
        self.msgs.deletes_pending(&deleting, true);
        let others = self.other_replicas(node, jid.as_str());
        let epoch = self.nodes[node as usize].epoch;
        let c = &mut self.nodes[node as usize].cluster;
        let id = c.next_write;
        c.next_write += 1;
        c.writes.insert(
            id,
            RepWrite {
                epoch,
                shard,
                shard_epoch,
                jid,
                deleting,
                writes: writes.clone(),
                local_sent: false,
                local_done: false,
                local_failed: false,
                remote_left: others.len(),
                remote_ok: 0,
            },
        );
        for o in &others {
            let op = Op::Replicate { writes: writes.clone() };
            self.request(node, shard, *o, op, Pending::Replicate { write: id });
        }
        self.replicated_step(node, id);
    }

    /// The ids of the offline messages a batch's `DeleteOffline` removes here.
    fn offline_ids_upto(&self, node: u32, writes: &[Write]) -> Vec<String> {
        let mut ids = Vec::new();
        for wr in writes {
            if let Write::DeleteOffline { user, upto } = wr {
                if let Ok(d) = self.nodes[node as usize].storage.load_user(user) {
                    ids.extend(
                        d.offline
                            .iter()
                            .filter(|m| m.seq <= *upto)
                            .filter_map(|m| crate::oracle::xml_id(&m.xml)),
                    );
                }
            }
        }
        ids
    }

    pub fn replicated_local_done(&mut self, node: u32, id: u64) {
        if let Some(w) = self.nodes[node as usize].cluster.writes.get_mut(&id) {
            w.local_done = true;
        }
        self.replicated_step(node, id);
    }

    pub fn replicated_local_failed(&mut self, node: u32, id: u64) {
        if let Some(w) = self.nodes[node as usize].cluster.writes.get_mut(&id) {
            w.local_failed = true;
        }
        self.replicated_step(node, id);
    }

    fn replicated_step(&mut self, node: u32, id: u64) {
        let c = &mut self.nodes[node as usize].cluster;
        let Some(w) = c.writes.get_mut(&id) else { return };
        if w.remote_left > 0 {
            return;
        }
        let enough = rules::durable(!w.local_failed, w.remote_ok, REPLICATION);
        if enough {
            // The replicas have it: now this node's copy (remote first, so that a batch that
            // failed never raises this copy's version above the others').
            if !w.local_sent {
                w.local_sent = true;
                let writes = w.writes.clone();
                return self.submit(node, writes, Some(Waiter::Replicated(id)));
            }
            if !w.local_done {
                return;
            }
        }
        let w = c.writes.remove(&id).expect("present");
        self.msgs.deletes_pending(&w.deleting, false);
        if enough {
            return self.persisted(node, w.epoch, w.shard, w.shard_epoch, &w.jid, true);
        }
        // Not durable on enough copies: nothing that depended on it is claimed (user_host.rs).
        self.stats.write_failures += 1;
        // Offline messages handed over whose deletion failed stay stored and come again:
        // at-least-once, as after a crash.
        self.msgs.allow_redelivery(&w.deleting);
        if !self.shard_live(node, w.epoch, w.shard, w.shard_epoch) {
            return;
        }
        self.persisted(node, w.epoch, w.shard, w.shard_epoch, &w.jid, false);
    }

    // ---- convergence --------------------------------------------------------------------

    /// Invariant 5: every node up sees exactly the nodes up, in their current generations,
    /// and they all place every key alike. `None` when converged.
    pub fn membership_disagreement(&self) -> Option<String> {
        if !self.clustered() {
            return None;
        }
        let truth: BTreeMap<u32, u64> = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .filter_map(|n| Some((n.id, n.cluster.member.as_ref()?.me().generation)))
            .collect();
        let ring = Ring::new(truth.keys().map(|i| name(*i)));
        for n in self.nodes.iter().filter(|n| n.up) {
            let mut seen = n.cluster.peers.clone();
            seen.insert(n.id, n.cluster.member.as_ref().map_or(0, |m| m.me().generation));
            if seen != truth {
                return Some(format!(
                    "n{} sees members {seen:?} (id: generation) but the nodes up are {truth:?}",
                    n.id
                ));
            }
            if n.cluster.ring != ring {
                return Some(format!("n{}'s ring {:?} is not {:?}", n.id, n.cluster.ring, ring));
            }
        }
        None
    }

    /// The node whose storage holds `user`'s state once membership converged.
    pub fn home(&self, user: &str) -> u32 {
        if !self.clustered() {
            return 0;
        }
        let bare: BareJid = user.parse().expect("valid user");
        let first_up = self.nodes.iter().find(|n| n.up).map(|n| n.id).unwrap_or(0);
        self.place_user(first_up, &bare).0
    }
}
