//! The cluster protocol as a sans-io state machine, one per shard, run by both hosts: account
//! reads and writes at the user's owner, writes replicated to the user's other replicas and
//! acknowledged on a majority of copies, read repair before an actor starts, handoffs after a
//! ring change, and the serving of other nodes' requests (with the owner check). Its rules
//! are `system::cluster`'s; this module is the plumbing around them that both hosts used to
//! write twice: request ids and timeouts, what waits for which answer, which storage call
//! comes next. The Raft issue replaces the protocol behind the same interface.
//!
//! The host calls in with work (`load_account`, `create_account`, `put_account`, `write`,
//! `pull`, `ring_changed`, `serve`) and with what its I/O brought (`answer`, `timeout`,
//! `storage`), then carries out the effects `pop` gives, in order:
//! - `Act::Ask`: send the request on the link to `to`, and call `timeout(id)` after
//!   `timeout_ms` (a request that cannot be sent is answered at once: `answer(id, Failed)`);
//! - `Act::Storage`: run the storage call on this node's store and call `storage(task, ..)`
//!   with its result (a write's once it is durable);
//! - `Act::Reply`: send the answer to a served request back where it came from;
//! - `Act::Done`: hand the outcome to whoever waits on this node (a session, an actor);
//! - `Act::Count`: count it (metrics).
//!
//! Every call takes the shard's view of the membership (`Members`) as it is now.

use std::collections::{BTreeMap, VecDeque};

use jid::BareJid;
use starling_gossip::Ring;
use starling_storage::{Account, StorageError, Write};

use super::cluster as rules;
use super::limits;
use crate::address::NodeId;

/// A request to another node's protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Load {
        user: String,
    },
    Create {
        user: String,
        account: Account,
    },
    Put {
        user: String,
        account: Account,
    },
    /// A batch of writes for a user the receiver keeps a copy of (from its owner).
    Replicate {
        writes: Vec<Write>,
    },
    /// A user's whole state, for the receiver to keep if newer than its copy.
    Handoff {
        user: String,
        version: u64,
        writes: Vec<Write>,
    },
    /// The receiver's whole copy of a user (read repair).
    Pull {
        user: String,
    },
}

/// The answer to an `Op`.
#[derive(Clone, Debug, PartialEq)]
pub enum Res {
    Loaded(Option<Account>),
    Created(bool),
    Snapshot { version: u64, writes: Vec<Write> },
    Done,
    Failed(String),
}

/// A call on this node's storage.
#[derive(Clone, Debug, PartialEq)]
pub enum Local {
    /// → `Got::Account`
    Account(String),
    /// → `Got::Version` (`Storage::copy_version`)
    Version(String),
    /// → `Got::Snapshot` (`Storage::snapshot`)
    Snapshot(String),
    /// → `Got::Users`
    Users,
    /// Create if absent, durable → `Got::Created`
    Create { user: String, account: Account },
    /// Apply (all or none, with conditions) and make durable → `Got::Stored`
    Write(Vec<Write>),
}

/// What a storage call returned.
#[derive(Debug)]
pub enum Got {
    Account(Option<Account>),
    Version { exists: bool, version: u64 },
    Snapshot(Option<(u64, Vec<Write>)>),
    Users(Vec<String>),
    Created(bool),
    Stored,
}

/// What the host is told when work it asked for ends.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Account(Result<Option<Account>, String>),
    Created(Result<bool, String>),
    /// A write (`write`, `put_account`), durable on enough copies or not.
    Written(Result<(), String>),
    /// A read repair: the actor may start, or not (too few copies answered).
    Pulled(Result<(), String>),
}

/// What the host counts.
#[derive(Debug, PartialEq, Eq)]
pub enum Count {
    /// A write or create refused or failed for want of copies.
    ReplicationFailure,
    /// A handoff to a new replica.
    Handoff,
    /// A read repair replaced this node's copy.
    Repair,
    /// A replica brought level by a read repair.
    LevelPush,
    /// A replica refused a replicated batch.
    ReplicaRefused,
}

/// An effect for the host.
#[derive(Debug)]
pub enum Act<T, R> {
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
    Count(Count),
}

/// The shard's view of the membership, as the protocol needs it.
pub trait Members {
    /// This node's name on the ring; empty when it is not configured as a cluster member.
    fn name(&self) -> &str;
    fn me(&self) -> NodeId;
    fn ring(&self) -> &Ring;
    /// No other member is up.
    fn alone(&self) -> bool;
    fn node_id(&self, name: &str) -> Option<NodeId>;
}

