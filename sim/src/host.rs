//! Hosting the real actors on simulated shards. Routing, mailboxes, overflow, held control
//! messages and activation are the node's own (`starling_actors::system::shard::ShardCore`,
//! one per simulated shard, its effects carried out by `drive`), and so are the effect loops
//! of a user actor (`system::runner`), of a connection (`system::conn`), group commit
//! (`system::commit`) and the replicated state (`system::consensus`, `cluster.rs`). What
//! this file adds is I/O in virtual time: when each actor and connection runs, the storage
//! thread's delays, and the bookkeeping the oracles need.

use std::collections::{BTreeMap, VecDeque};

use jid::BareJid;
use starling_actors::address::{ActorKey, MailboxKey, NodeId, Placement, SessionAddr, ShardId};
use starling_actors::c2s::{C2sSession, Ctx, Input};
use starling_actors::msg::{Envelope, SessionMsg, UserMsg};
use starling_actors::planted::{self, Bug};
use starling_actors::system::commit::GroupCommit;
use starling_actors::system::conn::{Conn, ConnStep};
use starling_actors::system::life;
use starling_actors::system::runner::{Runner, Step};
pub(crate) use starling_actors::system::shard::Origin;
use starling_actors::system::shard::{Out, Routed as CoreRouted, ShardCore};
use starling_actors::throttle::AuthThrottle;
use starling_actors::user::UserActor;
use starling_actors::xml::Element;
use starling_storage::{MemoryStorage, Storage, Write};

use crate::cluster::SimWaiter;
use crate::oracle::xml_id;
use crate::world::{Ev, World, MAX_OFFLINE};

/// The Raft clock's period (`limits::RAFT_TICK_MS`), in virtual microseconds.
const RAFT_TICK_US: u64 = starling_actors::system::limits::RAFT_TICK_MS * 1000;
use starling_actors::system::consensus::{Cfg, Consensus, Got, Outcome};

#[derive(Debug)]
pub enum Read {
    /// A user actor's state, before it starts.
    User { jid: BareJid },
    /// A storage read of the shard's cluster protocol.
    Protocol {
        shard_epoch: u64,
        task: u64,
        op: starling_actors::system::consensus::Local,
    },
}

pub struct Node {
    pub id: u32,
    pub up: bool,
    /// A late joiner that has not started yet is neither up nor a member.
    pub started: bool,
    /// The node's cluster state (multi-node runs only; see cluster.rs).
    pub cluster: crate::cluster::NodeCluster,
    /// Bumped by every crash: events of an earlier life are dropped on arrival.
    pub epoch: u64,
    pub shards: Vec<Shard>,
    pub storage: MemoryStorage,
    /// Messages one mailbox holds (`c2s.mailbox`; drawn per seed).
    mailbox: usize,
    /// Write batches waiting for a flush (the node's group commit): who waits on each, and
    /// the (user, message id) of the offline messages it stores.
    pub(crate) commit: GroupCommit<(Option<Waiter>, Stored)>,
}

/// The (user, message id) of the offline messages a write batch stores.
type Stored = Vec<(String, String)>;

/// Who waits for a flush.
pub enum Waiter {
    /// A log write of the shard's replicated state (`system::consensus`).
    Task { shard: u16, shard_epoch: u64, task: u64 },
}

pub struct Shard {
    pub epoch: u64,
    /// The node's per-shard state machine: mailboxes, routing, overflow, activation.
    pub core: ShardCore,
    pub sessions: BTreeMap<u64, SessionHost>,
    /// The user actors whose mailbox `core` holds.
    pub users: BTreeMap<BareJid, UserHost>,
    throttle: AuthThrottle,
    /// The shard's replicated state (the node's, `system::consensus`).
    pub protocol: crate::cluster::Protocol,
    /// Read repairs started (`UserHost::pulling`).
    pub pulls: u64,
}

pub enum ConnInput {
    Bytes(Vec<u8>),
    Closed,
}

pub struct SessionHost {
    /// The session and its effect loop (the node's, `system::conn`).
    c: Conn,
    conn: u64,
    inbox: VecDeque<ConnInput>,
    scheduled: bool,
    /// Offline messages it wrote and has not yet confirmed (`OfflineDelivered`): if it ends
    /// first, they stay stored and come again — at-least-once, allowed by the oracle.
    unconfirmed: Vec<String>,
}

pub struct UserHost {
    /// The actor and its effect loop (the node's, `system::runner`); `None` while its state
    /// loads.
    pub runner: Option<Runner<UserActor>>,
    /// Messages it handled (an idle check is void if it handled one since).
    handled: u64,
    /// Idle and kept in memory (`passivate_after_ms`) since its last message.
    idle: bool,
    /// Its node's membership changes when it started (`NodeCluster::changes`): after one,
    /// it is not kept idle in memory (user_host.rs).
    born: u64,
    scheduled: bool,
    /// The read repair this incarnation waits for (`cluster.rs pull`). An answer to an older
    /// one (an incarnation since ended) must not start or fail this one: in the node each
    /// incarnation awaits its own `pull_newest`.
    pub pulling: Option<u64>,
}

/// A route a connection must wait for gives its envelope back (boxed: it is large).
pub(crate) type Routed = Result<(), Box<Envelope>>;

/// Where a cluster node places an actor (`NodeCluster::place` with the shard count).
struct ClusterPlace<'a>(&'a crate::cluster::NodeCluster, ShardId);

