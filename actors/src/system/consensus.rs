//! Replicated state on Raft (issue 17), as a sans-io state machine per shard, run by both
//! hosts: Multi-Raft in TiKV's manner. Keys hash into `cluster.slots` slots
//! (`cluster::slot_of`), each slot one Raft group ([`Slot`], raft-rs underneath) whose members
//! are the ring's `cluster.replication` nodes for it (`cluster::slot_voters`). A slot's group
//! lives on shard `slot % shards` of each member node, and so do the actors of its keys
//! ([`place_slot`]): an actor's writes and reads never leave its shard on this node.
//!
//! What it does for the host, on this shard's slots:
//! - a user actor's write batch is proposed to its slot's group (a follower forwards it to the
//!   leader) and answered once the entry is committed — durable on a majority of the members —
//!   and applied here, with the storage's answer: its version condition (`Write::NextVersion`)
//!   is checked where the entry is applied, on every member alike, so two incarnations of one
//!   actor cannot both write on one base;
//! - accounts are created ("if absent", `Write::NoAccount`) and changed through the log too;
//! - a read for an actor's activation, and an account read for a login, first get a read
//!   index from the leader (raft-rs `read_index`: the leader confirms it still leads with a
//!   round of heartbeats) and wait until this node has applied that far: an old leader cut off
//!   on a minority side serves nothing stale; it gets no read index;
//! - membership: the group's leader moves its configuration toward the ring's members for the
//!   slot (a newcomer is added as a learner, catches up from a snapshot, and is promoted with
//!   the member it replaces removed in the same joint change; the leader never removes
//!   itself, it hands over first), and hands leadership to the ring's owner of the slot once
//!   that member is caught up;
//! - snapshots of a slot's data for members that are behind the compacted log, and their
//!   installation; compaction of the log once applied.
//!
//! The host calls in with work (`write`, `pull`, `load_account`, `create_account`,
//! `put_account`, `serve`), with what its I/O brought (`raft`, `storage`, `answer`, `timeout`)
//! and with time (`tick`, every [`limits::RAFT_TICK_MS`]), then carries out the effects `pop`
//! gives, in order. `Act::Storage` calls must run in the order given (the applied entries'
//! conditions depend on it): the node runs them through one queue per shard.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState};
use serde::{Deserialize, Serialize};
use starling_gossip::Ring;
use starling_storage::{Account, RaftStored, RaftWrite, StorageError, Write};

use super::cluster as rules;
use super::limits;
use super::slot::{RaftMsg, Slot, ASK, ELECTION_TICKS, TOMBSTONE};
use crate::address::{NodeId, ShardId};

/// The writes of the entries a stored log holds past its applied index: what a restart
/// applies (again) — the entries committed among them; the rest a new leader may drop.
pub fn logged_writes(stored: &RaftStored) -> Vec<Write> {
    let mut out = Vec::new();
    for (index, bytes) in &stored.entries {
        if *index <= stored.applied {
            continue;
        }
        let Ok(data) = super::slot::SlotLog::entry_data(bytes) else {
            continue;
        };
        if let Ok(p) = postcard::from_bytes::<Proposal>(&data) {
            match p.cmd {
                Command::Writes(w) => out.extend(w),
                Command::Create { user, account } => out.push(Write::PutAccount { user, account }),
            }
        }
    }
    out
}

/// The shard's view of the membership, as the replicated state needs it.
pub trait Members {
    /// This node's name on the ring; empty when it is not configured as a cluster member.
    fn name(&self) -> &str;
    fn me(&self) -> NodeId;
    fn ring(&self) -> &Ring;
    /// No other member is up.
    fn alone(&self) -> bool;
    fn node_id(&self, name: &str) -> Option<NodeId>;
    /// A member being decommissioned (`cluster leave`): off the ring already; its groups
    /// replace it even when fewer than `replication` members remain.
    fn leaving(&self, node: NodeId) -> bool;
}

/// A node's raft id (raft ids start at 1).
pub fn raft_id(n: NodeId) -> u64 {
    u64::from(n) + 1
}

/// The node of a raft id.
pub fn node_of(id: u64) -> NodeId {
    id.saturating_sub(1) as NodeId
}

/// The shard of every node that hosts `slot`'s group and the actors of its keys.
pub fn shard_of_slot(slot: u32, shards: ShardId) -> ShardId {
    (slot % u32::from(shards.max(1))) as ShardId
}

/// Whether `user`'s state belongs to `slot` (a snapshot's selection).
pub fn in_slot(user: &str, slot: u32, slots: u32) -> bool {
    rules::slot_of(user.as_bytes(), slots) == slot
}

/// The nodes (by name) that should be `slot`'s members: the ring's first `replication` for it,
/// every slot on this node when it is alone or not in a cluster.
fn wanted(m: &impl Members, slot: u32, replication: usize) -> Vec<&str> {
    if m.alone() || m.name().is_empty() {
        return Vec::new();
    }
    rules::slot_voters(m.ring(), slot, replication)
}

/// Where the actors of `slot`'s keys live: on the ring's owner for the slot (the member
/// leadership is handed to), on the slot's shard; everything is here when alone.
pub fn place_slot(m: &impl Members, slot: u32, shards: ShardId) -> (NodeId, ShardId) {
    let shard = shard_of_slot(slot, shards);
    let owner = wanted(m, slot, 1).first().and_then(|n| m.node_id(n));
    (owner.unwrap_or(m.me()), shard)
}

/// A slot's group as one member sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub leader: Option<NodeId>,
    pub leading: bool,
    pub committed: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// A configuration change is under way.
    pub changing: bool,
    /// On the leader: how many committed entries each other member's log lacks.
    pub lag: Vec<(NodeId, u64)>,
}

/// What this shard of the node runs.
#[derive(Clone, Debug)]
pub struct Cfg {
    /// `cluster.slots`: fixed when the cluster is made.
    pub slots: u32,
    pub shards: ShardId,
    pub shard: ShardId,
    /// `cluster.replication`: the members each slot's group has.
    pub replication: usize,
    /// Tells this process's proposals from an earlier one's (its start time, say).
    pub incarnation: u64,
}

/// A request to the node that owns a key (a login or registration on another node).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Load { user: String },
    Create { user: String, account: Account },
    Put { user: String, account: Account },
}