/// Who waits for a task: the host on this node, or another node's request.
enum Whom<T, R> {
    Here(T),
    There(R),
}

enum Task<T, R> {
    /// The account from this node's storage (asked here or by another node).
    LoadHere(Whom<T, R>),
    /// Waiting for the owner's answer to a request made for `Here`.
    Remote(T, Kind),
    Create {
        whom: Whom<T, R>,
        user: String,
        account: Account,
        step: CreateStep,
    },
    Write {
        whom: Whom<T, R>,
        user: String,
        writes: Vec<Write>,
        step: WriteStep,
    },
    /// Another node's replicated batch, stored here.
    StoreReplica(R),
    /// Another node's pull: this node's copy.
    Snapshot(R),
    /// A whole copy offered (a handoff, the newest copy of a read repair): kept if newer.
    Take(Take<R>),
    Pull {
        whom: T,
        user: String,
        left: usize,
        repair: rules::Repair<Vec<Write>>,
        step: PullStep,
    },
    /// After a ring change: the users stored here, then each handed to its new replicas.
    Handoff {
        old: Ring,
        new: Ring,
        jobs: VecDeque<(String, NodeId)>,
        running: usize,
        failed: usize,
    },
    /// One user of a handoff: its snapshot, then the request.
    HandOne { parent: u64, user: String, to: NodeId },
}

/// What a request to the owner is for: the outcome it ends with.
#[derive(Clone, Copy)]
enum Kind {
    Account,
    Created,
    Written,
}

struct Take<R> {
    whom: TakeFor<R>,
    user: String,
    version: u64,
    writes: Vec<Write>,
    tries: usize,
    /// The version read here, once read (the replacement is conditional on it).
    have: Option<u64>,
}

