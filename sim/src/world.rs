//! The world: the event queue ordered by (virtual time, sequence number), the simulated
//! client connections with their faults, node crashes and reconnect storms, and the checks at
//! quiescence. The hosting of actors on shards is in host.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use jid::BareJid;
use starling_actors::c2s::C2sConfig;
use starling_actors::msg::Envelope;
use starling_actors::parser::Limits;
use starling_actors::user::UserConfig;
use starling_gossip::{NodeIdentity, Timer};
use starling_storage::{MemoryStorage, Storage, Subscription};

use crate::client::{self, Client, Note};
use crate::faults::Faults;
use starling_actors::address::MailboxKey;

use crate::host::{Node, Read};
use crate::oracle::{xml_id, Messages, Violation};
use crate::rng::Rng;
use crate::trace::Trace;
use crate::{Config, Outcome, Stats};

/// Virtual wall clock at time zero (Unix ms), for the actors' `now` and delay stamps.
pub const EPOCH_MS: u64 = 1_800_000_000_000;
/// Mean time between two actions of an online client, µs.
const ACT_MEAN_US: u64 = 400_000;
/// Offline messages kept per user: small, so that the cap is reached.
pub const MAX_OFFLINE: usize = 5;
/// Capacity of one shard-to-shard mesh channel (as in the node).
pub const MESH_CAP: usize = starling_actors::system::limits::MESH_CAPACITY;

pub enum Ev {
    ClientWake(usize),
    ToServer {
        conn: u64,
        bytes: Vec<u8>,
    },
    ServerSeesClose {
        conn: u64,
    },
    ToClient {
        conn: u64,
        bytes: Vec<u8>,
    },
    ClientSeesClose {
        conn: u64,
    },
    Mesh {
        node: u32,
        epoch: u64,
        from: u16,
        to: u16,
        env: Envelope,
    },
    Retry {
        node: u32,
        epoch: u64,
        shard: u16,
        target: MailboxKey,
    },
    /// A moment after a node went: the user actors on `node` check their contacts' presence.
    Resync {
        node: u32,
        epoch: u64,
        moved: Vec<u32>,
    },
    /// A stanza whose write failed goes again after a pause (`UserMsg::Again`).
    Again {
        node: u32,
        epoch: u64,
        shard: u16,
        env: Envelope,
    },
    SessionRun {
        node: u32,
        epoch: u64,
        shard: u16,
        sid: u64,
    },
    UserRun {
        node: u32,
        epoch: u64,
        shard: u16,
        jid: BareJid,
    },
    Read {
        node: u32,
        epoch: u64,
        shard: u16,
        what: Read,
    },
    FlushDone {
        node: u32,
        epoch: u64,
    },
    NodeCrash(u32),
    NodeRestart(u32),
    /// `starling cluster leave` on the node.
    LeaveStart(u32),
    /// The leaving node's driver looks whether its slots have moved (cluster.rs).
    LeaveCheck {
        node: u32,
        epoch: u64,
    },
    /// A node that was not started yet starts and joins the cluster.
    NodeJoin(u32),
    /// A gossip datagram arrives (cluster.rs).
    Datagram {
        to: u32,
        bytes: Vec<u8>,
    },
    GossipTimer {
        node: u32,
        epoch: u64,
        timer: Timer<NodeIdentity>,
    },
    GossipTick {
        node: u32,
        epoch: u64,
    },
    /// A frame arrives over a node-to-node link.
    Link {
        from: u32,
        from_gen: u64,
        shard: u16,
        to: u32,
        to_gen: u64,
        frame: crate::cluster::Frame,
    },
    ReqTimeout {
        node: u32,
        epoch: u64,
        shard: u16,
        shard_epoch: u64,
        id: u64,
    },
    /// `passivate_after_ms` after a user actor went idle, having handled `handled` messages.
    Idle {
        node: u32,
        epoch: u64,
        shard: u16,
        jid: BareJid,
        handled: u64,
    },
    /// The Raft clock of a node's shards (`limits::RAFT_TICK_MS`).
    RaftTick {
        node: u32,
        epoch: u64,
    },
    Partition,
    Heal,
    ShardCrash(u32, u16),
    Storm,
    Quiesce,
}

impl Ev {
    /// The event's kind, for a report.
    fn kind(&self) -> &'static str {
        match self {
            Ev::ClientWake(_) => "client wake",
            Ev::ToServer { .. } => "to server",
            Ev::ServerSeesClose { .. } => "server sees close",
            Ev::ToClient { .. } => "to client",
            Ev::ClientSeesClose { .. } => "client sees close",
            Ev::Mesh { .. } => "mesh",
            Ev::Retry { .. } => "retry",
            Ev::Resync { .. } => "resync",
            Ev::Again { .. } => "again",
            Ev::SessionRun { .. } => "session run",
            Ev::UserRun { .. } => "user run",
            Ev::Read { .. } => "read",
            Ev::FlushDone { .. } => "flush done",
            Ev::NodeCrash(_) => "node crash",
            Ev::NodeRestart(_) => "node restart",
            Ev::LeaveStart(_) => "leave",
            Ev::LeaveCheck { .. } => "leave check",
            Ev::NodeJoin(_) => "node join",
            Ev::Datagram { .. } => "datagram",
            Ev::GossipTimer { .. } => "gossip timer",
            Ev::GossipTick { .. } => "gossip tick",
            Ev::Link { .. } => "link",
            Ev::ReqTimeout { .. } => "request timeout",
            Ev::Idle { .. } => "idle",
            Ev::RaftTick { .. } => "raft tick",
            Ev::Partition => "partition",
            Ev::Heal => "heal",
            Ev::ShardCrash(..) => "shard crash",
            Ev::Storm => "storm",
            Ev::Quiesce => "quiesce",
        }
    }

    /// Membership keeps talking forever: its events do not count as work left to do.
    fn background(&self) -> bool {
        matches!(
            self,
            Ev::Datagram { .. }
                | Ev::GossipTimer { .. }
                | Ev::GossipTick { .. }
                | Ev::RaftTick { .. }
                | Ev::LeaveCheck { .. }
                | Ev::Link {
                    frame: crate::cluster::Frame::Raft { .. },
                    ..
                }
        )
    }
}