impl Op {
    /// The user it is about: the host serves it on the shard of that user's slot.
    pub fn user(&self) -> &str {
        match self {
            Op::Load { user } | Op::Create { user, .. } | Op::Put { user, .. } => user,
        }
    }
}

/// The shard of this node that serves `op` (its user's slot's), of `shards`, with `slots`.
pub fn shard_for(op: &Op, slots: u32, shards: ShardId) -> ShardId {
    shard_of_slot(rules::slot_of(op.user().as_bytes(), slots), shards)
}

/// The answer to an [`Op`].
#[derive(Clone, Debug, PartialEq)]
pub enum Res {
    Loaded(Option<Account>),
    Created(bool),
    Done,
    Failed(String),
}

/// A call on this node's storage (`starling_storage::Storage`).
#[derive(Clone, Debug, PartialEq)]
pub enum Local {
    /// `account` → `Got::Account`.
    Account(String),
    /// `raft_write`, durable → `Got::Stored`.
    Log(RaftWrite),
    /// `apply_committed` for each entry, in order (need not wait for a flush: the log has
    /// them) → `Got::Applied` with each one's result.
    Apply { slot: u32, entries: Vec<(u64, Vec<Write>)> },
    /// `slot_state` of the users `in_slot(user, slot, slots)` → `Got::State`.
    State { slot: u32, slots: u32 },
    /// `install_slot` over the users `in_slot(user, slot, slots)` → `Got::Stored` (need not
    /// wait for a flush: the log write after it does).
    Install {
        slot: u32,
        slots: u32,
        index: u64,
        writes: Vec<Write>,
    },
}

/// What a storage call returned.
#[derive(Debug)]
pub enum Got {
    Account(Option<Account>),
    Stored,
    Applied(Vec<Result<(), StorageError>>),
    State(Vec<Write>),
}

/// What the host is told when work it asked for ends.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Account(Result<Option<Account>, String>),
    Created(Result<bool, String>),
    /// A write: committed and applied, or not (the actor ends: its memory may be ahead).
    Written(Result<(), String>),
    /// The actor may start: this node has applied everything committed before it asked.
    Pulled(Result<(), String>),
}

/// What the host counts.
#[derive(Debug, PartialEq, Eq)]
pub enum Count {
    /// A write or read that failed (no leader, no quorum, timed out, refused).
    ReplicationFailure,
    /// A slot's leadership came to this node.
    LeaderHere,
    /// A snapshot was made to send, or installed.
    Snapshot,
    /// A configuration change proposed.
    ConfChange,
}

/// An effect for the host.
#[derive(Debug)]
pub enum Act<T, R> {
    /// Send these raft messages to node `to` (in one frame; lost ones are raft's to resend).
    Raft {
        to: NodeId,
        msgs: Vec<(u32, RaftMsg)>,
    },
    /// Send the request to node `to`; call `timeout(id)` after `timeout_ms` unless answered.
    Ask {
        to: NodeId,
        id: u64,
        op: Op,
        timeout_ms: u64,
    },
    Storage {
        task: u64,
        op: Local,
    },
    Reply {
        to: R,
        res: Res,
    },
    Done {
        to: T,
        outcome: Outcome,
    },
    /// A write of `user`'s history that this shard's life did not propose was applied here:
    /// an actor of `user` running here holds older state and must end (`Runner::stale`).
    Stale {
        user: String,
    },
    Count(Count),
}

/// An entry's data: a command and who proposed it (answered where it is applied).
#[derive(Serialize, Deserialize)]
struct Proposal {
    node: u64,
    incarnation: u64,
    id: u64,
    cmd: Command,
}

#[derive(Serialize, Deserialize)]
enum Command {
    Writes(Vec<Write>),
    Create { user: String, account: Account },
}

/// Who waits.
enum Whom<T, R> {
    Here(T),
    There(R),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Account,
    Created,
    Written,
    Pulled,
}

/// A proposal of this shard's, until it is applied here or times out.
struct Pending<T, R> {
    whom: Whom<T, R>,
    kind: Kind,
    slot: u32,
    deadline: u64,
    /// Not yet taken by raft (no leader known): proposed again on each tick.
    data: Option<Vec<u8>>,
}

/// A read waiting for its read index, then for this node to apply that far.
struct Reading<T, R> {
    whom: Whom<T, R>,
    slot: u32,
    deadline: u64,
    /// The account to read once level (a login); `None` for an activation.
    account: Option<String>,
    /// The read index granted.
    index: Option<u64>,
    /// The tick it was last asked for (raft-rs drops a read index it cannot serve yet).
    asked: Option<u64>,
}

impl<T, R> Reading<T, R> {
    fn kind(&self) -> Kind {
        if self.account.is_some() {
            Kind::Account
        } else {
            Kind::Pulled
        }
    }
}

enum Task {
    /// A log write: ready `number` of the slot's group is durable once it is.
    Persist {
        slot: u32,
        number: u64,
    },
    /// A log write no ready waits on (compaction).
    Quiet,
    /// Applied entries: who proposed each (this shard's proposal ids), and the users whose
    /// history another life wrote.
    Apply {
        slot: u32,
        mine: Vec<(u64, Option<u64>)>,
        foreign: Vec<String>,
    },
    /// The slot's data at `index`, for a snapshot.
    State {
        slot: u32,
        index: u64,
        term: u64,
        cs: ConfState,
    },
    Install {
        slot: u32,
        index: u64,
    },
    Account {
        read: u64,
    },
}

/// Ticks between two looks at a slot's configuration (leader only).
const RECONCILE_TICKS: u64 = 5;
/// Ticks a read index may go unanswered before it is asked again.
const READ_AGAIN_TICKS: u64 = 3;
/// Entries a log keeps past its applied point (members a little behind catch up from the
/// log; further behind, from a snapshot). It is compacted when twice as long.
pub const LOG_KEEP: u64 = 1024;

