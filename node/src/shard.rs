//! One shard: a glommio executor pinned to a core. It accepts c2s connections (SO_REUSEPORT
//! spreads them over shards), hosts the sessions it accepted and the user actors that hash to
//! it, and routes envelopes: locally through bounded mailboxes, to other shards over the
//! channel mesh. Nothing here is shared with another shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::TcpListener;
use glommio::{GlommioError, ResourceType};
use jid::BareJid;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use starling_actors::address::{MailboxKey, NodeId, SessionAddr, ShardId};
use starling_actors::c2s::C2sConfig;
use starling_actors::msg::{Envelope, SessionMsg, To, UserMsg};
use starling_actors::throttle::AuthThrottle;
use starling_actors::user::UserConfig;

use crate::storage_thread::StorageHandle;

/// What mailboxes and the mesh carry: a message and when it was first routed, so the
/// receiver can record the routing latency (`starling_route_seconds`).
pub struct Timed<T> {
    pub at: Instant,
    pub msg: T,
}

impl<T> Timed<T> {
    pub fn now(msg: T) -> Self {
        Timed {
            at: Instant::now(),
            msg,
        }
    }
}

/// The sending side of a session's or user actor's mailbox, bounded by `c2s.mailbox`.
/// flume rather than glommio's local channel: a bounded local channel allocates its whole
/// capacity up front (1024 slots × ~120 B for every session and every user actor), flume's
/// queue grows only as messages wait.
pub type Mailbox<T> = flume::Sender<Timed<T>>;

/// Who routes an envelope: decides where the sender may wait for room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Connection,
    Actor,
}

/// What every shard is started with.
#[derive(Clone)]
pub struct ShardParams {
    pub node: NodeId,
    pub shards: usize,
    pub c2s: C2sConfig,
    pub user: UserConfig,
    pub c2s_listen: std::net::SocketAddr,
    pub direct_tls_listen: Option<std::net::SocketAddr>,
    pub tls: Arc<rustls::ServerConfig>,
    pub storage: StorageHandle,
    pub mailbox: usize,
    pub max_auth_failures: u32,
    pub grace: Duration,
    pub negotiation_timeout: Duration,
    pub write_timeout: Duration,
    /// `None` on a single node.
    pub cluster: Option<crate::cluster::ClusterParams>,
}

pub struct Shard {
    pub id: ShardId,
    pub node: NodeId,
    /// The membership as this shard sees it, and its links to other nodes.
    pub cluster: crate::cluster::link::Links,
    mesh: Option<Senders<Timed<Envelope>>>,
    pub sessions: RefCell<HashMap<u64, Mailbox<SessionMsg>>>,
    /// Bound sessions: their user and the node its actor was on when they bound (a session
    /// whose user's actor moves or dies must reconnect).
    pub session_users: RefCell<HashMap<u64, (BareJid, NodeId)>>,
    pub users: RefCell<HashMap<BareJid, Mailbox<UserMsg>>>,
    held: RefCell<HashMap<MailboxKey, std::collections::VecDeque<Timed<Envelope>>>>,
    pub storage: StorageHandle,
    pub c2s_cfg: Rc<C2sConfig>,
    pub user_cfg: Rc<UserConfig>,
    pub throttle: RefCell<AuthThrottle>,
    pub tls: Arc<rustls::ServerConfig>,
    next_session: Cell<u64>,
    pub mailbox: usize,
    pub negotiation_timeout: Duration,
    pub write_timeout: Duration,
    pub metrics: crate::metrics::ShardMetrics,
    rng: RefCell<ChaCha20Rng>,
}

impl Shard {
    pub fn next_session_id(&self) -> u64 {
        let id = self.next_session.get();
        self.next_session.set(id + 1);
        id
    }

    /// A fresh RNG for a session, seeded from the shard's (itself seeded from the OS).
    pub fn session_rng(&self) -> ChaCha20Rng {
        let mut seed = [0u8; 32];
        self.rng.borrow_mut().fill_bytes(&mut seed);
        ChaCha20Rng::from_seed(seed)
    }

    /// The (node, shard) of an address; for another node's user, the shard is that node's
    /// business.
    fn place(&self, to: To<'_>) -> (NodeId, ShardId) {
        match to {
            To::User(j) => self.cluster.view.borrow().place_user(j),
            To::Session(a) => (a.node, a.shard),
        }
    }

    /// Sends an envelope wherever its target lives.
    pub fn route(self: &Rc<Self>, env: Envelope) {
        self.route_at(env, Instant::now())
    }