impl Placement for ClusterPlace<'_> {
    fn place(&self, key: &[u8]) -> (NodeId, ShardId) {
        self.0.place(key, self.1)
    }
}

impl SessionHost {
    /// conn.rs after a failed account lookup.
    pub fn stream_error(&mut self, condition: &str, text: &str) {
        self.c.storage_failed(condition, text);
    }
}

impl Shard {
    /// Session ids in the simulator are connection ids, never reused, so no address can name
    /// an earlier life's session: the core's generation check (`started`) is 0.
    /// `life`: the node's process life (its proposals are told apart from an earlier life's).
    fn new(epoch: u64, node: u32, shard: u16, shards: u16, mailbox: usize, life: u64) -> Self {
        let cfg = Cfg {
            slots: crate::cluster::SLOTS,
            shards,
            shard,
            replication: crate::cluster::REPLICATION,
            incarnation: life << 20 | epoch,
        };
        Shard {
            epoch,
            core: ShardCore::new(node, shard, 0, mailbox),
            sessions: BTreeMap::new(),
            users: BTreeMap::new(),
            throttle: AuthThrottle::new(1000, 60_000, 100_000),
            protocol: Consensus::new(cfg, node),
            pulls: 0,
        }
    }
}

impl Node {
    pub fn new(id: u32, shards: u16, storage: MemoryStorage, mailbox: usize) -> Self {
        Node {
            id,
            up: true,
            started: true,
            cluster: crate::cluster::NodeCluster::new(id),
            epoch: 0,
            shards: (0..shards).map(|s| Shard::new(0, id, s, shards, mailbox, 0)).collect(),
            storage,
            mailbox,
            commit: GroupCommit::default(),
        }
    }

    /// Power cut: everything in memory is gone, storage keeps only what was flushed.
    pub fn crash(&mut self) {
        self.up = false;
        self.epoch += 1;
        self.storage.crash();
        let n = self.shards.len() as u16;
        let life = self.epoch;
        self.shards = (0..n)
            .map(|s| Shard::new(0, self.id, s, n, self.mailbox, life))
            .collect();
        self.commit.crash();
        self.cluster.crash();
    }
}

/// A test message's id (the scripted clients number theirs `m…`).
fn msg_id(st: &Element) -> Option<&str> {
    (st.name == "message")
        .then(|| st.attr("id"))
        .flatten()
        .filter(|i| i.starts_with('m'))
}

impl World {
    /// A node's process starts its slots' groups: from its store, or — the cluster's first
    /// node (`n0`) on an empty store, or a single node — new ones with itself their only member;
    /// its Raft clock starts.
    pub(crate) fn raft_start(&mut self, node: u32) {
        let stored = self.nodes[node as usize].storage.raft_slots().unwrap_or_default();
        if stored.is_empty() && node == 0 {
            for s in 0..self.cfg.shards {
                self.protocol(node, s, |p, _| p.bootstrap());
            }
        } else {
            self.raft_restore(node, None);
        }
        let epoch = self.nodes[node as usize].epoch;
        self.after(RAFT_TICK_US, Ev::RaftTick { node, epoch });
    }

    /// The groups of `shard` (every shard: `None`) from the node's store.
    pub(crate) fn raft_restore(&mut self, node: u32, shard: Option<u16>) {
        let n = &mut self.nodes[node as usize];
        let _ = n.storage.flush();
        let slots = n.storage.raft_slots().unwrap_or_default();
        for slot in slots {
            let s = starling_actors::system::consensus::shard_of_slot(slot, self.cfg.shards);
            if shard.is_some_and(|x| x != s) {
                continue;
            }
            let stored = match self.nodes[node as usize].storage.raft_stored(slot) {
                Ok(Some(st)) if !st.state.is_empty() => st,
                _ => continue,
            };
            let mut r = Ok(());
            self.protocol(node, s, |p, _| r = p.restore(slot, &stored));
            if let Err(e) = r {
                self.fail(0, format!("n{node} cannot restore slot {slot}: {e}"));
            }
        }
    }

    /// Every `RAFT_TICK_MS`, the Raft clock of every shard of the node.
    pub fn raft_tick(&mut self, node: u32, epoch: u64) {
        if !self.live(node, epoch) {
            return;
        }
        for s in 0..self.cfg.shards {
            self.protocol(node, s, |p, v| p.tick(v));
        }
        self.after(RAFT_TICK_US, Ev::RaftTick { node, epoch });
    }

    pub(crate) fn live(&self, node: u32, epoch: u64) -> bool {
        let n = &self.nodes[node as usize];
        n.up && n.epoch == epoch
    }

    pub(crate) fn shard_live(&self, node: u32, epoch: u64, shard: u16, shard_epoch: u64) -> bool {
        self.live(node, epoch) && self.nodes[node as usize].shards[shard as usize].epoch == shard_epoch
    }

    fn cpu(&mut self) -> u64 {
        self.rng.range(1, 30)
    }

    /// A new connection lands on a shard; returns the session id.
    pub fn accept(&mut self, node: u32, shard: u16, conn: u64) -> u64 {
        let cfg = self.c2s_cfg.clone();
        let rng = self.rng.fork();
        let node_gen = self.node_gen(node);
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        // Session ids are the connection ids: unique across crashes and restarts.
        let sid = conn;
        let addr = SessionAddr {
            node,
            node_gen,
            shard,
            id: sid,
        };
        let s = C2sSession::new(addr, cfg, 0x7f00_0001 + conn as u128, false, rng);
        sh.core.open_session(sid);
        sh.sessions.insert(
            sid,
            SessionHost {
                c: Conn::new(s),
                conn,
                inbox: VecDeque::new(),
                scheduled: false,
                unconfirmed: Vec::new(),
            },
        );
        sid
    }