/// The protocol's state on one shard.
pub struct Consensus<T, R> {
    cfg: Cfg,
    me: u64,
    groups: BTreeMap<u32, Slot>,
    /// Groups to ready before returning.
    dirty: BTreeSet<u32>,
    /// Groups whose snapshot is being made.
    snapshotting: BTreeSet<u32>,
    next: u64,
    now: u64,
    proposals: BTreeMap<u64, Pending<T, R>>,
    reads: BTreeMap<u64, Reading<T, R>>,
    tasks: BTreeMap<u64, Task>,
    /// Requests to other nodes: who waits, for what.
    asked: BTreeMap<u64, (T, Kind)>,
    outbox: BTreeMap<NodeId, Vec<(u32, RaftMsg)>>,
    out: VecDeque<Act<T, R>>,
    /// This node is being decommissioned (as the last tick saw it).
    leaving: bool,
}

impl<T, R> Consensus<T, R> {
    /// `me`: this node's id (its raft id is `raft_id(me)`).
    pub fn new(cfg: Cfg, me: NodeId) -> Self {
        Consensus {
            cfg,
            me: raft_id(me),
            groups: BTreeMap::new(),
            dirty: BTreeSet::new(),
            snapshotting: BTreeSet::new(),
            next: 1,
            now: 0,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            tasks: BTreeMap::new(),
            asked: BTreeMap::new(),
            outbox: BTreeMap::new(),
            out: VecDeque::new(),
            leaving: false,
        }
    }

    /// The next effect to carry out.
    pub fn pop(&mut self) -> Option<Act<T, R>> {
        self.out.pop_front()
    }

