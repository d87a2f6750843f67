//! Node-to-node links, on the shards (glommio): each shard keeps one TCP connection to each
//! other node it sends to, and every shard accepts on `cluster.transport` (SO_REUSEPORT).
//! A link carries length-prefixed rkyv frames (`starling_actors::wire`) both ways: envelopes
//! and account requests one way, account answers back on the same connection, so an answer
//! lands on the shard that asked.
//!
//! Order: one shard's envelopes to one node travel one connection in order, and the receiving
//! shard routes them on through the mesh (FIFO per shard pair): what one sender sends to one
//! actor arrives in order, as on a single node.
//!
//! Bounds: a link's queue holds `LINK_QUEUE` frames. When it is full, a connection task
//! waits (TCP pushes back on its client), an actor's stanza bounces with
//! `resource-constraint`, and control messages retry. A received frame is routed like an
//! actor's send — the reader never waits for a mailbox, only for the mesh — so two nodes
//! cannot deadlock on each other's full queues.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use starling_actors::address::NodeId;
use starling_actors::msg::Envelope;
use starling_actors::system::consensus::{self, Act, Cfg, Consensus, Count, Got, Local, Op, Outcome, Res};
use starling_actors::system::shard::Unsent;
use starling_actors::system::slot::RaftMsg;
use starling_actors::wire::{self, AccountOp, AccountResult, Frame, WireRaft};
use starling_storage::{Account, Write};

use crate::storage_thread::StorageReq;

use super::View;
use crate::shard::{Origin, Shard};

/// Frames waiting for one link.
pub const LINK_QUEUE: usize = starling_actors::system::limits::LINK_QUEUE;
/// Bytes gathered into one write.
const BATCH: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A shard's cluster state: its view of the membership and its links.
pub struct Links {
    pub name: String,
    /// This node's membership generation now: its start time, plus one for each time it
    /// rejoined after being declared down. New sessions' addresses carry it.
    pub generation: Cell<u64>,
    /// The generation this process started under: a session address from before it names no
    /// session here (ids restart with the process).
    pub started: u64,
    /// `cluster.slots`.
    pub slots: u32,
    pub view: RefCell<View>,
    /// Outgoing links by node, with the peer generation they were opened for.
    out: RefCell<HashMap<NodeId, (u64, flume::Sender<Frame>)>>,
    /// The replicated state of this shard's slots (`system::consensus`).
    protocol: RefCell<Protocol>,
    /// Its storage calls, sent to the storage thread in the order it gave them (the entries'
    /// verdicts depend on it), and whether a task is sending them.
    storage_queue: RefCell<VecDeque<(u64, Local)>>,
    storage_pumping: Cell<bool>,
    /// Users whose actor here holds older state than the store (`Act::Stale`): it ends at
    /// its next message.
    stale: RefCell<std::collections::HashSet<jid::BareJid>>,
    /// Bumped by every membership change, and the idle actors waiting for one
    /// (`Shard::membership_changed`).
    changes: Cell<u64>,
    change_waiters: RefCell<HashMap<jid::BareJid, std::task::Waker>>,
    /// Its requests' deadlines, in order, and whether a task expires them.
    deadlines: RefCell<VecDeque<(std::time::Instant, u64)>>,
    expiring: Cell<bool>,
}

/// Who waits for the protocol's outcome on this shard.
type Waiter = futures::channel::oneshot::Sender<Outcome>;
/// Where an answer to a served request goes: the connection it came on, and its id.
type ReplyTo = (flume::WeakSender<Frame>, u64);
pub(crate) type Protocol = Consensus<Waiter, ReplyTo>;

/// Work for another shard of this node (the second channel mesh): what belongs to the
/// slots that shard hosts.
pub enum ShardCall {
    /// Raft messages another node sent for its slots.
    Raft(Vec<(u32, RaftMsg)>),
    /// Another node's account request for a user of its slots.
    Serve { op: Op, reply: ReplyTo },
    /// A session's account operation for a user of its slots.
    Account { op: Op, reply: Waiter },
}