    pub(crate) fn session_mut(&mut self, node: u32, shard: u16, sid: u64) -> Option<&mut SessionHost> {
        self.nodes[node as usize].shards[shard as usize].sessions.get_mut(&sid)
    }

    fn schedule_session(&mut self, node: u32, shard: u16, sid: u64) {
        let epoch = self.nodes[node as usize].epoch;
        let d = self.cpu();
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        if !h.scheduled {
            h.scheduled = true;
            self.after(
                d,
                Ev::SessionRun {
                    node,
                    epoch,
                    shard,
                    sid,
                },
            );
        }
    }

    pub(crate) fn schedule_user(&mut self, node: u32, shard: u16, jid: &BareJid) {
        let epoch = self.nodes[node as usize].epoch;
        let d = self.cpu();
        let Some(h) = self.nodes[node as usize].shards[shard as usize].users.get_mut(jid) else {
            return;
        };
        if !h.scheduled {
            h.scheduled = true;
            self.after(
                d,
                Ev::UserRun {
                    node,
                    epoch,
                    shard,
                    jid: jid.clone(),
                },
            );
        }
    }

    fn conn_target(&self, conn: u64) -> Option<(u32, u16, u64)> {
        let c = self.conns.get(&conn)?;
        if !c.server_open || !self.nodes[c.node as usize].up {
            return None;
        }
        Some((c.node, c.shard, c.sid))
    }

    pub fn server_bytes(&mut self, conn: u64, bytes: Vec<u8>) {
        let Some((node, shard, sid)) = self.conn_target(conn) else {
            return;
        };
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        h.inbox.push_back(ConnInput::Bytes(bytes));
        self.schedule_session(node, shard, sid);
    }

    pub fn server_sees_close(&mut self, conn: u64) {
        let Some((node, shard, sid)) = self.conn_target(conn) else {
            self.conns.remove(&conn);
            return;
        };
        if let Some(h) = self.session_mut(node, shard, sid) {
            h.inbox.push_back(ConnInput::Closed);
            self.schedule_session(node, shard, sid);
        }
    }

    /// One step of a connection task: carry out pending actions; else take one input (bytes
    /// from the socket or a message from the router, whichever the select picks).
    pub fn session_run(&mut self, node: u32, epoch: u64, shard: u16, sid: u64) {
        if !self.live(node, epoch) {
            return;
        }
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        h.scheduled = false;
        if !h.c.ready() {
            return;
        }
        if !h.c.has_work() {
            let no_mail = self.nodes[node as usize].shards[shard as usize]
                .core
                .session_queued(sid)
                == 0;
            let h = self.session_mut(node, shard, sid).expect("checked");
            let take_mail = match (h.inbox.is_empty(), no_mail) {
                (true, true) => return,
                (false, true) => false,
                (true, false) => true,
                (false, false) => self.rng.chance(0.5),
            };
            if take_mail {
                let sh = &mut self.nodes[node as usize].shards[shard as usize];
                let m = sh.core.pop_session(sid).expect("checked").msg;
                let h = sh.sessions.get_mut(&sid).expect("checked");
                let bound = h.c.session().jid().is_some() && !h.c.session().is_closed();
                let to = h.c.session().jid().map(|j| j.to_bare().to_string());
                if let (SessionMsg::Stanza(st) | SessionMsg::Offline(st), true, Some(to)) = (&m, bound, to) {
                    if let Some(id) = msg_id(st).filter(|_| st.attr("type") != Some("error")) {
                        let now = self.now_us / 1000;
                        match self.msgs.handed(id, &to, now) {
                            Ok(excused) => {
                                self.stats.messages_handed += 1;
                                self.stats.duplicates_excused += excused as u64;
                                if matches!(m, SessionMsg::Offline(_)) {
                                    let h = self.session_mut(node, shard, sid).expect("present");
                                    h.unconfirmed.push(id.to_string());
                                }
                            }
                            Err(v) => {
                                self.violation.get_or_insert(v);
                            }
                        }
                    }
                }
                self.session_input(node, shard, sid, Input::Router(m));
            } else {
                let h = self.session_mut(node, shard, sid).expect("checked");
                match h.inbox.pop_front().expect("checked") {
                    ConnInput::Bytes(b) => self.session_input(node, shard, sid, Input::Bytes(&b)),
                    ConnInput::Closed => self.session_input(node, shard, sid, Input::Closed),
                }
            }
        }
        self.carry_out(node, shard, sid);
    }

    pub(crate) fn session_input(&mut self, node: u32, shard: u16, sid: u64, input: Input<'_>) {
        let now = self.now_ms();
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        let Some(h) = sh.sessions.get_mut(&sid) else { return };
        let ctx = &mut Ctx {
            throttle: &mut sh.throttle,
        };
        if h.c.answered(input, now, ctx).is_err() {
            return self.fail(0, format!("session #{sid} panicked"));
        }
        let bytes = h.c.take_bytes();
        let conn = h.conn;
        // From the bind request on, as conn.rs records it (`ShardCore::binding`).
        let newly_bound = match h.c.session().binding_user() {
            Some(j) if !sh.core.is_binding(sid) => Some(j.clone()),
            _ => None,
        };
        self.server_send(conn, bytes);
        if let Some(bare) = newly_bound {
            let owner = self.place_user(node, &bare).0;
            self.nodes[node as usize].shards[shard as usize]
                .core
                .binding(sid, bare, owner);
        }
    }