    /// The slots this shard hosts (of all `cfg.slots`).
    pub fn hosted(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.cfg.slots).filter(|s| shard_of_slot(*s, self.cfg.shards) == self.cfg.shard)
    }

    /// Work in progress (the simulator checks it drains).
    pub fn in_progress(&self) -> usize {
        self.proposals.len() + self.reads.len() + self.asked.len()
    }

    /// The groups here: (slot, leader's node if known, this node leads, committed, applied).
    pub fn status(&self) -> Vec<(u32, Option<NodeId>, bool, u64, u64)> {
        self.groups
            .values()
            .map(|g| {
                let l = (g.leader() != 0).then(|| node_of(g.leader()));
                (g.slot, l, g.is_leader(), g.committed(), g.applied)
            })
            .collect()
    }

    /// Drops everything (the shard is gone), giving back who was waiting here.
    pub fn crash(&mut self) -> Vec<T> {
        let mut waiting = Vec::new();
        for (_, p) in std::mem::take(&mut self.proposals) {
            if let Whom::Here(w) = p.whom {
                waiting.push(w);
            }
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            if let Whom::Here(w) = r.whom {
                waiting.push(w);
            }
        }
        waiting.extend(std::mem::take(&mut self.asked).into_values().map(|(w, _)| w));
        self.groups.clear();
        self.tasks.clear();
        self.out.clear();
        waiting
    }

    /// One slot's group here, if this node is in it.
    pub fn slot_info(&self, slot: u32) -> Option<SlotInfo> {
        let g = self.groups.get(&slot)?;
        let mut voters: Vec<NodeId> = g.conf().voters.iter().map(|v| node_of(*v)).collect();
        voters.sort_unstable();
        let mut learners: Vec<NodeId> = g.conf().learners.iter().map(|v| node_of(*v)).collect();
        learners.sort_unstable();
        let committed = g.committed();
        let lag = if g.is_leader() {
            voters
                .iter()
                .chain(&learners)
                .filter(|n| raft_id(**n) != self.me)
                .map(|n| (*n, committed.saturating_sub(g.matched(raft_id(*n)).unwrap_or(0))))
                .collect()
        } else {
            Vec::new()
        };
        Some(SlotInfo {
            leader: (g.leader() != 0).then(|| node_of(g.leader())),
            leading: g.is_leader(),
            committed: g.committed(),
            applied: g.applied,
            voters,
            learners,
            changing: g.conf_pending(),
            lag,
        })
    }

    /// The slots this shard hosts a member of.
    pub fn slots(&self) -> Vec<u32> {
        self.groups.keys().copied().collect()
    }

    fn id(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn storage_call(&mut self, t: Task, op: Local) {
        let task = self.id();
        self.tasks.insert(task, t);
        self.out.push_back(Act::Storage { task, op });
    }

    fn deadline(&self) -> u64 {
        self.now + limits::ACCOUNT_TIMEOUT_MS / limits::RAFT_TICK_MS
    }

    fn finish(&mut self, whom: Whom<T, R>, outcome: Outcome) {
        if matches!(
            outcome,
            Outcome::Written(Err(_)) | Outcome::Pulled(Err(_)) | Outcome::Created(Err(_)) | Outcome::Account(Err(_))
        ) {
            self.out.push_back(Act::Count(Count::ReplicationFailure));
        }
        match whom {
            Whom::Here(to) => self.out.push_back(Act::Done { to, outcome }),
            Whom::There(to) => {
                let res = match outcome {
                    Outcome::Account(Ok(a)) => Res::Loaded(a),
                    Outcome::Created(Ok(c)) => Res::Created(c),
                    Outcome::Written(Ok(())) | Outcome::Pulled(Ok(())) => Res::Done,
                    Outcome::Account(Err(e))
                    | Outcome::Created(Err(e))
                    | Outcome::Written(Err(e))
                    | Outcome::Pulled(Err(e)) => Res::Failed(e),
                };
                self.out.push_back(Act::Reply { to, res });
            }
        }
    }

    fn failed(kind: Kind, e: String) -> Outcome {
        match kind {
            Kind::Account => Outcome::Account(Err(e)),
            Kind::Created => Outcome::Created(Err(e)),
            Kind::Written => Outcome::Written(Err(e)),
            Kind::Pulled => Outcome::Pulled(Err(e)),
        }
    }

    fn slot_of(&self, user: &str) -> u32 {
        rules::slot_of(user.as_bytes(), self.cfg.slots)
    }

    /// The node whose actors `user` has (it proposes and reads for them).
    fn owner(&self, m: &impl Members, user: &str) -> NodeId {
        place_slot(m, self.slot_of(user), self.cfg.shards).0
    }

    // ---- starting ---------------------------------------------------------------------

    /// Makes every slot this shard hosts a new group with this node its only member (the
    /// first node of a new cluster, or a single node): stored first.
    pub fn bootstrap(&mut self) {
        let slots: Vec<u32> = self.hosted().collect();
        for slot in slots {
            match Slot::bootstrap(slot, self.me, &[self.me]) {
                Ok((mut g, w)) => {
                    let _ = g.campaign();
                    self.groups.insert(slot, g);
                    self.dirty.insert(slot);
                    self.storage_call(Task::Quiet, Local::Log(w));
                }
                Err(e) => tracing::error!(slot, error = %e, "raft: cannot bootstrap the slot"),
            }
        }
        self.drive();
    }

    /// A slot's group as this node stored it.
    pub fn restore(&mut self, slot: u32, stored: &RaftStored) -> Result<(), String> {
        if shard_of_slot(slot, self.cfg.shards) != self.cfg.shard || slot >= self.cfg.slots {
            return Err(format!("slot {slot} is not this shard's ({} slots)", self.cfg.slots));
        }
        let mut g = Slot::restore(slot, self.me, stored)?;
        if g.conf().voters == [self.me] {
            // Alone in its group: it need not wait for an election timeout.
            let _ = g.campaign();
        }
        self.groups.insert(slot, g);
        self.dirty.insert(slot);
        self.drive();
        Ok(())
    }

    // ---- work from this node ----------------------------------------------------------

    /// A user actor's batch, on its version `base` (`None`: outside an actor's history) →
    /// `Outcome::Written` once committed and applied here.
    pub fn write(&mut self, to: T, user: String, mut writes: Vec<Write>, base: Option<u64>) {
        if let Some(base) = base {
            writes.push(Write::NextVersion {
                user: user.clone(),
                base,
            });
        }
        let slot = self.slot_of(&user);
        if crate::planted::active(crate::planted::Bug::AckBeforeCommit) {
            // The planted bug: the actor is told its write is stored before it is committed.
            self.out.push_back(Act::Done {
                to,
                outcome: Outcome::Written(Ok(())),
            });
            let id = self.id();
            let p = Proposal {
                node: self.me,
                incarnation: self.cfg.incarnation,
                id,
                cmd: Command::Writes(writes),
            };
            let data = postcard::to_stdvec(&p).expect("postcard encoding of plain structs cannot fail");
            if let Some(g) = self.groups.get_mut(&slot) {
                let _ = g.propose(data);
                self.dirty.insert(slot);
            }
            return self.drive();
        }
        self.propose(Whom::Here(to), Kind::Written, slot, Command::Writes(writes));
    }

    /// Before `user`'s actor starts here → `Outcome::Pulled` once this node has applied
    /// everything committed in its slot before now (a read index).
    pub fn pull(&mut self, to: T, user: String) {
        let slot = self.slot_of(&user);
        self.read(Whom::Here(to), slot, None);
    }

    /// `user`'s account, read at its owner with a read index → `Outcome::Account`.
    pub fn load_account(&mut self, to: T, user: String, m: &impl Members) {
        let owner = self.owner(m, &user);
        if owner != m.me() {
            return self.ask(to, Kind::Account, owner, Op::Load { user });
        }
        let slot = self.slot_of(&user);
        self.read(Whom::Here(to), slot, Some(user));
    }

    /// Creates `user`'s account if absent → `Outcome::Created`.
    pub fn create_account(&mut self, to: T, user: String, account: Account, m: &impl Members) {
        let owner = self.owner(m, &user);
        if owner != m.me() {
            return self.ask(to, Kind::Created, owner, Op::Create { user, account });
        }
        let slot = self.slot_of(&user);
        self.propose(Whom::Here(to), Kind::Created, slot, Command::Create { user, account });
    }

    /// Replaces `user`'s account (a password change) → `Outcome::Written`.
    pub fn put_account(&mut self, to: T, user: String, account: Account, m: &impl Members) {
        let owner = self.owner(m, &user);
        if owner != m.me() {
            return self.ask(to, Kind::Written, owner, Op::Put { user, account });
        }
        let slot = self.slot_of(&user);
        let w = vec![Write::PutAccount { user, account }];
        self.propose(Whom::Here(to), Kind::Written, slot, Command::Writes(w));
    }

    /// Another node's request, served here; the answer comes as `Act::Reply { to: reply }`.
    pub fn serve(&mut self, op: Op, reply: R) {
        match op {
            Op::Load { user } => {
                let slot = self.slot_of(&user);
                self.read(Whom::There(reply), slot, Some(user));
            }
            Op::Create { user, account } => {
                let slot = self.slot_of(&user);
                self.propose(
                    Whom::There(reply),
                    Kind::Created,
                    slot,
                    Command::Create { user, account },
                );
            }
            Op::Put { user, account } => {
                let slot = self.slot_of(&user);
                let w = vec![Write::PutAccount { user, account }];
                self.propose(Whom::There(reply), Kind::Written, slot, Command::Writes(w));
            }
        }
    }

    fn ask(&mut self, to: T, kind: Kind, node: NodeId, op: Op) {
        let id = self.id();
        self.asked.insert(id, (to, kind));
        self.out.push_back(Act::Ask {
            to: node,
            id,
            op,
            timeout_ms: limits::ACCOUNT_TIMEOUT_MS,
        });
    }

    fn propose(&mut self, whom: Whom<T, R>, kind: Kind, slot: u32, cmd: Command) {
        let id = self.id();
        let p = Proposal {
            node: self.me,
            incarnation: self.cfg.incarnation,
            id,
            cmd,
        };
        let data = postcard::to_stdvec(&p).expect("postcard encoding of plain structs cannot fail");
        let deadline = self.deadline();
        self.proposals.insert(
            id,
            Pending {
                whom,
                kind,
                slot,
                deadline,
                data: Some(data),
            },
        );
        self.offer_proposal(id);
        self.drive();
    }

    /// Hands proposal `id` to its group if it has a leader (else it waits for the next tick).
    fn offer_proposal(&mut self, id: u64) {
        let Some(p) = self.proposals.get_mut(&id) else { return };
        let Some(g) = self.groups.get_mut(&p.slot) else { return };
        if !g.initialized() {
            return;
        }
        let Some(data) = p.data.take() else { return };
        if let Err(e) = g.propose(data.clone()) {
            tracing::trace!(slot = p.slot, error = %e, "raft: proposal waits for a leader");
            p.data = Some(data);
            return;
        }
        self.dirty.insert(p.slot);
    }

    fn read(&mut self, whom: Whom<T, R>, slot: u32, account: Option<String>) {
        let id = self.id();
        let deadline = self.deadline();
        self.reads.insert(
            id,
            Reading {
                whom,
                slot,
                deadline,
                account,
                index: None,
                asked: None,
            },
        );
        self.ask_read(id);
        self.drive();
    }

    fn ask_read(&mut self, id: u64) {
        let now = self.now;
        let Some(r) = self.reads.get_mut(&id) else { return };
        if r.index.is_some() {
            return;
        }
        let Some(g) = self.groups.get_mut(&r.slot) else { return };
        if !g.initialized() || g.leader() == 0 {
            return;
        }
        g.read(id.to_be_bytes().to_vec());
        r.asked = Some(now);
        self.dirty.insert(r.slot);
    }

    // ---- what the host's I/O and time brought --------------------------------------------

    /// Raft messages another node sent to this shard's slots.
    pub fn raft(&mut self, msgs: Vec<(u32, RaftMsg)>) {
        for (slot, msg) in msgs {
            if msg.to != self.me || slot >= self.cfg.slots || shard_of_slot(slot, self.cfg.shards) != self.cfg.shard {
                tracing::debug!(slot, to = msg.to, "raft: a message not for this shard; dropped");
                continue;
            }
            if !self.groups.contains_key(&slot) {
                // A leader that added this node: it starts empty, the snapshot brings the rest.
                let from_leader = [
                    raft::eraftpb::MessageType::MsgAppend as i32,
                    raft::eraftpb::MessageType::MsgHeartbeat as i32,
                    raft::eraftpb::MessageType::MsgSnapshot as i32,
                ];
                if !from_leader.contains(&msg.kind) {
                    continue;
                }
                if self.leaving {
                    // Decommissioning: a leader that has not heard yet adds no copy here.
                    tracing::debug!(slot, "raft: leaving; not joining the slot's group");
                    continue;
                }
                match Slot::joining(slot, self.me) {
                    Ok((g, w)) => {
                        tracing::info!(slot, leader = node_of(msg.from), "raft: joining the slot's group");
                        self.groups.insert(slot, g);
                        self.storage_call(Task::Quiet, Local::Log(w));
                    }
                    Err(e) => {
                        tracing::error!(slot, error = %e, "raft: cannot join the slot's group");
                        continue;
                    }
                }
            }
            let g = self.groups.get_mut(&slot).expect("inserted");
            if msg.kind == TOMBSTONE {
                // Told by a member that applied our removal (its applied index is past all
                // we have: had we been added again since, our log would hold more).
                if g.last_index() <= msg.index && !g.is_leader() {
                    tracing::info!(
                        slot,
                        by = node_of(msg.from),
                        "raft: removed from the slot's group earlier; its copy is dropped"
                    );
                    self.forget(slot, "this node was removed from the slot's group");
                }
                continue;
            }
            if msg.kind == ASK {
                if g.initialized() && !g.knows(msg.from) {
                    tracing::debug!(
                        slot,
                        from = node_of(msg.from),
                        "raft: a learner not in the group asks; telling it"
                    );
                    let t = RaftMsg::tombstone(self.me, msg.from, g.applied);
                    self.outbox.entry(node_of(t.to)).or_default().push((slot, t));
                }
                continue;
            }
            let campaign = [
                raft::eraftpb::MessageType::MsgRequestVote as i32,
                raft::eraftpb::MessageType::MsgRequestPreVote as i32,
            ];
            if campaign.contains(&msg.kind) && g.initialized() && !g.knows(msg.from) {
                // A member removed by a change it never learnt of campaigns for ever: tell it.
                // (Or one added by a change this member has not applied yet: its log is past
                // our applied index, so it ignores this; the vote request goes on to raft.)
                let applied = g.applied;
                tracing::debug!(
                    slot,
                    from = node_of(msg.from),
                    "raft: a campaign from a node not in the group; telling it"
                );
                let t = RaftMsg::tombstone(self.me, msg.from, applied);
                self.outbox.entry(node_of(t.to)).or_default().push((slot, t));
            }
            let g = self.groups.get_mut(&slot).expect("inserted");
            if let Err(e) = g.step(msg) {
                tracing::debug!(slot, error = %e, "raft: message refused");
            }
            self.dirty.insert(slot);
        }
        self.drive();
    }

    /// Every `limits::RAFT_TICK_MS`: raft's clock, expiries, retries, and (on leaders) the
    /// configuration and leadership moved toward the ring's.
    pub fn tick(&mut self, m: &impl Members) {
        self.now += 1;
        self.leaving = m.leaving(m.me());
        if self.leaving {
            // A copy still waiting for its first snapshot holds nothing and acknowledged
            // nothing: it goes (its leader, told of the leave, drops it as a stale learner).
            let empty: Vec<u32> = self
                .groups
                .iter()
                .filter(|(_, g)| !g.initialized())
                .map(|(s, _)| *s)
                .collect();
            for slot in empty {
                tracing::info!(slot, "raft: leaving; the copy waiting for a snapshot is dropped");
                self.forget(slot, "this node is leaving");
            }
        }
        let slots: Vec<u32> = self.groups.keys().copied().collect();
        for slot in &slots {
            if let Some(g) = self.groups.get_mut(slot) {
                g.tick();
            }
            self.dirty.insert(*slot);
        }
        if self.now.is_multiple_of(RECONCILE_TICKS) {
            for slot in &slots {
                self.reconcile(*slot, m);
                self.ask_if_removed(*slot, m);
            }
        }
        let now = self.now;
        let late: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(p) = self.proposals.remove(&id) {
                let e = format!("slot {}: not committed in time", p.slot);
                tracing::warn!(slot = p.slot, "raft: a proposal timed out");
                self.finish(p.whom, Self::failed(p.kind, e));
            }
        }
        let late: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(r) = self.reads.remove(&id) {
                let e = format!("slot {}: no read index in time", r.slot);
                tracing::warn!(slot = r.slot, "raft: a read timed out");
                let kind = r.kind();
                self.finish(r.whom, Self::failed(kind, e));
            }
        }
        let waiting: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.data.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.offer_proposal(id);
        }
        let again: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_none() && r.asked.is_none_or(|a| a + READ_AGAIN_TICKS <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in again {
            self.ask_read(id);
        }
        self.drive();
    }

    /// The answer to request `id` (`Act::Ask`).
    pub fn answer(&mut self, id: u64, res: Res) {
        let Some((to, kind)) = self.asked.remove(&id) else {
            return;
        };
        let outcome = match (kind, res) {
            (Kind::Account, Res::Loaded(a)) => Outcome::Account(Ok(a)),
            (Kind::Created, Res::Created(c)) => Outcome::Created(Ok(c)),
            (Kind::Written, Res::Done) => Outcome::Written(Ok(())),
            (kind, Res::Failed(e)) => Self::failed(kind, e),
            (kind, other) => Self::failed(kind, format!("unexpected answer {other:?}")),
        };
        self.finish(Whom::Here(to), outcome);
    }

    /// Request `id` had no answer in time (or could not be sent).
    pub fn timeout(&mut self, id: u64) {
        if let Some((to, kind)) = self.asked.remove(&id) {
            self.finish(
                Whom::Here(to),
                Self::failed(kind, "no answer from the key's owner".into()),
            );
        }
    }

    /// What storage call `task` returned.
    pub fn storage(&mut self, task: u64, got: Result<Got, StorageError>) {
        let Some(t) = self.tasks.remove(&task) else { return };
        match (t, got) {
            (Task::Persist { slot, number }, Ok(_)) => {
                if let Some(g) = self.groups.get_mut(&slot) {
                    let msgs = g.persisted(number);
                    self.send(slot, msgs);
                    self.dirty.insert(slot);
                }
            }
            (Task::Persist { slot, .. } | Task::Install { slot, .. }, Err(e)) => {
                // A log that cannot be written: this member stops taking part (it would
                // acknowledge what it does not have). Its peers go on without it.
                tracing::error!(slot, error = %e, "raft: the slot's log cannot be stored; leaving the group here");
                self.drop_group(slot, "its log cannot be stored here");
            }
            (Task::Quiet, r) => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "raft: a log write failed");
                }
            }
            (Task::Apply { slot, mine, foreign }, got) => {
                self.applied(slot, mine, got);
                for user in foreign {
                    self.out.push_back(Act::Stale { user });
                }
            }
            (Task::State { slot, index, term, cs }, got) => {
                self.snapshotting.remove(&slot);
                match got {
                    Ok(Got::State(writes)) => {
                        if let Some(g) = self.groups.get(&slot) {
                            let data = postcard::to_stdvec(&writes).expect("postcard encoding of writes cannot fail");
                            tracing::info!(slot, index, bytes = data.len(), "raft: snapshot made");
                            g.offer(index, term, cs, data);
                            self.out.push_back(Act::Count(Count::Snapshot));
                        }
                    }
                    other => tracing::error!(slot, answer = ?other, "raft: no snapshot of the slot's data"),
                }
            }
            (Task::Install { slot, index }, Ok(_)) => {
                if let Some(g) = self.groups.get_mut(&slot) {
                    g.applied_to(index, LOG_KEEP);
                }
                self.level(slot);
            }
            (Task::Account { read }, got) => {
                if let Some(r) = self.reads.remove(&read) {
                    let outcome = match got {
                        Ok(Got::Account(a)) => Outcome::Account(Ok(a)),
                        Ok(other) => Outcome::Account(Err(format!("unexpected {other:?}"))),
                        Err(e) => Outcome::Account(Err(e.to_string())),
                    };
                    self.finish(r.whom, outcome);
                }
            }
        }
        self.drive();
    }

    fn applied(&mut self, slot: u32, mine: Vec<(u64, Option<u64>)>, got: Result<Got, StorageError>) {
        let results: Vec<Result<(), String>> = match got {
            Ok(Got::Applied(r)) => r
                .into_iter()
                .map(|r| match r {
                    Ok(()) => Ok(()),
                    Err(StorageError::Exists(_)) => Err("exists".to_string()),
                    Err(e) => Err(e.to_string()),
                })
                .collect(),
            Ok(other) => vec![Err(format!("unexpected {other:?}")); mine.len()],
            Err(e) => vec![Err(e.to_string()); mine.len()],
        };
        let mut last = None;
        for ((index, proposal), r) in mine.into_iter().zip(results) {
            last = Some(index);
            let Some(p) = proposal.and_then(|id| self.proposals.remove(&id)) else {
                continue;
            };
            let outcome = match (p.kind, r) {
                (Kind::Created, Ok(())) => Outcome::Created(Ok(true)),
                (Kind::Created, Err(e)) if e == "exists" => Outcome::Created(Ok(false)),
                (Kind::Written, Ok(())) => Outcome::Written(Ok(())),
                (kind, Err(e)) => Self::failed(kind, e),
                (kind, Ok(())) => Self::failed(kind, "unexpected".into()),
            };
            self.finish(p.whom, outcome);
        }
        if let (Some(index), Some(g)) = (last, self.groups.get_mut(&slot)) {
            if let Some(w) = g.applied_to(index, LOG_KEEP) {
                self.storage_call(Task::Quiet, Local::Log(w));
            }
        }
        self.level(slot);
    }

    /// Reads of `slot` whose index this node has now applied.
    fn level(&mut self, slot: u32) {
        let Some(applied) = self.groups.get(&slot).map(|g| g.applied) else {
            return;
        };
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.slot == slot && r.index.is_some_and(|i| i <= applied))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let Some(r) = self.reads.get(&id) else { continue };
            match r.account.clone() {
                Some(user) => self.storage_call(Task::Account { read: id }, Local::Account(user)),
                None => {
                    let r = self.reads.remove(&id).expect("present");
                    self.finish(r.whom, Outcome::Pulled(Ok(())));
                }
            }
        }
    }

    /// This node stops taking part in `slot`'s group: what waits on it here fails (a read
    /// whose index was reached may be reading the copy about to be wiped: it fails too, and
    /// its answer from storage, when it comes, finds no read).
    fn drop_group(&mut self, slot: u32, why: &str) {
        self.groups.remove(&slot);
        self.dirty.remove(&slot);
        let e = format!("slot {slot}: {why}");
        let mine: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.slot == slot)
            .map(|(id, _)| *id)
            .collect();
        for id in mine {
            if let Some(p) = self.proposals.remove(&id) {
                self.finish(p.whom, Self::failed(p.kind, e.clone()));
            }
        }
        let mine: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.slot == slot)
            .map(|(id, _)| *id)
            .collect();
        for id in mine {
            if let Some(r) = self.reads.remove(&id) {
                let kind = r.kind();
                self.finish(r.whom, Self::failed(kind, e.clone()));
            }
        }
    }

    // ---- membership ---------------------------------------------------------------------

    /// A learner that has heard from no leader for two election timeouts, or a voter that has
    /// known none for four, asks whether it is still in the group ([`ASK`]) — the voters it
    /// knows, and the ring's members for the slot (those it knows may all have left the group
    /// since: a learner that missed its own promotion and then its removal, found in the
    /// five-node end-to-end test): a member that applied its removal answers [`TOMBSTONE`],
    /// and the copy goes. (A removed voter's campaign is answered the same way by the voters
    /// it knows that are still in the group.)
    fn ask_if_removed(&mut self, slot: u32, m: &impl Members) {
        let Some(g) = self.groups.get(&slot) else { return };
        // (The ring is asked only for a copy long unfed: this runs for every slot.)
        let wanted_here = || {
            wanted(m, slot, self.cfg.replication)
                .into_iter()
                .any(|n| m.node_id(n) == Some(m.me()))
        };
        if !g.initialized() && g.unheard() >= 2 * ELECTION_TICKS && !wanted_here() {
            // An empty copy made for a leader that then stopped feeding it (it removed this
            // node before the snapshot came), on a node the ring no longer wants in the
            // group: it holds and acknowledged nothing, and a leader that still wants it makes
            // it again with its next message. (One the ring wants waits: reads of its keys
            // wait for its snapshot.)
            tracing::info!(slot, "raft: an empty copy no leader has fed for long is dropped");
            return self.forget(slot, "an empty copy no leader fed");
        }
        // A learner never campaigns; a voter does, but only to the voters it knows, and a
        // node without the slot ignores a vote request: either asks once it has long known
        // no leader.
        let stuck = if g.is_learner() {
            g.unheard() >= 2 * ELECTION_TICKS
        } else {
            g.leaderless() >= 4 * ELECTION_TICKS as u64
        };
        if !g.initialized() || g.is_leader() || !stuck {
            return;
        }
        let mut to: BTreeSet<u64> = g.voters().into_iter().collect();
        to.extend(
            wanted(m, slot, self.cfg.replication)
                .into_iter()
                .filter_map(|n| m.node_id(n))
                .map(raft_id)
                .filter(|id| *id != self.me),
        );
        for v in to {
            let a = RaftMsg::ask(self.me, v);
            self.outbox.entry(node_of(v)).or_default().push((slot, a));
        }
    }

    /// On a leader: moves the group's configuration one step toward the ring's members for
    /// the slot, or hands leadership to the ring's owner of the slot.
    fn reconcile(&mut self, slot: u32, m: &impl Members) {
        let r = self.cfg.replication;
        let want: Vec<u64> = wanted(m, slot, r)
            .into_iter()
            .filter_map(|n| m.node_id(n))
            .map(raft_id)
            .collect();
        let me = self.me;
        let Some(g) = self.groups.get_mut(&slot) else { return };
        if want.is_empty() || !g.is_leader() || g.conf_pending() || g.transferring() {
            return;
        }
        let cs = g.conf().clone();
        let voters: BTreeSet<u64> = cs.voters.iter().copied().collect();
        let learners: BTreeSet<u64> = cs.learners.iter().copied().collect();
        // Fewer live members than `replication`: add who is missing, remove no one (a
        // member that died may come back; there is no one to replace it with).
        let target: BTreeSet<u64> = if want.len() >= r {
            want.iter().copied().collect()
        } else {
            // (A member leaving is not coming back: it goes all the same.)
            let mut t: BTreeSet<u64> = voters.iter().copied().filter(|v| !m.leaving(node_of(*v))).collect();
            for w in &want {
                if t.len() < r {
                    t.insert(*w);
                }
            }
            t
        };
        let caught_up = |g: &Slot, id: u64| g.matched(id).is_some_and(|mi| mi + 1 >= g.last_index());
        let mut changes = Vec::new();
        let single = |id: u64, t: ConfChangeType| ConfChangeSingle {
            change_type: t,
            node_id: id,
            ..Default::default()
        };
        let new: Vec<u64> = target.difference(&voters).copied().collect();
        let newcomers: Vec<u64> = new.iter().copied().filter(|n| !learners.contains(n)).collect();
        let stale_learners: Vec<u64> = learners.difference(&target).copied().collect();
        if !newcomers.is_empty() || !stale_learners.is_empty() {
            // First: the newcomers as learners (they catch up without counting in a quorum).
            changes.extend(newcomers.iter().map(|n| single(*n, ConfChangeType::AddLearnerNode)));
            changes.extend(stale_learners.iter().map(|n| single(*n, ConfChangeType::RemoveNode)));
        } else {
            let gone: Vec<u64> = voters.difference(&target).copied().collect();
            if !new.is_empty() {
                // The learners caught up become voters, and the members they replace go in the
                // same joint change — but not the leader: it hands over first (below, once
                // the newcomers vote).
                if new.iter().all(|n| caught_up(g, *n)) {
                    changes.extend(new.iter().map(|n| single(*n, ConfChangeType::AddNode)));
                    changes.extend(
                        gone.iter()
                            .filter(|n| **n != me)
                            .map(|n| single(*n, ConfChangeType::RemoveNode)),
                    );
                }
            } else if gone.contains(&me) {
                // The leader leaves last: it hands over to a member that stays.
                if let Some(to) = target.iter().copied().find(|t| voters.contains(t) && caught_up(g, *t)) {
                    tracing::info!(
                        slot,
                        to = node_of(to),
                        "raft: handing leadership over before leaving the group"
                    );
                    g.transfer_leader(to);
                    self.dirty.insert(slot);
                }
                return;
            } else {
                changes.extend(gone.iter().map(|n| single(*n, ConfChangeType::RemoveNode)));
            }
        }
        if !changes.is_empty() {
            let cc = ConfChangeV2 {
                transition: ConfChangeTransition::Auto,
                changes: changes.into(),
                ..Default::default()
            };
            tracing::info!(slot, ?target, ?voters, ?learners, "raft: changing the slot's members");
            match g.propose_conf(cc) {
                Ok(()) => self.out.push_back(Act::Count(Count::ConfChange)),
                Err(e) => tracing::debug!(slot, error = %e, "raft: configuration change not proposed"),
            }
            self.dirty.insert(slot);
            return;
        }
        // Leadership follows the ring: to the owner of the slot, once it is caught up.
        if let Some(owner) = want.first().copied() {
            if owner != me && voters.contains(&owner) && caught_up(g, owner) {
                tracing::debug!(
                    slot,
                    to = node_of(owner),
                    "raft: handing leadership to the slot's owner"
                );
                g.transfer_leader(owner);
                self.dirty.insert(slot);
            }
        }
    }

    // ---- the effect loop ---------------------------------------------------------------------

    fn send(&mut self, slot: u32, msgs: Vec<RaftMsg>) {
        for msg in msgs {
            self.outbox.entry(node_of(msg.to)).or_default().push((slot, msg));
        }
    }

    /// Readies the groups touched, then sends what they said, one frame per node.
    fn drive(&mut self) {
        while let Some(slot) = self.dirty.pop_first() {
            for _ in 0..16 {
                if !self.ready(slot) {
                    break;
                }
            }
        }
        for (to, msgs) in std::mem::take(&mut self.outbox) {
            self.out.push_back(Act::Raft { to, msgs });
        }
    }

    /// One ready of `slot`'s group; whether it had anything.
    fn ready(&mut self, slot: u32) -> bool {
        let Some(g) = self.groups.get_mut(&slot) else {
            return false;
        };
        let out = g.ready();
        let want_snapshot = g.want_snapshot();
        let (submitted, cs) = (g.submitted, g.conf().clone());
        let any = out.log.is_some()
            || !out.messages.is_empty()
            || out.install.is_some()
            || !out.apply.is_empty()
            || !out.reads.is_empty()
            || out.leader.is_some()
            || out.removed;
        if out.leader == Some(true) {
            tracing::debug!(slot, "raft: this node leads the slot");
            self.out.push_back(Act::Count(Count::LeaderHere));
        }
        self.send(slot, out.messages);
        if let Some((index, data)) = out.install {
            let writes: Vec<Write> = match postcard::from_bytes(&data) {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(slot, error = %e, "raft: unreadable snapshot; leaving the group here");
                    self.drop_group(slot, "unreadable snapshot");
                    return false;
                }
            };
            tracing::info!(slot, index, writes = writes.len(), "raft: installing a snapshot");
            self.out.push_back(Act::Count(Count::Snapshot));
            let slots = self.cfg.slots;
            self.storage_call(
                Task::Install { slot, index },
                Local::Install {
                    slot,
                    slots,
                    index,
                    writes,
                },
            );
        }
        if let Some(w) = out.log {
            self.storage_call(
                Task::Persist {
                    slot,
                    number: out.number,
                },
                Local::Log(w),
            );
        }
        if !out.apply.is_empty() {
            let mut entries = Vec::with_capacity(out.apply.len());
            let mut mine = Vec::with_capacity(out.apply.len());
            let mut foreign: Vec<String> = Vec::new();
            for (index, data) in out.apply {
                let (writes, id) = self.command(slot, index, &data);
                if id.is_none() {
                    for (user, _) in starling_storage::version_conditions(&writes) {
                        if !foreign.iter().any(|u| u == user) {
                            foreign.push(user.to_string());
                        }
                    }
                }
                entries.push((index, writes));
                mine.push((index, id));
            }
            self.storage_call(Task::Apply { slot, mine, foreign }, Local::Apply { slot, entries });
        }
        for (ctx, index) in out.reads {
            let Ok(id) = <[u8; 8]>::try_from(ctx.as_slice()).map(u64::from_be_bytes) else {
                continue;
            };
            if let Some(r) = self.reads.get_mut(&id) {
                r.index = Some(index);
            }
        }
        if out.leader.is_some() {
            // A leader known (or gone): what waited for one goes now.
            let waiting: Vec<u64> = self
                .proposals
                .iter()
                .filter(|(_, p)| p.slot == slot && p.data.is_some())
                .map(|(id, _)| *id)
                .collect();
            for id in waiting {
                self.offer_proposal(id);
            }
        }
        self.level(slot);
        if want_snapshot && self.snapshotting.insert(slot) {
            let slots = self.cfg.slots;
            self.storage_call(
                Task::State {
                    slot,
                    index: submitted.0,
                    term: submitted.1,
                    cs,
                },
                Local::State { slot, slots },
            );
        }
        if out.removed {
            tracing::info!(slot, "raft: this node left the slot's group; its copy is dropped");
            self.forget(slot, "this node left the slot's group");
        }
        any
    }

    /// This node is no member of `slot`'s group any more: its log and its copy of the slot's
    /// data go (a later member here starts from a snapshot).
    fn forget(&mut self, slot: u32, why: &str) {
        {
            self.drop_group(slot, why);
            let slots = self.cfg.slots;
            let forget = RaftWrite {
                slot,
                clear: true,
                state: Some(Vec::new()),
                ..Default::default()
            };
            self.storage_call(Task::Quiet, Local::Log(forget));
            self.storage_call(
                Task::Quiet,
                Local::Install {
                    slot,
                    slots,
                    index: 0,
                    writes: Vec::new(),
                },
            );
        }
    }

    /// An entry's writes, and this shard's proposal it answers, if it is one.
    fn command(&self, slot: u32, index: u64, data: &[u8]) -> (Vec<Write>, Option<u64>) {
        if data.is_empty() {
            return (Vec::new(), None);
        }
        let p: Proposal = match postcard::from_bytes(data) {
            Ok(p) => p,
            Err(e) => {
                // Every member skips it alike: the entry is the same everywhere.
                tracing::error!(slot, index, error = %e, "raft: unreadable entry; skipped");
                return (Vec::new(), None);
            }
        };
        let mine = (p.node == self.me && p.incarnation == self.cfg.incarnation).then_some(p.id);
        let writes = match p.cmd {
            Command::Writes(w) => w,
            Command::Create { user, account } => vec![
                Write::NoAccount { user: user.clone() },
                Write::PutAccount { user, account },
            ],
        };
        (writes, mine)
    }
}

#[cfg(test)]
mod tests;
