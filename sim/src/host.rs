//! Hosting the real actors on simulated shards, mirroring node/src (conn.rs, user_host.rs,
//! shard.rs, storage_thread.rs): the same routing rules, mailbox bounds and overflow policy,
//! one message at a time per actor with its effects carried out in order, a `Persist` awaited
//! (flushed, with group commit) before the messages that depend on it.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use jid::BareJid;
use starling_actors::address::{MailboxKey, SessionAddr, SingleNode};
use starling_actors::c2s::{Action, C2sSession, Ctx, Input};
use starling_actors::msg::{Envelope, SessionMsg, To, UserMsg};
use starling_actors::planted::{self, Bug};
use starling_actors::system::life::{self, Ending, NotStarted};
use starling_actors::throttle::AuthThrottle;
use starling_actors::user::{Effect, UserActor};
use starling_actors::xml::Element;
use starling_storage::{MemoryStorage, Storage, Write};

use crate::oracle::xml_id;
use crate::world::{Ev, World, MAX_OFFLINE};

#[derive(Debug)]
pub enum Read {
    Account { sid: u64, user: String },
    User { jid: BareJid },
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
    pub placement: SingleNode,
    /// Writes waiting for the flush in progress to finish (group commit).
    queued: Vec<(Vec<Write>, Option<Waiter>)>,
    /// The flush in progress: who waits on it, and the offline messages it makes durable.
    flushing: Option<Flush>,
}

/// The flush in progress: who waits on it, and the (user, message id) of the offline
/// messages it makes durable.
type Flush = (Vec<Waiter>, Vec<(String, String)>);

/// Who waits for a flush.
pub enum Waiter {
    /// A user actor waiting for its writes, with what it sends once they are durable.
    User {
        shard: u16,
        shard_epoch: u64,
        jid: BareJid,
        then: Vec<Envelope>,
    },
    /// The local copy of a replicated write (cluster.rs).
    Replicated(u64),
    /// A request from another node answered once its writes are durable here.
    Answer(crate::cluster::Reply),
}

pub struct Shard {
    pub epoch: u64,
    pub sessions: BTreeMap<u64, SessionHost>,
    pub users: BTreeMap<BareJid, UserHost>,
    /// Control messages waiting for room in a full mailbox, in order; later envelopes for
    /// the same mailbox queue behind them.
    pub held: BTreeMap<MailboxKey, VecDeque<Envelope>>,
    throttle: AuthThrottle,
}

pub enum ConnInput {
    Bytes(Vec<u8>),
    Closed,
}

pub struct SessionHost {
    s: C2sSession,
    conn: u64,
    inbox: VecDeque<ConnInput>,
    pub mailbox: VecDeque<SessionMsg>,
    actions: VecDeque<Action>,
    /// Waiting for a storage read.
    pub waiting: bool,
    scheduled: bool,
    /// Offline messages it wrote and has not yet confirmed (`OfflineDelivered`): if it ends
    /// first, they stay stored and come again — at-least-once, allowed by the oracle.
    unconfirmed: Vec<String>,
    /// Once bound: the node its user's actor was on then (a session whose user moves to
    /// another node is closed, as `after_change` in node/src/cluster/link.rs does).
    pub bound_owner: Option<u32>,
}

pub struct UserHost {
    /// `None` while its state loads.
    pub actor: Option<UserActor>,
    pub mailbox: VecDeque<UserMsg>,
    effects: VecDeque<Effect>,
    /// Waiting for a flush.
    waiting: bool,
    scheduled: bool,
    /// A write failed: its memory is ahead of its storage, so it ends after this message
    /// (user_host.rs).
    pub doomed: bool,
    /// The version its state was loaded at plus its batches since: the base of its next
    /// replicated write (user_host.rs).
    pub version: u64,
    /// What its failed writes asked to send instead (`Effect::Persist::failed`), sent when
    /// it ends.
    pub instead: Vec<Envelope>,
    /// The read repair this incarnation waits for (`cluster.rs pull`). An answer to an older
    /// one (an incarnation since ended) must not start or fail this one: in the node each
    /// incarnation awaits its own `pull_newest`.
    pub pulling: Option<u64>,
}

/// A route a connection must wait for gives its envelope back (boxed: it is large).
pub(crate) type Routed = Result<(), Box<Envelope>>;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Connection,
    Actor,
}

impl SessionHost {
    pub fn jid_bare(&self) -> Option<BareJid> {
        self.s.binding_user().cloned()
    }