    /// Sends what the session wrote outside `handle` (a stream error from the host).
    pub(crate) fn session_flush(&mut self, node: u32, shard: u16, sid: u64) {
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        let (conn, bytes) = (h.conn, h.c.take_bytes());
        self.server_send(conn, bytes);
    }

    /// Carries out the session's steps in order, as conn.rs does (`system::conn`); stops at
    /// a storage read or a full local mailbox (the connection is not read meanwhile).
    pub(crate) fn carry_out(&mut self, node: u32, shard: u16, sid: u64) {
        loop {
            let now = self.now_ms();
            let sh = &mut self.nodes[node as usize].shards[shard as usize];
            let Some(h) = sh.sessions.get_mut(&sid) else {
                return;
            };
            let step = h.c.step(
                now,
                &mut Ctx {
                    throttle: &mut sh.throttle,
                },
            );
            match step {
                ConnStep::Idle => break,
                ConnStep::Write(bytes) => {
                    let conn = h.conn;
                    self.server_send(conn, bytes);
                }
                ConnStep::Route(env) => {
                    if let Envelope::User {
                        msg: UserMsg::OfflineDelivered { session, upto },
                        ..
                    } = &env
                    {
                        let confirmed = std::mem::take(&mut h.unconfirmed);
                        self.confirming.insert((session.id, *upto), confirmed);
                    }
                    if let Envelope::User {
                        to,
                        msg: UserMsg::Inbound { stanza: st },
                    } = &env
                    {
                        if let Some(id) = msg_id(st) {
                            let from = st
                                .attr("from")
                                .unwrap_or("")
                                .split('/')
                                .next()
                                .unwrap_or("")
                                .to_string();
                            let now = self.now_us / 1000;
                            let (id, to) = (id.to_string(), to.to_string());
                            if !self.msgs.recs.contains_key(&id) {
                                self.stats.messages_accepted += 1;
                                if let Some(v) = self.msgs.accepted(&id, &from, &to, now) {
                                    self.violation.get_or_insert(v);
                                }
                            }
                        }
                    }
                    if let Err(env) = self.route(node, shard, env, Origin::Connection) {
                        // Full mailbox: wait for room, not reading the client meanwhile.
                        let h = self.session_mut(node, shard, sid).expect("present");
                        h.c.unroute(*env);
                        let epoch = self.nodes[node as usize].epoch;
                        self.after(
                            1000,
                            Ev::SessionRun {
                                node,
                                epoch,
                                shard,
                                sid,
                            },
                        );
                        return;
                    }
                }
                // The simulated sessions offer no TLS: StartTls cannot come; if it did, the
                // connection ends.
                ConnStep::StartTls => h.c.broken(),
                ConnStep::Close { bytes, routes } => return self.finish_session(node, shard, sid, bytes, routes),
                ConnStep::LoadAccount(user) => {
                    let w = SimWaiter::Account { sid, shard };
                    let s = self.slot_shard(&user);
                    return self.protocol(node, s, |p, v| p.load_account(w, user, v));
                }
                ConnStep::CreateAccount { user, account } => {
                    let w = SimWaiter::Created { sid, shard };
                    let s = self.slot_shard(&user);
                    return self.protocol(node, s, |p, v| p.create_account(w, user, account, v));
                }
                ConnStep::SetPassword { user, account } => {
                    let w = SimWaiter::Password { sid, shard };
                    let s = self.slot_shard(&user);
                    return self.protocol(node, s, |p, v| p.put_account(w, user, account, v));
                }
            }
        }
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        let inbox = !h.inbox.is_empty();
        if inbox
            || self.nodes[node as usize].shards[shard as usize]
                .core
                .session_queued(sid)
                > 0
        {
            self.schedule_session(node, shard, sid);
        }
    }

    /// The connection task ends (`ConnStep::Close`): the client sees the close, what the
    /// session still had to route goes (its unbind), and stanzas still queued for it go
    /// back to the user actor.
    fn finish_session(&mut self, node: u32, shard: u16, sid: u64, bytes: Vec<u8>, routes: Vec<Envelope>) {
        let Some(h) = self.nodes[node as usize].shards[shard as usize].sessions.remove(&sid) else {
            return;
        };
        self.server_send(h.conn, bytes);
        self.server_close(h.conn);
        self.msgs.allow_redelivery(&h.unconfirmed);
        for env in routes {
            let _ = self.route(node, shard, env, Origin::Actor);
        }
        let addr = h.c.session().addr;
        self.nodes[node as usize].shards[shard as usize]
            .core
            .close_session(addr);
        self.drive(node, shard);
    }

    pub fn read_done(&mut self, node: u32, epoch: u64, shard: u16, what: Read) {
        if !self.live(node, epoch) {
            return;
        }
        match what {
            // The cluster's read repair first (a single node has none to do).
            Read::User { jid } => self.pull(node, shard, jid),
            Read::Protocol { shard_epoch, task, op } => self.protocol_read(node, shard, shard_epoch, task, op),
        }
    }

