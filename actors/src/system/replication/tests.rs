//! The protocol against real in-memory stores, with a tiny synchronous network: every
//! effect is carried out at once, in order, unless a test holds it back.

use std::collections::VecDeque;

use starling_storage::{MemoryStorage, Storage};

use super::*;

/// Who waits: a number the test picks.
type P = Replication<u32, (NodeId, u64)>;

struct View {
    name: String,
    me: NodeId,
    ring: Ring,
    alone: bool,
}

impl Members for View {
    fn name(&self) -> &str {
        &self.name
    }
    fn me(&self) -> NodeId {
        self.me
    }
    fn ring(&self) -> &Ring {
        &self.ring
    }
    fn alone(&self) -> bool {
        self.alone
    }
    fn node_id(&self, name: &str) -> Option<NodeId> {
        name.strip_prefix('n')?.parse().ok()
    }
}

struct Node {
    p: P,
    st: MemoryStorage,
    view: View,
}

enum Msg {
    Req { from: NodeId, to: NodeId, id: u64, op: Op },
    Resp { to: NodeId, id: u64, res: Res },
}

struct Net {
    nodes: Vec<Node>,
    /// Nodes that cannot be reached: a request to one fails at once (as an unsendable one).
    cut: Vec<NodeId>,
    msgs: VecDeque<Msg>,
    done: Vec<(NodeId, u32, Outcome)>,
    /// Storage calls held back instead of carried out (`hold`), with their node.
    held: Vec<(NodeId, u64, Local)>,
    hold: bool,
}

fn account(pw: &str) -> Account {
    crate::scram::new_account(pw, [1; 16], [2; 16], 16)
}

impl Net {
    fn new(n: u32, replication: usize) -> Net {
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let nodes = (0..n)
            .map(|i| Node {
                p: Replication::new(replication),
                st: MemoryStorage::new(),
                view: View {
                    name: names[i as usize].clone(),
                    me: i,
                    ring: Ring::new(names.clone()),
                    alone: n == 1,
                },
            })
            .collect();
        Net {
            nodes,
            cut: Vec::new(),
            msgs: VecDeque::new(),
            done: Vec::new(),
            held: Vec::new(),
            hold: false,
        }
    }

    /// A user whose owner is `owner` (with replication 2, its other copy is the next node).
    fn user_owned_by(&self, owner: NodeId) -> String {
        (0..)
            .map(|i| format!("u{i}@x"))
            .find(|u| P::owner(&self.nodes[0].view, u) == Some(owner))
            .unwrap()
    }

    fn call(&mut self, n: NodeId, f: impl FnOnce(&mut P, &View)) {
        let node = &mut self.nodes[n as usize];
        f(&mut node.p, &node.view);
        self.run(n);
    }

    /// Carries out node `n`'s effects, then delivers messages until none is left.
    fn run(&mut self, n: NodeId) {
        self.effects(n);
        while let Some(m) = self.msgs.pop_front() {
            match m {
                Msg::Req { from, to, id, op } => {
                    let node = &mut self.nodes[to as usize];
                    node.p.serve(op, Some(from), (from, id), &node.view);
                    self.effects(to);
                }
                Msg::Resp { to, id, res } => {
                    self.nodes[to as usize].p.answer(id, res);
                    self.effects(to);
                }
            }
        }
    }

    fn effects(&mut self, n: NodeId) {
        while let Some(act) = self.nodes[n as usize].p.pop() {
            match act {
                Act::Ask { to, id, op, timeout_ms } => {
                    assert_eq!(timeout_ms, limits::ACCOUNT_TIMEOUT_MS);
                    if self.cut.contains(&to) || self.cut.contains(&n) {
                        self.nodes[n as usize].p.answer(id, Res::Failed("unreachable".into()));
                    } else {
                        self.msgs.push_back(Msg::Req { from: n, to, id, op });
                    }
                }
                Act::Reply { to: (to, id), res } => self.msgs.push_back(Msg::Resp { to, id, res }),
                Act::Storage { task, op } if self.hold => self.held.push((n, task, op)),
                Act::Storage { task, op } => {
                    let got = self.storage(n, op);
                    let node = &mut self.nodes[n as usize];
                    node.p.storage(task, got, &node.view);
                }
                Act::Done { to, outcome } => self.done.push((n, to, outcome)),
                Act::Count(_) => {}
            }
        }
    }

