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
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use starling_actors::address::NodeId;
use starling_actors::msg::Envelope;
use starling_actors::system::cluster as rules;
use starling_actors::system::shard::Unsent;
use starling_actors::wire::{self, AccountOp, AccountResult, Frame};
use starling_storage::{Account, Write};

use super::View;
use crate::shard::{Origin, Shard};

/// Frames waiting for one link.
pub const LINK_QUEUE: usize = starling_actors::system::limits::LINK_QUEUE;
/// Bytes gathered into one write.
const BATCH: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a session waits for a remote account answer.
const ACCOUNT_TIMEOUT: Duration = Duration::from_millis(starling_actors::system::limits::ACCOUNT_TIMEOUT_MS);

/// A shard's cluster state: its view of the membership and its links.
pub struct Links {
    pub name: String,
    /// This node's membership generation now: its start time, plus one for each time it
    /// rejoined after being declared down. New sessions' addresses carry it.
    pub generation: Cell<u64>,
    /// The generation this process started under: a session address from before it names no
    /// session here (ids restart with the process).
    pub started: u64,
    pub replication: usize,
    pub view: RefCell<View>,
    /// Outgoing links by node, with the peer generation they were opened for.
    out: RefCell<HashMap<NodeId, (u64, flume::Sender<Frame>)>>,
    pending: RefCell<HashMap<u64, flume::Sender<AccountResult>>>,
    next_req: Cell<u64>,
}

impl Links {
    pub fn new(name: String, generation: u64, replication: usize, view: View) -> Self {
        Links {
            name,
            generation: Cell::new(generation),
            started: generation,
            replication,
            view: RefCell::new(view),
            out: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            next_req: Cell::new(1),
        }
    }