    fn route_at(self: &Rc<Self>, env: Envelope, at: Instant) {
        let (node, shard) = self.place(env.to());
        if node != self.node {
            return self.send_remote(node, env);
        }
        if shard == self.id {
            return self.deliver_local_at(env, at);
        }
        match &self.mesh {
            Some(m) => {
                if let Err(e) = m.try_send_to(shard as usize, Timed { at, msg: env }) {
                    if let Some(t) = give_back(e) {
                        self.mesh_full(t.msg);
                    }
                }
            }
            None => self.undeliverable(env, "internal-server-error"),
        }
    }

    /// Routes with backpressure. Every sender waits for room in the mesh: its receivers
    /// only hand envelopes to mailboxes and never wait, so this cannot deadlock. Connection
    /// tasks also wait for room in local mailboxes: a client that sends faster than its
    /// targets drain is slowed down (its socket is not read meanwhile) instead of bounced.
    /// User actors never wait on another actor's mailbox — two waiting on each other would
    /// deadlock — so for them a full local mailbox bounces the stanza.
    pub async fn route_wait(self: &Rc<Self>, env: Envelope, from: Origin) {
        let (node, shard) = self.place(env.to());
        if node != self.node {
            return self.send_remote_wait(node, env).await;
        }
        if shard != self.id && self.mesh.is_none() {
            return self.route(env);
        }
        if shard != self.id {
            let mesh = self.mesh.as_ref().expect("checked above");
            if let Err(e) = mesh.send_to(shard as usize, Timed::now(env)).await {
                if let Some(t) = give_back(e) {
                    self.undeliverable(t.msg, "internal-server-error");
                }
            }
            return;
        }
        if from == Origin::Actor {
            return self.deliver_local(env);
        }
        if self.is_held(&env) {
            // Behind what is held for it, whatever its kind: a connection waits, never bounces.
            return self.hold(Timed::now(env));
        }
        match env {
            Envelope::User { to: j, msg: m } => {
                let tx = self.users.borrow().get(&j).cloned();
                let tx = tx.unwrap_or_else(|| crate::user_host::activate(self, j.clone()));
                if let Err(flume::SendError(t)) = tx.send_async(Timed::now(m)).await {
                    self.undeliverable(Envelope::to_user(j, t.msg), "internal-server-error");
                }
            }
            Envelope::Session { to: a, msg: m } => {
                let tx = self.session_tx(a);
                match tx {
                    Some(tx) => {
                        if let Err(flume::SendError(t)) = tx.send_async(Timed::now(m)).await {
                            self.session_gone(a, t.msg);
                        }
                    }
                    None => self.session_gone(a, m),
                }
            }
        }
    }

    pub fn deliver_local(self: &Rc<Self>, env: Envelope) {
        self.deliver_local_at(env, Instant::now())
    }

    fn deliver_local_at(self: &Rc<Self>, env: Envelope, at: Instant) {
        if self.is_held(&env) {
            return self.overflow(env, at, "messages for it are held");
        }
        match env {
            Envelope::Session { to: a, msg: m } => {
                let tx = self.session_tx(a);
                match tx {
                    Some(tx) => {
                        if let Err(e) = tx.try_send(Timed { at, msg: m }) {
                            let t = e.into_inner();
                            self.overflow(Envelope::to_session(a, t.msg), t.at, "session mailbox full");
                        }
                    }
                    None => self.session_gone(a, m),
                }
            }
            Envelope::User { to: j, msg: m } => {
                let tx = self.users.borrow().get(&j).cloned();
                let tx = match tx {
                    Some(tx) => tx,
                    None => crate::user_host::activate(self, j.clone()),
                };
                if let Err(e) = tx.try_send(Timed { at, msg: m }) {
                    let t = e.into_inner();
                    self.overflow(Envelope::to_user(j, t.msg), t.at, "user mailbox full");
                }
            }
        }
    }

    /// A mailbox is full. Control messages wait for room (they are few: a handful per
    /// session) in a per-target queue drained in order; stanzas bounce with
    /// `resource-constraint`.
    fn overflow(self: &Rc<Self>, env: Envelope, at: Instant, why: &'static str) {
        if !env.is_control() {
            self.metrics.bounced.increment(1);
            tracing::warn!(to = ?env.to(), why, "bouncing stanza");
            return self.undeliverable(env, "resource-constraint");
        }
        self.hold(Timed { at, msg: env });
    }