    fn storage(&mut self, n: NodeId, op: Local) -> Result<Got, StorageError> {
        let st = &mut self.nodes[n as usize].st;
        match op {
            Local::Account(u) => st.account(&u).map(Got::Account),
            Local::Version(u) => st
                .copy_version(&u)
                .map(|(exists, version)| Got::Version { exists, version }),
            Local::Snapshot(u) => st.snapshot(&u).map(Got::Snapshot),
            Local::Users => st.list_accounts().map(Got::Users),
            Local::Create { user, account } => {
                let c = st.create_account(&user, &account)?;
                st.flush()?;
                Ok(Got::Created(c))
            }
            Local::Write(w) => {
                st.apply(&w)?;
                st.flush()?;
                Ok(Got::Stored)
            }
        }
    }

    /// The node other than `owner` that holds `user`'s account (replication 2).
    fn replica_of(&self, user: &str, owner: NodeId) -> NodeId {
        (0..self.nodes.len() as NodeId)
            .filter(|n| *n != owner)
            .find(|n| self.nodes[*n as usize].st.account(user).unwrap().is_some())
            .expect("a replica")
    }

    fn version(&self, n: NodeId, user: &str) -> u64 {
        self.nodes[n as usize].st.load_user(user).unwrap().version
    }

    fn offline(&self, n: NodeId, user: &str) -> usize {
        self.nodes[n as usize].st.load_user(user).unwrap().offline.len()
    }

    fn outcome(&mut self, waiter: u32) -> Outcome {
        let i = self.done.iter().position(|(_, w, _)| *w == waiter).expect("an outcome");
        self.done.remove(i).2
    }
}

fn push(user: &str, seq: u64) -> Write {
    Write::PushOffline {
        user: user.to_string(),
        msg: starling_storage::OfflineMessage {
            seq,
            stamp_unix_ms: 0,
            xml: format!("<message id='m{seq}'/>"),
        },
    }
}

/// Creates `user` at its owner (through node 0): on both copies, at version 1.
fn created(net: &mut Net, user: &str) {
    let u = user.to_string();
    net.call(0, |p, v| p.create_account(900, u, account("pw"), v));
    assert_eq!(net.outcome(900), Outcome::Created(Ok(true)));
}

#[test]
fn a_single_node_writes_here_without_copies() {
    let mut net = Net::new(1, 2);
    net.nodes[0].view.name = String::new(); // not a cluster member
    net.call(0, |p, v| p.create_account(1, "a@x".into(), account("pw"), v));
    assert_eq!(net.outcome(1), Outcome::Created(Ok(true)));
    net.call(0, |p, v| p.write(2, "a@x".into(), vec![push("a@x", 1)], Some(0), v));
    assert_eq!(net.outcome(2), Outcome::Written(Ok(())));
    assert_eq!((net.version(0, "a@x"), net.offline(0, "a@x")), (1, 1));
    net.call(0, |p, v| p.pull(3, "a@x".into(), v));
    assert_eq!(net.outcome(3), Outcome::Pulled(Ok(())));
}

#[test]
fn an_account_and_a_write_are_on_both_copies_when_acknowledged() {
    let mut net = Net::new(3, 2);
    let user = net.user_owned_by(1);
    created(&mut net, &user);
    let holders: Vec<NodeId> = (0..3)
        .filter(|n| net.nodes[*n as usize].st.account(&user).unwrap().is_some())
        .collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
    assert!(holders.contains(&1));
    // The owner's actor writes on version 1.
    net.call(1, |p, v| p.write(7, user.clone(), vec![push(&user, 1)], Some(1), v));
    assert_eq!(net.outcome(7), Outcome::Written(Ok(())));
    for n in &holders {
        assert_eq!((net.version(*n, &user), net.offline(*n, &user)), (2, 1), "node {n}");
    }
    // A load from a node that is not a copy asks the owner.
    let other = (0..3).find(|n| !holders.contains(n)).unwrap();
    net.call(other, |p, v| p.load_account(8, user.clone(), v));
    assert_eq!(net.outcome(8), Outcome::Account(Ok(Some(account("pw")))));
}

