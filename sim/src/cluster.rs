//! The cluster in the simulator (`--nodes N`, N > 1), mirroring node/src/cluster: each node
//! runs the real foca membership (`starling_gossip::Membership`) over simulated UDP (delay,
//! reordering, loss, duplication, partitions), routes by its own view of the ring, and talks
//! to the other nodes over simulated links with the node's semantics (link.rs): envelopes
//! encoded with the real wire codec, and the node's own replicated state
//! (`starling_actors::system::consensus`, one per shard: each slot a Raft group over
//! raft-rs, its members the ring's `REPLICATION` nodes for the slot; writes committed on a
//! majority, reads behind a read index, configuration and leadership moved toward the ring,
//! snapshots, the serving of account requests), whose effects this host carries out over the
//! simulated links, timers and disk; `NodeDown` to the actors when a node dies or restarts,
//! sessions whose user moved closed so that their clients reconnect.
//!
//! A link is one TCP connection per (sending node, sending shard, receiving node): frames
//! arrive in order. While a partition separates the two nodes its frames wait (TCP
//! retransmits); they arrive after the heal if the sender still sees the receiver as the same
//! member, and are lost when the sender drops it from its view (the node closes the link)
//! or the receiver restarts. Gossip datagrams have no such care: lost, duplicated, reordered.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use jid::BareJid;
use starling_actors::address::{NodeId, ShardId};
use starling_actors::c2s::Input;
use starling_actors::msg::{Envelope, SessionMsg, UserMsg};
use starling_actors::system::cluster as rules;
use starling_actors::system::consensus::{self, Act, Consensus, Count, Got, Local, Members, Op, Outcome, Res};
use starling_actors::system::slot::RaftMsg;
use starling_actors::wire;
use starling_gossip::{Membership, NodeIdentity, Output, Ring, Timer, Timings};
use starling_storage::{Storage, Write};

use crate::host::{Origin, Read, Waiter};
use crate::world::{Ev, World};

/// `cluster.replication` in the simulated deployment (the node's default).
pub const REPLICATION: usize = 3;
/// `cluster.slots` in the simulated deployment: fewer than the node's default, so that each
/// run exercises every slot's group without simulating dozens of them.
pub const SLOTS: u32 = 8;
/// Frames a link holds while its peer is unreachable (link.rs `LINK_QUEUE`).
pub const LINK_QUEUE: usize = starling_actors::system::limits::LINK_QUEUE;
/// The driver's membership tick.
const TICK_US: u64 = 1_000_000;
/// How often a leaving node's driver looks at its slots (how many looks in a row must find
/// none before it stops: `starling_actors::system::leave::QUIET_LOOKS`). The node's driver
/// looks once a second, at its membership tick; half that here makes leaves end sooner in
/// a run.
const LEAVE_CHECK_US: u64 = 500_000;

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
/// A node's cluster state (node/src/cluster: `View` and `Links`).
pub struct NodeCluster {
    pub id: u32,
    /// Its name on the ring.
    pub name: String,
    /// Bumped by every start of the process (its TCP connections die with it).
    pub generation: u64,
    pub member: Option<Membership>,
    /// The ring over the members this node sees up (itself included).
    pub ring: Ring,
    /// The other members up, with their generations.
    pub peers: BTreeMap<u32, u64>,
    /// Members being decommissioned (this node included when it is).
    pub leaving: BTreeSet<u32>,
    /// Membership changes applied (`Links::changes`).
    pub changes: u64,
}

impl NodeCluster {
    pub fn new(id: u32) -> Self {
        NodeCluster {
            id,
            name: name(id),
            generation: 0,
            member: None,
            ring: Ring::new([name(id)]),
            peers: BTreeMap::new(),
            leaving: BTreeSet::new(),
            changes: 0,
        }
    }

    pub fn crash(&mut self) {
        self.member = None;
        self.ring = Ring::new([name(self.id)]);
        self.peers.clear();
        self.leaving.clear();
    }

    /// `View::place`: the owner node of a ring key (its slot's), and the slot's shard.
    pub fn place(&self, key: &[u8], shards: ShardId) -> (NodeId, ShardId) {
        let view = View {
            c: self,
            name: &self.name,
        };
        consensus::place_slot(&view, rules::slot_of(key, SLOTS), shards)
    }
}

