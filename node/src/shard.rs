//! One shard: a glommio executor pinned to a core. It accepts c2s connections (SO_REUSEPORT
//! spreads them over shards), hosts the sessions it accepted and the user actors that hash to
//! it, and routes envelopes: locally through bounded mailboxes, to other shards over the
//! channel mesh. Nothing here is shared with another shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::TcpListener;
use glommio::{GlommioError, ResourceType};
use jid::BareJid;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use starling_actors::address::{ActorKey, MailboxKey, NodeId, SessionAddr, ShardId};
use starling_actors::c2s::C2sConfig;
use starling_actors::msg::{Envelope, SessionMsg, UserMsg};
pub use starling_actors::system::shard::Origin;
use starling_actors::system::shard::{Out, Queued, Routed, ShardCore, Unsent};
use starling_actors::throttle::AuthThrottle;
use starling_actors::user::UserConfig;

use crate::storage_thread::StorageHandle;

/// The clock the shards stamp routed messages with: µs since this process's first reading.
/// The receiver records how long a message travelled (`starling_route_seconds`).
pub fn stamp() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

/// Seconds since `at` (a [`stamp`]).
pub fn since(at: u64) -> f64 {
    stamp().saturating_sub(at) as f64 / 1e6
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
    /// How long an idle placed actor stays before it is let go (`actors.passivate_after_ms`).
    pub passivate_after: Duration,
    pub max_auth_failures: u32,
    pub grace: Duration,
    pub negotiation_timeout: Duration,
    pub write_timeout: Duration,
    /// `None` on a single node.
    pub cluster: Option<crate::cluster::ClusterParams>,
    /// `cluster.slots` (a single node has them too).
    pub slots: u32,
    /// Every slot's stored Raft state (each shard restores its own), read before the shards
    /// start; and whether, with none stored, this node bootstraps every slot.
    pub raft_restore: Arc<Vec<(u32, starling_storage::RaftStored)>>,
    pub raft_bootstrap: bool,
    /// This process's start (ms): its proposals are told from an earlier process's.
    pub incarnation: u64,
}

pub struct Shard {
    pub id: ShardId,
    pub node: NodeId,
    /// The membership as this shard sees it, and its links to other nodes.
    pub cluster: crate::cluster::link::Links,
    mesh: Option<Senders<Queued<Envelope>>>,
    /// The second mesh: work for the slots another shard hosts (`link::ShardCall`).
    pub(crate) calls: Option<Senders<crate::cluster::link::ShardCall>>,
    /// The actor system's state machine for this shard: mailboxes, routing, overflow
    /// (`starling_actors::system::shard`). This host moves what it decides.
    pub(crate) core: RefCell<ShardCore>,
    /// The task waiting for each empty mailbox.
    wakers: RefCell<HashMap<MailboxKey, Waker>>,
    pub storage: StorageHandle,
    pub c2s_cfg: Rc<C2sConfig>,
    pub user_cfg: Rc<UserConfig>,
    pub throttle: RefCell<AuthThrottle>,
    pub tls: Arc<rustls::ServerConfig>,
    next_session: Cell<u64>,
    pub negotiation_timeout: Duration,
    pub write_timeout: Duration,
    pub passivate_after: Duration,
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

    /// Runs `f` on the shard's core, then carries out what it decided (every change to the
    /// core goes through here, so that its effects are carried out).
    pub(crate) fn with_core<R>(self: &Rc<Self>, f: impl FnOnce(&mut ShardCore) -> R) -> R {
        let r = f(&mut self.core.borrow_mut());
        self.carry_out();
        r
    }

    /// Asks the core where `env` goes. The caller sends it on (mesh, link) and only then
    /// calls `carry_out`: what the core asked for earlier must not overtake it.
    fn core_route(self: &Rc<Self>, env: Envelope, at: u64, origin: Origin) -> Routed {
        let view = self.cluster.view.borrow();
        self.core.borrow_mut().route(env, at, origin, &*view)
    }