    /// The user's state cannot be read (user_host.rs: too few copies answered the read
    /// repair): the actor does not start and its messages fail.
    pub(crate) fn activation_failed(&mut self, node: u32, shard: u16, jid: &BareJid) {
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        if sh.users.remove(jid).is_none() {
            return;
        }
        self.stats.activations_failed += 1;
        // A moved session that cannot register is closed (`life::not_started`): what it
        // confirmed and is not deleted yet may come again, as for any session the server
        // closes.
        let closed: Vec<u64> = sh
            .core
            .user_mail(jid)
            .filter_map(|m| match m {
                UserMsg::Rebind { session, .. } => Some(session.id),
                _ => None,
            })
            .collect();
        sh.core.not_started(jid);
        for sid in closed {
            self.excuse_confirmed(sid);
        }
        self.drive(node, shard);
    }

    /// `passivate_after_ms` after a user actor went idle (`Ev::Idle`): let it go if it has
    /// handled nothing since and nothing is queued.
    pub fn idle_check(&mut self, node: u32, epoch: u64, shard: u16, jid: BareJid, handled: u64) {
        if !self.live(node, epoch) {
            return;
        }
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        let Some(h) = sh.users.get(&jid) else { return };
        if h.handled != handled || h.runner.is_none() {
            self.stats.idle_reused += 1;
            return;
        }
        if !h.scheduled && sh.core.passivate(&jid) {
            sh.users.remove(&jid);
            self.stats.passivated_late += 1;
        }
    }

    /// A membership change lets every idle actor kept in memory go, now or once it is idle
    /// again (user_host.rs: another node may have served its user meanwhile).
    pub(crate) fn passivate_idle(&mut self, node: u32) {
        for sh in self.nodes[node as usize].shards.iter_mut() {
            let idle: Vec<BareJid> = sh
                .users
                .iter()
                .filter(|(_, h)| h.idle && h.runner.is_some())
                .map(|(j, _)| j.clone())
                .collect();
            for j in idle {
                let h = sh.users.get(&j).expect("present");
                if !h.scheduled && sh.core.passivate(&j) {
                    sh.users.remove(&j);
                    self.stats.passivated_late += 1;
                }
            }
        }
    }

    /// The user's state is read: its actor starts.
    pub(crate) fn activate_user(&mut self, node: u32, shard: u16, jid: BareJid) {
        {
            {
                let st = &self.nodes[node as usize].storage;
                let key = jid.to_string();
                let exists = st.account(&key).ok().flatten().is_some();
                let data = st.load_user(&key).unwrap_or_default();
                let version = data.version;
                let actor = UserActor::new(jid.clone(), exists, data, self.user_cfg.clone());
                let Some(h) = self.nodes[node as usize].shards[shard as usize].users.get_mut(&jid) else {
                    return;
                };
                if h.runner.is_some() {
                    // A read for an earlier life of this actor (before a shard restart).
                    return;
                }
                h.runner = Some(Runner::new(actor, version));
                self.schedule_user(node, shard, &jid);
            }
        }
    }

    /// Routes an envelope from `shard` (Shard::route / route_wait) through its core. `Err`
    /// gives it back when a connection must wait for room.
    pub(crate) fn route(&mut self, node: u32, shard: u16, env: Envelope, origin: Origin) -> Routed {
        if let Some(id) = crate::cluster::env_msg_id(&env) {
            self.msgs.touch(&id, node);
        }
        if let Envelope::User {
            msg: UserMsg::Inbound { stanza: st },
            ..
        }
        | Envelope::Session {
            msg: SessionMsg::Stanza(st),
            ..
        } = &env
        {
            if st.attr("type") == Some("error") {
                if let Some(id) = msg_id(st) {
                    if self.msgs.recs.get(id).is_some_and(|r| !r.errored) {
                        self.stats.messages_errored += 1;
                    }
                    self.msgs.errored(id);
                }
            }
        }
        let (shards, at) = (self.cfg.shards, self.now_us);
        let n = &mut self.nodes[node as usize];
        let core = &mut n.shards[shard as usize].core;
        let r = core.route(env, at, origin, &ClusterPlace(&n.cluster, shards));
        // The envelope goes on before what the core asked for since (and what was left of an
        // earlier call): a nested route must not overtake it.
        let r = match r {
            CoreRouted::Done => Ok(()),
            CoreRouted::Full(env) => Err(Box::new(env)),
            CoreRouted::Remote { node: to, env } => {
                self.send_remote(node, shard, to, env);
                Ok(())
            }
            CoreRouted::Mesh { shard: s, env } => {
                // The mesh: FIFO per (from, to) pair, like glommio's channels.
                let key = (node, shard, s);
                let d = self.rng.exp(self.faults.mesh_delay_us) + 1;
                let t = self.mesh_last.get(&key).copied().unwrap_or(0).max(self.now_us + d);
                self.mesh_last.insert(key, t);
                *self.mesh_depth.entry(key).or_default() += 1;
                let epoch = self.nodes[node as usize].epoch;
                self.at(
                    t,
                    Ev::Mesh {
                        node,
                        epoch,
                        from: shard,
                        to: s,
                        env: env.msg,
                    },
                );
                Ok(())
            }
        };
        self.drive(node, shard);
        r
    }