enum TakeFor<R> {
    There(R),
    /// The repair of a pull (task id).
    Pull(u64),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CreateStep {
    Creating,
    /// Created here: its first version, on base 0.
    Versioning,
    Replicating {
        left: usize,
        ok: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteStep {
    Replicating {
        left: usize,
        ok: usize,
    },
    /// The replicas have it (or there are none): this node's copy.
    Storing,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PullStep {
    Asking,
    /// The newest copy is being taken here.
    Taking,
    /// This node's copy, read to level the replicas behind.
    Reading,
    Leveling,
}

/// The protocol's state on one shard.
pub struct Replication<T, R> {
    replication: usize,
    next: u64,
    tasks: BTreeMap<u64, Task<T, R>>,
    /// Requests in flight: the task each answer goes to, and who was asked.
    asked: BTreeMap<u64, (u64, NodeId)>,
    out: VecDeque<Act<T, R>>,
    failures: Vec<String>,
}

impl<T, R> Replication<T, R> {
    /// `replication`: `cluster.replication`, the copies each user's state has.
    pub fn new(replication: usize) -> Self {
        Replication {
            replication: replication.max(1),
            next: 1,
            tasks: BTreeMap::new(),
            asked: BTreeMap::new(),
            out: VecDeque::new(),
            failures: Vec::new(),
        }
    }

    /// The next effect to carry out.
    pub fn pop(&mut self) -> Option<Act<T, R>> {
        self.out.pop_front()
    }

    /// Tasks in progress (the host's gauge; the simulator checks it drains).
    pub fn in_progress(&self) -> usize {
        self.tasks.len()
    }

    /// Drops every task (the shard is gone), giving back who was waiting here.
    pub fn crash(&mut self) -> Vec<T> {
        self.asked.clear();
        self.out.clear();
        let mut waiting = Vec::new();
        for (_, t) in std::mem::take(&mut self.tasks) {
            match t {
                Task::LoadHere(Whom::Here(w))
                | Task::Create {
                    whom: Whom::Here(w), ..
                }
                | Task::Write {
                    whom: Whom::Here(w), ..
                }
                | Task::Remote(w, _)
                | Task::Pull { whom: w, .. } => waiting.push(w),
                _ => {}
            }
        }
        waiting
    }

    fn id(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn task(&mut self, t: Task<T, R>) -> u64 {
        let id = self.id();
        self.tasks.insert(id, t);
        id
    }

    fn storage_call(&mut self, task: u64, op: Local) {
        self.out.push_back(Act::Storage { task, op });
    }

    fn ask(&mut self, task: u64, to: NodeId, op: Op) {
        let id = self.id();
        self.asked.insert(id, (task, to));
        self.out.push_back(Act::Ask {
            to,
            id,
            op,
            timeout_ms: limits::ACCOUNT_TIMEOUT_MS,
        });
    }

    fn finish(&mut self, whom: Whom<T, R>, outcome: Outcome) {
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

    // ---- the view -------------------------------------------------------------------

    fn in_cluster(m: &impl Members) -> bool {
        !m.name().is_empty()
    }

    /// The node that owns `user` (its actor and its account) as this shard sees it.
    pub fn owner(m: &impl Members, user: &str) -> Option<NodeId> {
        let bare: BareJid = user.parse().ok()?;
        let key = bare.as_str().as_bytes();
        Some(rules::place(m.ring(), m.me(), m.alone(), 1, key, |n| m.node_id(n)).0)
    }

    fn remote_owner(m: &impl Members, user: &str) -> Option<NodeId> {
        Self::owner(m, user).filter(|o| *o != m.me())
    }

    /// The other nodes that keep copies of `user`'s state.
    pub fn others(&self, m: &impl Members, user: &str) -> Vec<NodeId> {
        rules::other_replicas(m.ring(), m.name(), m.alone(), user, self.replication)
            .into_iter()
            .filter_map(|n| m.node_id(n))
            .collect()
    }

    /// `Err` when this node and the replicas it can reach are fewer than a write needs.
    fn reachable(&mut self, others: usize) -> Result<(), String> {
        let need = rules::copies_needed(self.replication);
        if others + 1 >= need {
            return Ok(());
        }
        self.out.push_back(Act::Count(Count::ReplicationFailure));
        Err(format!(
            "{} of the {need} copies needed are reachable (cluster.replication = {})",
            others + 1,
            self.replication
        ))
    }

    // ---- work from this node ----------------------------------------------------------

    /// `user`'s account, from wherever it lives → `Outcome::Account`.
    pub fn load_account(&mut self, to: T, user: String, m: &impl Members) {
        if let Some(node) = Self::remote_owner(m, &user) {
            let task = self.task(Task::Remote(to, Kind::Account));
            return self.ask(task, node, Op::Load { user });
        }
        let task = self.task(Task::LoadHere(Whom::Here(to)));
        self.storage_call(task, Local::Account(user));
    }

    /// Creates `user`'s account if absent, at its owner and on its replicas →
    /// `Outcome::Created`.
    pub fn create_account(&mut self, to: T, user: String, account: Account, m: &impl Members) {
        if let Some(node) = Self::remote_owner(m, &user) {
            let task = self.task(Task::Remote(to, Kind::Created));
            return self.ask(task, node, Op::Create { user, account });
        }
        self.create_here(Whom::Here(to), user, account, m);
    }

    /// Replaces `user`'s account (a password change), at its owner and replicas →
    /// `Outcome::Written`.
    pub fn put_account(&mut self, to: T, user: String, account: Account, m: &impl Members) {
        if let Some(node) = Self::remote_owner(m, &user) {
            let task = self.task(Task::Remote(to, Kind::Written));
            return self.ask(task, node, Op::Put { user, account });
        }
        let w = vec![Write::PutAccount {
            user: user.clone(),
            account,
        }];
        self.write_here(Whom::Here(to), user, w, None, m);
    }

    /// Writes `user`'s batch on its replicas, then here → `Outcome::Written`, `Ok` once it is
    /// durable on a majority of `replication` copies, this node's included (it serves the
    /// reads): what a client is told is durable survives the loss of any one node. The
    /// replicas go first so that a batch that failed never raises this copy's version above
    /// theirs (the simulator found acknowledged writes lost to such a copy after a heal).
    ///
    /// `base` is the version the writer's state was loaded at plus its batches since (a
    /// user actor's); every copy applies the batch only at that version
    /// (`Write::NextVersion`), and a replica only from the node it sees as the user's owner
    /// (`serve`). So two actors of one user on two nodes with different views (a join or
    /// heal in progress) cannot both write, and a copy that missed a batch refuses the next
    /// instead of applying it on another base; the write fails, the actor ends, and its next
    /// incarnation's read repair (`pull`) brings every copy level. `None` for writes outside
    /// a user actor's history (a password change).
    pub fn write(&mut self, to: T, user: String, writes: Vec<Write>, base: Option<u64>, m: &impl Members) {
        self.write_here(Whom::Here(to), user, writes, base, m);
    }

    fn write_here(
        &mut self,
        whom: Whom<T, R>,
        user: String,
        mut writes: Vec<Write>,
        base: Option<u64>,
        m: &impl Members,
    ) {
        if let Some(base) = base {
            writes.push(Write::NextVersion {
                user: user.clone(),
                base,
            });
        }
        if !Self::in_cluster(m) {
            // A single node: no copy. The version still counts the batches: offline
            // sequence numbers are never reused (`UserActor::new`).
            let task = self.task(Task::Write {
                whom,
                user,
                writes: Vec::new(),
                step: WriteStep::Storing,
            });
            return self.storage_call(task, Local::Write(writes));
        }
        let others = self.others(m, &user);
        if let Err(e) = self.reachable(others.len()) {
            return self.finish(whom, Outcome::Written(Err(e)));
        }
        let step = WriteStep::Replicating {
            left: others.len(),
            ok: 0,
        };
        let task = self.task(Task::Write {
            whom,
            user,
            writes: writes.clone(),
            step,
        });
        for o in others {
            self.ask(task, o, Op::Replicate { writes: writes.clone() });
        }
        self.write_step(task);
    }

    fn create_here(&mut self, whom: Whom<T, R>, user: String, account: Account, m: &impl Members) {
        if Self::in_cluster(m) {
            // Refused before anything is written when too few copies can be reached: an
            // account is acknowledged like every other write, on a majority of copies.
            let others = self.others(m, &user).len();
            if let Err(e) = self.reachable(others) {
                return self.finish(whom, Outcome::Created(Err(e)));
            }
        }
        let op = Local::Create {
            user: user.clone(),
            account: account.clone(),
        };
        let task = self.task(Task::Create {
            whom,
            user,
            account,
            step: CreateStep::Creating,
        });
        // Here the local copy goes first: "create if absent" is decided by this node.
        self.storage_call(task, op);
    }

    /// Read repair before the owner starts `user`'s actor → `Outcome::Pulled`: the other
    /// replicas send their copies, and the newest replaces this node's if it is newer (as a
    /// handoff would). So a node that owns a user after a join, a heal or a death serves the
    /// latest acknowledged state even before its handoff arrives. Then the replicas found
    /// older get the newest copy, so that the actor's first write finds them at its base.
    ///
    /// A read needs as many copies as a write (`copies_needed`, this node's included): a
    /// node cut off from the others must not serve its own, possibly stale, copy (found by
    /// the simulator: a roster read on the minority side of a partition lacked items the
    /// client had been told were stored). `Err` then, and the actor does not start.
    pub fn pull(&mut self, to: T, user: String, m: &impl Members) {
        if !Self::in_cluster(m) {
            return self.finish(Whom::Here(to), Outcome::Pulled(Ok(())));
        }
        let others = self.others(m, &user);
        let need = rules::copies_needed(self.replication);
        if others.len() + 1 < need {
            let e = format!("{} copies of {user} reachable, {need} needed", others.len() + 1);
            return self.finish(Whom::Here(to), Outcome::Pulled(Err(e)));
        }
        if others.is_empty() {
            return self.finish(Whom::Here(to), Outcome::Pulled(Ok(())));
        }
        let task = self.task(Task::Pull {
            whom: to,
            user: user.clone(),
            left: others.len(),
            repair: rules::Repair::default(),
            step: PullStep::Asking,
        });
        for o in others {
            self.ask(task, o, Op::Pull { user: user.clone() });
        }
    }

    /// After a membership change (on one shard per node: the stored users are the node's):
    /// every user stored here whose replica set gained a node is sent to that node, whole, by
    /// the first of its previous replicas still up; the receiver keeps the newer copy.
    pub fn ring_changed(&mut self, old: Ring, new: Ring) {
        if old == new || old.is_empty() {
            return;
        }
        let task = self.task(Task::Handoff {
            old,
            new,
            jobs: VecDeque::new(),
            running: 0,
            failed: 0,
        });
        self.storage_call(task, Local::Users);
    }

    // ---- requests from other nodes ------------------------------------------------------

    /// Serves another node's request (`from`, as its link's hello named it) against this
    /// node's storage; the answer comes as `Act::Reply { to: reply }`.
    pub fn serve(&mut self, op: Op, from: Option<NodeId>, reply: R, m: &impl Members) {
        match op {
            Op::Load { user } => {
                let task = self.task(Task::LoadHere(Whom::There(reply)));
                self.storage_call(task, Local::Account(user));
            }
            Op::Create { user, account } => self.create_here(Whom::There(reply), user, account, m),
            Op::Put { user, account } => {
                let w = vec![Write::PutAccount {
                    user: user.clone(),
                    account,
                }];
                self.write_here(Whom::There(reply), user, w, None, m);
            }
            Op::Pull { user } => {
                let task = self.task(Task::Snapshot(reply));
                self.storage_call(task, Local::Snapshot(user));
            }
            Op::Handoff { user, version, writes } => {
                if writes.iter().any(|w| w.user() != user) {
                    let res = Res::Failed("handoff writes for another user".into());
                    return self.out.push_back(Act::Reply { to: reply, res });
                }
                self.take(TakeFor::There(reply), user, version, writes);
            }
            Op::Replicate { writes } => {
                let Some(user) = writes.first().map(|w| w.user().to_string()) else {
                    return self.out.push_back(Act::Reply {
                        to: reply,
                        res: Res::Done,
                    });
                };
                if writes.iter().any(|x| x.user() != user) {
                    let res = Res::Failed("a replicated batch for several users".into());
                    return self.out.push_back(Act::Reply { to: reply, res });
                }
                // Only the owner this node sees writes: during a join or a heal two nodes
                // may each think they own the user; neither gets this copy until the views
                // agree (found by the simulator: two actors of one user, each acknowledged
                // by the other's copy, overfilled the offline queue).
                let owner = Self::owner(m, &user);
                if from.is_none() || owner != from {
                    tracing::debug!(
                        user,
                        ?from,
                        ?owner,
                        "cluster: replicated batch from a node not the owner here"
                    );
                    let res = Res::Failed("not the owner here".into());
                    return self.out.push_back(Act::Reply { to: reply, res });
                }
                let task = self.task(Task::StoreReplica(reply));
                self.storage_call(task, Local::Write(writes));
            }
        }
    }

    fn take(&mut self, whom: TakeFor<R>, user: String, version: u64, writes: Vec<Write>) {
        let task = self.task(Task::Take(Take {
            whom,
            user: user.clone(),
            version,
            writes,
            tries: 0,
            have: None,
        }));
        self.storage_call(task, Local::Version(user));
    }

    // ---- what the host's I/O brought -------------------------------------------------

    /// The answer to request `id` (`Act::Ask`).
    pub fn answer(&mut self, id: u64, res: Res) {
        let Some((task, from)) = self.asked.remove(&id) else {
            return; // timed out before, or the task is gone
        };
        self.answered(task, from, res);
    }

    /// Request `id` had no answer in time (or could not be sent).
    pub fn timeout(&mut self, id: u64) {
        let Some((task, from)) = self.asked.remove(&id) else {
            return;
        };
        self.answered(task, from, Res::Failed(format!("no answer from node {from}")));
    }

    fn answered(&mut self, id: u64, from: NodeId, res: Res) {
        let Some(task) = self.tasks.get_mut(&id) else { return };
        match task {
            Task::Remote(..) => {
                let Some(Task::Remote(to, kind)) = self.tasks.remove(&id) else {
                    unreachable!()
                };
                let outcome = match (kind, res) {
                    (Kind::Account, Res::Loaded(a)) => Outcome::Account(Ok(a)),
                    (Kind::Created, Res::Created(c)) => Outcome::Created(Ok(c)),
                    (Kind::Written, Res::Done) => Outcome::Written(Ok(())),
                    (kind, res) => {
                        let e = match res {
                            Res::Failed(e) => e,
                            other => format!("unexpected answer {other:?}"),
                        };
                        match kind {
                            Kind::Account => Outcome::Account(Err(e)),
                            Kind::Created => Outcome::Created(Err(e)),
                            Kind::Written => Outcome::Written(Err(e)),
                        }
                    }
                };
                self.out.push_back(Act::Done { to, outcome });
            }
            Task::Write {
                step: WriteStep::Replicating { left, ok },
                ..
            }
            | Task::Create {
                step: CreateStep::Replicating { left, ok },
                ..
            } => {
                *left -= 1;
                if res == Res::Done {
                    *ok += 1;
                } else {
                    self.out.push_back(Act::Count(Count::ReplicaRefused));
                    self.failures.push(format!("{from}: {res:?}"));
                }
                self.write_step(id);
            }
            Task::Pull {
                left,
                repair,
                step,
                user,
                ..
            } => {
                *left -= 1;
                if *step == PullStep::Asking {
                    match res {
                        Res::Snapshot { version, writes } => repair.copy(from, version, writes),
                        Res::Done => repair.none_there(from),
                        other => tracing::warn!(user, answer = ?other, "cluster: read repair without a replica's copy"),
                    }
                } else if res != Res::Done {
                    tracing::warn!(user, node = from, answer = ?res, "cluster: a replica was not brought level");
                }
                if *left == 0 {
                    self.pull_step(id);
                }
            }
            Task::HandOne { parent, user, to } => {
                let (parent, ok) = (*parent, res == Res::Done);
                if !ok {
                    tracing::warn!(user, node = *to, answer = ?res, "cluster: handoff failed");
                }
                self.tasks.remove(&id);
                self.handoff_done(parent, !ok);
            }
            _ => {}
        }
    }

    /// What storage call `task` (`Act::Storage`) returned.
    pub fn storage(&mut self, task: u64, got: Result<Got, StorageError>, m: &impl Members) {
        let Some(t) = self.tasks.remove(&task) else { return };
        match (t, got) {
            (Task::LoadHere(whom), got) => {
                let outcome = match got {
                    Ok(Got::Account(a)) => Ok(a),
                    Ok(other) => Err(format!("unexpected {other:?}")),
                    Err(e) => Err(e.to_string()),
                };
                self.finish(whom, Outcome::Account(outcome));
            }
            (Task::StoreReplica(to), got) => {
                let res = match got {
                    Ok(_) => Res::Done,
                    Err(e) => Res::Failed(e.to_string()),
                };
                self.out.push_back(Act::Reply { to, res });
            }
            (Task::Snapshot(to), got) => {
                let res = match got {
                    Ok(Got::Snapshot(Some((version, writes)))) => Res::Snapshot { version, writes },
                    Ok(_) => Res::Done,
                    Err(e) => Res::Failed(e.to_string()),
                };
                self.out.push_back(Act::Reply { to, res });
            }
            (
                Task::Create {
                    whom,
                    user,
                    account,
                    step,
                },
                got,
            ) => self.create_stored(task, whom, user, account, step, got, m),
            (Task::Write { whom, user, .. }, got) => {
                let outcome = got.map(|_| ()).map_err(|e| e.to_string());
                if let Err(e) = &outcome {
                    tracing::debug!(user, error = %e, "cluster: this node's copy refused the write");
                }
                self.finish(whom, Outcome::Written(outcome));
            }
            (Task::Take(t), got) => self.take_step(task, t, got),
            (t @ Task::Pull { .. }, got) => {
                self.tasks.insert(task, t);
                match got {
                    Ok(Got::Snapshot(Some((version, writes)))) => self.level(task, version, writes),
                    _ => self.pulled(task, Ok(())),
                }
            }
            (Task::Handoff { old, new, .. }, Ok(Got::Users(users))) => {
                let (me, r) = (m.name().to_string(), self.replication);
                let mut jobs = VecDeque::new();
                for user in users {
                    for n in rules::handoff_targets(&old, &new, &me, &user, r) {
                        if let Some(id) = m.node_id(n) {
                            jobs.push_back((user.clone(), id));
                        }
                    }
                }
                if jobs.is_empty() {
                    return;
                }
                tracing::info!(users = jobs.len(), "cluster: handing users to their new replicas");
                self.tasks.insert(
                    task,
                    Task::Handoff {
                        old,
                        new,
                        jobs,
                        running: 0,
                        failed: 0,
                    },
                );
                for _ in 0..limits::HANDOFF_PARALLEL {
                    self.handoff_start(task);
                }
            }
            (Task::Handoff { .. }, got) => {
                tracing::error!(answer = ?got, "cluster: handoff cannot list accounts");
            }
            (Task::HandOne { parent, user, to }, got) => match got {
                Ok(Got::Snapshot(Some((version, writes)))) => {
                    self.out.push_back(Act::Count(Count::Handoff));
                    let op = Op::Handoff {
                        user: user.clone(),
                        version,
                        writes,
                    };
                    self.tasks.insert(task, Task::HandOne { parent, user, to });
                    self.ask(task, to, op);
                }
                other => {
                    tracing::warn!(user, answer = ?other, "cluster: no snapshot to hand off");
                    self.handoff_done(parent, true);
                }
            },
            (t @ Task::Remote(..), _) => {
                self.tasks.insert(task, t);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_stored(
        &mut self,
        task: u64,
        whom: Whom<T, R>,
        user: String,
        account: Account,
        step: CreateStep,
        got: Result<Got, StorageError>,
        m: &impl Members,
    ) {
        match (step, got) {
            (_, Err(e)) => self.finish(whom, Outcome::Created(Err(e.to_string()))),
            (CreateStep::Creating, Ok(Got::Created(true))) if Self::in_cluster(m) => {
                // A new account's history starts here: its first batch, on base 0 everywhere.
                let first = Write::NextVersion {
                    user: user.clone(),
                    base: 0,
                };
                self.tasks.insert(
                    task,
                    Task::Create {
                        whom,
                        user,
                        account,
                        step: CreateStep::Versioning,
                    },
                );
                self.storage_call(task, Local::Write(vec![first]));
            }
            (CreateStep::Creating, Ok(Got::Created(c))) => self.finish(whom, Outcome::Created(Ok(c))),
            (CreateStep::Versioning, Ok(_)) => {
                let others = self.others(m, &user);
                if let Err(e) = self.reachable(others.len()) {
                    return self.finish(whom, Outcome::Created(Err(e)));
                }
                let batch = vec![
                    Write::PutAccount {
                        user: user.clone(),
                        account: account.clone(),
                    },
                    Write::NextVersion {
                        user: user.clone(),
                        base: 0,
                    },
                ];
                let left = others.len();
                self.tasks.insert(
                    task,
                    Task::Create {
                        whom,
                        user,
                        account,
                        step: CreateStep::Replicating { left, ok: 0 },
                    },
                );
                for o in others {
                    self.ask(task, o, Op::Replicate { writes: batch.clone() });
                }
                self.write_step(task);
            }
            (_, Ok(other)) => self.finish(whom, Outcome::Created(Err(format!("unexpected {other:?}")))),
        }
    }

    /// A replicated write (or a new account's first batch) once every replica answered.
    fn write_step(&mut self, id: u64) {
        let Some(task) = self.tasks.get_mut(&id) else { return };
        let (left, ok, user) = match task {
            Task::Write {
                step: WriteStep::Replicating { left, ok },
                user,
                ..
            }
            | Task::Create {
                step: CreateStep::Replicating { left, ok },
                user,
                ..
            } => (*left, *ok, user.clone()),
            _ => return,
        };
        if left > 0 {
            return;
        }
        let why = std::mem::take(&mut self.failures);
        if rules::durable(true, ok, self.replication) {
            match task {
                Task::Write { step, writes, .. } => {
                    // The replicas have it: now this node's copy.
                    *step = WriteStep::Storing;
                    let writes = std::mem::take(writes);
                    return self.storage_call(id, Local::Write(writes));
                }
                _ => {
                    let Some(Task::Create { whom, .. }) = self.tasks.remove(&id) else {
                        unreachable!()
                    };
                    return self.finish(whom, Outcome::Created(Ok(true)));
                }
            }
        }
        let need = rules::copies_needed(self.replication);
        self.out.push_back(Act::Count(Count::ReplicationFailure));
        tracing::warn!(
            user,
            copies = 1 + ok,
            need,
            ?why,
            "cluster: write not replicated to a majority"
        );
        let e = format!("durable on {} of the copies, {need} needed", 1 + ok);
        match self.tasks.remove(&id) {
            Some(Task::Write { whom, .. }) => self.finish(whom, Outcome::Written(Err(e))),
            Some(Task::Create { whom, .. }) => self.finish(whom, Outcome::Created(Err(e))),
            _ => {}
        }
    }

    /// A whole copy offered replaces the one here only if that one is older (fewer write
    /// batches) or absent, so a node back from the dead never has its stale copy win, nor
    /// does a late handoff undo newer writes. The replacement is conditional on the version
    /// read (`Write::NextVersion` as a condition): a replicated batch that lands between the
    /// read and the write makes it fail, and the comparison is made again — unconditional, it
    /// overwrote that batch with the versions tied.
    fn take_step(&mut self, task: u64, t: Take<R>, got: Result<Got, StorageError>) {
        let have = t.have;
        let done = |s: &mut Self, whom: TakeFor<R>, res: Res| match whom {
            TakeFor::There(to) => s.out.push_back(Act::Reply { to, res }),
            TakeFor::Pull(pull) => {
                if let Res::Failed(e) = &res {
                    tracing::warn!(error = %e, "cluster: read repair failed");
                } else if have.is_some() {
                    s.out.push_back(Act::Count(Count::Repair));
                }
                s.after_take(pull);
            }
        };
        match (have, got) {
            (None, Ok(Got::Version { exists, version: v })) => {
                if !rules::replaces(exists.then_some(v), t.version) {
                    tracing::debug!(
                        user = t.user,
                        here = v,
                        offered = t.version,
                        "cluster: copy offered not newer; kept ours"
                    );
                    return done(self, t.whom, Res::Done);
                }
                let all = rules::replacement(&t.user, v, t.writes.iter().cloned(), t.version);
                self.tasks.insert(task, Task::Take(Take { have: Some(v), ..t }));
                self.storage_call(task, Local::Write(all));
            }
            (Some(_), Ok(_)) => done(self, t.whom, Res::Done),
            (Some(_), Err(StorageError::Conflict { .. })) if t.tries + 1 < limits::HANDOFF_TRIES => {
                let user = t.user.clone();
                let tries = t.tries + 1;
                self.tasks.insert(task, Task::Take(Take { tries, have: None, ..t }));
                self.storage_call(task, Local::Version(user));
            }
            (Some(_), Err(StorageError::Conflict { .. })) => {
                let e = format!("{}: the copy here kept changing during the handoff", t.user);
                done(self, t.whom, Res::Failed(e))
            }
            (_, Err(e)) => done(self, t.whom, Res::Failed(e.to_string())),
            (None, Ok(other)) => done(self, t.whom, Res::Failed(format!("unexpected {other:?}"))),
        }
    }

    /// Every replica answered a pull.
    fn pull_step(&mut self, id: u64) {
        let Some(Task::Pull { step, repair, user, .. }) = self.tasks.get_mut(&id) else {
            return;
        };
        match *step {
            PullStep::Asking => {
                if !repair.enough(self.replication) {
                    let e = format!(
                        "{} copies of {user} answered, {} needed",
                        repair.seen.len() + 1,
                        rules::copies_needed(self.replication)
                    );
                    return self.pulled(id, Err(e));
                }
                match repair.best.take() {
                    Some((version, writes)) => {
                        *step = PullStep::Taking;
                        let user = user.clone();
                        self.take(TakeFor::Pull(id), user, version, writes);
                    }
                    None => self.after_take(id),
                }
            }
            PullStep::Leveling => self.pulled(id, Ok(())),
            PullStep::Taking | PullStep::Reading => {}
        }
    }

    /// The newest copy is here (or the repair failed, logged): this node's copy is read to
    /// level the replicas behind it.
    fn after_take(&mut self, id: u64) {
        let Some(Task::Pull { step, user, .. }) = self.tasks.get_mut(&id) else {
            return;
        };
        *step = PullStep::Reading;
        let user = user.clone();
        self.storage_call(id, Local::Snapshot(user));
    }

    /// The replicas found older get the newest copy before the actor's first write, which
    /// they would refuse on its base.
    fn level(&mut self, id: u64, version: u64, writes: Vec<Write>) {
        let Some(Task::Pull {
            step,
            repair,
            left,
            user,
            ..
        }) = self.tasks.get_mut(&id)
        else {
            return;
        };
        let behind = repair.behind(version);
        if behind.is_empty() {
            return self.pulled(id, Ok(()));
        }
        *step = PullStep::Leveling;
        *left = behind.len();
        let user = user.clone();
        for to in behind {
            self.out.push_back(Act::Count(Count::LevelPush));
            let op = Op::Handoff {
                user: user.clone(),
                version,
                writes: writes.clone(),
            };
            self.ask(id, to, op);
        }
    }

    fn pulled(&mut self, id: u64, r: Result<(), String>) {
        if let Some(Task::Pull { whom, .. }) = self.tasks.remove(&id) {
            self.out.push_back(Act::Done {
                to: whom,
                outcome: Outcome::Pulled(r),
            });
        }
    }

    /// Starts the next user of a handoff, if any is left.
    fn handoff_start(&mut self, parent: u64) {
        let Some(Task::Handoff { jobs, running, .. }) = self.tasks.get_mut(&parent) else {
            return;
        };
        let Some((user, to)) = jobs.pop_front() else { return };
        *running += 1;
        let t = self.task(Task::HandOne {
            parent,
            user: user.clone(),
            to,
        });
        self.storage_call(t, Local::Snapshot(user));
    }

    /// One user of a handoff ended (`failed` or not): the next starts, or the handoff ends.
    fn handoff_done(&mut self, parent: u64, failed: bool) {
        let Some(Task::Handoff {
            jobs,
            running,
            failed: f,
            ..
        }) = self.tasks.get_mut(&parent)
        else {
            return;
        };
        *running -= 1;
        *f += usize::from(failed);
        if !jobs.is_empty() {
            return self.handoff_start(parent);
        }
        if *running == 0 {
            let f = *f;
            self.tasks.remove(&parent);
            if f > 0 {
                tracing::warn!(failed = f, "cluster: some handoffs failed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