/// A shard's view of the membership for its protocol: a single node (`--nodes 1`) is no
/// cluster member, as a node without `cluster.node_name`.
pub struct View<'a> {
    c: &'a NodeCluster,
    name: &'a str,
}

impl Members for View<'_> {
    fn name(&self) -> &str {
        self.name
    }
    fn me(&self) -> NodeId {
        self.c.id
    }
    fn ring(&self) -> &Ring {
        &self.c.ring
    }
    fn alone(&self) -> bool {
        self.c.peers.is_empty()
    }
    fn node_id(&self, name: &str) -> Option<NodeId> {
        index(name)
    }
    fn leaving(&self, node: NodeId) -> bool {
        self.c.leaving.contains(&node)
    }
}

/// Who waits on a shard's protocol.
pub enum SimWaiter {
    /// A session's account operations, served on the shard of the user's slot: the session
    /// is on `shard`.
    Account {
        sid: u64,
        shard: u16,
    },
    Created {
        sid: u64,
        shard: u16,
    },
    Password {
        sid: u64,
        shard: u16,
    },
    /// A user actor's batch, with the offline messages its `DeleteOffline` removes (oracle:
    /// their redelivery is excused while the deletion is not acknowledged).
    Persist {
        jid: BareJid,
        deleting: Vec<String>,
    },
    /// The read repair of one incarnation (`UserHost::pulling`).
    Pull {
        jid: BareJid,
        id: u64,
    },
}

/// The replicated state of one simulated shard.
pub type Protocol = Consensus<SimWaiter, Reply>;