    /// Carries out what the shard's core decided, in order (shard.rs `carry_out`).
    pub(crate) fn drive(&mut self, node: u32, shard: u16) {
        while let Some(o) = self.nodes[node as usize].shards[shard as usize].core.pop_out() {
            match o {
                Out::Route(env) => {
                    let _ = self.route(node, shard, env, Origin::Actor);
                }
                Out::Wake(MailboxKey::Session(id)) => self.schedule_session(node, shard, id),
                Out::Wake(MailboxKey::Actor(ActorKey::User(j))) => self.schedule_user(node, shard, &j),
                Out::Activate(ActorKey::User(j)) => {
                    let born = self.nodes[node as usize].cluster.changes;
                    let users = &mut self.nodes[node as usize].shards[shard as usize].users;
                    users.insert(
                        j.clone(),
                        UserHost {
                            runner: None,
                            handled: 0,
                            idle: false,
                            born,
                            scheduled: false,
                            pulling: None,
                        },
                    );
                    let epoch = self.nodes[node as usize].epoch;
                    let d = self.rng.exp(self.faults.read_us) + 1;
                    self.after(
                        d,
                        Ev::Read {
                            node,
                            epoch,
                            shard,
                            what: Read::User { jid: j },
                        },
                    );
                }
                Out::RetryHeld { key, after_ms } => {
                    let epoch = self.nodes[node as usize].epoch;
                    self.after(
                        after_ms * 1000,
                        Ev::Retry {
                            node,
                            epoch,
                            shard,
                            target: key,
                        },
                    );
                }
                Out::Later { env, after_ms } => {
                    let epoch = self.nodes[node as usize].epoch;
                    self.after(
                        after_ms * 1000,
                        Ev::Again {
                            node,
                            epoch,
                            shard,
                            env,
                        },
                    );
                }
                Out::Bounced { env, .. } => self.bounced(&env),
            }
        }
    }

    /// Moves held envelopes into their mailbox while it has room.
    pub fn drain_held(&mut self, node: u32, epoch: u64, shard: u16, target: MailboxKey) {
        if !self.live(node, epoch) {
            return;
        }
        self.nodes[node as usize].shards[shard as usize]
            .core
            .retry_held(&target);
        self.drive(node, shard);
    }

    pub fn mesh_arrive(&mut self, node: u32, epoch: u64, shard: u16, env: Envelope) {
        if !self.live(node, epoch) {
            return;
        }
        let _ = self.deliver_local(node, shard, env, Origin::Actor);
    }

    pub(crate) fn deliver_local(&mut self, node: u32, shard: u16, env: Envelope, origin: Origin) -> Routed {
        let at = self.now_us;
        let r = self.nodes[node as usize].shards[shard as usize]
            .core
            .deliver(env, at, origin);
        self.drive(node, shard);
        match r {
            CoreRouted::Full(env) => Err(Box::new(env)),
            _ => Ok(()),
        }
    }

    /// A stanza bounced for lack of room (the core answers it). A presence bounced here
    /// leaves its receiver's view stale until the sender's next presence: the overflow rule
    /// allows it, so that pair is excused from invariant 3.
    fn bounced(&mut self, env: &Envelope) {
        self.stats.bounces += 1;
        if let Envelope::User {
            msg: UserMsg::Inbound { stanza: st } | UserMsg::Outbound { stanza: st, .. },
            ..
        }
        | Envelope::Session {
            msg: SessionMsg::Stanza(st),
            ..
        } = env
        {
            let bare = |a: Option<&str>| a.unwrap_or("").split('/').next().unwrap_or("").to_string();
            if st.name == "presence" {
                // Either way: a bounced probe or subscription answer costs the other side too.
                let (to, from) = (bare(st.attr("to")), bare(st.attr("from")));
                // No `to`: a user's own broadcast presence, bounced before its actor saw it —
                // every contact's view of it is stale ("*").
                let to = if to.is_empty() { "*".to_string() } else { to };
                self.presence_lost.insert((to.clone(), from.clone()));
                self.presence_lost.insert((from, to));
            }
            if st.name == "iq" && st.child("query", "jabber:iq:roster").is_some() {
                // A roster push bounced: that client's view is stale until it fetches again.
                self.roster_stale.insert(bare(st.attr("to")));
            }
        }
    }

    pub(crate) fn undeliverable(&mut self, node: u32, shard: u16, env: Envelope, condition: &str) {
        self.nodes[node as usize].shards[shard as usize]
            .core
            .undeliverable(env, condition);
        self.drive(node, shard);
    }