    /// Carries out the core's effects, in order.
    fn carry_out(self: &Rc<Self>) {
        loop {
            let Some(o) = self.core.borrow_mut().pop_out() else {
                return;
            };
            match o {
                Out::Route(env) => self.route(env),
                Out::Wake(key) => {
                    let w = self.wakers.borrow_mut().remove(&key);
                    if let Some(w) = w {
                        w.wake();
                    }
                }
                Out::Activate(ActorKey::User(jid)) => crate::user_host::start(self, jid),
                Out::RetryHeld { key, after_ms } => {
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        glommio::timer::sleep(Duration::from_millis(after_ms)).await;
                        me.with_core(|c| c.retry_held(&key));
                    })
                    .detach();
                }
                Out::Later { env, after_ms } => {
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        glommio::timer::sleep(Duration::from_millis(after_ms)).await;
                        me.route(env);
                    })
                    .detach();
                }
                Out::Bounced { env, why } => {
                    self.metrics.bounced.increment(1);
                    tracing::warn!(to = ?env.to(), why, "bouncing stanza");
                }
            }
        }
    }

    /// Sends an envelope wherever its target lives, without waiting.
    pub fn route(self: &Rc<Self>, env: Envelope) {
        self.route_now(env);
        self.carry_out();
    }

    fn route_now(self: &Rc<Self>, env: Envelope) {
        match self.core_route(env, stamp(), Origin::Actor) {
            Routed::Done => {}
            Routed::Full(env) => self.with_core(|c| c.overflow(env, stamp())),
            Routed::Mesh { shard, env } => match &self.mesh {
                Some(m) => {
                    if let Err(e) = m.try_send_to(shard as usize, env) {
                        let (t, why) = match e {
                            GlommioError::WouldBlock(ResourceType::Channel(t)) => (Some(t), Unsent::MeshFull),
                            GlommioError::Closed(ResourceType::Channel(t)) => (Some(t), Unsent::MeshClosed),
                            _ => (None, Unsent::MeshClosed),
                        };
                        if let Some(t) = t {
                            self.with_core(|c| c.unsent(t.msg, why));
                        }
                    }
                }
                None => self.with_core(|c| c.unsent(env.msg, Unsent::MeshClosed)),
            },
            Routed::Remote { node, env } => self.send_remote(node, env),
        }
    }

    /// Routes with backpressure (`starling_actors::system::shard`): a connection waits for
    /// room anywhere; an actor waits for room in the mesh and links, never for a mailbox.
    pub async fn route_wait(self: &Rc<Self>, env: Envelope, from: Origin) {
        let mut env = env;
        loop {
            let r = self.core_route(env, stamp(), from);
            if !matches!(r, Routed::Mesh { .. } | Routed::Remote { .. }) {
                self.carry_out();
            }
            match r {
                Routed::Done => return,
                Routed::Full(e) => {
                    // Only a connection gets here: its client is not read meanwhile.
                    glommio::timer::sleep(Duration::from_millis(starling_actors::system::limits::RETRY_MS)).await;
                    env = e;
                }
                Routed::Mesh { shard, env } => {
                    let Some(mesh) = self.mesh.as_ref() else {
                        return self.with_core(|c| c.unsent(env.msg, Unsent::MeshClosed));
                    };
                    if let Err(e) = mesh.send_to(shard as usize, env).await {
                        if let Some(t) = give_back(e) {
                            self.core.borrow_mut().unsent(t.msg, Unsent::MeshClosed);
                        }
                    }
                    return self.carry_out();
                }
                Routed::Remote { node, env } => {
                    self.send_remote_wait(node, env).await;
                    return self.carry_out();
                }
            }
        }
    }

    /// An envelope for this shard (from the mesh, or the cluster's reactions), as an
    /// actor's send.
    pub fn deliver_local(self: &Rc<Self>, env: Envelope) {
        self.deliver_at(env, stamp())
    }

    fn deliver_at(self: &Rc<Self>, env: Envelope, at: u64) {
        if let Routed::Full(env) = self.with_core(|c| c.deliver(env, at, Origin::Actor)) {
            self.with_core(|c| c.overflow(env, at));
        }
    }

    /// Answers the sender of an undeliverable stanza with an error (`msg::undeliverable`).
    pub fn undeliverable(self: &Rc<Self>, env: Envelope, condition: &str) {
        self.with_core(|c| c.undeliverable(env, condition));
    }

    /// Reports an envelope that could not go on (`ShardCore::unsent`).
    pub fn unsent(self: &Rc<Self>, env: Envelope, why: Unsent) {
        self.with_core(|c| c.unsent(env, why));
    }

    /// The session `id` asked to bind as `user` (`ShardCore::binding`), once.
    pub fn binding(&self, id: u64, user: &BareJid) {
        if self.core.borrow().is_binding(id) {
            return;
        }
        let (owner, _) = self.cluster.view.borrow().place_user(user);
        self.core.borrow_mut().binding(id, user.clone(), owner);
    }

    /// Nodes went: the user actors here unbind their sessions (`ShardCore::node_down`).
    pub fn node_down(self: &Rc<Self>, gone: &[(NodeId, u64)]) {
        self.with_core(|c| c.node_down(gone, stamp()));
    }

    /// The user actors here check their contacts' presence (`ShardCore::resync`).
    pub fn resync(self: &Rc<Self>, moved: &[u32], slots: u32) {
        self.with_core(|c| c.resync(moved, slots, stamp()));
    }

    /// Ends the session `id` of this shard with a stream error (`condition`, `text`).
    pub fn kick(self: &Rc<Self>, id: u64, condition: &'static str, text: &str) {
        let addr = SessionAddr {
            node: self.node,
            node_gen: self.cluster.generation.get(),
            shard: self.id,
            id,
        };
        let kick = SessionMsg::Kick {
            condition,
            text: text.into(),
        };
        self.deliver_local(Envelope::to_session(addr, kick));
    }

    /// Opens the mailbox of a session accepted here.
    pub fn open_session(self: &Rc<Self>, id: u64) {
        self.core.borrow_mut().open_session(id);
    }

    /// The session ended: what was queued for it goes where a message for a vanished session
    /// goes.
    pub fn close_session(self: &Rc<Self>, addr: SessionAddr) {
        self.wakers.borrow_mut().remove(&MailboxKey::Session(addr.id));
        self.with_core(|c| c.close_session(addr));
    }

    /// Waits for the next message of a mailbox: `pop` gives it (`Ready(Some)`), says the
    /// mailbox is gone (`Ready(None)`) or that it is empty (`Pending`: the task's waker is
    /// kept under `key` until `Out::Wake`).
    async fn next_in<T>(
        &self,
        key: impl Fn() -> MailboxKey,
        pop: impl Fn(&mut ShardCore) -> Poll<Option<Queued<T>>>,
    ) -> Option<Queued<T>> {
        std::future::poll_fn(|cx| {
            let r = pop(&mut self.core.borrow_mut());
            if r.is_pending() {
                self.wakers.borrow_mut().insert(key(), cx.waker().clone());
            }
            r
        })
        .await
    }

    /// The next message for the session `id`; `None` once its mailbox is gone.
    pub async fn next_session_msg(self: &Rc<Self>, id: u64) -> Option<Queued<SessionMsg>> {
        let pop = |c: &mut ShardCore| match c.pop_session(id) {
            Some(t) => Poll::Ready(Some(t)),
            None if !c.has_session(id) => Poll::Ready(None),
            None => Poll::Pending,
        };
        self.next_in(|| MailboxKey::Session(id), pop).await
    }

    /// The next message for the user actor of `jid` (its mailbox exists while it runs).
    pub async fn next_user_msg(self: &Rc<Self>, jid: &BareJid) -> Option<Queued<UserMsg>> {
        let pop = |c: &mut ShardCore| match c.pop_user(jid) {
            Some(t) => Poll::Ready(Some(t)),
            None if !c.has_user(jid) => Poll::Ready(None),
            None => Poll::Pending,
        };
        self.next_in(|| MailboxKey::user(jid), pop).await
    }

    /// Lets an idle user actor go if nothing is queued for it.
    pub fn passivate(self: &Rc<Self>, jid: &BareJid) -> bool {
        let gone = self.core.borrow_mut().passivate(jid);
        if gone {
            self.wakers.borrow_mut().remove(&MailboxKey::user(jid));
            self.forget_change_waiter(jid);
        }
        gone
    }

    /// The user actor could not start (`ShardCore::not_started`).
    pub fn not_started(self: &Rc<Self>, jid: &BareJid) {
        self.wakers.borrow_mut().remove(&MailboxKey::user(jid));
        self.forget_change_waiter(jid);
        self.with_core(|c| c.not_started(jid));
    }

    /// The user actor ended early (`ShardCore::end_user`).
    pub fn end_user(
        self: &Rc<Self>,
        jid: &BareJid,
        sessions: Vec<(SessionAddr, String)>,
        why: starling_actors::system::life::Ending,
        instead: Vec<Envelope>,
    ) {
        self.wakers.borrow_mut().remove(&MailboxKey::user(jid));
        self.forget_change_waiter(jid);
        self.with_core(|c| c.end_user(jid, sessions, why, instead));
    }

    /// Messages queued for the user actor of `jid`.
    pub fn user_queued(&self, jid: &BareJid) -> usize {
        self.core.borrow().user_queued(jid)
    }

    /// Whether the user actor of `jid` is active here.
    pub fn user_active(&self, jid: &BareJid) -> bool {
        self.core.borrow().has_user(jid)
    }

    /// The user actors active on this shard.
    pub fn users(&self) -> Vec<BareJid> {
        self.core.borrow().users().cloned().collect()
    }
}