/// Where an answer goes: the requesting node (in the life that asked), shard and shard life.
#[derive(Debug)]
pub struct Reply {
    to: u32,
    to_gen: u64,
    from_shard: u16,
    shard_epoch: u64,
    id: u64,
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
    /// A request of the shard `shard_epoch` names (its answer is lost if that shard crashed).
    Req {
        id: u64,
        from_gen: u64,
        shard_epoch: u64,
        op: Op,
    },
    Resp {
        id: u64,
        shard_epoch: u64,
        res: Res,
    },
    /// Raft messages for the receiver's slots (each lands on its slot's shard).
    Raft {
        msgs: Vec<(u32, RaftMsg)>,
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
        n.cluster.place(user.as_str().as_bytes(), self.cfg.shards)
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
            self.stats.rejoins += 1;
        }
        if !out.changes.is_empty() {
            let what = format!("n{n} membership: {:?}", out.changes);
            self.trace.record(self.now_us, what);
        }
        if out.rejoined || !out.changes.is_empty() {
            self.apply_view(n, out.rejoined);
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

    /// `starling cluster leave` on node `n` (`Ev::LeaveStart`): it gossips that it leaves;
    /// every member takes it off the ring, so its slots' groups replace it and its actors
    /// move. A node not up (not joined yet, crashed), or one that sees no other member
    /// staying (`leave::may_start`: the node's driver refuses the command then), is asked
    /// again a second later, as an operator would.
    pub fn leave_start(&mut self, n: u32) {
        use starling_actors::system::leave;
        let node = &self.nodes[n as usize];
        let may = node
            .cluster
            .member
            .as_ref()
            .is_some_and(|m| leave::may_start(&m.ring(), &m.me().name).is_ok());
        if !node.up || !may || self.leaving.is_some() {
            if !self.quiescing {
                self.after(TICK_US, Ev::LeaveStart(n));
            }
            return;
        }
        self.stats.leaves_started += 1;
        let epoch = node.epoch;
        self.leaving = Some((n, epoch, leave::Leave::new()));
        let out = self.nodes[n as usize]
            .cluster
            .member
            .as_mut()
            .expect("a member")
            .start_leaving();
        self.gossip_out(n, out);
        self.after(LEAVE_CHECK_US, Ev::LeaveCheck { node: n, epoch });
    }

    /// The leaving node's driver (node/src/cluster/driver.rs) looks at the slots its shards
    /// host (`leave::Leave::look`); once it may stop, it says goodbye and its process stops
    /// for good — its sessions close (their clients reconnect elsewhere), and the data it
    /// held must be on the others (the invariants check every acknowledged write).
    pub fn leave_check(&mut self, n: u32, epoch: u64) {
        use starling_actors::system::leave::Step;
        let Some((l, e, mut look)) = self.leaving else { return };
        if l != n || e != epoch || !self.live(n, epoch) {
            return;
        }
        let hosted: usize = self.nodes[n as usize]
            .shards
            .iter()
            .map(|sh| sh.protocol.slots().len())
            .sum();
        if let Step::Wait { .. } = look.look(hosted) {
            self.leaving = Some((n, epoch, look));
            self.after(LEAVE_CHECK_US, Ev::LeaveCheck { node: n, epoch });
            return;
        }
        self.trace.record(
            self.now_us,
            format!("n{n} hosts no slot: it leaves the cluster and stops"),
        );
        self.leaving = None;
        self.stats.leaves_done += 1;
        let out = self.nodes[n as usize]
            .cluster
            .member
            .as_mut()
            .expect("a member")
            .leave();
        self.gossip_out(n, out);
        self.departed.insert(n);
        self.node_stops(n);
    }

    /// The driver pushed a membership to the shards (`follow_membership`): the ring changes,
    /// links to nodes gone close, the actors learn which nodes died, sessions whose user
    /// moved are closed, and users whose replica set gained a node are handed to it.
    fn apply_view(&mut self, n: u32, rejoined: bool) {
        let Some(m) = self.nodes[n as usize].cluster.member.as_ref() else {
            return;
        };
        let up = m.up();
        let new_ring = m.ring();
        let leaving: BTreeSet<u32> = m.leaving().iter().filter_map(|n| index(n)).collect();
        let peers: BTreeMap<u32, u64> = up
            .iter()
            .filter_map(|i| Some((index(&i.name)?, i.generation)))
            .filter(|(i, _)| *i != n)
            .collect();
        let c = &mut self.nodes[n as usize].cluster;
        let old_peers = std::mem::replace(&mut c.peers, peers);
        c.leaving = leaving;
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
        // Idle actors kept in memory go, now or once idle again (`passivate_idle`).
        self.nodes[n as usize].cluster.changes += 1;
        self.passivate_idle(n);
        // A moment later, `Resync` to the actors then here (link.rs `after_change`).
        let epoch = self.nodes[n as usize].epoch;
        let gone_ids: Vec<u32> = gone.iter().map(|(i, _)| *i).collect();
        let moved = rules::moved_slots(
            &old_ring,
            &new_ring,
            &gone_ids,
            |name| index(name).unwrap_or(u32::MAX),
            SLOTS,
        );
        self.after(
            starling_actors::msg::RESYNC_AFTER_MS * 1000,
            Ev::Resync { node: n, epoch, moved },
        );
        // Sessions whose user's actor now lives on another node than when they registered, or
        // lived on a node that died or restarted (the actor died with it), register with the
        // new incarnation; actors here whose users went elsewhere forget their sessions. Only
        // a node that rejoined closes its sessions (link.rs `after_change`).
        let (generation, shards, at) = (self.node_gen(n), self.cfg.shards, self.now_us);
        for s in 0..shards {
            let node = &mut self.nodes[n as usize];
            let cluster = &node.cluster;
            let owner_now = |u: &BareJid| cluster.place(u.as_str().as_bytes(), shards).0;
            let moved = node.shards[s as usize]
                .core
                .membership_changed(generation, rejoined, &gone, owner_now, at);
            self.stats.moved_rebinds += moved.rebound.len() as u64;
            self.stats.handoffs += moved.handed_off as u64;
            // A moved session names the offline messages it confirmed when it registers; the
            // registration, or the confirmation itself, may still be lost with a link, so
            // what it confirmed and is not deleted yet may come again (at-least-once, as
            // for a closed session).
            for id in moved.rebound.iter().chain(&moved.kicked) {
                self.excuse_confirmed(*id);
            }
            self.stats.rejoin_kicks += moved.kicked.len() as u64;
            self.drive(n, s);
        }
    }

    /// The server closes session `sid` for a membership change: what it confirmed and is not
    /// yet deleted for good may come again (`Messages::allow_redelivery_undeleted`).
    pub(crate) fn excuse_confirmed(&mut self, sid: u64) {
        let ids: Vec<String> = self
            .confirming
            .range((sid, 0)..=(sid, u64::MAX))
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect();
        self.msgs.allow_redelivery_undeleted(&ids);
    }

    /// `Resync` to every user actor on the node (`Ev::Resync`).
    pub fn resync(&mut self, n: u32, epoch: u64, moved: &[u32]) {
        if !self.live(n, epoch) {
            return;
        }
        for s in 0..self.cfg.shards {
            let at = self.now_us;
            self.nodes[n as usize].shards[s as usize].core.resync(moved, SLOTS, at);
            self.drive(n, s);
        }
    }

    // ---- the replicated state (`system::consensus`) -------------------------------------

    /// The shard of `node` whose replicated state serves `user` (its slot's).
    pub(crate) fn slot_shard(&self, user: &str) -> u16 {
        consensus::shard_of_slot(rules::slot_of(user.as_bytes(), SLOTS), self.cfg.shards)
    }

    /// Calls the shard's protocol with its view of the membership, then carries out what it
    /// asks for, in order (its storage calls run in that order: `Consensus`'s contract).
    pub(crate) fn protocol(&mut self, node: u32, shard: u16, f: impl FnOnce(&mut Protocol, &View<'_>)) {
        let clustered = self.clustered();
        let n = &mut self.nodes[node as usize];
        let view = View {
            c: &n.cluster,
            name: if clustered { &n.cluster.name } else { "" },
        };
        f(&mut n.shards[shard as usize].protocol, &view);
        while let Some(act) = self.nodes[node as usize].shards[shard as usize].protocol.pop() {
            match act {
                Act::Raft { to, msgs } => {
                    // Not a member here, or the link is full: raft sends again.
                    let _ = self.link_send(node, shard, to, Frame::Raft { msgs });
                }
                Act::Ask { to, id, op, timeout_ms } => self.request(node, shard, to, id, op, timeout_ms),
                Act::Storage { task, op } => self.storage_call(node, shard, task, op),
                Act::Reply { to, res } => self.answer(node, to, res),
                Act::Done { to, outcome } => self.outcome(node, shard, to, outcome),
                Act::Stale { user } => self.stale_user(node, shard, &user),
                Act::Count(c) => match c {
                    Count::Snapshot => self.stats.snapshots += 1,
                    Count::ConfChange => self.stats.conf_changes += 1,
                    Count::LeaderHere => self.stats.leader_changes += 1,
                    Count::ReplicationFailure => {}
                },
            }
        }
    }

    /// `Act::Ask`: a request on the shard's link, with its timeout.
    fn request(&mut self, node: u32, shard: u16, to: u32, id: u64, op: Op, timeout_ms: u64) {
        let from_gen = self.nodes[node as usize].cluster.generation;
        let shard_epoch = self.nodes[node as usize].shards[shard as usize].epoch;
        let frame = Frame::Req {
            id,
            from_gen,
            shard_epoch,
            op,
        };
        if !self.link_send(node, shard, to, frame) {
            // Not a member: the node fails at once.
            return self.protocol(node, shard, |p, _| p.answer(id, Res::Failed("not a member".into())));
        }
        let epoch = self.nodes[node as usize].epoch;
        self.after(
            timeout_ms * 1000,
            Ev::ReqTimeout {
                node,
                epoch,
                shard,
                shard_epoch,
                id,
            },
        );
    }

    pub fn req_timeout(&mut self, node: u32, epoch: u64, shard: u16, shard_epoch: u64, id: u64) {
        if self.shard_live(node, epoch, shard, shard_epoch) {
            self.protocol(node, shard, |p, _| p.timeout(id));
        }
    }

    /// `Act::Storage`, as the node's storage thread runs it: log writes wait for the next
    /// flush (group commit), entries are applied at once and in order (their answers need no
    /// flush: the log has them), snapshots are taken and installed at once; an account read
    /// takes a moment.
    fn storage_call(&mut self, node: u32, shard: u16, task: u64, op: Local) {
        let shard_epoch = self.nodes[node as usize].shards[shard as usize].epoch;
        let n = &mut self.nodes[node as usize];
        let got = match op {
            Local::Log(w) => match n.storage.raft_write(&w) {
                Ok(()) => {
                    n.commit.after((
                        Some(Waiter::Task {
                            shard,
                            shard_epoch,
                            task,
                        }),
                        Vec::new(),
                    ));
                    return self.start_flush(node);
                }
                Err(e) => Err(e),
            },
            Local::Apply { slot, entries } => {
                let mut results = Vec::with_capacity(entries.len());
                let mut stored = Vec::new();
                for (index, writes) in &entries {
                    let r = n.storage.apply_committed(slot, *index, writes);
                    if r.is_ok() {
                        stored.extend(offline_stored(writes));
                    }
                    results.push(r);
                }
                // Offline messages are stored durably once the flush after their entry's
                // application is done (the log had them before: durable on a majority).
                if !stored.is_empty() {
                    n.commit.after((None, stored));
                    self.start_flush(node);
                }
                Ok(Got::Applied(results))
            }
            Local::State { slot, slots } => n
                .storage
                .slot_state(&|u| consensus::in_slot(u, slot, slots))
                .map(Got::State),
            Local::Install {
                slot,
                slots,
                index,
                writes,
            } => n
                .storage
                .install_slot(slot, index, &|u| consensus::in_slot(u, slot, slots), &writes)
                .map(|()| Got::Stored),
            op @ Local::Account(_) => {
                let epoch = self.nodes[node as usize].epoch;
                let d = self.rng.exp(self.faults.read_us) + 1;
                let what = Read::Protocol { shard_epoch, task, op };
                return self.after(
                    d,
                    Ev::Read {
                        node,
                        epoch,
                        shard,
                        what,
                    },
                );
            }
        };
        self.protocol(node, shard, |p, _| p.storage(task, got));
    }

    /// A protocol read done (`Read::Protocol`).
    pub(crate) fn protocol_read(&mut self, node: u32, shard: u16, shard_epoch: u64, task: u64, op: Local) {
        if self.nodes[node as usize].shards[shard as usize].epoch != shard_epoch {
            return;
        }
        let st = &self.nodes[node as usize].storage;
        let got = match op {
            Local::Account(user) => st.account(&user).map(Got::Account),
            other => unreachable!("not a read: {other:?}"),
        };
        self.protocol(node, shard, |p, _| p.storage(task, got));
    }

    /// `Act::Stale`: the user's actor here, if one runs, ends after its turn (user_host.rs).
    fn stale_user(&mut self, node: u32, shard: u16, user: &str) {
        if std::env::var_os("SIM_NO_STALE").is_some() {
            return;
        }
        let Ok(jid) = user.parse::<BareJid>() else { return };
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        let Some(r) = sh.users.get_mut(&jid).and_then(|h| h.runner.as_mut()) else {
            return;
        };
        r.stale();
        // Its sessions register with the next incarnation, naming the offline messages they
        // confirmed: nothing comes twice (a write failing meanwhile closes them instead:
        // `Step::End`).
        self.stats.stale_ends += 1;
        self.schedule_user(node, shard, &jid);
    }

    /// `Act::Done`: work this shard asked the protocol for ended.
    pub(crate) fn outcome(&mut self, node: u32, shard: u16, to: SimWaiter, outcome: Outcome) {
        match (to, outcome) {
            (SimWaiter::Account { sid, shard }, Outcome::Account(r)) => {
                let Some(h) = self.session_mut(node, shard, sid) else {
                    return;
                };
                match r {
                    Ok(acc) => self.session_input(node, shard, sid, Input::Account(acc)),
                    Err(_) => {
                        h.stream_error("internal-server-error", "storage unavailable");
                        self.session_flush(node, shard, sid);
                    }
                }
                self.carry_out(node, shard, sid);
            }
            (SimWaiter::Created { sid, shard }, Outcome::Created(r)) => {
                if self.session_mut(node, shard, sid).is_some() {
                    self.session_input(node, shard, sid, Input::AccountCreated(r.ok()));
                    self.carry_out(node, shard, sid);
                }
            }
            (SimWaiter::Password { sid, shard }, Outcome::Written(r)) => {
                if self.session_mut(node, shard, sid).is_some() {
                    self.session_input(node, shard, sid, Input::PasswordSet(r.is_ok()));
                    self.carry_out(node, shard, sid);
                }
            }
            (SimWaiter::Persist { jid, deleting }, Outcome::Written(r)) => {
                self.msgs.deletes_pending(&deleting, false);
                if r.is_ok() {
                    self.msgs.deleted(&deleting);
                }
                if r.is_err() {
                    // Not durable on enough copies: nothing that depended on it is claimed
                    // (user_host.rs). Offline messages handed over whose deletion failed stay
                    // stored and come again: at-least-once, as after a crash.
                    self.stats.write_failures += 1;
                    self.msgs.allow_redelivery(&deleting);
                }
                let epoch = self.nodes[node as usize].epoch;
                let shard_epoch = self.nodes[node as usize].shards[shard as usize].epoch;
                self.persisted(node, epoch, shard, shard_epoch, &jid, r.is_ok());
            }
            (SimWaiter::Pull { jid, id }, Outcome::Pulled(r)) => {
                // The incarnation that asked may have ended and another be waiting on its own
                // read repair, or running.
                let current = self.nodes[node as usize].shards[shard as usize]
                    .users
                    .get(&jid)
                    .is_some_and(|h| h.pulling == Some(id) && h.runner.is_none());
                if !current {
                    return;
                }
                match r {
                    Ok(()) => self.activate_user(node, shard, jid),
                    Err(_) => self.activation_failed(node, shard, &jid),
                }
            }
            (_, outcome) => self.fail(
                0,
                format!("the protocol ended with {outcome:?} for another kind of work"),
            ),
        }
    }

    /// A user actor's `Persist` (`Shard::write_replicated`): on its version, `base`.
    pub fn persist(&mut self, node: u32, shard: u16, jid: BareJid, writes: Vec<Write>, base: u64) {
        let deleting = self.offline_ids_upto(node, &writes);
        self.msgs.deletes_pending(&deleting, true);
        let user = jid.to_string();
        let w = SimWaiter::Persist { jid, deleting };
        self.protocol(node, shard, |p, _| p.write(w, user, writes, Some(base)));
    }

    /// Read repair before a user actor starts (`pull_newest`); only this incarnation's
    /// answer starts or fails it.
    pub fn pull(&mut self, node: u32, shard: u16, jid: BareJid) {
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        sh.pulls += 1;
        let id = sh.pulls;
        if let Some(h) = sh.users.get_mut(&jid) {
            h.pulling = Some(id);
        }
        let user = jid.to_string();
        self.protocol(node, shard, |p, _| p.pull(SimWaiter::Pull { jid, id }, user));
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
                frame: Frame::Resp {
                    id: r.id,
                    shard_epoch: r.shard_epoch,
                    res,
                },
            },
        );
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
        if matches!(f, Frame::Raft { .. }) {
            // Raft sends again; a lost raft frame loses nothing accepted.
            self.stats.raft_frames_lost += 1;
            return;
        }
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
            Frame::Req {
                id,
                from_gen: g,
                shard_epoch,
                op,
            } => {
                debug_assert_eq!(g, from_gen);
                let reply = Reply {
                    to: from,
                    to_gen: from_gen,
                    from_shard: shard,
                    shard_epoch,
                    id,
                };
                // Served on the shard of the user's slot (the node forwards over the mesh).
                let s = consensus::shard_for(&op, SLOTS, self.cfg.shards);
                self.protocol(to, s, |p, _| p.serve(op, reply));
            }
            Frame::Resp { id, shard_epoch, res } => {
                // The answer lands on the shard that asked, if it is the life that asked.
                if self.nodes[to as usize].shards[shard as usize].epoch == shard_epoch {
                    self.protocol(to, shard, |p, _| p.answer(id, res));
                }
            }
            Frame::Raft { msgs } => {
                // Each message to its slot's shard (the node forwards over the mesh).
                let mut by_shard: BTreeMap<u16, Vec<(u32, RaftMsg)>> = BTreeMap::new();
                for (slot, m) in msgs {
                    by_shard
                        .entry(consensus::shard_of_slot(slot, self.cfg.shards))
                        .or_default()
                        .push((slot, m));
                }
                for (s, msgs) in by_shard {
                    self.protocol(to, s, |p, _| p.raft(msgs));
                }
            }
        }
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