pub struct Conn {
    pub client: usize,
    pub node: u32,
    pub shard: u16,
    pub sid: u64,
    pub client_open: bool,
    pub server_open: bool,
    to_server_at: u64,
    to_client_at: u64,
}

pub struct World {
    pub cfg: Config,
    seed: u64,
    pub now_us: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    pub rng: Rng,
    pub faults: Faults,
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    /// A wake-up is scheduled for the client (so that there is only ever one).
    woken: Vec<bool>,
    pub conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    pub msgs: Messages,
    pub stats: Stats,
    pub trace: Trace,
    pub violation: Option<Violation>,
    pub(crate) quiescing: bool,
    pub c2s_cfg: Rc<C2sConfig>,
    pub user_cfg: Rc<UserConfig>,
    pub mesh_last: BTreeMap<(u32, u16, u16), u64>,
    pub mesh_depth: BTreeMap<(u32, u16, u16), usize>,
    /// (receiver, sender) pairs whose presence was bounced by a full mailbox.
    pub presence_lost: BTreeSet<(String, String)>,
    /// Users whose roster pushes were bounced by a full mailbox.
    pub roster_stale: BTreeSet<String>,
    /// What each session's `OfflineDelivered` (session id, upto) confirmed: if the link
    /// carrying it is lost, those messages may come again.
    pub confirming: BTreeMap<(u64, u64), Vec<String>>,
    /// Node-to-node links by (from node, from shard, to node) (cluster.rs).
    pub links: BTreeMap<(u32, u16, u32), crate::cluster::Link>,
    /// Node pairs (lower id first) a partition separates.
    pub cut_pairs: BTreeSet<(u32, u32)>,
    /// Events queued that are not membership chatter.
    work: u64,
    /// A leave under way: the node, its process's epoch, and its driver's looks at its slots
    /// (`starling_actors::system::leave`).
    pub leaving: Option<(u32, u64, starling_actors::system::leave::Leave)>,
    /// Nodes that left (`cluster leave`) and stopped for good.
    pub departed: BTreeSet<u32>,
}