    /// conn.rs after a failed account lookup.
    pub fn stream_error(&mut self, condition: &str, text: &str) {
        self.s.stream_error(condition, Some(text));
    }
}

impl Shard {
    fn new(epoch: u64) -> Self {
        Shard {
            epoch,
            sessions: BTreeMap::new(),
            users: BTreeMap::new(),
            held: BTreeMap::new(),
            throttle: AuthThrottle::new(1000, 60_000, 100_000),
        }
    }
}

impl Node {
    pub fn new(id: u32, shards: u16, storage: MemoryStorage) -> Self {
        Node {
            id,
            up: true,
            started: true,
            cluster: crate::cluster::NodeCluster::new(id),
            epoch: 0,
            shards: (0..shards).map(|_| Shard::new(0)).collect(),
            storage,
            placement: SingleNode { node: id, shards },
            queued: Vec::new(),
            flushing: None,
        }
    }

    /// Power cut: everything in memory is gone, storage keeps only what was flushed.
    pub fn crash(&mut self) {
        self.up = false;
        self.epoch += 1;
        self.storage.crash();
        let n = self.shards.len();
        self.shards = (0..n).map(|_| Shard::new(0)).collect();
        self.queued.clear();
        self.flushing = None;
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
        sh.sessions.insert(
            sid,
            SessionHost {
                s,
                conn,
                inbox: VecDeque::new(),
                mailbox: VecDeque::new(),
                actions: VecDeque::new(),
                waiting: false,
                scheduled: false,
                unconfirmed: Vec::new(),
                bound_owner: None,
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

    fn schedule_user(&mut self, node: u32, shard: u16, jid: &BareJid) {
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
        if h.waiting {
            return;
        }
        if h.actions.is_empty() {
            let take_mail = match (h.inbox.is_empty(), h.mailbox.is_empty()) {
                (true, true) => return,
                (false, true) => false,
                (true, false) => true,
                (false, false) => self.rng.chance(0.5),
            };
            let h = self.session_mut(node, shard, sid).expect("checked");
            if take_mail {
                let m = h.mailbox.pop_front().expect("checked");
                let bound = h.s.jid().is_some() && !h.s.is_closed();
                let to = h.s.jid().map(|j| j.to_bare().to_string());
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
        h.s.handle(
            input,
            now,
            &mut Ctx {
                throttle: &mut sh.throttle,
            },
        );
        let out = h.s.take_output();
        h.actions.extend(out.actions);
        let conn = h.conn;
        // From the bind request on, as conn.rs records it.
        let newly_bound = match h.s.binding_user() {
            Some(j) if h.bound_owner.is_none() => Some(j.clone()),
            _ => None,
        };
        self.server_send(conn, out.bytes);
        if let Some(bare) = newly_bound {
            let owner = self.place_user(node, &bare).0;
            if let Some(h) = self.session_mut(node, shard, sid) {
                h.bound_owner = Some(owner);
            }
        }
    }

    /// Sends what the session wrote outside `handle` (a stream error from the host).
    pub(crate) fn session_flush(&mut self, node: u32, shard: u16, sid: u64) {
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        let out = h.s.take_output();
        h.actions.extend(out.actions);
        let conn = h.conn;
        self.server_send(conn, out.bytes);
    }

    /// Carries out the session's actions in order, as conn.rs does; stops at a storage read
    /// or a full local mailbox (the connection is not read meanwhile).
    pub(crate) fn carry_out(&mut self, node: u32, shard: u16, sid: u64) {
        loop {
            let Some(h) = self.session_mut(node, shard, sid) else {
                return;
            };
            let Some(a) = h.actions.pop_front() else { break };
            match a {
                Action::Route(env) => {
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
                        h.actions.push_front(Action::Route(*env));
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
                // StartTls cannot come: the simulated sessions offer no TLS.
                Action::Close | Action::StartTls => return self.finish_session(node, shard, sid),
                Action::LoadAccount(user) => {
                    h.waiting = true;
                    if let Some(home) = self.account_home(node, &user) {
                        self.load_account_remote(node, shard, sid, home, user);
                        return;
                    }
                    let epoch = self.nodes[node as usize].epoch;
                    let d = self.rng.exp(self.faults.read_us) + 1;
                    self.after(
                        d,
                        Ev::Read {
                            node,
                            epoch,
                            shard,
                            what: Read::Account { sid, user },
                        },
                    );
                    return;
                }
                Action::CreateAccount { user, account } => {
                    let st = &mut self.nodes[node as usize].storage;
                    let created = st.create_account(&user, &account).ok().filter(|_| st.flush().is_ok());
                    self.session_input(node, shard, sid, Input::AccountCreated(created));
                }
                Action::SetPassword { user, account } => {
                    let st = &mut self.nodes[node as usize].storage;
                    let ok = st.apply(&[Write::PutAccount { user, account }]).is_ok() && st.flush().is_ok();
                    self.session_input(node, shard, sid, Input::PasswordSet(ok));
                }
            }
        }
        let Some(h) = self.session_mut(node, shard, sid) else {
            return;
        };
        if h.s.is_closed() {
            return self.finish_session(node, shard, sid);
        }
        if !h.inbox.is_empty() || !h.mailbox.is_empty() {
            self.schedule_session(node, shard, sid);
        }
    }

    /// The connection task ends: the client sees the close, the user actor learns the
    /// session is gone, and stanzas still queued for it go back to the user actor.
    fn finish_session(&mut self, node: u32, shard: u16, sid: u64) {
        self.session_input(node, shard, sid, Input::Closed);
        let Some(mut h) = self.nodes[node as usize].shards[shard as usize].sessions.remove(&sid) else {
            return;
        };
        self.server_close(h.conn);
        self.msgs.allow_redelivery(&h.unconfirmed);
        for a in std::mem::take(&mut h.actions) {
            if let Action::Route(env) = a {
                let _ = self.route(node, shard, env, Origin::Actor);
            }
        }
        let addr = h.s.addr;
        for m in h.mailbox {
            self.session_gone(node, shard, addr, m);
        }
    }

    pub fn read_done(&mut self, node: u32, epoch: u64, shard: u16, what: Read) {
        if !self.live(node, epoch) {
            return;
        }
        match what {
            Read::Account { sid, user } => {
                let acc = self.nodes[node as usize].storage.account(&user).ok().flatten();
                let Some(h) = self.session_mut(node, shard, sid) else {
                    return;
                };
                h.waiting = false;
                self.session_input(node, shard, sid, Input::Account(acc));
                self.carry_out(node, shard, sid);
            }
            Read::User { jid } => {
                if self.clustered() {
                    // The cluster's read repair first (cluster.rs `pull`).
                    return self.pull(node, shard, jid);
                }
                self.activate_user(node, shard, jid);
            }
        }
    }

    /// The user's state cannot be read (user_host.rs: too few copies answered the read
    /// repair): the actor does not start and its messages fail.
    pub(crate) fn activation_failed(&mut self, node: u32, shard: u16, jid: &BareJid) {
        let Some(h) = self.nodes[node as usize].shards[shard as usize].users.remove(jid) else {
            return;
        };
        self.stats.activations_failed += 1;
        for m in h.mailbox {
            match life::not_started(jid, m) {
                NotStarted::Send(env) => {
                    let _ = self.route(node, shard, env, Origin::Actor);
                }
                NotStarted::Bounce(env) => self.undeliverable(node, shard, env, "internal-server-error"),
                NotStarted::Nothing => {}
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
                if h.actor.is_some() {
                    // A read for an earlier life of this actor (before a shard restart).
                    return;
                }
                h.actor = Some(actor);
                h.version = version;
                self.schedule_user(node, shard, &jid);
            }
        }
    }

    /// Routes an envelope from `shard` (Shard::route / route_wait). `Err` gives it back when
    /// a connection must wait for room.
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
        let (n, s) = match env.to() {
            To::User(j) => self.place_user(node, j),
            To::Session(a) => (a.node, a.shard),
        };
        if n != node {
            self.send_remote(node, shard, n, env);
            return Ok(());
        }
        if s == shard {
            return self.deliver_local(node, s, env, origin);
        }
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
                env,
            },
        );
        Ok(())
    }

    fn retry_held(&mut self, node: u32, epoch: u64, shard: u16, target: MailboxKey) {
        self.after(
            starling_actors::system::limits::RETRY_MS * 1000,
            Ev::Retry {
                node,
                epoch,
                shard,
                target,
            },
        );
    }

    /// Moves held envelopes into their mailbox while it has room.
    pub fn drain_held(&mut self, node: u32, epoch: u64, shard: u16, target: MailboxKey) {
        if !self.live(node, epoch) {
            return;
        }
        let cap = self.faults.mailbox;
        loop {
            let sh = &mut self.nodes[node as usize].shards[shard as usize];
            let Some(env) = sh.held.get_mut(&target).and_then(|q| q.pop_front()) else {
                sh.held.remove(&target);
                return;
            };
            let full = match env.to() {
                To::Session(a) => sh.sessions.get(&a.id).is_some_and(|h| h.mailbox.len() >= cap),
                To::User(j) => sh.users.get(j).is_some_and(|h| h.mailbox.len() >= cap),
            };
            if full {
                sh.held.get_mut(&target).expect("present").push_front(env);
                self.retry_held(node, epoch, shard, target);
                return;
            }
            // Room (or the session is gone): deliver as if fresh, with nothing held before it.
            let q = sh.held.remove(&target).expect("present");
            let _ = self.deliver_local(node, shard, env, Origin::Actor);
            if !q.is_empty() {
                self.nodes[node as usize].shards[shard as usize]
                    .held
                    .insert(target.clone(), q);
            }
        }
    }

    pub fn mesh_arrive(&mut self, node: u32, epoch: u64, shard: u16, env: Envelope) {
        if !self.live(node, epoch) {
            return;
        }
        let _ = self.deliver_local(node, shard, env, Origin::Actor);
    }

    pub(crate) fn deliver_local(&mut self, node: u32, shard: u16, env: Envelope, origin: Origin) -> Routed {
        let cap = self.faults.mailbox;
        let target = env.mailbox_key();
        if let Some(q) = self.nodes[node as usize].shards[shard as usize].held.get_mut(&target) {
            if origin == Origin::Connection || env.is_control() {
                q.push_back(env);
            } else {
                self.overflow(node, shard, env);
            }
            return Ok(());
        }
        match env {
            Envelope::Session { to: a, msg: m } => {
                let Some(h) = self.session_mut(node, shard, a.id) else {
                    self.session_gone(node, shard, a, m);
                    return Ok(());
                };
                if h.mailbox.len() >= cap {
                    let env = Envelope::to_session(a, m);
                    if origin == Origin::Connection {
                        return Err(Box::new(env));
                    }
                    self.overflow(node, shard, env);
                    return Ok(());
                }
                h.mailbox.push_back(m);
                self.schedule_session(node, shard, a.id);
            }
            Envelope::User { to: j, msg: m } => {
                let users = &mut self.nodes[node as usize].shards[shard as usize].users;
                if !users.contains_key(&j) {
                    users.insert(
                        j.clone(),
                        UserHost {
                            actor: None,
                            mailbox: VecDeque::new(),
                            effects: VecDeque::new(),
                            waiting: false,
                            scheduled: false,
                            doomed: false,
                            version: 0,
                            instead: Vec::new(),
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
                            what: Read::User { jid: j.clone() },
                        },
                    );
                }
                let h = self.nodes[node as usize].shards[shard as usize]
                    .users
                    .get_mut(&j)
                    .expect("inserted");
                if h.mailbox.len() >= cap {
                    let env = Envelope::to_user(j, m);
                    if origin == Origin::Connection {
                        return Err(Box::new(env));
                    }
                    self.overflow(node, shard, env);
                    return Ok(());
                }
                h.mailbox.push_back(m);
                self.schedule_user(node, shard, &j);
            }
        }
        Ok(())
    }

    /// A full mailbox: control messages are held (in order) until there is room, stanzas
    /// bounce.
    fn overflow(&mut self, node: u32, shard: u16, env: Envelope) {
        if env.is_control() {
            let target = env.mailbox_key();
            let held = &mut self.nodes[node as usize].shards[shard as usize].held;
            if let Some(q) = held.get_mut(&target) {
                q.push_back(env);
            } else {
                held.insert(target.clone(), VecDeque::from([env]));
                let epoch = self.nodes[node as usize].epoch;
                self.retry_held(node, epoch, shard, target);
            }
            return;
        }
        self.stats.bounces += 1;
        // A presence bounced here leaves its receiver's view stale until the sender's next
        // presence: the overflow rule allows it, so that pair is excused from invariant 3.
        if let Envelope::User {
            msg: UserMsg::Inbound { stanza: st } | UserMsg::Outbound { stanza: st, .. },
            ..
        }
        | Envelope::Session {
            msg: SessionMsg::Stanza(st),
            ..
        } = &env
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
        self.undeliverable(node, shard, env, "resource-constraint");
    }

    /// `Shard::session_gone`: the shared rule (`msg::session_gone`) for a stanza that reached
    /// a session after it ended.
    fn session_gone(&mut self, node: u32, shard: u16, addr: SessionAddr, m: SessionMsg) {
        let gone = starling_actors::msg::session_gone(addr, m);
        for env in gone.route {
            let _ = self.route(node, shard, env, Origin::Actor);
        }
        if let Some((env, condition)) = gone.bounce {
            self.undeliverable(node, shard, env, condition);
        }
    }

    pub(crate) fn undeliverable(&mut self, node: u32, shard: u16, env: Envelope, condition: &str) {
        if let Some(err) = starling_actors::msg::undeliverable(env, condition) {
            let _ = self.route(node, shard, err, Origin::Actor);
        }
    }

    /// One step of a user actor's task: carry on with its effects, or handle its next
    /// message.
    pub fn user_run(&mut self, node: u32, epoch: u64, shard: u16, jid: BareJid) {
        if !self.live(node, epoch) {
            return;
        }
        let now = self.now_ms();
        let Some(h) = self.nodes[node as usize].shards[shard as usize].users.get_mut(&jid) else {
            return;
        };
        h.scheduled = false;
        if h.waiting || h.actor.is_none() {
            return;
        }
        if h.doomed && h.effects.is_empty() {
            // Its last write failed with nothing queued behind it: it ends now, as the node's
            // actor does right after the failed write (found by the simulator: it lived on,
            // its memory ahead of its storage, and never sent what the write failed instead).
            return self.end_actor(node, shard, &jid);
        }
        if h.effects.is_empty() {
            let Some(m) = h.mailbox.pop_front() else { return };
            if self.cfg.keep_events > 0 {
                let what = format!("user {jid} handles {m:?}");
                self.trace.note(self.now_us, what);
            }
            let h = self.nodes[node as usize].shards[shard as usize]
                .users
                .get_mut(&jid)
                .expect("present");
            let actor = h.actor.as_mut().expect("loaded");
            match catch_unwind(AssertUnwindSafe(|| actor.handle(m, now))) {
                Ok(fx) => h.effects.extend(fx),
                Err(_) => {
                    return self.fail(0, format!("user actor {jid} panicked"));
                }
            }
        }
        let shard_epoch = self.nodes[node as usize].shards[shard as usize].epoch;
        loop {
            let h = self.nodes[node as usize].shards[shard as usize]
                .users
                .get_mut(&jid)
                .expect("present");
            let Some(fx) = h.effects.pop_front() else { break };
            match fx {
                Effect::Send(env) => {
                    let _ = self.route(node, shard, env, Origin::Actor);
                }
                // After a failed write, later ones would build on what is not stored.
                Effect::Persist { failed, .. } if h.doomed => h.instead.extend(failed),
                Effect::Persist { writes, then, failed } => {
                    if planted::active(Bug::AckBeforeFlush) {
                        self.submit(node, writes, None);
                        for env in then {
                            let _ = self.route(node, shard, env, Origin::Actor);
                        }
                        continue;
                    }
                    h.waiting = true;
                    if self.cfg.nodes > 1 {
                        let base = h.version;
                        self.persist_replicated(node, shard, shard_epoch, jid, (writes, then, failed), base);
                        return;
                    }
                    // One node: the batch still raises the version (`write_replicated`).
                    let mut writes = writes;
                    writes.push(Write::NextVersion {
                        user: jid.to_string(),
                        base: h.version,
                    });
                    h.version += 1;
                    let w = Waiter::User {
                        shard,
                        shard_epoch,
                        jid: jid.clone(),
                        then,
                    };
                    self.submit(node, writes, Some(w));
                    return;
                }
            }
        }
        let h = self.nodes[node as usize].shards[shard as usize]
            .users
            .get_mut(&jid)
            .expect("present");
        if h.doomed {
            return self.end_actor(node, shard, &jid);
        }
        let idle = h.actor.as_ref().is_some_and(|a| a.is_idle());
        if idle && h.mailbox.is_empty() {
            // Idle and nothing queued: let go; the durable state reloads on the next message.
            self.nodes[node as usize].shards[shard as usize].users.remove(&jid);
        } else if !h.mailbox.is_empty() {
            self.schedule_user(node, shard, &jid);
        }
    }

    /// Ends a user actor whose write failed (user_host.rs `end_after_failed_write`): its
    /// sessions are closed (their clients reconnect) and the next incarnation, loaded from
    /// storage, learns they are gone and gets what was queued.
    pub(crate) fn end_actor(&mut self, node: u32, shard: u16, jid: &BareJid) {
        let Some(h) = self.nodes[node as usize].shards[shard as usize].users.remove(jid) else {
            return;
        };
        let sessions = h.actor.as_ref().map(|a| a.sessions()).unwrap_or_default();
        for env in life::ended(jid, sessions, Ending::WriteFailed) {
            let _ = self.route(node, shard, env, Origin::Actor);
        }
        for env in h.instead {
            match life::delay_ms(&env) {
                0 => {
                    let _ = self.route(node, shard, env, Origin::Actor);
                }
                ms => {
                    let epoch = self.nodes[node as usize].epoch;
                    self.after(
                        ms * 1000,
                        Ev::Again {
                            node,
                            epoch,
                            shard,
                            env,
                        },
                    );
                }
            }
        }
        for m in h.mailbox {
            let _ = self.route(node, shard, Envelope::to_user(jid.clone(), m), Origin::Actor);
        }
    }

    /// Hands writes to the storage thread: applied at once (later reads see them, as with
    /// sled), made durable by the next flush with whatever else is queued (group commit).
    pub(crate) fn submit(&mut self, node: u32, writes: Vec<Write>, waiter: Option<Waiter>) {
        let n = &mut self.nodes[node as usize];
        match n.storage.apply(&writes) {
            Ok(()) => {}
            // A replicated batch on another base (`Write::NextVersion`): refused whole, at
            // once, as the storage thread answers it.
            Err(e @ starling_storage::StorageError::Conflict { .. }) => {
                return match waiter {
                    Some(Waiter::Replicated(id)) => self.replicated_local_failed(node, id),
                    Some(Waiter::Answer(r)) => self.answer(node, r, crate::cluster::Res::Failed(e.to_string())),
                    _ => self.fail(0, format!("an unconditional write met a conflict: {e}")),
                };
            }
            Err(e) => {
                self.fail(0, format!("memory storage refused a write: {e}"));
                return;
            }
        }
        n.queued.push((writes, waiter));
        if n.flushing.is_none() {
            self.start_flush(node);
        }
    }

    fn start_flush(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        let batch = std::mem::take(&mut n.queued);
        if batch.is_empty() {
            return;
        }
        let mut waiters = Vec::new();
        let mut stored = Vec::new();
        for (writes, w) in batch {
            for wr in &writes {
                if let Write::PushOffline { user, msg } = wr {
                    if let Some(id) = xml_id(&msg.xml) {
                        stored.push((user.clone(), id));
                    }
                }
            }
            waiters.extend(w);
        }
        n.flushing = Some((waiters, stored));
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
        let Some((waiters, stored)) = n.flushing.take() else {
            return;
        };
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
            let (shard, shard_epoch, jid, then) = match w {
                Waiter::User {
                    shard,
                    shard_epoch,
                    jid,
                    then,
                } => (shard, shard_epoch, jid, then),
                Waiter::Replicated(id) => {
                    self.replicated_local_done(node, id);
                    continue;
                }
                Waiter::Answer(r) => {
                    self.answer(node, r, crate::cluster::Res::Done);
                    continue;
                }
            };
            self.persisted(node, epoch, shard, shard_epoch, &jid, then);
        }
        self.start_flush(node);
    }

    /// A user actor's writes are durable (everywhere they had to be): it sends what
    /// depended on them and goes on.
    pub(crate) fn persisted(
        &mut self,
        node: u32,
        epoch: u64,
        shard: u16,
        shard_epoch: u64,
        jid: &BareJid,
        then: Vec<Envelope>,
    ) {
        if !self.shard_live(node, epoch, shard, shard_epoch) {
            return;
        }
        for env in then {
            let _ = self.route(node, shard, env, Origin::Actor);
        }
        self.resume_user(node, shard, jid);
    }

    pub(crate) fn resume_user(&mut self, node: u32, shard: u16, jid: &BareJid) {
        if let Some(h) = self.nodes[node as usize].shards[shard as usize].users.get_mut(jid) {
            h.waiting = false;
            self.schedule_user(node, shard, jid);
        }
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
        let old = std::mem::replace(&mut self.nodes[node as usize].shards[shard as usize], Shard::new(epoch));
        // In-flight work on it is lost: excuse what has no fate yet.
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
            for (session, resource) in u.actor.as_ref().map(|a| a.sessions()).unwrap_or_default() {
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
            if let Some(j) = h.s.jid() {
                let env = Envelope::to_user(
                    j.to_bare(),
                    UserMsg::Unbind {
                        session: h.s.addr,
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
                .filter(|(_, h)| match h.s.jid() {
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