    /// Applies a membership: the ring changes, links to nodes gone (or restarted) close.
    /// Returns the nodes that died, restarted or were declared down, each with the
    /// generation that went (the sessions it hosted are gone), and the ring before.
    pub fn update(&self, members: &[starling_gossip::NodeIdentity]) -> (Vec<(NodeId, u64)>, starling_gossip::Ring) {
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

    /// Where `user`'s account lives: this node, or the owner's node.
    fn account_home(&self, user: &str) -> Option<NodeId> {
        let bare: jid::BareJid = user.parse().ok()?;
        let (node, _) = self.cluster.view.borrow().place_user(&bare);
        (node != self.node).then_some(node)
    }

    async fn ask_remote(self: &Rc<Self>, node: NodeId, op: AccountOp) -> Result<AccountResult, String> {
        let tx = self.link(node).ok_or("the account's node is not a member")?;
        let id = self.cluster.next_req.get();
        self.cluster.next_req.set(id + 1);
        let (reply_tx, reply_rx) = flume::bounded(1);
        self.cluster.pending.borrow_mut().insert(id, reply_tx);
        let asked = tx.send_async(Frame::AccountReq { id, op }).await.is_ok();
        let answer = if asked {
            futures::future::select(
                Box::pin(reply_rx.recv_async()),
                Box::pin(glommio::timer::sleep(ACCOUNT_TIMEOUT)),
            )
            .await
        } else {
            futures::future::Either::Right(((), Box::pin(reply_rx.recv_async())))
        };
        self.cluster.pending.borrow_mut().remove(&id);
        match answer {
            futures::future::Either::Left((Ok(r), _)) => Ok(r),
            _ => Err(format!("no answer from node {node}")),
        }
    }

    /// The account, from wherever it lives.
    pub async fn load_account(self: &Rc<Self>, user: String) -> Result<Option<Account>, String> {
        let Some(node) = self.account_home(&user) else {
            return self.storage.account(user).await.map_err(|e| e.to_string());
        };
        match self.ask_remote(node, AccountOp::Load { user }).await? {
            AccountResult::Loaded(a) => Ok(a.map(wire::account_in)),
            AccountResult::Failed(e) => Err(e),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    pub async fn create_account(self: &Rc<Self>, user: String, account: Account) -> Result<bool, String> {
        let Some(node) = self.account_home(&user) else {
            return self.create_account_here(user, account).await;
        };
        let account = wire::account_out(&account);
        match self.ask_remote(node, AccountOp::Create { user, account }).await? {
            AccountResult::Created(c) => Ok(c),
            AccountResult::Failed(e) => Err(e),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    pub async fn put_account(self: &Rc<Self>, user: String, account: Account) -> Result<(), String> {
        let Some(node) = self.account_home(&user) else {
            let w = vec![Write::PutAccount {
                user: user.clone(),
                account,
            }];
            return self.write_replicated(&user, w, None).await;
        };
        let account = wire::account_out(&account);
        match self.ask_remote(node, AccountOp::Put { user, account }).await? {
            AccountResult::Done => Ok(()),
            AccountResult::Failed(e) => Err(e),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Creates an account owned by this node, on this node and its replicas.
    async fn create_account_here(self: &Rc<Self>, user: String, account: Account) -> Result<bool, String> {
        if self.in_cluster() {
            // Refused before anything is written when too few copies can be reached: an
            // account is acknowledged like every other write, on a majority of copies.
            self.reachable_copies(&self.replica_nodes(&user))?;
        }
        let created = self
            .storage
            .create_account(user.clone(), account.clone())
            .await
            .map_err(|e| e.to_string())?;
        if created && self.in_cluster() {
            // A new account's history starts here: its first batch, on base 0 everywhere.
            let first = Write::NextVersion {
                user: user.clone(),
                base: 0,
            };
            let batch = [
                Write::PutAccount {
                    user: user.clone(),
                    account,
                },
                first.clone(),
            ];
            // Here the local copy goes first: "create if absent" is decided by this node.
            self.storage.write(vec![first]).await.map_err(|e| e.to_string())?;
            self.replicate(&user, &batch).await?;
        }
        Ok(created)
    }

    /// Configured as a cluster member (`cluster.node_name`), whether alone just now or not.
    pub(crate) fn in_cluster(&self) -> bool {
        !self.cluster.name.is_empty()
    }

    /// The other nodes that keep copies of `user`'s state: the next `cluster.replication - 1`
    /// nodes in the ring's order for that key.
    fn replica_nodes(&self, user: &str) -> Vec<NodeId> {
        let view = self.cluster.view.borrow();
        let (me, alone, r) = (&self.cluster.name, view.peers.is_empty(), self.cluster.replication);
        rules::other_replicas(&view.ring, me, alone, user, r)
            .into_iter()
            .map(starling_gossip::node_id)
            .collect()
    }

    /// Copies a write needs: a majority of `cluster.replication` (with the default 2: both),
    /// whatever the number of members seen just now — a node cut off from the others must
    /// not acknowledge alone what the other side of a partition may be writing too.
    fn copies_needed(&self) -> usize {
        rules::copies_needed(self.cluster.replication)
    }

    /// `Err` when this node and the replicas it can reach (`others`) are fewer than a write
    /// needs: alone in the cluster, nothing is acknowledged.
    fn reachable_copies(&self, others: &[NodeId]) -> Result<(), String> {
        if others.len() + 1 >= self.copies_needed() {
            return Ok(());
        }
        self.metrics.cluster_replication_failures.increment(1);
        Err(format!(
            "{} of the {} copies needed are reachable (cluster.replication = {})",
            others.len() + 1,
            self.copies_needed(),
            self.cluster.replication
        ))
    }

    /// Writes `user`'s batch on its replicas, then here; `Ok` once it is durable on a
    /// majority of `cluster.replication` copies, this node's included — it serves the reads.
    /// What a client is told is durable survives the loss of any one node. The replicas go
    /// first so that a batch that failed never raises this copy's version above theirs (the
    /// simulator found acknowledged writes lost to such a copy after a partition healed).
    ///
    /// `base` is the version the writer's state was loaded at plus its batches since (a
    /// user actor's); every copy applies the batch only at that version
    /// (`Write::NextVersion`), and a replica only from the node it sees as the user's owner
    /// (`serve_account`). So two actors of one user on two nodes with different views (a
    /// join or heal in progress) cannot both write, and a copy that missed a batch refuses
    /// the next instead of applying it on another base; the write fails, the actor ends, and
    /// its next incarnation's read repair (`pull_newest`) brings every copy level. `None`
    /// for writes outside a user actor's history (a password change).
    pub async fn write_replicated(
        self: &Rc<Self>,
        user: &str,
        mut writes: Vec<Write>,
        base: Option<u64>,
    ) -> Result<(), String> {
        if let Some(base) = base {
            writes.push(Write::NextVersion {
                user: user.to_string(),
                base,
            });
        }
        if !self.in_cluster() {
            // A single node: no copy of the batch, nothing encoded. The version still counts
            // the batches: offline sequence numbers are never reused (`UserActor::new`).
            return self.storage.write(writes).await.map_err(|e| e.to_string());
        }
        let others = self.replica_nodes(user);
        self.reachable_copies(&others)?;
        if !others.is_empty() {
            let bytes = postcard::to_stdvec(&writes).map_err(|e| e.to_string())?;
            self.replicate_to(user, &others, bytes).await?;
        }
        self.storage.write(writes).await.map_err(|e| e.to_string())
    }

    /// Sends a batch to `user`'s replicas and waits for enough of them (see
    /// `write_replicated`; this node's own copy counts as one).
    async fn replicate(self: &Rc<Self>, user: &str, writes: &[Write]) -> Result<(), String> {
        let others = self.replica_nodes(user);
        self.reachable_copies(&others)?;
        if others.is_empty() {
            return Ok(());
        }
        let bytes = postcard::to_stdvec(writes).map_err(|e| e.to_string())?;
        self.replicate_to(user, &others, bytes).await
    }

    async fn replicate_to(self: &Rc<Self>, user: &str, others: &[NodeId], bytes: Vec<u8>) -> Result<(), String> {
        let asks = others
            .iter()
            .map(|n| self.ask_remote(*n, AccountOp::Replicate { writes: bytes.clone() }));
        let answers = futures::future::join_all(asks).await;
        // This node's copy is written after these answers (see `write_replicated`).
        let remote_ok = answers.iter().filter(|a| matches!(a, Ok(AccountResult::Done))).count();
        if rules::durable(true, remote_ok, self.cluster.replication) {
            return Ok(());
        }
        let (copies, need) = (1 + remote_ok, self.copies_needed());
        let why: Vec<String> = answers
            .into_iter()
            .filter_map(|a| match a {
                Ok(AccountResult::Done) => None,
                Ok(other) => Some(format!("{other:?}")),
                Err(e) => Some(e),
            })
            .collect();
        self.metrics.cluster_replication_failures.increment(1);
        tracing::warn!(user, copies, need, ?why, "cluster: write not replicated to a majority");
        Err(format!(
            "durable on {copies} of {} copies, {need} needed",
            others.len() + 1
        ))
    }

    /// Read repair before the owner starts `user`'s actor: the other replicas send their
    /// copies, and the newest replaces this node's if it is newer (`take_handoff`). So a node
    /// that owns a user after a join, a heal or a death serves the latest acknowledged state
    /// even before its handoff arrives. Then the replicas found older get the newest copy,
    /// so that the actor's first write finds them at its base (`write_replicated`).
    ///
    /// A read needs as many copies as a write (`copies_needed`, this node's included): a
    /// node cut off from the others must not serve its own, possibly stale, copy (found by
    /// the simulator: a roster read on the minority side of a partition lacked items the
    /// client had been told were stored). `Err` then, and the actor does not start.
    pub async fn pull_newest(self: &Rc<Self>, user: &str) -> Result<(), String> {
        let others = self.replica_nodes(user);
        let need = self.copies_needed() - 1;
        if others.len() < need {
            return Err(format!(
                "{} copies of {user} reachable, {} needed",
                others.len() + 1,
                need + 1
            ));
        }
        if others.is_empty() {
            return Ok(());
        }
        let asks = others
            .iter()
            .map(|n| self.ask_remote(*n, AccountOp::Pull { user: user.to_string() }));
        let mut repair: rules::Repair<Vec<u8>> = rules::Repair::default();
        for (n, a) in others.iter().zip(futures::future::join_all(asks).await) {
            match a {
                Ok(AccountResult::Snapshot { version, writes }) => repair.copy(*n, version, writes),
                Ok(AccountResult::Done) => repair.none_there(*n),
                other => tracing::warn!(user, answer = ?other, "cluster: read repair without a replica's copy"),
            }
        }
        if !repair.enough(self.cluster.replication) {
            return Err(format!(
                "{} copies of {user} answered, {} needed",
                repair.seen.len() + 1,
                need + 1
            ));
        }
        if let Some((version, writes)) = repair.best.take() {
            if let AccountResult::Failed(e) = self.take_handoff(user.to_string(), version, &writes).await {
                tracing::warn!(user, error = %e, "cluster: read repair failed");
            }
        }
        let Ok(Some((writes, version))) = self.snapshot(user).await else {
            return Ok(());
        };
        let behind = repair.behind(version);
        let pushes = behind.iter().map(|n| {
            let op = AccountOp::Handoff {
                user: user.to_string(),
                version,
                writes: writes.clone(),
            };
            self.ask_remote(*n, op)
        });
        for (n, a) in behind.iter().zip(futures::future::join_all(pushes).await) {
            if !matches!(a, Ok(AccountResult::Done)) {
                tracing::warn!(user, node = n, answer = ?a, "cluster: a replica was not brought level");
            }
        }
        Ok(())
    }

    /// A user's whole state here as postcard-encoded writes, with its version; `None` when
    /// there is no account.
    async fn snapshot(&self, user: &str) -> Result<Option<(Vec<u8>, u64)>, String> {
        let Some(account) = self
            .storage
            .account(user.to_string())
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let (_, data) = self
            .storage
            .load_user(user.to_string())
            .await
            .map_err(|e| e.to_string())?;
        let version = data.version;
        let w = data.into_writes(user, account);
        postcard::to_stdvec(&w)
            .map(|b| Some((b, version)))
            .map_err(|e| e.to_string())
    }

    /// A whole user from the node that held it: it replaces the copy here only if that one
    /// is older (fewer write batches) or absent, so a node back from the dead never has its
    /// stale copy win, nor does a late handoff undo newer writes. The replacement is
    /// conditional on the version read (`Write::NextVersion` as a condition): a replicated
    /// batch that lands between the read and the write makes it fail, and the comparison
    /// is made again — unconditional, it overwrote that batch with the versions tied.
    async fn take_handoff(self: &Rc<Self>, user: String, version: u64, writes: &[u8]) -> AccountResult {
        let w = match postcard::from_bytes::<Vec<Write>>(writes) {
            Ok(w) if w.iter().all(|w| w.user() == user) => w,
            Ok(_) => return AccountResult::Failed("handoff writes for another user".into()),
            Err(e) => {
                self.metrics.cluster_bad_frames.increment(1);
                return AccountResult::Failed(format!("undecodable writes: {e}"));
            }
        };
        for _ in 0..3 {
            let here = async {
                let account = self.storage.account(user.clone()).await?;
                let (_, data) = self.storage.load_user(user.clone()).await?;
                Ok::<_, starling_storage::StorageError>((account.is_some(), data.version))
            };
            let have = match here.await {
                Err(e) => return AccountResult::Failed(e.to_string()),
                Ok((exists, v)) if !rules::replaces(exists.then_some(v), version) => {
                    tracing::debug!(
                        user,
                        here = v,
                        offered = version,
                        "cluster: handoff not newer; kept ours"
                    );
                    return AccountResult::Done;
                }
                Ok((_, v)) => v,
            };
            let all = rules::replacement(&user, have, w.iter().cloned(), version);
            match self.storage.write(all).await {
                Ok(()) => return AccountResult::Done,
                Err(starling_storage::StorageError::Conflict { .. }) => continue,
                Err(e) => return AccountResult::Failed(e.to_string()),
            }
        }
        AccountResult::Failed(format!("{user}: the copy here kept changing during the handoff"))
    }

    /// Serves an account request from another node (`from`, as its hello named it) against
    /// this node's storage.
    async fn serve_account(self: &Rc<Self>, op: AccountOp, from: Option<NodeId>) -> AccountResult {
        match op {
            AccountOp::Load { user } => match self.storage.account(user).await {
                Ok(a) => AccountResult::Loaded(a.as_ref().map(wire::account_out)),
                Err(e) => AccountResult::Failed(e.to_string()),
            },
            AccountOp::Create { user, account } => {
                match self.create_account_here(user, wire::account_in(account)).await {
                    Ok(c) => AccountResult::Created(c),
                    Err(e) => AccountResult::Failed(e),
                }
            }
            AccountOp::Put { user, account } => {
                let account = wire::account_in(account);
                let w = vec![Write::PutAccount {
                    user: user.clone(),
                    account,
                }];
                match self.write_replicated(&user, w, None).await {
                    Ok(()) => AccountResult::Done,
                    Err(e) => AccountResult::Failed(e),
                }
            }
            AccountOp::Handoff { user, version, writes } => self.take_handoff(user, version, &writes).await,
            AccountOp::Pull { user } => match self.snapshot(&user).await {
                Ok(Some((writes, version))) => AccountResult::Snapshot { version, writes },
                Ok(None) => AccountResult::Done,
                Err(e) => AccountResult::Failed(e),
            },
            AccountOp::Replicate { writes } => match postcard::from_bytes::<Vec<Write>>(&writes) {
                Ok(w) => {
                    let Some(user) = w.first().map(|w| w.user().to_string()) else {
                        return AccountResult::Done;
                    };
                    if w.iter().any(|x| x.user() != user) {
                        return AccountResult::Failed("a replicated batch for several users".into());
                    }
                    // Only the owner this node sees writes: during a join or a heal two
                    // nodes may each think they own the user; neither gets this copy until
                    // the views agree (found by the simulator: two actors of one user, each
                    // acknowledged by the other's copy, overfilled the offline queue).
                    let owner = jid::BareJid::new(&user)
                        .ok()
                        .map(|j| self.cluster.view.borrow().place_user(&j).0);
                    if from.is_none() || owner != from {
                        tracing::debug!(
                            user,
                            ?from,
                            ?owner,
                            "cluster: replicated batch from a node not the owner here"
                        );
                        return AccountResult::Failed("not the owner here".into());
                    }
                    match self.storage.write(w).await {
                        Ok(()) => AccountResult::Done,
                        Err(e) => AccountResult::Failed(e.to_string()),
                    }
                }
                Err(e) => {
                    self.metrics.cluster_bad_frames.increment(1);
                    AccountResult::Failed(format!("undecodable writes: {e}"))
                }
            },
        }
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
            Frame::AccountReq { id, op } => {
                let s = shard.clone();
                let reply = reply.clone();
                glommio::spawn_local(async move {
                    let result = s.serve_account(op, from).await;
                    if let Some(tx) = reply.upgrade() {
                        let _ = tx.send_async(Frame::AccountResp { id, result }).await;
                    }
                })
                .detach();
            }
            Frame::AccountResp { id, result } => {
                if let Some(tx) = shard.cluster.pending.borrow_mut().remove(&id) {
                    let _ = tx.try_send(result);
                }
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
            .iter()
            .find(|m| m.name == shard.cluster.name)
            .map_or(my_generation, |m| m.generation);
        let rejoined = now != my_generation;
        my_generation = now;
        shard.cluster.generation.set(now);
        after_change(&shard, &gone, &old_ring, rejoined);
        let new_ring = shard.cluster.view.borrow().ring.clone();
        // One shard per node walks the stored users (they are the node's, not the shard's).
        if shard.id == 0 && new_ring != old_ring && !old_ring.is_empty() {
            glommio::spawn_local(handoff(shard.clone(), old_ring, new_ring)).detach();
        }
        if updates.recv_async().await.is_err() {
            return;
        }
    }
}

/// What a membership change means for this shard's actors and sessions.
/// - The user actors here unbind the sessions that nodes gone hosted (contacts see them
///   go offline; their clients reconnect elsewhere).
/// - A session is closed, so that its client reconnects and binds again, when its user's
///   actor now lives on another node than when it bound, or lived on a node that died or
///   restarted (the actor died with it), or when the user's replica set gained a node (after
///   a heal that node may have served the user: the actor must reload, with read repair), or
///   when this node itself rejoined. Re-registering live sessions in place is not built yet.
fn after_change(shard: &Rc<Shard>, gone: &[(NodeId, u64)], old_ring: &starling_gossip::Ring, rejoined: bool) {
    if !gone.is_empty() {
        shard.node_down(gone);
        // Once the membership has settled, the actors then here check the contacts'
        // presence they see (the contacts' actors that died with the node knew it).
        let s = shard.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_millis(starling_actors::msg::RESYNC_AFTER_MS)).await;
            s.resync();
        })
        .detach();
    }
    let moved = {
        let view = shard.cluster.view.borrow();
        let r = shard.cluster.replication;
        let owner_now = |user: &jid::BareJid| view.place_user(user).0;
        let gained = |user: &jid::BareJid| rules::replicas_gained(old_ring, &view.ring, user.as_str(), r);
        shard.core().moved_sessions(rejoined, gone, owner_now, gained)
    };
    for id in moved {
        tracing::info!(
            session = id,
            "cluster: the session's user moved to another node; closing it"
        );
        shard.kick(
            id,
            "undefined-condition",
            "this account's cluster node changed; please reconnect",
        );
    }
}

/// Users handed off at once (each is one request and one flush on the receiver).
const HANDOFF_PARALLEL: usize = 32;

/// After a membership change: for every user stored here whose replica set gained a node,
/// the first of its previous replicas still up sends that node the user's whole state
/// (account, roster, offline queue, write version). The receiver keeps the newer of the two
/// (`take_handoff`).
async fn handoff(shard: Rc<Shard>, old: starling_gossip::Ring, new: starling_gossip::Ring) {
    let users = match shard.storage.list_accounts().await {
        Ok(u) => u,
        Err(e) => return tracing::error!(error = %e, "cluster: handoff cannot list accounts"),
    };
    let me = shard.cluster.name.clone();
    let r = shard.cluster.replication;
    let mut jobs: Vec<(String, NodeId)> = Vec::new();
    for user in users {
        for n in rules::handoff_targets(&old, &new, &me, &user, r) {
            jobs.push((user.clone(), starling_gossip::node_id(n)));
        }
    }
    if jobs.is_empty() {
        return;
    }
    tracing::info!(users = jobs.len(), "cluster: handing users to their new replicas");
    let mut failed = 0usize;
    for chunk in jobs.chunks(HANDOFF_PARALLEL) {
        let sends = chunk.iter().map(|(user, node)| hand_one(&shard, user, *node));
        failed += futures::future::join_all(sends)
            .await
            .into_iter()
            .filter(|ok| !ok)
            .count();
    }
    if failed > 0 {
        tracing::warn!(failed, "cluster: some handoffs failed");
    }
}

async fn hand_one(shard: &Rc<Shard>, user: &str, node: NodeId) -> bool {
    let (writes, version) = match shard.snapshot(user).await {
        Ok(Some(w)) => w,
        Ok(None) => {
            tracing::warn!(user, "cluster: no snapshot to hand off: account gone");
            return false;
        }
        Err(e) => {
            tracing::warn!(user, error = %e, "cluster: no snapshot to hand off");
            return false;
        }
    };
    let op = AccountOp::Handoff {
        user: user.to_string(),
        version,
        writes,
    };
    match shard.ask_remote(node, op).await {
        Ok(AccountResult::Done) => true,
        other => {
            tracing::warn!(user, node, answer = ?other, "cluster: handoff failed");
            false
        }
    }
}