#[test]
fn a_write_without_its_replica_fails_and_leaves_this_copy_alone() {
    let mut net = Net::new(3, 2);
    let user = net.user_owned_by(0);
    created(&mut net, &user);
    let replica = net.replica_of(&user, 0);
    net.cut = vec![replica];
    net.call(0, |p, v| p.write(1, user.clone(), vec![push(&user, 1)], Some(1), v));
    assert!(matches!(net.outcome(1), Outcome::Written(Err(_))));
    // The replicas go first: the failed batch never raised this copy above theirs.
    assert_eq!((net.version(0, &user), net.offline(0, &user)), (1, 0));
    // Alone in the cluster, nothing is acknowledged and nothing is asked.
    net.nodes[0].view.alone = true;
    net.call(0, |p, v| p.write(2, user.clone(), vec![push(&user, 1)], Some(1), v));
    assert!(matches!(net.outcome(2), Outcome::Written(Err(_))));
    net.call(0, |p, v| p.pull(3, user.clone(), v));
    assert!(
        matches!(net.outcome(3), Outcome::Pulled(Err(_))),
        "a read needs as many copies"
    );
}

#[test]
fn a_replica_takes_batches_only_from_the_owner_it_sees() {
    let mut net = Net::new(3, 2);
    let user = net.user_owned_by(0);
    created(&mut net, &user);
    let replica = net.replica_of(&user, 0);
    let stranger = 3 - replica;
    // The stranger believes it owns the user (its view lags): the replica refuses it.
    let r = &mut net.nodes[replica as usize];
    r.p.serve(
        Op::Replicate {
            writes: vec![push(&user, 1)],
        },
        Some(stranger),
        (stranger, 1),
        &r.view,
    );
    let res = std::iter::from_fn(|| r.p.pop()).find_map(|a| match a {
        Act::Reply { res, .. } => Some(res),
        _ => None,
    });
    assert_eq!(res, Some(Res::Failed("not the owner here".into())));
    assert_eq!(net.offline(replica, &user), 0);
}

#[test]
fn a_request_without_an_answer_times_out() {
    let mut net = Net::new(2, 2);
    let user = net.user_owned_by(1);
    let n0 = &mut net.nodes[0];
    n0.p.load_account(5, user, &n0.view);
    let id = match net.nodes[0].p.pop() {
        Some(Act::Ask { id, .. }) => id,
        other => panic!("{other:?}"),
    };
    net.nodes[0].p.timeout(id);
    net.nodes[0].p.answer(id, Res::Loaded(None)); // late: ignored
    net.effects(0);
    assert!(matches!(net.outcome(5), Outcome::Account(Err(e)) if e.contains("no answer")));
    assert!(net.done.is_empty());
    assert_eq!(net.nodes[0].p.in_progress(), 0);
}