    /// The mesh channel to another shard is full (only `route`, which does not wait, gets
    /// here): control messages try again shortly, stanzas bounce.
    fn mesh_full(self: &Rc<Self>, env: Envelope) {
        if !env.is_control() {
            self.metrics.bounced.increment(1);
            tracing::warn!(to = ?env.to(), "bouncing stanza: shard mesh channel full");
            return self.undeliverable(env, "resource-constraint");
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_millis(starling_actors::system::limits::RETRY_MS)).await;
            me.route(env);
        })
        .detach();
    }

    /// Queues behind what is already held for the same target: a full mailbox must not
    /// reorder one sender's messages (an `Unbind` overtaking the session's last
    /// `OfflineDelivered`, or a `Bind`, would break the user actor; found by the simulator).
    fn hold(self: &Rc<Self>, t: Timed<Envelope>) {
        let target = t.msg.mailbox_key();
        let mut held = self.held.borrow_mut();
        if let Some(q) = held.get_mut(&target) {
            q.push_back(t);
            return;
        }
        held.insert(target.clone(), std::collections::VecDeque::from([t]));
        drop(held);
        let me = self.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(starling_actors::system::limits::RETRY_MS)).await;
                if me.drain_held(&target) {
                    return;
                }
            }
        })
        .detach();
    }

    /// Moves held envelopes into the target's mailbox while it has room; `true` when none
    /// is left.
    fn drain_held(self: &Rc<Self>, target: &MailboxKey) -> bool {
        loop {
            let Some(t) = self.held.borrow_mut().get_mut(target).and_then(|q| q.pop_front()) else {
                self.held.borrow_mut().remove(target);
                return true;
            };
            let Timed { at, msg: env } = t;
            let back = match env {
                Envelope::Session { to: a, msg: m } => {
                    let tx = self.session_tx(a);
                    match tx {
                        Some(tx) => match tx.try_send(Timed { at, msg: m }) {
                            Ok(()) => None,
                            Err(flume::TrySendError::Full(t)) => Some(Envelope::to_session(a, t.msg)),
                            Err(flume::TrySendError::Disconnected(t)) => {
                                self.session_gone(a, t.msg);
                                None
                            }
                        },
                        None => {
                            self.session_gone(a, m);
                            None
                        }
                    }
                }
                Envelope::User { to: j, msg: m } => {
                    let tx = self.users.borrow().get(&j).cloned();
                    let tx = tx.unwrap_or_else(|| crate::user_host::activate(self, j.clone()));
                    match tx.try_send(Timed { at, msg: m }) {
                        Ok(()) => None,
                        Err(flume::TrySendError::Full(t)) => Some(Envelope::to_user(j, t.msg)),
                        Err(flume::TrySendError::Disconnected(t)) => {
                            self.undeliverable(Envelope::to_user(j, t.msg), "internal-server-error");
                            None
                        }
                    }
                }
            };
            if let Some(env) = back {
                if let Some(q) = self.held.borrow_mut().get_mut(target) {
                    q.push_front(Timed { at, msg: env });
                }
                return false;
            }
        }
    }

    /// Whether envelopes for `env`'s target are held (then newcomers queue behind them).
    fn is_held(&self, env: &Envelope) -> bool {
        !self.held.borrow().is_empty() && self.held.borrow().contains_key(&env.mailbox_key())
    }

    /// The mailbox of the session at `a`, if it is still here. A session of an earlier
    /// process of this node (ids restart with it) is gone.
    fn session_tx(&self, a: SessionAddr) -> Option<Mailbox<SessionMsg>> {
        if a.node_gen < self.cluster.started {
            return None;
        }
        self.sessions.borrow().get(&a.id).cloned()
    }

    /// A stanza for a session that ended: `msg::session_gone` says what becomes of it.
    fn session_gone(self: &Rc<Self>, addr: SessionAddr, m: SessionMsg) {
        let gone = starling_actors::msg::session_gone(addr, m);
        for env in gone.route {
            self.route(env);
        }
        if let Some((env, condition)) = gone.bounce {
            self.undeliverable(env, condition);
        }
    }

    /// Answers the sender of an undeliverable stanza with an error (`msg::undeliverable`).
    pub fn undeliverable(self: &Rc<Self>, env: Envelope, condition: &str) {
        if let Some(err) = starling_actors::msg::undeliverable(env, condition) {
            self.route(err);
        }
    }
}

/// The message a failed `try_send` hands back.
fn give_back<T>(e: GlommioError<T>) -> Option<T> {
    match e {
        GlommioError::Closed(ResourceType::Channel(t)) | GlommioError::WouldBlock(ResourceType::Channel(t)) => Some(t),
        _ => None,
    }
}

fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| std::io::Error::other(format!("cannot listen on {addr}: {e}")))
}