impl World {
    pub fn new(seed: u64, cfg: Config) -> Self {
        let mut rng = Rng::new(seed);
        let mut faults = if cfg.faults {
            Faults::draw(&mut rng)
        } else {
            Faults::none()
        };
        if cfg.faults && cfg.nodes > 1 {
            faults.draw_cluster(&mut rng, cfg.cluster_faults.as_deref());
            faults.draw_leave(seed, cfg.nodes, cfg.duration_ms * 1000, cfg.cluster_faults.as_deref());
        }
        let c2s_cfg = Rc::new(C2sConfig {
            domains: vec![client::DOMAIN.to_string()],
            require_tls: false,
            tls_available: false,
            anonymous: false,
            registration_open: false,
            limits: Limits::default(),
            scram_iterations: 16,
            max_pending: 64,
            version: "sim".into(),
        });
        let user_cfg = Rc::new(UserConfig {
            max_offline: MAX_OFFLINE,
            max_roster_items: 1000,
        });
        let nodes = (0..cfg.nodes)
            .map(|id| Node::new(id, cfg.shards, MemoryStorage::new(), faults.mailbox))
            .collect();
        let clients = (0..cfg.clients).map(Client::new).collect();
        World {
            trace: Trace::new(cfg.keep_events),
            woken: vec![false; cfg.clients],
            cfg,
            seed,
            now_us: 0,
            seq: 0,
            queue: BTreeMap::new(),
            rng,
            faults,
            nodes,
            clients,
            conns: BTreeMap::new(),
            next_conn: 1,
            msgs: Messages::default(),
            stats: Stats::default(),
            violation: None,
            quiescing: false,
            c2s_cfg,
            user_cfg,
            mesh_last: BTreeMap::new(),
            mesh_depth: BTreeMap::new(),
            presence_lost: BTreeSet::new(),
            roster_stale: BTreeSet::new(),
            confirming: BTreeMap::new(),
            links: BTreeMap::new(),
            cut_pairs: BTreeSet::new(),
            work: 0,
            leaving: None,
            departed: BTreeSet::new(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        EPOCH_MS + self.now_us / 1000
    }

    pub fn at(&mut self, t_us: u64, ev: Ev) {
        self.seq += 1;
        if !ev.background() {
            self.work += 1;
        }
        self.queue.insert((t_us.max(self.now_us), self.seq), ev);
    }

    pub fn after(&mut self, d_us: u64, ev: Ev) {
        self.at(self.now_us + d_us, ev)
    }

    pub fn fail(&mut self, invariant: u8, what: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                invariant,
                at_ms: self.now_us / 1000,
                what,
            });
        }
    }

    fn setup(&mut self) {
        // Accounts exist before the run, durably (as `starling user add` leaves them).
        for n in 0..self.nodes.len() {
            for c in 0..self.clients.len() {
                let u = self.clients[c].user.clone();
                let pw = self.clients[c].password.clone();
                let s1 = (self.rng.u64() as u128).to_le_bytes();
                let s2 = (self.rng.u64() as u128).to_le_bytes();
                let acc = starling_actors::scram::new_account(&pw, s1, s2, 16);
                let st = &mut self.nodes[n].storage;
                let _ = st.create_account(&u, &acc);
                let _ = st.flush();
            }
        }
        let dur = self.cfg.duration_ms * 1000;
        if !self.clustered() {
            self.raft_start(0);
        }
        if self.clustered() {
            let n = self.nodes.len() as u32;
            for i in 0..n {
                if i == n - 1 && self.faults.late_join {
                    self.nodes[i as usize].up = false;
                    self.nodes[i as usize].started = false;
                    let t = self.rng.range(dur / 10, dur / 2);
                    self.at(t, Ev::NodeJoin(i));
                } else {
                    self.node_start(i);
                    self.raft_start(i);
                }
            }
            for _ in 0..self.faults.partitions {
                let t = self.rng.range(dur / 10, dur * 7 / 10);
                self.at(t, Ev::Partition);
            }
            if let Some((t, n)) = self.faults.leave {
                self.at(t, Ev::LeaveStart(n));
            }
        }
        for c in 0..self.clients.len() {
            let d = self.rng.range(0, 2_000_000);
            self.wake(c, d);
        }
        for _ in 0..self.faults.node_crashes {
            let t = self.rng.range(dur / 10, dur);
            let n = self.rng.below(self.nodes.len()) as u32;
            self.at(t, Ev::NodeCrash(n));
        }
        for _ in 0..self.faults.shard_crashes {
            let t = self.rng.range(dur / 10, dur);
            let n = self.rng.below(self.nodes.len()) as u32;
            let s = self.rng.below(self.cfg.shards as usize) as u16;
            self.at(t, Ev::ShardCrash(n, s));
        }
        for _ in 0..self.faults.storms {
            let t = self.rng.range(dur / 10, dur);
            self.at(t, Ev::Storm);
        }
        self.at(dur, Ev::Quiesce);
    }

    pub fn run(mut self) -> Outcome {
        self.setup();
        // Quiescence must come within two virtual minutes of the end of activity.
        let limit = (self.cfg.duration_ms + 120_000) * 1000;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            if t > limit {
                self.now_us = t;
                match self.membership_disagreement().or_else(|| self.raft_unsettled()) {
                    Some(d) if self.work == 0 => self.fail(
                        5,
                        format!("membership did not converge within two virtual minutes after the end: {d}"),
                    ),
                    _ => self.fail(
                        0,
                        "no quiescence: events still scheduled two virtual minutes after the end".into(),
                    ),
                }
                break;
            }
            if !ev.background() {
                self.work -= 1;
            }
            self.now_us = t;
            self.handle(ev);
            if self.violation.is_some() {
                break;
            }
            // Quiescent: no work left and (with a cluster) the membership converged.
            if self.quiescing
                && self.work == 0
                && self.membership_disagreement().is_none()
                && self.raft_unsettled().is_none()
            {
                break;
            }
        }
        if self.violation.is_none() {
            self.final_checks();
        }
        if std::env::var_os("SIM_RAFT_STATUS").is_some() {
            let pending: Vec<String> = self
                .queue
                .iter()
                .filter(|(_, e)| !e.background())
                .take(10)
                .map(|((t, _), e)| format!("{t}: {}", e.kind()))
                .collect();
            eprintln!("work left {}: {pending:?}", self.work);
            eprintln!("raft unsettled: {:?}", self.raft_unsettled());
            eprintln!("membership: {:?}", self.membership_disagreement());
            for n in &self.nodes {
                if let Some(m) = n.cluster.member.as_ref() {
                    let seen: Vec<String> = m
                        .members()
                        .iter()
                        .map(|(id, st)| format!("{}@{} {st:?}", id.name, id.generation))
                        .collect();
                    eprintln!("n{} gossip members: {seen:?}", n.id);
                }
            }
            // Each node's slots at the end: (slot, leader, leads here, committed, applied).
            for n in &self.nodes {
                for (s, sh) in n.shards.iter().enumerate() {
                    eprintln!(
                        "n{} (up {}) shard {s}: {:?} {:?}",
                        n.id,
                        n.up,
                        sh.protocol.status(),
                        sh.protocol
                            .slots()
                            .iter()
                            .map(|x| sh.protocol.slot_info(*x))
                            .collect::<Vec<_>>()
                    );
                }
            }
        }
        Outcome {
            seed: self.seed,
            trace_hash: self.trace.digest(),
            events: self.trace.events,
            virtual_ms: self.now_us / 1000,
            violation: self.violation.take(),
            last_events: self.trace.recent(),
            stats: self.stats.clone(),
            faults: self.faults.clone(),
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::ClientWake(c) => {
                self.trace.record(self.now_us, format!("client u{c} wakes"));
                self.woken[c] = false;
                self.client_wake(c);
            }
            Ev::ToServer { conn, bytes } => {
                self.trace.record(
                    self.now_us,
                    format!("conn {conn} → server {}", String::from_utf8_lossy(&bytes)),
                );
                self.server_bytes(conn, bytes);
            }
            Ev::ServerSeesClose { conn } => {
                self.trace
                    .record(self.now_us, format!("conn {conn} closed by the client"));
                self.server_sees_close(conn);
            }
            Ev::ToClient { conn, bytes } => {
                self.trace.record(
                    self.now_us,
                    format!("conn {conn} → client {}", String::from_utf8_lossy(&bytes)),
                );
                self.client_bytes(conn, &bytes);
            }
            Ev::ClientSeesClose { conn } => {
                self.trace
                    .record(self.now_us, format!("conn {conn} closed by the server"));
                self.client_sees_close(conn);
            }
            Ev::Mesh {
                node,
                epoch,
                from,
                to,
                env,
            } => {
                self.trace
                    .record(self.now_us, format!("mesh n{node} s{from}→s{to} {env:?}"));
                if let Some(d) = self.mesh_depth.get_mut(&(node, from, to)) {
                    *d = d.saturating_sub(1);
                }
                self.mesh_arrive(node, epoch, to, env);
            }
            Ev::Retry {
                node,
                epoch,
                shard,
                target,
            } => {
                self.trace
                    .record(self.now_us, format!("held for {target:?} on n{node} s{shard}: retry"));
                self.drain_held(node, epoch, shard, target);
            }
            Ev::Resync { node, epoch, moved } => {
                self.trace.record(self.now_us, format!("resync n{node}"));
                self.resync(node, epoch, &moved);
            }
            Ev::Again {
                node,
                epoch,
                shard,
                env,
            } => {
                self.trace
                    .record(self.now_us, format!("again n{node} s{shard} {env:?}"));
                if self.live(node, epoch) {
                    let _ = self.route(node, shard, env, crate::host::Origin::Actor);
                }
            }
            Ev::SessionRun {
                node,
                epoch,
                shard,
                sid,
            } => {
                self.trace
                    .record(self.now_us, format!("session n{node} s{shard} #{sid} runs"));
                self.session_run(node, epoch, shard, sid);
            }
            Ev::UserRun {
                node,
                epoch,
                shard,
                jid,
            } => {
                self.trace
                    .record(self.now_us, format!("user {jid} runs on n{node} s{shard}"));
                self.user_run(node, epoch, shard, jid);
            }
            Ev::Read {
                node,
                epoch,
                shard,
                what,
            } => {
                self.trace
                    .record(self.now_us, format!("storage read done n{node} s{shard} {what:?}"));
                self.read_done(node, epoch, shard, what);
            }
            Ev::FlushDone { node, epoch } => {
                self.trace.record(self.now_us, format!("flush done n{node}"));
                self.flush_done(node, epoch);
            }
            Ev::NodeCrash(n) => {
                self.trace.record(self.now_us, format!("CRASH node {n}"));
                self.node_crash(n);
            }
            Ev::LeaveStart(n) => {
                self.trace
                    .record(self.now_us, format!("LEAVE node {n} (cluster leave)"));
                self.leave_start(n);
            }
            Ev::LeaveCheck { node, epoch } => {
                self.trace.record(self.now_us, format!("leave check n{node}"));
                self.leave_check(node, epoch);
            }
            Ev::NodeRestart(n) => {
                self.trace.record(self.now_us, format!("restart node {n}"));
                self.nodes[n as usize].up = true;
                if self.clustered() {
                    self.node_start(n);
                }
                self.raft_start(n);
            }
            Ev::NodeJoin(n) => {
                self.trace.record(self.now_us, format!("node {n} starts and joins"));
                self.stats.node_joins += 1;
                let node = &mut self.nodes[n as usize];
                node.up = true;
                node.started = true;
                self.node_start(n);
                self.raft_start(n);
            }
            Ev::Datagram { to, bytes } => {
                self.trace
                    .record(self.now_us, format!("datagram → n{to} ({} bytes)", bytes.len()));
                if self.nodes[to as usize].up {
                    self.datagram_arrives(to, bytes);
                }
            }
            Ev::GossipTimer { node, epoch, timer } => {
                self.trace
                    .record(self.now_us, format!("gossip timer n{node} {timer:?}"));
                self.gossip_timer(node, epoch, timer);
            }
            Ev::GossipTick { node, epoch } => {
                self.trace.record(self.now_us, format!("gossip tick n{node}"));
                self.gossip_tick(node, epoch);
            }
            Ev::Link {
                from,
                from_gen,
                shard,
                to,
                to_gen,
                frame,
            } => {
                self.trace
                    .record(self.now_us, format!("link n{from}/s{shard} → n{to} {frame:?}"));
                self.link_arrives(from, from_gen, shard, to, to_gen, frame);
            }
            Ev::ReqTimeout {
                node,
                epoch,
                shard,
                shard_epoch,
                id,
            } => {
                self.trace
                    .record(self.now_us, format!("request {id} of n{node}/s{shard} times out?"));
                self.req_timeout(node, epoch, shard, shard_epoch, id);
            }
            Ev::Idle {
                node,
                epoch,
                shard,
                jid,
                handled,
            } => {
                self.trace
                    .record(self.now_us, format!("user {jid} on n{node} s{shard} idle check"));
                self.idle_check(node, epoch, shard, jid, handled);
            }
            Ev::RaftTick { node, epoch } => self.raft_tick(node, epoch),
            Ev::Partition => {
                let up: Vec<u32> = self.nodes.iter().filter(|n| n.up).map(|n| n.id).collect();
                if up.len() >= 2 && self.cut_pairs.is_empty() && !self.quiescing {
                    // A random non-empty proper subset on one side.
                    let mut side = Vec::new();
                    while side.is_empty() || side.len() == up.len() {
                        side = up.iter().copied().filter(|_| self.rng.chance(0.5)).collect();
                    }
                    for &a in &side {
                        for &b in up.iter().filter(|b| !side.contains(b)) {
                            self.cut_pairs.insert((a.min(b), a.max(b)));
                        }
                    }
                    self.stats.partitions += 1;
                    self.trace
                        .record(self.now_us, format!("PARTITION {side:?} from the rest"));
                    let d = self.rng.range(1_000_000, 8_000_000);
                    self.after(d, Ev::Heal);
                }
            }
            Ev::Heal => {
                self.trace.record(self.now_us, "partition heals".into());
                self.cut_pairs.clear();
                self.release_held();
            }
            Ev::ShardCrash(n, s) => {
                self.trace.record(self.now_us, format!("CRASH shard {s} of node {n}"));
                self.shard_crash(n, s);
            }
            Ev::Storm => {
                self.trace.record(self.now_us, "reconnect storm".into());
                for c in 0..self.clients.len() {
                    if self.clients[c].conn.is_some() && self.rng.chance(0.8) {
                        self.cut(c);
                        let d = self.rng.exp(300_000);
                        self.wake(c, d);
                    }
                }
            }
            Ev::Quiesce => {
                self.trace
                    .record(self.now_us, "quiesce: faults and scripts stop".into());
                self.quiescing = true;
                for c in 0..self.clients.len() {
                    let stay = self.rng.chance(0.8);
                    self.clients[c].wants_online = stay;
                    if stay && self.clients[c].conn.is_none() {
                        self.wake(c, 0);
                    } else if !stay && self.clients[c].online() {
                        self.clients[c].available = false;
                        let bytes = b"<presence type='unavailable'/></stream:stream>".to_vec();
                        self.client_send(c, bytes, false);
                        self.client_hangs_up(c);
                    }
                }
            }
        }
        self.check_bounds();
    }

    fn wake(&mut self, c: usize, d_us: u64) {
        if !self.woken[c] {
            self.woken[c] = true;
            self.after(d_us, Ev::ClientWake(c));
        }
    }

    fn client_wake(&mut self, c: usize) {
        let cl = &self.clients[c];
        if cl.conn.is_none() {
            if self.quiescing && !cl.wants_online {
                return;
            }
            self.clients[c].wants_online = true;
            return self.connect(c);
        }
        if self.quiescing {
            return;
        }
        if cl.online() {
            let cut_p = self.faults.cut_per_sec * ACT_MEAN_US as f64 / 1e6;
            if self.rng.chance(cut_p) {
                self.cut(c);
                let d = self.rng.exp(1_000_000);
                return self.wake(c, d);
            }
            let users = self.clients.len();
            let (xml, logout) = self.clients[c].act(&mut self.rng, users, self.cfg.churn);
            if !xml.is_empty() {
                self.client_send(c, xml.into_bytes(), true);
            }
            if logout && self.clients[c].conn.is_some() {
                self.client_hangs_up(c);
                self.clients[c].wants_online = false;
                let d = self.rng.exp(3_000_000);
                return self.wake(c, d);
            }
        }
        let d = self.rng.exp(ACT_MEAN_US);
        self.wake(c, d);
    }

    fn connect(&mut self, c: usize) {
        let up: Vec<u32> = self.nodes.iter().filter(|n| n.up).map(|n| n.id).collect();
        if up.is_empty() {
            let d = self.rng.range(100_000, 1_000_000);
            return self.wake(c, d);
        }
        let node = up[self.rng.below(up.len())];
        // SO_REUSEPORT: the kernel picks the shard.
        let shard = self.rng.below(self.cfg.shards as usize) as u16;
        let conn = self.next_conn;
        self.next_conn += 1;
        let sid = self.accept(node, shard, conn);
        self.conns.insert(
            conn,
            Conn {
                client: c,
                node,
                shard,
                sid,
                client_open: true,
                server_open: true,
                to_server_at: 0,
                to_client_at: 0,
            },
        );
        let bytes = self.clients[c].connect(conn);
        self.client_send(c, bytes, true);
        let d = self.rng.exp(ACT_MEAN_US);
        self.wake(c, d);
    }

    /// The client writes `bytes`; they may arrive in pieces, and (a fault) the connection may
    /// drop part-way through them.
    pub fn client_send(&mut self, c: usize, mut bytes: Vec<u8>, may_cut: bool) {
        let Some(conn_id) = self.clients[c].conn else { return };
        let mut cut = false;
        if may_cut && !self.quiescing && bytes.len() > 1 && self.rng.chance(self.faults.cut_mid_stanza) {
            let at = self.rng.range(1, bytes.len() as u64 - 1) as usize;
            bytes.truncate(at);
            cut = true;
        }
        let mut pieces = Vec::new();
        while bytes.len() > 1 && self.rng.chance(self.faults.split) {
            let at = self.rng.range(1, bytes.len() as u64 - 1) as usize;
            let rest = bytes.split_off(at);
            pieces.push(std::mem::replace(&mut bytes, rest));
        }
        pieces.push(bytes);
        for p in pieces {
            let delay = self.rng.exp(self.faults.client_delay_us) + 1;
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                return;
            };
            let t = conn.to_server_at.max(self.now_us + delay);
            conn.to_server_at = t;
            self.at(
                t,
                Ev::ToServer {
                    conn: conn_id,
                    bytes: p,
                },
            );
        }
        if cut {
            self.cut(c);
            let d = self.rng.exp(1_000_000);
            self.wake(c, d);
        }
    }

    /// The connection drops under the client (network fault): it sees it at once; the
    /// server after the bytes already on their way.
    fn cut(&mut self, c: usize) {
        self.stats.connections_cut += 1;
        self.client_hangs_up(c);
    }

    /// The client is done with its connection (a logout after `</stream:stream>`, or a cut).
    fn client_hangs_up(&mut self, c: usize) {
        let Some(conn_id) = self.clients[c].conn else { return };
        self.clients[c].closed();
        let delay = self.rng.exp(self.faults.client_delay_us) + 1;
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.client_open = false;
            let t = conn.to_server_at.max(self.now_us + delay);
            self.at(t, Ev::ServerSeesClose { conn: conn_id });
        }
    }

    /// The server writes to a connection.
    pub fn server_send(&mut self, conn_id: u64, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let delay = self.rng.exp(self.faults.client_delay_us) + 1;
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if !conn.server_open {
            return;
        }
        let t = conn.to_client_at.max(self.now_us + delay);
        conn.to_client_at = t;
        self.at(t, Ev::ToClient { conn: conn_id, bytes });
    }

    /// The server closes a connection (after what it wrote).
    pub fn server_close(&mut self, conn_id: u64) {
        let delay = self.rng.exp(self.faults.client_delay_us) + 1;
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if !conn.server_open {
            return;
        }
        conn.server_open = false;
        let t = conn.to_client_at.max(self.now_us + delay);
        self.at(t, Ev::ClientSeesClose { conn: conn_id });
    }

    fn client_bytes(&mut self, conn_id: u64, bytes: &[u8]) {
        let Some(conn) = self.conns.get(&conn_id) else { return };
        if !conn.client_open {
            return;
        }
        let c = conn.client;
        let out = self.clients[c].on_bytes(bytes);
        for n in out.notes {
            self.client_note(c, n);
        }
        if !out.bytes.is_empty() {
            self.client_send(c, out.bytes, true);
        }
        if out.close && self.clients[c].conn == Some(conn_id) {
            self.client_hangs_up(c);
            let d = self.rng.exp(500_000);
            self.wake(c, d);
        }
    }

    fn client_note(&mut self, c: usize, n: Note) {
        match n {
            Note::LoggedIn => self.stats.logins += 1,
            Note::Push => self.stats.roster_pushes += 1,
            Note::Received { id, delayed } => {
                let user = &self.clients[c].user;
                match self.msgs.recs.get(&id) {
                    Some(r) if &r.to == user => {}
                    r => {
                        let what = format!(
                            "{user} received message {id} (delayed: {delayed}) meant for {:?}",
                            r.map(|r| &r.to)
                        );
                        self.fail(1, what)
                    }
                }
            }
            Note::ErrorFor { id, condition } => {
                let user = &self.clients[c].user;
                if self.msgs.recs.get(&id).is_none_or(|r| &r.from != user) {
                    let what = format!("{user} got a {condition} error for message {id}, which it did not send");
                    self.fail(1, what)
                }
            }
            Note::ToldItemMissing { contact } => {
                let user = self.clients[c].user.clone();
                self.fail(
                    2,
                    format!(
                        "{user} was told {contact} is on its roster (push or fetch), but after reconnecting its roster lacks it"
                    ),
                )
            }
            Note::Unexpected(what) => {
                let user = self.clients[c].user.clone();
                self.fail(0, format!("client {user}: {what}"))
            }
        }
    }

    fn client_sees_close(&mut self, conn_id: u64) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if !conn.client_open {
            self.conns.remove(&conn_id);
            return;
        }
        conn.client_open = false;
        let c = conn.client;
        self.conns.remove(&conn_id);
        if self.clients[c].conn == Some(conn_id) {
            self.clients[c].closed();
            let d = self.rng.exp(500_000);
            self.wake(c, d);
        }
    }

    fn node_crash(&mut self, n: u32) {
        if !self.nodes[n as usize].up {
            return;
        }
        self.stats.node_crashes += 1;
        if self.leaving.is_some_and(|(l, _, _)| l == n) {
            // The restarted process is not leaving: the operator would run it again.
            self.trace.record(self.now_us, format!("n{n} crashed while leaving"));
            self.leaving = None;
            self.stats.leaves_abandoned += 1;
        }
        self.node_stops(n);
        let d = self.rng.range(200_000, 3_000_000);
        self.after(d, Ev::NodeRestart(n));
    }

    /// The node's process ends (a crash, or the end of a leave): its sessions close, what
    /// was in flight through it is excused as lost with it.
    pub(crate) fn node_stops(&mut self, n: u32) {
        // Its sessions close with it: what they confirmed and is not yet deleted for good may
        // come again after their clients reconnect (as for a session the server closes for a
        // membership change; a leave stops the node with its sessions' last confirmations
        // possibly still on their way — 5 nodes, seed 84).
        let sids: Vec<u64> = self.nodes[n as usize]
            .shards
            .iter()
            .flat_map(|sh| sh.sessions.keys().copied())
            .collect();
        for sid in sids {
            self.excuse_confirmed(sid);
        }
        let node = &mut self.nodes[n as usize];
        node.crash();
        // What is still durably in offline storage may be handed over again.
        // So may the offline messages on their way to sessions on other nodes now: their
        // sessions will confirm them to an actor that died with this node.
        let still = self.stored_offline_ids(n);
        let on_the_way = self.offline_in_mailboxes();
        let bit = 1u64 << n.min(63);
        self.stats.messages_lost_in_crash += self.msgs.crashed(|r| r.touched & bit != 0, &still, &on_the_way);
        // Its links die with it (frames already on the wire still arrive).
        self.links.retain(|k, _| k.0 != n);
        self.mesh_depth.retain(|k, _| k.0 != n);
        let conns: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.node == n && c.server_open)
            .map(|(id, _)| *id)
            .collect();
        for id in conns {
            self.server_close(id);
        }
    }

    /// Ids of the messages on their way to a session anywhere: in a session mailbox, between
    /// shards, or in a link frame (held or on the wire).
    pub(crate) fn offline_in_mailboxes(&self) -> Vec<String> {
        let offline_id = |m: &starling_actors::msg::SessionMsg| match m {
            starling_actors::msg::SessionMsg::Offline(st) | starling_actors::msg::SessionMsg::Stanza(st) => {
                st.attr("id").map(str::to_string)
            }
            _ => None,
        };
        let mut ids: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.shards.iter())
            .flat_map(|s| s.core.session_mail())
            .filter_map(offline_id)
            .collect();
        for ev in self.queue.values() {
            match ev {
                Ev::Mesh { env, .. } => ids.extend(crate::cluster::env_msg_id(env)),
                Ev::Link { frame, .. } => ids.extend(frame.msg_id()),
                _ => {}
            }
        }
        for l in self.links.values() {
            ids.extend(l.held_msg_ids());
        }
        ids
    }

    /// Ids of every message now in the node's offline storage (all users), and of those its
    /// Raft logs hold past their applied index (a restart applies them again).
    pub fn stored_offline_ids(&self, node: u32) -> Vec<String> {
        let storage = &self.nodes[node as usize].storage;
        let mut ids: Vec<String> = self
            .clients
            .iter()
            .filter_map(|c| storage.load_user(&c.user).ok())
            .flat_map(|d| d.offline.into_iter().filter_map(|m| xml_id(&m.xml)))
            .collect();
        for slot in storage.raft_slots().unwrap_or_default() {
            if let Ok(Some(stored)) = storage.raft_stored(slot) {
                let writes = starling_actors::system::consensus::logged_writes(&stored);
                ids.extend(crate::cluster::offline_stored(&writes).into_iter().map(|(_, id)| id));
            }
        }
        ids
    }

    /// After the queue ran dry: invariants 1 and 3 over the whole state.
    fn final_checks(&mut self) {
        let now = self.now_us / 1000;
        // 5: membership, placement and the slots' groups converged.
        if let Some(d) = self.membership_disagreement().or_else(|| self.raft_unsettled()) {
            self.violation = Some(Violation {
                invariant: 5,
                at_ms: now,
                what: d,
            });
            return;
        }
        // Each user's state as its owner holds it now.
        let homes: BTreeMap<String, u32> = self
            .clients
            .iter()
            .map(|c| (c.user.clone(), self.home(&c.user)))
            .collect();
        let nodes = &self.nodes;
        let st = |u: &str| &nodes[homes.get(u).copied().unwrap_or(0) as usize].storage;
        // 1: every accepted message has a fate.
        let stored = |u: &str| -> Vec<String> {
            st(u)
                .load_user(u)
                .map(|d| d.offline.iter().filter_map(|m| xml_id(&m.xml)).collect())
                .unwrap_or_default()
        };
        if let Some(v) = self.msgs.check_fates(stored, now) {
            self.violation = Some(v);
            return;
        }
        // 3: rosters and presence as each online client sees them.
        let online: BTreeSet<String> = self
            .clients
            .iter()
            .filter(|c| c.online() && c.available)
            .map(|c| c.user.clone())
            .collect();
        for c in &self.clients {
            if !c.online() || !c.roster_known {
                continue;
            }
            let truth: BTreeMap<String, (String, bool)> = st(&c.user)
                .load_user(&c.user)
                .map(|d| {
                    d.roster
                        .iter()
                        .filter(|i| i.in_roster)
                        .map(|i| (i.jid.clone(), (i.subscription.as_str().to_string(), i.ask_out)))
                        .collect()
                })
                .unwrap_or_default();
            if truth != c.roster && !self.roster_stale.contains(&c.user) {
                let v = Violation {
                    invariant: 3,
                    at_ms: now,
                    what: format!(
                        "{}'s roster as its client was told {:?} differs from the stored roster {:?}",
                        c.user, c.roster, truth
                    ),
                };
                self.violation = Some(v);
                return;
            }
            for (contact, (sub, _)) in &truth {
                if !(sub == "to" || sub == "both")
                    || self.presence_lost.contains(&(c.user.clone(), contact.clone()))
                    || self.presence_lost.contains(&("*".to_string(), contact.clone()))
                    || self.presence_lost.contains(&(c.user.clone(), "*".to_string()))
                    || self.churned(&c.user, contact)
                {
                    continue;
                }
                let sees = c.presence.get(contact).is_some_and(|r| r.values().any(|a| *a));
                // The contact's side decides whom it sends presence to; after a crash the two
                // sides can disagree (checked below when no crash happened).
                let grants = st(contact)
                    .load_user(contact)
                    .map(|d| d.roster.iter().any(|i| i.jid == c.user && i.subscription.has_from()))
                    .unwrap_or(false);
                let is = online.contains(contact) && grants;
                if sees != is {
                    self.violation = Some(Violation {
                        invariant: 3,
                        at_ms: now,
                        what: format!(
                            "{} sees {contact} as {} but it is {} (subscription {sub})",
                            c.user,
                            if sees { "available" } else { "unavailable" },
                            if is { "available" } else { "offline" }
                        ),
                    });
                    return;
                }
            }
        }
        // 3: subscription states agree pairwise — unless a crash cut an exchange in half (the
        // two users' writes are not one transaction).
        let st_ = &self.stats;
        if st_.node_crashes + st_.shard_crashes + st_.partitions + st_.write_failures + st_.frames_lost == 0 {
            let mut rosters = BTreeMap::new();
            for c in &self.clients {
                let r: BTreeMap<String, Subscription> = st(&c.user)
                    .load_user(&c.user)
                    .map(|d| d.roster.into_iter().map(|i| (i.jid, i.subscription)).collect())
                    .unwrap_or_default();
                rosters.insert(c.user.clone(), r);
            }
            for (a, ra) in &rosters {
                for (b, sub) in ra {
                    let back = rosters.get(b).and_then(|rb| rb.get(a)).copied().unwrap_or_default();
                    let bounced = self.presence_lost.contains(&(a.clone(), b.clone()))
                        || self.presence_lost.contains(&(b.clone(), a.clone()));
                    if !bounced
                        && !self.churned(a, b)
                        && (sub.has_to() != back.has_from() || sub.has_from() != back.has_to())
                    {
                        self.violation = Some(Violation {
                            invariant: 3,
                            at_ms: now,
                            what: format!(
                                "subscriptions disagree: {a} has {b} as '{}', {b} has {a} as '{}'",
                                sub.as_str(),
                                back.as_str()
                            ),
                        });
                        return;
                    }
                }
            }
        }
    }

    /// Whether one of the two removed the other or cancelled a subscription: such requests
    /// can cross an approval in flight, and RFC 6121 cannot tell a stale approval from a
    /// fresh one, so the two rosters may legitimately disagree.
    fn churned(&self, a: &str, b: &str) -> bool {
        let by = |x: &str, y: &str| {
            self.clients
                .iter()
                .find(|c| c.user == x)
                .is_some_and(|c| c.churned_with.contains(y))
        };
        by(a, b) || by(b, a)
    }

    /// Invariant 4, after every event: the real actors' queues and the host's mailboxes.
    fn check_bounds(&mut self) {
        let cap = self.faults.mailbox;
        let mut bad = None;
        for node in &self.nodes {
            for (s, shard) in node.shards.iter().enumerate() {
                if let Some((k, n)) = shard.core.deepest().filter(|(_, n)| *n > cap) {
                    bad = Some(format!("{k:?}'s mailbox on shard {s} holds {n} > {cap}"));
                }
                for (j, u) in &shard.users {
                    if let Some(a) = u.runner.as_ref().map(|r| r.actor()) {
                        if a.offline_len() > MAX_OFFLINE {
                            bad = Some(format!(
                                "{j}'s offline queue holds {} > offline.max_per_user {MAX_OFFLINE}",
                                a.offline_len()
                            ));
                        }
                    }
                }
            }
        }
        if let Some((k, d)) = self.mesh_depth.iter().find(|(_, d)| **d > MESH_CAP) {
            bad = Some(format!("mesh channel {k:?} holds {d} > {MESH_CAP}"));
        }
        if let Some(b) = bad {
            self.fail(4, b);
        }
    }
}