/// The race the node's handoff had: it read the version, waited, then replaced the copy
/// unconditionally — a replicated batch landing in between was overwritten with the
/// versions tied. The replacement is now conditional on the version read; a batch in
/// between makes it fail, and the comparison is made again.
#[test]
fn a_batch_landing_during_a_handoff_is_not_overwritten() {
    let mut net = Net::new(2, 2);
    let user = net.user_owned_by(0);
    created(&mut net, &user); // both nodes at version 1
                              // Node 1 is offered an older whole copy (version 1 elsewhere is not newer) — nothing
                              // changes — and then a newer one, at version 2, while a batch lands.
    let offered = vec![
        Write::PutAccount {
            user: user.clone(),
            account: account("pw"),
        },
        push(&user, 1),
    ];
    net.hold = true;
    let n1 = &mut net.nodes[1];
    n1.p.serve(
        Op::Handoff {
            user: user.clone(),
            version: 2,
            writes: offered.clone(),
        },
        Some(0),
        (0, 77),
        &n1.view,
    );
    net.effects(1);
    let (_, task, op) = net.held.pop().unwrap();
    assert_eq!(op, Local::Version(user.clone()));
    let got = net.storage(1, op); // reads version 1
                                  // Between the read and the write: the owner's batch on version 1 lands here (now 2,
                                  // holding message 5).
    net.nodes[1]
        .st
        .apply(&[
            push(&user, 5),
            Write::NextVersion {
                user: user.clone(),
                base: 1,
            },
        ])
        .unwrap();
    let n1 = &mut net.nodes[1];
    n1.p.storage(task, got, &n1.view);
    net.effects(1);
    let (_, task, op) = net.held.pop().unwrap();
    assert!(matches!(&op, Local::Write(w) if matches!(w[0], Write::NextVersion { base: 1, .. })));
    let got = net.storage(1, op);
    assert!(matches!(got, Err(StorageError::Conflict { .. })), "{got:?}");
    let n1 = &mut net.nodes[1];
    n1.p.storage(task, got, &n1.view);
    net.effects(1);
    // It compares again: version 2 here is not older than the offer, so ours is kept.
    let (_, task, op) = net.held.pop().unwrap();
    assert_eq!(op, Local::Version(user.clone()));
    let got = net.storage(1, op);
    let n1 = &mut net.nodes[1];
    n1.p.storage(task, got, &n1.view);
    net.hold = false;
    net.effects(1);
    assert!(net.held.is_empty());
    assert!(matches!(
        net.msgs.pop_front(),
        Some(Msg::Resp {
            id: 77,
            res: Res::Done,
            ..
        })
    ));
    let data = net.nodes[1].st.load_user(&user).unwrap();
    assert_eq!(data.version, 2);
    assert_eq!(
        data.offline.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5],
        "the batch survived"
    );
}

#[test]
fn a_read_repair_takes_the_newest_copy_and_levels_the_replica() {
    let mut net = Net::new(3, 3);
    let user = net.user_owned_by(0);
    created(&mut net, &user); // version 1 on all three
                              // Node 2 has a newer copy (it served the user while 0 was away); node 1 is behind.
    net.nodes[2]
        .st
        .apply(&[
            push(&user, 1),
            Write::NextVersion {
                user: user.clone(),
                base: 1,
            },
        ])
        .unwrap();
    net.call(0, |p, v| p.pull(4, user.clone(), v));
    assert_eq!(net.outcome(4), Outcome::Pulled(Ok(())));
    for n in 0..3 {
        assert_eq!((net.version(n, &user), net.offline(n, &user)), (2, 1), "node {n}");
    }
}

#[test]
fn after_a_join_each_user_is_handed_to_its_new_replica_once() {
    let mut net = Net::new(3, 2);
    // Users created while only n0 and n1 were members.
    let two = Ring::new(["n0".to_string(), "n1".to_string()]);
    let three = net.nodes[0].view.ring.clone();
    for n in 0..3 {
        net.nodes[n].view.ring = two.clone();
    }
    net.cut = vec![2];
    let users: Vec<String> = (0..20).map(|i| format!("h{i}@x")).collect();
    for (i, u) in users.iter().enumerate() {
        let u2 = u.clone();
        net.call(0, |p, v| p.create_account(i as u32, u2, account("pw"), v));
    }
    assert!(net.done.drain(..).all(|(_, _, o)| o == Outcome::Created(Ok(true))));
    net.cut.clear();
    for n in 0..3 {
        net.nodes[n].view.ring = three.clone();
    }
    for n in 0..2 {
        net.call(n, |p, _| p.ring_changed(two.clone(), three.clone()));
    }
    for u in &users {
        let should = three.replicas(u.as_bytes(), 2).contains(&"n2");
        let has = net.nodes[2].st.account(u).unwrap().is_some();
        assert_eq!(has, should, "{u}");
    }
    assert!(users.iter().any(|u| net.nodes[2].st.account(u).unwrap().is_some()));
    assert_eq!((net.nodes[0].p.in_progress(), net.nodes[1].p.in_progress()), (0, 0));
}