impl Links {
    pub fn new(name: String, generation: u64, view: View, cfg: Cfg) -> Self {
        let me = view.me;
        Links {
            name,
            generation: Cell::new(generation),
            started: generation,
            slots: cfg.slots,
            view: RefCell::new(view),
            out: RefCell::new(HashMap::new()),
            protocol: RefCell::new(Consensus::new(cfg, me)),
            storage_queue: RefCell::new(VecDeque::new()),
            storage_pumping: Cell::new(false),
            stale: RefCell::new(std::collections::HashSet::new()),
            changes: Cell::new(0),
            change_waiters: RefCell::new(HashMap::new()),
            deadlines: RefCell::new(VecDeque::new()),
            expiring: Cell::new(false),
        }
    }

    /// Applies a membership: the ring changes, links to nodes gone (or restarted) close.
    /// Returns the nodes that died, restarted or were declared down, each with the
    /// generation that went (the sessions it hosted are gone), and the ring before.
    pub fn update(&self, members: &super::MemberList) -> (Vec<(NodeId, u64)>, starling_gossip::Ring) {
        let mut view = self.view.borrow_mut();
        let before = view.peers.clone();
        let old_ring = view.ring.clone();
        view.update(members);
        self.out
            .borrow_mut()
            .retain(|n, (generation, _)| view.peers.get(n).is_some_and(|p| p.generation == *generation));
        let mut gone: Vec<(NodeId, u64)> = before
            .iter()
            .filter(|(n, p)| view.peers.get(n).is_none_or(|q| q.generation != p.generation))
            .map(|(n, p)| (*n, p.generation))
            .collect();
        gone.sort_unstable();
        (gone, old_ring)
    }
}

impl Shard {
    /// The queue of this shard's link to `node`, opening it if needed; `None` when the node
    /// is not a member.
    fn link(self: &Rc<Self>, node: NodeId) -> Option<flume::Sender<Frame>> {
        if let Some((_, tx)) = self.cluster.out.borrow().get(&node) {
            return Some(tx.clone());
        }
        let peer = self.cluster.view.borrow().peers.get(&node).cloned()?;
        let (tx, rx) = flume::bounded(LINK_QUEUE);
        self.cluster
            .out
            .borrow_mut()
            .insert(node, (peer.generation, tx.clone()));
        glommio::spawn_local(outgoing(
            self.clone(),
            node,
            peer.name,
            peer.transport,
            tx.downgrade(),
            rx,
        ))
        .detach();
        Some(tx)
    }

    /// Sends an envelope to another node without waiting.
    pub(crate) fn send_remote(self: &Rc<Self>, node: NodeId, env: Envelope) {
        let Some(tx) = self.link(node) else {
            tracing::debug!(to = ?env.to(), node, "envelope for a node that is not a member");
            return self.unsent(env, Unsent::NotMember);
        };
        match tx.try_send(Frame::Envelope(wire::envelope_out(&env))) {
            Ok(()) => self.metrics.cluster_frames_out.increment(1),
            Err(flume::TrySendError::Full(_)) => self.unsent(env, Unsent::LinkFull),
            Err(flume::TrySendError::Disconnected(_)) => {
                self.drop_link(node, &tx);
                self.unsent(env, Unsent::LinkClosed);
            }
        }
    }

    /// Sends an envelope to another node, waiting for room in the link's queue.
    pub(crate) async fn send_remote_wait(self: &Rc<Self>, node: NodeId, env: Envelope) {
        let Some(tx) = self.link(node) else {
            return self.unsent(env, Unsent::NotMember);
        };
        if let Err(flume::SendError(Frame::Envelope(w))) =
            tx.send_async(Frame::Envelope(wire::envelope_out(&env))).await
        {
            self.drop_link(node, &tx);
            if let Ok(env) = wire::envelope_in(w) {
                self.unsent(env, Unsent::LinkClosed);
            }
            return;
        }
        self.metrics.cluster_frames_out.increment(1);
    }

    fn drop_link(&self, node: NodeId, tx: &flume::Sender<Frame>) {
        let mut out = self.cluster.out.borrow_mut();
        if out.get(&node).is_some_and(|(_, t)| t.same_channel(tx)) {
            out.remove(&node);
        }
    }

    /// Membership changes this shard has seen.
    pub(crate) fn membership_changes(&self) -> u64 {
        self.cluster.changes.get()
    }