/// The message a failed `send_to` hands back.
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
    mesh: Option<MeshBuilder<Queued<Envelope>, Full>>,
    calls: Option<MeshBuilder<crate::cluster::link::ShardCall, Full>>,
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
    let (call_senders, call_receivers) = match calls {
        Some(m) => match m.join().await {
            Ok((s, r)) if s.peer_id() as ShardId == id => (Some(s), Some(r)),
            _ => {
                let _ = ready.send(Err("cannot join the shards' call mesh".into()));
                return;
            }
        },
        None => (None, None),
    };
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    let links = {
        let (name, generation, replication) = match &params.cluster {
            Some(c) => (c.name.clone(), c.generation, c.replication),
            None => (String::new(), 0, 1),
        };
        let view = crate::cluster::View::single(params.node, &name, params.shards as ShardId, params.slots);
        let cfg = starling_actors::system::consensus::Cfg {
            slots: params.slots,
            shards: params.shards as ShardId,
            shard: id,
            replication,
            incarnation: params.incarnation,
        };
        crate::cluster::link::Links::new(name, generation, view, cfg)
    };
    let started = links.started;
    let shard = Rc::new(Shard {
        id,
        node: params.node,
        cluster: links,
        mesh: senders,
        calls: call_senders,
        core: RefCell::new(ShardCore::new(params.node, id, started, params.mailbox)),
        wakers: RefCell::new(HashMap::new()),
        storage: params.storage.clone(),
        c2s_cfg: Rc::new(params.c2s.clone()),
        user_cfg: Rc::new(params.user.clone()),
        throttle: RefCell::new(AuthThrottle::new(params.max_auth_failures, 60_000, 100_000)),
        tls: params.tls.clone(),
        next_session: Cell::new(1),
        negotiation_timeout: params.negotiation_timeout,
        write_timeout: params.write_timeout,
        passivate_after: params.passivate_after,
        metrics: crate::metrics::ShardMetrics::new(id),
        rng: RefCell::new(ChaCha20Rng::from_seed(seed)),
    });
    if let Some(mut r) = receivers {
        for (_, rx) in r.streams() {
            let s = shard.clone();
            glommio::spawn_local(async move {
                while let Some(t) = rx.recv().await {
                    s.deliver_at(t.msg, t.at);
                }
            })
            .detach();
        }
    }
    if let Some(mut r) = call_receivers {
        for (_, rx) in r.streams() {
            let s = shard.clone();
            glommio::spawn_local(async move {
                while let Some(call) = rx.recv().await {
                    s.shard_call(call);
                }
            })
            .detach();
        }
    }
    // This shard's slots: from the store, or new ones with this node their only member.
    let shards = params.shards as ShardId;
    let mine = |slot: u32| starling_actors::system::consensus::shard_of_slot(slot, shards) == id;
    for (slot, stored) in params.raft_restore.iter().filter(|(s, _)| mine(*s)) {
        let mut r = Ok(());
        shard.protocol(|p, _| r = p.restore(*slot, stored));
        if let Err(e) = r {
            let _ = ready.send(Err(format!("slot {slot}'s stored Raft state: {e}")));
            return;
        }
    }
    if params.raft_bootstrap {
        shard.protocol(|p, _| p.bootstrap());
    }
    let table = params.cluster.as_ref().map(|c| c.slot_table.clone());
    let clock = glommio::spawn_local(crate::cluster::link::raft_clock(shard.clone(), table));
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
    let _ = &clock;
    // Tell every client we are going away, then give them a moment.
    let sessions: Vec<u64> = shard.core.borrow().session_ids().collect();
    for id in sessions {
        shard.kick(id, "system-shutdown", "the server is shutting down");
    }
    let deadline = std::time::Instant::now() + params.grace;
    while (shard.core.borrow().session_ids().next().is_some() || shard.core.borrow().users().next().is_some())
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
        let (users, sessions) = {
            let core = shard.core.borrow();
            let (u, s) = core.depths();
            (depths(u), depths(s))
        };
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