    /// One step of a user actor's task (user_host.rs): carry on with its effects, or handle
    /// its next message.
    pub fn user_run(&mut self, node: u32, epoch: u64, shard: u16, jid: BareJid) {
        if !self.live(node, epoch) {
            return;
        }
        let now = self.now_ms();
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        let Some(h) = sh.users.get_mut(&jid) else {
            return;
        };
        h.scheduled = false;
        let Some(r) = h.runner.as_mut() else { return };
        if r.ready() {
            let Some(m) = sh.core.pop_user(&jid) else {
                return;
            };
            if sh.core.take_stale(&jid) {
                // A handoff undone since (`ShardCore::pop_user`): the actor ends as stale
                // before this message, which goes to the next incarnation (user_host.rs).
                let sessions = r.actor().sessions();
                sh.users.remove(&jid);
                let again = life::stale_again(&jid, m.msg);
                sh.core.end_user(&jid, sessions, life::Ending::Stale, again);
                self.stats.stale_ends += 1;
                return self.drive(node, shard);
            }
            h.handled += 1;
            h.idle = false;
            if self.cfg.keep_events > 0 {
                let what = format!("user {jid} handles {:?}", m.msg);
                self.trace.note(self.now_us, what);
            }
            let sh = &mut self.nodes[node as usize].shards[shard as usize];
            let r = sh.users.get_mut(&jid).and_then(|h| h.runner.as_mut()).expect("present");
            if r.handle(m.msg, now).is_err() {
                return self.fail(0, format!("user actor {jid} panicked"));
            }
        }
        loop {
            let sh = &mut self.nodes[node as usize].shards[shard as usize];
            let r = sh.users.get_mut(&jid).and_then(|h| h.runner.as_mut()).expect("present");
            match r.step() {
                Step::Send(env) => {
                    let _ = self.route(node, shard, env, Origin::Actor);
                }
                Step::Persist { writes, base } => {
                    if planted::active(Bug::AckBeforeFlush) {
                        // The planted bug: what depends on the write goes before it is durable.
                        let mut writes = writes;
                        writes.push(Write::NextVersion {
                            user: jid.to_string(),
                            base,
                        });
                        self.submit(node, writes, None);
                        let sh = &mut self.nodes[node as usize].shards[shard as usize];
                        let r = sh.users.get_mut(&jid).and_then(|h| h.runner.as_mut()).expect("present");
                        for env in r.persisted(true) {
                            let _ = self.route(node, shard, env, Origin::Actor);
                        }
                        continue;
                    }
                    return self.persist(node, shard, jid, writes, base);
                }
                Step::Waiting => return,
                Step::Done { idle } => {
                    let delay = self.cfg.passivate_after_ms;
                    let changes = self.nodes[node as usize].cluster.changes;
                    let sh = &mut self.nodes[node as usize].shards[shard as usize];
                    let born = sh.users.get(&jid).map_or(changes, |h| h.born);
                    if idle && life::passivate_now(delay, born, changes) && sh.core.passivate(&jid) {
                        // Idle and nothing queued: let go; the durable state reloads on the
                        // next message.
                        sh.users.remove(&jid);
                    } else if sh.core.user_queued(&jid) > 0 {
                        self.schedule_user(node, shard, &jid);
                    } else if idle {
                        // Let go after `delay` unless a message comes first (user_host.rs).
                        let handled = sh.users.get_mut(&jid).map_or(0, |h| {
                            h.idle = true;
                            h.handled
                        });
                        let epoch = self.nodes[node as usize].epoch;
                        self.after(
                            delay * 1000,
                            Ev::Idle {
                                node,
                                epoch,
                                shard,
                                jid,
                                handled,
                            },
                        );
                    }
                    return;
                }
                Step::End { sessions, instead, why } => {
                    // Its write failed: it ends (user_host.rs), its sessions are closed (their
                    // clients reconnect) and the next incarnation, loaded from storage, learns
                    // they are gone and gets what was queued. A stale one's sessions register
                    // with the next incarnation instead.
                    sh.users.remove(&jid);
                    sh.core.end_user(&jid, sessions, why, instead);
                    return self.drive(node, shard);
                }
            }
        }
    }

    /// Hands writes to the storage thread: applied at once (later reads see them, as with
    /// sled), made durable by the next flush with whatever else is queued (group commit).
    pub(crate) fn submit(&mut self, node: u32, writes: Vec<Write>, waiter: Option<Waiter>) {
        let mut stored = Vec::new();
        for wr in &writes {
            if let Write::PushOffline { user, msg } = wr {
                if let Some(id) = xml_id(&msg.xml) {
                    stored.push((user.clone(), id));
                }
            }
        }
        let n = &mut self.nodes[node as usize];
        if let Err((_, e)) = n.commit.write(&mut n.storage, &writes, (waiter, stored)) {
            return self.fail(0, format!("memory storage refused a write: {e}"));
        }
        self.start_flush(node);
    }

    /// Starts a flush if none is in progress and a batch waits (`GroupCommit::start`).
    pub(crate) fn start_flush(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        if !n.commit.start() {
            return;
        }
        let epoch = n.epoch;
        let d = self.rng.exp(self.faults.flush_us) + 1;
        self.after(d, Ev::FlushDone { node, epoch });
    }

    pub fn flush_done(&mut self, node: u32, epoch: u64) {
        if !self.live(node, epoch) {
            return;
        }
        let n = &mut self.nodes[node as usize];
        let _ = n.storage.flush();
        if !n.commit.in_progress() {
            return;
        }
        let (waiters, stored): (Vec<_>, Vec<_>) = n.commit.flushed().into_iter().unzip();
        let (waiters, stored) = (waiters.into_iter().flatten(), stored.into_iter().flatten());
        for (user, id) in stored {
            if self.msgs.recs.get(&id).is_some_and(|r| !r.stored_durable) {
                self.stats.messages_stored_offline += 1;
            }
            self.msgs.stored_durably(&id);
            let len = self.nodes[node as usize]
                .storage
                .load_user(&user)
                .map(|d| d.offline.len())
                .unwrap_or(0);
            if len > MAX_OFFLINE {
                self.fail(4, format!("{user}'s stored offline queue holds {len} > {MAX_OFFLINE}"));
            }
        }
        for w in waiters {
            let Waiter::Task {
                shard,
                shard_epoch,
                task,
            } = w;
            if self.shard_live(node, epoch, shard, shard_epoch) {
                self.protocol(node, shard, |p, _| p.storage(task, Ok(Got::Stored)));
            }
        }
        self.start_flush(node);
    }