    /// Resolves once the membership changes after `since` (`membership_changes`): an idle
    /// actor kept in memory (`actors.passivate_after_ms`) is let go then, since another node
    /// may have served its user meanwhile and its state be stale.
    pub(crate) async fn membership_changed(&self, jid: &jid::BareJid, since: u64) {
        std::future::poll_fn(|cx| {
            if self.cluster.changes.get() != since {
                self.cluster.change_waiters.borrow_mut().remove(jid);
                return std::task::Poll::Ready(());
            }
            self.cluster
                .change_waiters
                .borrow_mut()
                .insert(jid.clone(), cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    /// The actor of `jid` is gone: it waits for no membership change.
    pub(crate) fn forget_change_waiter(&self, jid: &jid::BareJid) {
        self.cluster.change_waiters.borrow_mut().remove(jid);
    }

    /// Calls the shard's replicated state (`system::consensus`) with its view of the
    /// membership, then carries out what it asks for, in order.
    pub(crate) fn protocol(self: &Rc<Self>, f: impl FnOnce(&mut Protocol, &View)) {
        {
            // The view is the membership the protocol reads (`impl Members for View`).
            let view = self.cluster.view.borrow();
            f(&mut self.cluster.protocol.borrow_mut(), &view);
        }
        loop {
            let act = self.cluster.protocol.borrow_mut().pop();
            let Some(act) = act else { return };
            self.protocol_act(act);
        }
    }

    fn protocol_act(self: &Rc<Self>, act: Act<Waiter, ReplyTo>) {
        match act {
            Act::Raft { to, msgs } => {
                // Lost when the link is full or gone: raft sends again.
                let Some(tx) = self.link(to) else { return };
                let frame = Frame::Raft(msgs.into_iter().map(|(slot, msg)| WireRaft { slot, msg }).collect());
                match tx.try_send(frame) {
                    Ok(()) => {}
                    Err(flume::TrySendError::Full(_)) => self.metrics.cluster_raft_dropped.increment(1),
                    Err(flume::TrySendError::Disconnected(_)) => self.drop_link(to, &tx),
                }
            }
            Act::Ask { to, id, op, timeout_ms } => {
                let frame = Frame::AccountReq { id, op: op_out(&op) };
                let Some(tx) = self.link(to) else {
                    let e = format!("node {to} is not a member");
                    return self.protocol(|p, _| p.answer(id, Res::Failed(e)));
                };
                self.deadline(id, timeout_ms);
                match tx.try_send(frame) {
                    Ok(()) => {}
                    Err(flume::TrySendError::Full(frame)) => {
                        // A request waits for room on the link (its timeout runs meanwhile).
                        let s = self.clone();
                        glommio::spawn_local(async move {
                            if tx.send_async(frame).await.is_err() {
                                s.protocol(|p, _| p.answer(id, Res::Failed("the link closed".into())));
                            }
                        })
                        .detach();
                    }
                    Err(flume::TrySendError::Disconnected(_)) => {
                        self.drop_link(to, &tx);
                        self.protocol(|p, _| p.answer(id, Res::Failed("the link closed".into())));
                    }
                }
            }
            Act::Storage { task, op } => {
                self.cluster.storage_queue.borrow_mut().push_back((task, op));
                if !self.cluster.storage_pumping.replace(true) {
                    glommio::spawn_local(pump_storage(self.clone())).detach();
                }
            }
            Act::Reply { to: (reply, id), res } => {
                let Some(tx) = reply.upgrade() else { return };
                let frame = Frame::AccountResp {
                    id,
                    result: res_out(res),
                };
                if let Err(flume::TrySendError::Full(frame)) = tx.try_send(frame) {
                    glommio::spawn_local(async move {
                        let _ = tx.send_async(frame).await;
                    })
                    .detach();
                }
            }
            Act::Done { to, outcome } => {
                let _ = to.send(outcome);
            }
            Act::Stale { user } => {
                if let Ok(jid) = user.parse::<jid::BareJid>() {
                    if self.user_active(&jid) {
                        self.cluster.stale.borrow_mut().insert(jid);
                    }
                }
            }
            Act::Count(Count::ReplicationFailure) => self.metrics.cluster_replication_failures.increment(1),
            Act::Count(Count::LeaderHere) => self.metrics.raft_leader_changes.increment(1),
            Act::Count(Count::Snapshot) => self.metrics.raft_snapshots.increment(1),
            Act::Count(Count::ConfChange) => self.metrics.raft_conf_changes.increment(1),
        }
    }

    /// Whether the actor of `jid`, if it runs here, was told its state is stale (once): by
    /// the consensus (`Act::Stale`) or by its shard core (a handoff undone since:
    /// `ShardCore::take_stale`).
    pub(crate) fn take_stale(&self, jid: &jid::BareJid) -> bool {
        let told = self.cluster.stale.borrow_mut().remove(jid);
        self.core.borrow_mut().take_stale(jid) | told
    }

    /// Work for the slots another shard of this node hosts.
    fn call_shard(self: &Rc<Self>, shard: starling_actors::address::ShardId, call: ShardCall) {
        let Some(calls) = self.calls.as_ref() else {
            return tracing::error!(shard, "no mesh to the slot's shard");
        };
        if let Err(e) = calls.try_send_to(shard as usize, call) {
            // Raft sends again; an account operation fails (its waiter is dropped).
            tracing::debug!(shard, error = %e, "slot's shard busy: call dropped");
            self.metrics.cluster_raft_dropped.increment(1);
        }
    }

    /// A call from another shard of this node.
    pub(crate) fn shard_call(self: &Rc<Self>, call: ShardCall) {
        match call {
            ShardCall::Raft(msgs) => self.protocol(|p, _| p.raft(msgs)),
            ShardCall::Serve { op, reply } => self.protocol(|p, _| p.serve(op, reply)),
            ShardCall::Account { op, reply } => self.protocol(|p, m| match op {
                Op::Load { user } => p.load_account(reply, user, m),
                Op::Create { user, account } => p.create_account(reply, user, account, m),
                Op::Put { user, account } => p.put_account(reply, user, account, m),
            }),
        }
    }

    /// Raft messages from another node, each to its slot's shard.
    fn raft_in(self: &Rc<Self>, items: Vec<WireRaft>) {
        let shards = self.cluster.view.borrow().shards;
        let mut by_shard: std::collections::BTreeMap<starling_actors::address::ShardId, Vec<(u32, RaftMsg)>> =
            Default::default();
        for WireRaft { slot, msg } in items {
            by_shard
                .entry(consensus::shard_of_slot(slot, shards))
                .or_default()
                .push((slot, msg));
        }
        for (s, msgs) in by_shard {
            if s == self.id {
                self.protocol(|p, _| p.raft(msgs));
            } else {
                self.call_shard(s, ShardCall::Raft(msgs));
            }
        }
    }

    /// Another node's account request, on the shard of its user's slot.
    fn serve_in(self: &Rc<Self>, op: Op, reply: ReplyTo) {
        let (slots, shards) = (self.cluster.slots, self.cluster.view.borrow().shards);
        let s = consensus::shard_for(&op, slots, shards);
        if s == self.id {
            self.protocol(|p, _| p.serve(op, reply));
        } else {
            self.call_shard(s, ShardCall::Serve { op, reply });
        }
    }

    /// Request `id` times out after `ms` unless answered: every request's timeout is the
    /// same, so the deadlines queue in order, and one task per shard expires them.
    fn deadline(self: &Rc<Self>, id: u64, ms: u64) {
        let at = std::time::Instant::now() + Duration::from_millis(ms);
        {
            let mut d = self.cluster.deadlines.borrow_mut();
            let i = d.partition_point(|(t, _)| *t <= at);
            d.insert(i, (at, id));
        }
        if !self.cluster.expiring.replace(true) {
            glommio::spawn_local(expire(self.clone())).detach();
        }
    }

    /// Runs work on the shard's protocol and waits for its outcome.
    async fn ask_protocol(self: &Rc<Self>, f: impl FnOnce(&mut Protocol, Waiter, &View)) -> Outcome {
        let (tx, rx) = futures::channel::oneshot::channel();
        self.protocol(|p, m| f(p, tx, m));
        rx.await
            .unwrap_or_else(|_| Outcome::Written(Err("the replicated state dropped the request".into())))
    }

    /// A session's account operation, on the shard of its user's slot.
    async fn account_op(self: &Rc<Self>, op: Op) -> Outcome {
        let (slots, shards) = (self.cluster.slots, self.cluster.view.borrow().shards);
        let s = consensus::shard_for(&op, slots, shards);
        if s == self.id {
            return self
                .ask_protocol(|p, w, m| match op {
                    Op::Load { user } => p.load_account(w, user, m),
                    Op::Create { user, account } => p.create_account(w, user, account, m),
                    Op::Put { user, account } => p.put_account(w, user, account, m),
                })
                .await;
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        self.call_shard(s, ShardCall::Account { op, reply: tx });
        rx.await
            .unwrap_or_else(|_| Outcome::Written(Err("the slot's shard dropped the request".into())))
    }

    /// The account, from wherever it lives.
    pub async fn load_account(self: &Rc<Self>, user: String) -> Result<Option<Account>, String> {
        match self.account_op(Op::Load { user }).await {
            Outcome::Account(r) => r,
            Outcome::Written(Err(e)) => Err(e),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    pub async fn create_account(self: &Rc<Self>, user: String, account: Account) -> Result<bool, String> {
        match self.account_op(Op::Create { user, account }).await {
            Outcome::Created(r) => r,
            Outcome::Written(Err(e)) => Err(e),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    pub async fn put_account(self: &Rc<Self>, user: String, account: Account) -> Result<(), String> {
        match self.account_op(Op::Put { user, account }).await {
            Outcome::Written(r) => r,
            other => Err(format!("unexpected {other:?}")),
        }
    }

    /// A user actor's batch on its version `base`, committed in its slot's log and applied
    /// here (`Consensus::write`); the actor lives on its slot's shard.
    pub async fn write_replicated(
        self: &Rc<Self>,
        user: &str,
        writes: Vec<Write>,
        base: Option<u64>,
    ) -> Result<(), String> {
        let user = user.to_string();
        match self.ask_protocol(|p, w, _| p.write(w, user, writes, base)).await {
            Outcome::Written(r) => r,
            other => Err(format!("unexpected {other:?}")),
        }
    }

    /// Before `user`'s actor starts: everything committed in its slot is applied here (a
    /// read index, `Consensus::pull`).
    pub async fn pull_newest(self: &Rc<Self>, user: &str) -> Result<(), String> {
        let user = user.to_string();
        match self.ask_protocol(|p, w, _| p.pull(w, user)).await {
            Outcome::Pulled(r) => r,
            Outcome::Written(Err(e)) => Err(e),
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

/// Sends the shard's storage calls to the storage thread in order; each answer goes back to
/// the protocol when it comes.
async fn pump_storage(shard: Rc<Shard>) {
    loop {
        let next = shard.cluster.storage_queue.borrow_mut().pop_front();
        let Some((task, op)) = next else {
            shard.cluster.storage_pumping.set(false);
            return;
        };
        let (got, req) = storage_req(op);
        if let Err(e) = shard.storage.send(req).await {
            shard.protocol(|p, _| p.storage(task, Err(e)));
            continue;
        }
        let s = shard.clone();
        glommio::spawn_local(async move {
            let got = got.await;
            s.protocol(|p, _| p.storage(task, got));
        })
        .detach();
    }
}

/// The storage thread's request for a call, and the future of its answer.
fn storage_req(
    op: Local,
) -> (
    futures::future::LocalBoxFuture<'static, Result<Got, starling_storage::StorageError>>,
    StorageReq,
) {
    use futures::channel::oneshot;
    use futures::FutureExt;
    use starling_storage::StorageError;
    fn answer<T: 'static>(
        rx: oneshot::Receiver<Result<T, StorageError>>,
        f: impl FnOnce(T) -> Got + 'static,
    ) -> futures::future::LocalBoxFuture<'static, Result<Got, StorageError>> {
        async move {
            rx.await
                .map_err(|_| StorageError::Backend("storage thread dropped the request".into()))?
                .map(f)
        }
        .boxed_local()
    }
    match op {
        Local::Account(user) => {
            let (tx, rx) = oneshot::channel();
            (answer(rx, Got::Account), StorageReq::Account { user, reply: tx })
        }
        Local::Log(w) => {
            let (tx, rx) = oneshot::channel();
            (answer(rx, |()| Got::Stored), StorageReq::RaftLog { w, reply: tx })
        }
        Local::Apply { slot, entries } => {
            let (tx, rx) = oneshot::channel();
            (
                answer(rx, Got::Applied),
                StorageReq::RaftApply {
                    slot,
                    entries,
                    reply: tx,
                },
            )
        }
        Local::State { slot, slots } => {
            let (tx, rx) = oneshot::channel();
            (answer(rx, Got::State), StorageReq::SlotState { slot, slots, reply: tx })
        }
        Local::Install {
            slot,
            slots,
            index,
            writes,
        } => {
            let (tx, rx) = oneshot::channel();
            (
                answer(rx, |()| Got::Stored),
                StorageReq::Install {
                    slot,
                    slots,
                    index,
                    writes,
                    reply: tx,
                },
            )
        }
    }
}

/// The Raft clock of the shard's slots (`limits::RAFT_TICK_MS`), until the shard stops.
pub async fn raft_clock(shard: Rc<Shard>, table: Option<super::status::SlotTable>) {
    let tick = Duration::from_millis(starling_actors::system::limits::RAFT_TICK_MS);
    let every = (1_000 / starling_actors::system::limits::RAFT_TICK_MS).max(1);
    let mut n = 0u64;
    loop {
        glommio::timer::sleep(tick).await;
        shard.protocol(|p, m| p.tick(m));
        n += 1;
        if let Some(t) = table.as_ref().filter(|_| n.is_multiple_of(every)) {
            // Once a second, off the hot path: what `starling cluster status` shows.
            shard.protocol(|p, view| super::status::publish(t, shard.id, p, view));
        }
    }
}

/// Expires the shard's request deadlines, then ends when none is left.
async fn expire(shard: Rc<Shard>) {
    loop {
        let next = shard.cluster.deadlines.borrow().front().map(|(t, _)| *t);
        let Some(next) = next else {
            shard.cluster.expiring.set(false);
            return;
        };
        let now = std::time::Instant::now();
        if next > now {
            glommio::timer::sleep(next - now).await;
            continue;
        }
        let id = shard.cluster.deadlines.borrow_mut().pop_front().map(|(_, id)| id);
        if let Some(id) = id {
            shard.protocol(|p, _| p.timeout(id));
        }
    }
}

/// A request in the node's wire form.
fn op_out(op: &Op) -> AccountOp {
    match op {
        Op::Load { user } => AccountOp::Load { user: user.clone() },
        Op::Create { user, account } => AccountOp::Create {
            user: user.clone(),
            account: wire::account_out(account),
        },
        Op::Put { user, account } => AccountOp::Put {
            user: user.clone(),
            account: wire::account_out(account),
        },
    }
}

fn op_in(op: AccountOp) -> Op {
    match op {
        AccountOp::Load { user } => Op::Load { user },
        AccountOp::Create { user, account } => Op::Create {
            user,
            account: wire::account_in(account),
        },
        AccountOp::Put { user, account } => Op::Put {
            user,
            account: wire::account_in(account),
        },
    }
}

fn res_out(res: Res) -> AccountResult {
    match res {
        Res::Loaded(a) => AccountResult::Loaded(a.as_ref().map(wire::account_out)),
        Res::Created(c) => AccountResult::Created(c),
        Res::Done => AccountResult::Done,
        Res::Failed(e) => AccountResult::Failed(e),
    }
}

fn res_in(res: AccountResult) -> Res {
    match res {
        AccountResult::Loaded(a) => Res::Loaded(a.map(wire::account_in)),
        AccountResult::Created(c) => Res::Created(c),
        AccountResult::Done => Res::Done,
        AccountResult::Failed(e) => Res::Failed(e),
    }
}

/// Opens this shard's link to `node` and runs it until the node leaves the membership, the
/// connection fails, or the queue's last sender is dropped. What is still queued then is lost
/// (and logged): the senders' stanzas were in flight to a node that went away.
async fn outgoing(
    shard: Rc<Shard>,
    node: NodeId,
    name: String,
    addr: SocketAddr,
    tx: flume::WeakSender<Frame>,
    rx: flume::Receiver<Frame>,
) {
    let connect = futures::future::select(
        Box::pin(TcpStream::connect(addr)),
        Box::pin(glommio::timer::sleep(CONNECT_TIMEOUT)),
    )
    .await;
    let stream = match connect {
        futures::future::Either::Left((Ok(s), _)) => s,
        futures::future::Either::Left((Err(e), _)) => {
            tracing::warn!(peer = %name, %addr, error = %e, "cluster: cannot connect");
            return give_up(&shard, node, &tx, &rx);
        }
        futures::future::Either::Right(_) => {
            tracing::warn!(peer = %name, %addr, "cluster: connect timed out");
            return give_up(&shard, node, &tx, &rx);
        }
    };
    let _ = stream.set_nodelay(true);
    tracing::debug!(peer = %name, %addr, "cluster: link up");
    let (r, mut w) = stream.split();
    let hello = Frame::Hello {
        name: shard.cluster.name.clone(),
        generation: shard.cluster.generation.get(),
    };
    let mut buf = Vec::new();
    if wire::encode(&hello, &mut buf).is_err() || w.write_all(&buf).await.is_err() {
        return give_up(&shard, node, &tx, &rx);
    }
    // Answers to our account requests come back on this connection.
    let reader = glommio::spawn_local(read_frames(shard.clone(), r, tx.clone(), name.clone()));
    if let Err(e) = write_frames(&rx, w).await {
        tracing::info!(peer = %name, error = %e, "cluster: link closed");
    }
    drop(reader);
    give_up(&shard, node, &tx, &rx);
}

fn give_up(shard: &Rc<Shard>, node: NodeId, tx: &flume::WeakSender<Frame>, rx: &flume::Receiver<Frame>) {
    if let Some(tx) = tx.upgrade() {
        shard.drop_link(node, &tx);
    }
    let lost = rx.drain().filter(|f| matches!(f, Frame::Envelope(_))).count();
    if lost > 0 {
        tracing::warn!(node, lost, "cluster: envelopes lost with a link");
        shard.metrics.cluster_frames_lost.increment(lost as u64);
    }
}

async fn write_frames(rx: &flume::Receiver<Frame>, mut w: WriteHalf<TcpStream>) -> Result<(), String> {
    let mut buf = Vec::with_capacity(BATCH);
    while let Ok(f) = rx.recv_async().await {
        buf.clear();
        let mut next = Some(f);
        while let Some(f) = next.take() {
            if let Err(e) = wire::encode(&f, &mut buf) {
                tracing::error!(error = %e, "cluster: frame not sent");
            }
            if buf.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        w.write_all(&buf).await.map_err(|e| e.to_string())?;
        w.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reads frames until the connection ends or a frame is corrupt (then the connection is
/// dropped: the peer is broken or not a Starling node).
async fn read_frames(shard: Rc<Shard>, mut r: ReadHalf<TcpStream>, reply: flume::WeakSender<Frame>, peer: String) {
    let mut body = Vec::new();
    // Who is on the other end, once it said hello: account requests are served for it.
    let mut from: Option<NodeId> = None;
    loop {
        let mut header = [0u8; 4];
        if r.read_exact(&mut header).await.is_err() {
            return;
        }
        let n = match wire::frame_len(header) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(%peer, error = %e, "cluster: bad frame; closing the link");
                shard.metrics.cluster_bad_frames.increment(1);
                return;
            }
        };
        body.resize(n, 0);
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let frame = match wire::decode(&body) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(%peer, error = %e, "cluster: corrupt frame; closing the link");
                shard.metrics.cluster_bad_frames.increment(1);
                return;
            }
        };
        match frame {
            Frame::Hello { name, generation } => {
                tracing::debug!(peer = %name, generation, "cluster: peer said hello");
                from = Some(starling_gossip::node_id(&name));
            }
            Frame::Envelope(w) => match wire::envelope_in(w) {
                Ok(env) => {
                    shard.metrics.cluster_frames_in.increment(1);
                    shard.route_wait(env, Origin::Actor).await;
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cluster: envelope refused");
                    shard.metrics.cluster_bad_frames.increment(1);
                }
            },
            Frame::AccountReq { id, op } => shard.serve_in(op_in(op), (reply.clone(), id)),
            Frame::AccountResp { id, result } => {
                let res = res_in(result);
                shard.protocol(|p, _| p.answer(id, res));
            }
            Frame::Raft(items) => {
                if from.is_none() {
                    tracing::warn!(%peer, "cluster: raft frame before hello; closing the link");
                    shard.metrics.cluster_bad_frames.increment(1);
                    return;
                }
                shard.raft_in(items);
            }
        }
    }
}

/// Accepts links from other nodes on this shard (every shard listens, SO_REUSEPORT).
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let s = shard.clone();
                glommio::spawn_local(async move {
                    let (r, w) = stream.split();
                    let (tx, rx) = flume::bounded(LINK_QUEUE);
                    let writer = glommio::spawn_local(async move {
                        let _ = write_frames(&rx, w).await;
                    });
                    read_frames(s, r, tx.downgrade(), "incoming".into()).await;
                    drop(tx);
                    drop(writer);
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: accept failed");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Follows the driver's membership updates until the shard stops.
pub async fn follow_membership(
    shard: Rc<Shard>,
    latest: std::sync::Arc<std::sync::Mutex<super::Members>>,
    updates: flume::Receiver<()>,
) {
    let mut my_generation = shard.cluster.generation.get();
    loop {
        let members = latest.lock().expect("members lock").clone();
        let (gone, old_ring) = shard.cluster.update(&members);
        // Declared down by the others, this node rejoined under a new generation (see
        // `Output::rejoined`): they dropped its sessions and may have served its users.
        let now = members
            .up
            .iter()
            .find(|m| m.name == shard.cluster.name)
            .map_or(my_generation, |m| m.generation);
        let rejoined = now != my_generation;
        my_generation = now;
        shard.cluster.generation.set(now);
        after_change(&shard, &gone, rejoined, &old_ring);
        // Idle actors kept in memory let go (`membership_changed`).
        shard.cluster.changes.set(shard.cluster.changes.get() + 1);
        let waiters: Vec<_> = shard.cluster.change_waiters.borrow_mut().drain().collect();
        for (_, w) in waiters {
            w.wake();
        }
        // The slots' leaders move their members toward the new ring on their next ticks.
        if updates.recv_async().await.is_err() {
            return;
        }
    }
}

/// What a membership change means for this shard's actors and sessions.
/// - The user actors here unbind the sessions that nodes gone hosted (contacts see them
///   go offline; their clients reconnect elsewhere).
/// - A session whose user's actor now lives on another node than when it registered, or
///   lived on a node that died or restarted (the actor died with it), registers with the
///   new incarnation (`ShardCore::membership_changed`): its client notices nothing. An actor
///   here whose user is placed elsewhere now forgets its sessions and goes. Only when this
///   node itself rejoined are its sessions closed (the others told their contacts they
///   went). (A slot that gained a member moves nothing: an actor whose state went stale
///   meanwhile is ended by `Act::Stale`, its sessions registering again.)
fn after_change(shard: &Rc<Shard>, gone: &[(NodeId, u64)], rejoined: bool, old_ring: &starling_gossip::Ring) {
    if !gone.is_empty() {
        shard.node_down(gone);
    }
    let (moved, slots) = {
        let view = shard.cluster.view.borrow();
        let gone: Vec<NodeId> = gone.iter().map(|(n, _)| *n).collect();
        let moved =
            starling_actors::system::cluster::moved_slots(old_ring, &view.ring, &gone, super::node_id, view.slots);
        (moved, view.slots)
    };
    // Once the membership has settled, the actors then here check the contacts' presence
    // they see (the contacts' actors that died with a node knew it; those that moved may
    // have answered before they knew their sessions).
    let s = shard.clone();
    glommio::spawn_local(async move {
        glommio::timer::sleep(Duration::from_millis(starling_actors::msg::RESYNC_AFTER_MS)).await;
        s.resync(&moved, slots);
    })
    .detach();
    let view = shard.cluster.view.borrow().clone();
    let owner_now = |user: &jid::BareJid| view.place_user(user).0;
    let generation = shard.cluster.generation.get();
    let at = crate::shard::stamp();
    let moved = shard.with_core(|c| c.membership_changed(generation, rejoined, gone, owner_now, at));
    for id in &moved.kicked {
        tracing::info!(session = id, "cluster: this node rejoined; closing the session");
    }
    if !moved.rebound.is_empty() || moved.handed_off > 0 {
        tracing::info!(
            sessions = moved.rebound.len(),
            actors = moved.handed_off,
            "cluster: users moved; their sessions register with the new actors"
        );
    }
    shard.metrics.sessions_rebound.increment(moved.rebound.len() as u64);
}