    /// Invariant 5 for the replicated state: once membership converged, every slot's group
    /// is led by the ring's owner of the slot, has the ring's members for it (all of them
    /// when there are enough), no change under way, every member up has applied all that is
    /// committed, and no work waits. `None` when settled.
    pub fn raft_unsettled(&self) -> Option<String> {
        if let Some((n, _, _)) = self.leaving {
            let hosted: Vec<u32> = self.nodes[n as usize]
                .shards
                .iter()
                .flat_map(|sh| sh.protocol.slots())
                .collect();
            return Some(format!("n{n} is leaving and still hosts slots {hosted:?}"));
        }
        for n in self.nodes.iter().filter(|n| n.up) {
            for (s, sh) in n.shards.iter().enumerate() {
                if sh.protocol.in_progress() > 0 {
                    return Some(format!(
                        "n{} shard {s}: {} requests in progress",
                        n.id,
                        sh.protocol.in_progress()
                    ));
                }
            }
        }
        let first = self.nodes.iter().find(|n| n.up)?;
        for slot in 0..SLOTS {
            let shard = consensus::shard_of_slot(slot, self.cfg.shards) as usize;
            let want: Vec<u32> = if self.clustered() {
                rules::slot_voters(&first.cluster.ring, slot, REPLICATION)
                    .iter()
                    .filter_map(|n| index(n))
                    .collect()
            } else {
                vec![0]
            };
            let Some(&owner) = want.first() else { continue };
            let Some(info) = self.nodes[owner as usize].shards[shard].protocol.slot_info(slot) else {
                return Some(format!("slot {slot}: its owner n{owner} has no group"));
            };
            if !info.leading || info.changing {
                return Some(format!("slot {slot}: at its owner n{owner} {info:?}"));
            }
            let mut sorted = want.clone();
            sorted.sort_unstable();
            // With fewer members up than `REPLICATION`, no member is removed (one down may
            // come back): the ring's must be among them.
            let fits = if want.len() >= REPLICATION {
                info.voters == sorted
            } else {
                sorted.iter().all(|w| info.voters.contains(w))
            };
            if !fits {
                return Some(format!("slot {slot}: members {:?}, the ring's {sorted:?}", info.voters));
            }
            if let Some(d) = info.voters.iter().find(|v| self.departed.contains(v)) {
                return Some(format!(
                    "slot {slot}: n{d} left the cluster but is still a member {:?}",
                    info.voters
                ));
            }
            for m in &info.voters {
                let node = &self.nodes[*m as usize];
                if !node.up {
                    continue;
                }
                match node.shards[shard].protocol.slot_info(slot) {
                    Some(i) if i.applied >= info.committed => {}
                    other => {
                        return Some(format!(
                            "slot {slot}: n{m} behind its leader ({} committed): {other:?}",
                            info.committed
                        ))
                    }
                }
            }
        }
        None
    }

    /// The node whose storage holds `user`'s state once membership converged (its slot's
    /// leader once `raft_unsettled` is `None`).
    pub fn home(&self, user: &str) -> u32 {
        if !self.clustered() {
            return 0;
        }
        let bare: BareJid = user.parse().expect("valid user");
        let first_up = self.nodes.iter().find(|n| n.up).map(|n| n.id).unwrap_or(0);
        self.place_user(first_up, &bare).0
    }
}

/// The (user, message id) of the offline messages a batch stores.
pub(crate) fn offline_stored(writes: &[Write]) -> Vec<(String, String)> {
    writes
        .iter()
        .filter_map(|w| match w {
            Write::PushOffline { user, msg } => Some((user.clone(), crate::oracle::xml_id(&msg.xml)?)),
            _ => None,
        })
        .collect()
}