    /// A user actor's writes are durable (everywhere they had to be; `ok`) or failed: it
    /// sends what depended on them, or will end, and goes on.
    pub(crate) fn persisted(&mut self, node: u32, epoch: u64, shard: u16, shard_epoch: u64, jid: &BareJid, ok: bool) {
        if !self.shard_live(node, epoch, shard, shard_epoch) {
            return;
        }
        let sh = &mut self.nodes[node as usize].shards[shard as usize];
        let Some(r) = sh.users.get_mut(jid).and_then(|h| h.runner.as_mut()) else {
            return;
        };
        for env in r.persisted(ok) {
            let _ = self.route(node, shard, env, Origin::Actor);
        }
        self.schedule_user(node, shard, jid);
    }

    /// A shard dies and restarts empty. Its connections drop; the host tells the rest of the
    /// node what a restarting shard must: its sessions are gone (their users' actors get
    /// `Unbind`), and the sessions whose user actor it hosted are ended with
    /// `internal-server-error` (their clients reconnect), as after an actor panic. Unbound
    /// sessions anywhere on the node are ended too (their bind may have been lost).
    pub fn shard_crash(&mut self, node: u32, shard: u16) {
        if !self.nodes[node as usize].up {
            return;
        }
        self.stats.shard_crashes += 1;
        let epoch = self.nodes[node as usize].shards[shard as usize].epoch + 1;
        let (mailbox, life) = (self.nodes[node as usize].mailbox, self.nodes[node as usize].epoch);
        let old = std::mem::replace(
            &mut self.nodes[node as usize].shards[shard as usize],
            Shard::new(epoch, node, shard, self.cfg.shards, mailbox, life),
        );
        // Its cluster protocol's work is lost with it: batches whose deletion of offline
        // messages was in flight leave them stored (they come again).
        let mut old = old;
        let mut sessions_waiting = Vec::new();
        for w in old.protocol.crash() {
            match w {
                SimWaiter::Persist { deleting, .. } => {
                    self.msgs.deletes_pending(&deleting, false);
                    self.msgs.allow_redelivery(&deleting);
                }
                // Sessions on other shards waiting on an account operation here get a failure
                // (in the node, their oneshot is dropped).
                w @ (SimWaiter::Account { .. } | SimWaiter::Created { .. } | SimWaiter::Password { .. }) => {
                    sessions_waiting.push(w);
                }
                SimWaiter::Pull { .. } => {}
            }
        }
        // In-flight work on it is lost: excuse what has no fate yet.
        // Its slots' groups start again from the store, once what the storage thread holds
        // is flushed (it would count as durable what might not be yet).
        self.raft_restore(node, Some(shard));
        for w in sessions_waiting {
            let e = "the shard restarted".to_string();
            let outcome = match &w {
                SimWaiter::Account { .. } => Outcome::Account(Err(e)),
                SimWaiter::Created { .. } => Outcome::Created(Err(e)),
                _ => Outcome::Written(Err(e)),
            };
            self.outcome(node, shard, w, outcome);
        }
        // Storage survives a shard crash: offline messages handed over but not yet deleted
        // are still there and come again.
        let still = self.stored_offline_ids(node);
        let on_the_way = self.offline_in_mailboxes();
        self.stats.messages_lost_in_crash += self.msgs.crashed(|_| true, &still, &on_the_way);
        self.mesh_depth.retain(|k, _| !(k.0 == node && k.2 == shard));
        // As the node does after an actor panic: the next incarnation of each lost user
        // actor learns that its sessions are gone (their unbinds may have been lost in its
        // mailbox), and tells the contacts.
        for (jid, u) in &old.users {
            for (session, resource) in u.runner.as_ref().map(|r| r.actor().sessions()).unwrap_or_default() {
                if session.node != node {
                    // Sessions on other nodes are told directly, as user_host.rs does after
                    // a panic (this node's own sessions are ended below).
                    let kick = SessionMsg::Kick {
                        condition: "internal-server-error",
                        text: "internal error".into(),
                    };
                    let _ = self.route(node, shard, Envelope::to_session(session, kick), Origin::Actor);
                }
                let env = Envelope::to_user(jid.clone(), UserMsg::Unbind { session, resource });
                let _ = self.route(node, shard, env, Origin::Actor);
            }
        }
        for (_, h) in old.sessions {
            self.server_close(h.conn);
            self.msgs.allow_redelivery(&h.unconfirmed);
            if let Some(j) = h.c.session().jid() {
                let env = Envelope::to_user(
                    j.to_bare(),
                    UserMsg::Unbind {
                        session: h.c.session().addr,
                        resource: j.resource().to_string(),
                    },
                );
                let _ = self.route(node, shard, env, Origin::Actor);
            }
        }
        let kick = SessionMsg::Kick {
            condition: "internal-server-error",
            text: "internal error".into(),
        };
        for s in 0..self.nodes[node as usize].shards.len() as u16 {
            let ids: Vec<u64> = self.nodes[node as usize].shards[s as usize]
                .sessions
                .iter()
                .filter(|(_, h)| match h.c.session().jid() {
                    Some(j) => self.place_user(node, &j.to_bare()) == (node, shard),
                    None => true,
                })
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                let addr = SessionAddr {
                    node,
                    node_gen: self.node_gen(node),
                    shard: s,
                    id,
                };
                let env = Envelope::to_session(addr, kick.clone());
                let _ = self.route(node, s, env, Origin::Actor);
            }
        }
    }
}