/// The body of a shard's executor: join the mesh, listen, serve until `stop` fires.
pub async fn run(
    params: ShardParams,
    mesh: Option<MeshBuilder<Timed<Envelope>, Full>>,
    stop: flume::Receiver<()>,
    ready: flume::Sender<Result<(), String>>,
) {
    let (senders, receivers, id) = match mesh {
        Some(m) => match m.join().await {
            Ok((s, r)) => {
                let id = s.peer_id() as ShardId;
                (Some(s), Some(r), id)
            }
            Err(_) => {
                let _ = ready.send(Err("cannot join the shard mesh".into()));
                return;
            }
        },
        None => (None, None, 0),
    };
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    let shard = Rc::new(Shard {
        id,
        node: params.node,
        cluster: {
            let (name, generation, replication) = match &params.cluster {
                Some(c) => (c.name.clone(), c.generation, c.replication),
                None => (String::new(), 0, 1),
            };
            let view = crate::cluster::View::single(params.node, &name, params.shards as ShardId);
            crate::cluster::link::Links::new(name, generation, replication, view)
        },
        mesh: senders,
        sessions: RefCell::new(HashMap::new()),
        session_users: RefCell::new(HashMap::new()),
        held: RefCell::new(HashMap::new()),
        users: RefCell::new(HashMap::new()),
        storage: params.storage.clone(),
        c2s_cfg: Rc::new(params.c2s.clone()),
        user_cfg: Rc::new(params.user.clone()),
        throttle: RefCell::new(AuthThrottle::new(params.max_auth_failures, 60_000, 100_000)),
        tls: params.tls.clone(),
        next_session: Cell::new(1),
        mailbox: params.mailbox,
        negotiation_timeout: params.negotiation_timeout,
        write_timeout: params.write_timeout,
        metrics: crate::metrics::ShardMetrics::new(id),
        rng: RefCell::new(ChaCha20Rng::from_seed(seed)),
    });
    if let Some(mut r) = receivers {
        for (_, rx) in r.streams() {
            let s = shard.clone();
            glommio::spawn_local(async move {
                while let Some(t) = rx.recv().await {
                    s.deliver_local_at(t.msg, t.at);
                }
            })
            .detach();
        }
    }
    if let Some(c) = &params.cluster {
        let Some(updates) = c.updates.get(id as usize).cloned() else {
            let _ = ready.send(Err("no membership channel for this shard".into()));
            return;
        };
        glommio::spawn_local(crate::cluster::link::follow_membership(
            shard.clone(),
            c.latest.clone(),
            updates,
        ))
        .detach();
        match bind_listener(c.transport) {
            Ok(l) => {
                glommio::spawn_local(crate::cluster::link::accept_loop(shard.clone(), l)).detach();
            }
            Err(e) => {
                let _ = ready.send(Err(format!("cluster.transport: {e}")));
                return;
            }
        }
    }
    let mut listeners = vec![(params.c2s_listen, false)];
    if let Some(a) = params.direct_tls_listen {
        listeners.push((a, true));
    }
    let mut accept_tasks = Vec::new();
    for (addr, direct_tls) in listeners {
        let l = match bind_listener(addr) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let s = shard.clone();
        accept_tasks.push(glommio::spawn_local(accept_loop(s, l, direct_tls)));
    }
    let _ = ready.send(Ok(()));
    tracing::info!(shard = id, "shard serving");
    let gauges = glommio::spawn_local(sample_mailboxes(shard.clone()));
    let _ = stop.recv_async().await;
    drop(accept_tasks);
    drop(gauges);
    // Tell every client we are going away, then give them a moment.
    let sessions: Vec<_> = shard.sessions.borrow().values().cloned().collect();
    for tx in sessions {
        let _ = tx.try_send(Timed::now(SessionMsg::Kick {
            condition: "system-shutdown",
            text: "the server is shutting down".into(),
        }));
    }
    let deadline = std::time::Instant::now() + params.grace;
    while (!shard.sessions.borrow().is_empty() || !shard.users.borrow().is_empty())
        && std::time::Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(shard = id, "shard stopped");
}

/// Once a second, the depth of every mailbox on this shard (sum and deepest), for the
/// `starling_mailbox_*` gauges: nothing on the message path counts.
async fn sample_mailboxes(shard: Rc<Shard>) {
    fn depths(lens: impl Iterator<Item = usize>) -> (f64, f64) {
        let (sum, max) = lens.fold((0, 0), |(s, m), n| (s + n, m.max(n)));
        (sum as f64, max as f64)
    }
    loop {
        let users = depths(shard.users.borrow().values().map(|tx| tx.len()));
        let sessions = depths(shard.sessions.borrow().values().map(|tx| tx.len()));
        for (k, (sum, max)) in [users, sessions].into_iter().enumerate() {
            shard.metrics.mailbox[k].set(sum);
            shard.metrics.mailbox_max[k].set(max);
        }
        glommio::timer::sleep(Duration::from_secs(1)).await;
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, direct_tls: bool) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(crate::conn::serve(shard.clone(), stream, direct_tls)).detach();
            }
            Err(e) => {
                // EMFILE and friends: say so, refuse for a moment, never spin.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
