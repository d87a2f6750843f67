//! Nodes of one shard each on a deterministic in-memory network, each with the simulator's
//! store (it loses what was not flushed when the node crashes): a single node, a cluster
//! grown from its first node, writes acknowledged through crashes and a partition, reads on
//! a minority side refused, and the same run twice.

use std::collections::{BTreeMap, VecDeque};

use starling_gossip::Ring;
use starling_storage::{MemoryStorage, ScramCreds, Storage};

use super::*;

const SLOTS: u32 = 8;

struct View {
    name: String,
    me: NodeId,
    ring: Ring,
    leaving: Vec<NodeId>,
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
        self.ring.members().len() <= 1 && self.leaving.is_empty()
    }
    fn node_id(&self, name: &str) -> Option<NodeId> {
        name.strip_prefix('n')?.parse().ok()
    }
    fn leaving(&self, node: NodeId) -> bool {
        self.leaving.contains(&node)
    }
}

type Node = Consensus<u64, (NodeId, u64)>;

struct Host {
    c: Node,
    store: MemoryStorage,
    view: View,
    /// Log writes answered at the next flush.
    unflushed: Vec<u64>,
    up: bool,
    incarnation: u64,
}

enum Wire {
    Raft(Vec<(u32, RaftMsg)>),
    Ask { from: NodeId, id: u64, op: Op },
    Reply { id: u64, res: Res },
}

struct Net {
    hosts: Vec<Host>,
    /// (from, to, what), delivered in order.
    queue: VecDeque<(NodeId, NodeId, Wire)>,
    /// Pairs that cannot talk.
    cut: Vec<(NodeId, NodeId)>,
    outcomes: BTreeMap<u64, Outcome>,
    /// `Act::Stale` as each node said it.
    stale: Vec<(NodeId, String)>,
    next: u64,
}

fn cfg(incarnation: u64) -> Cfg {
    Cfg {
        slots: SLOTS,
        shards: 1,
        shard: 0,
        replication: 3,
        incarnation,
    }
}

fn account(n: u8) -> Account {
    let c = ScramCreds {
        salt: vec![n],
        iterations: 1,
        stored_key: vec![n],
        server_key: vec![n],
    };
    Account {
        sha1: c.clone(),
        sha256: c,
    }
}

fn roster_ver(user: &str, ver: u64) -> Write {
    Write::SetRosterVer { user: user.into(), ver }
}

impl Net {
    /// `n` nodes; node 0 bootstraps the cluster, the others start empty; each sees `members`.
    fn new(n: u32, single: bool) -> Net {
        let hosts = (0..n)
            .map(|i| {
                let mut c = Node::new(cfg(1), i);
                if i == 0 {
                    c.bootstrap();
                }
                Host {
                    c,
                    store: MemoryStorage::new(),
                    view: View {
                        name: if single { String::new() } else { format!("n{i}") },
                        me: i,
                        ring: Ring::new(vec![format!("n{i}")]),
                        leaving: Vec::new(),
                    },
                    unflushed: Vec::new(),
                    up: true,
                    incarnation: 1,
                }
            })
            .collect();
        let mut net = Net {
            hosts,
            queue: VecDeque::new(),
            cut: Vec::new(),
            outcomes: BTreeMap::new(),
            stale: Vec::new(),
            next: 1,
        };
        net.run();
        net
    }

    /// Every node up sees these members.
    fn members(&mut self, names: &[u32]) {
        let ring = Ring::new(names.iter().map(|n| format!("n{n}")));
        for h in &mut self.hosts {
            if h.up {
                h.view.ring = ring.clone();
            }
        }
    }

    /// Every node up sees `i` leaving: off the ring, still up.
    fn leave(&mut self, i: NodeId) {
        let name = format!("n{i}");
        for h in &mut self.hosts {
            if h.up {
                h.view.ring = Ring::new(h.view.ring.members().iter().filter(|n| **n != name).cloned());
                h.view.leaving.push(i);
            }
        }
    }

    fn can(&self, a: NodeId, b: NodeId) -> bool {
        self.hosts[a as usize].up
            && self.hosts[b as usize].up
            && !self.cut.contains(&(a, b))
            && !self.cut.contains(&(b, a))
    }

    /// Carries out node `i`'s effects.
    fn effects(&mut self, i: NodeId) {
        while let Some(act) = self.hosts[i as usize].c.pop() {
            match act {
                Act::Raft { to, msgs } => self.queue.push_back((i, to, Wire::Raft(msgs))),
                Act::Ask { to, id, op, .. } => self.queue.push_back((i, to, Wire::Ask { from: i, id, op })),
                Act::Reply { to: (node, id), res } => self.queue.push_back((i, node, Wire::Reply { id, res })),
                Act::Done { to, outcome } => {
                    self.outcomes.insert(to, outcome);
                }
                Act::Count(_) => {}
                Act::Stale { user } => self.stale.push((i, user)),
                Act::Storage { task, op } => self.storage(i, task, op),
            }
        }
    }

    fn storage(&mut self, i: NodeId, task: u64, op: Local) {
        let h = &mut self.hosts[i as usize];
        let got = match op {
            Local::Account(u) => h.store.account(&u).map(Got::Account),
            Local::Log(w) => match h.store.raft_write(&w) {
                Ok(()) => {
                    h.unflushed.push(task);
                    return;
                }
                Err(e) => Err(e),
            },
            Local::Apply { slot, entries } => Ok(Got::Applied(
                entries
                    .iter()
                    .map(|(index, w)| h.store.apply_committed(slot, *index, w))
                    .collect(),
            )),
            Local::State { slot, slots } => h.store.slot_state(&|u| in_slot(u, slot, slots)).map(Got::State),
            Local::Install {
                slot,
                slots,
                index,
                writes,
            } => h
                .store
                .install_slot(slot, index, &|u| in_slot(u, slot, slots), &writes)
                .map(|()| Got::Stored),
        };
        h.c.storage(task, got);
    }

    /// Flushes node `i`'s store and answers the log writes it made durable.
    fn flush(&mut self, i: NodeId) {
        let h = &mut self.hosts[i as usize];
        if h.unflushed.is_empty() {
            return;
        }
        h.store.flush().unwrap();
        for task in std::mem::take(&mut h.unflushed) {
            h.c.storage(task, Ok(Got::Stored));
        }
    }

    /// Delivers and flushes until nothing moves.
    fn run(&mut self) {
        for _ in 0..10_000 {
            for i in 0..self.hosts.len() as NodeId {
                if self.hosts[i as usize].up {
                    self.effects(i);
                }
            }
            if self.queue.is_empty() {
                let mut any = false;
                for i in 0..self.hosts.len() as NodeId {
                    if self.hosts[i as usize].up && !self.hosts[i as usize].unflushed.is_empty() {
                        self.flush(i);
                        any = true;
                    }
                }
                if !any {
                    return;
                }
                continue;
            }
            while let Some((from, to, w)) = self.queue.pop_front() {
                if !self.can(from, to) {
                    continue;
                }
                let h = &mut self.hosts[to as usize];
                match w {
                    Wire::Raft(msgs) => h.c.raft(msgs),
                    Wire::Ask { from, id, op } => h.c.serve(op, (from, id)),
                    Wire::Reply { id, res } => h.c.answer(id, res),
                }
            }
        }
        panic!("the network never went quiet");
    }

    fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            for h in &mut self.hosts {
                if h.up {
                    h.c.tick(&h.view);
                }
            }
            self.run();
        }
    }

    fn waiter(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Where `user`'s actor lives as node `via` sees it.
    fn owner(&self, via: NodeId, user: &str) -> NodeId {
        let h = &self.hosts[via as usize];
        place_slot(&h.view, rules::slot_of(user.as_bytes(), SLOTS), 1).0
    }

    /// Runs `f` on node `i` with a new waiter, then the network until `f`'s outcome is in (or
    /// `ticks` pass).
    fn call(&mut self, i: NodeId, ticks: usize, f: impl FnOnce(&mut Node, u64, &View)) -> Option<Outcome> {
        let w = self.waiter();
        let h = &mut self.hosts[i as usize];
        f(&mut h.c, w, &h.view);
        self.run();
        for _ in 0..ticks {
            if self.outcomes.contains_key(&w) {
                break;
            }
            self.ticks(1);
        }
        self.outcomes.remove(&w)
    }

    /// A write of `user`'s roster version at its owner (as node `via` sees it), on the base
    /// its stored version is.
    fn write(&mut self, via: NodeId, user: &str, ver: u64) -> Option<Outcome> {
        let owner = self.owner(via, user);
        let base = self.hosts[owner as usize].store.load_user(user).unwrap().version;
        let u = user.to_string();
        self.call(owner, 200, |c, w, _| {
            c.write(w, u.clone(), vec![roster_ver(&u, ver)], Some(base))
        })
    }

    /// The roster version of `user` read at its owner after a read index.
    fn read(&mut self, via: NodeId, user: &str) -> Result<u64, String> {
        let owner = self.owner(via, user);
        let u = user.to_string();
        match self.call(owner, 200, |c, w, _| c.pull(w, u)) {
            Some(Outcome::Pulled(Ok(()))) => Ok(self.hosts[owner as usize].store.load_user(user).unwrap().roster_ver),
            Some(Outcome::Pulled(Err(e))) => Err(e),
            other => Err(format!("{other:?}")),
        }
    }

    fn crash(&mut self, i: NodeId) {
        let h = &mut self.hosts[i as usize];
        h.up = false;
        h.store.crash();
        h.unflushed.clear();
    }

    fn restart(&mut self, i: NodeId) {
        let h = &mut self.hosts[i as usize];
        h.up = true;
        h.incarnation += 1;
        h.c = Node::new(cfg(h.incarnation), i);
        for slot in h.store.raft_slots().unwrap() {
            let stored = h.store.raft_stored(slot).unwrap().unwrap();
            h.c.restore(slot, &stored).unwrap();
        }
        self.run();
    }

    /// Whether node `i` holds a copy with data in which it is a learner.
    fn learner_with_data(&self, i: NodeId) -> bool {
        self.hosts[i as usize]
            .c
            .groups
            .values()
            .any(|g| g.initialized() && g.is_learner())
    }

    /// Ticks, one at a time, until node `i` is a learner with data somewhere.
    fn until_learner_with_data(&mut self, i: NodeId) {
        let mut ticks = 0;
        while !self.learner_with_data(i) {
            self.ticks(1);
            ticks += 1;
            assert!(ticks < 200, "node {i} never became a learner with data");
        }
    }

    fn voters(&self, i: NodeId) -> Vec<Vec<u64>> {
        self.hosts[i as usize]
            .c
            .groups
            .values()
            .map(|g| {
                let mut v = g.conf().voters.clone();
                v.sort_unstable();
                v
            })
            .collect()
    }
}

fn users() -> Vec<String> {
    (0..16).map(|i| format!("u{i}@x")).collect()
}

#[test]
fn a_single_node_is_a_cluster_of_one() {
    let mut net = Net::new(1, true);
    assert_eq!(net.hosts[0].c.groups.len(), SLOTS as usize);
    let created = net.call(0, 10, |c, w, v| c.create_account(w, "a@x".into(), account(1), v));
    assert_eq!(created, Some(Outcome::Created(Ok(true))));
    let again = net.call(0, 10, |c, w, v| c.create_account(w, "a@x".into(), account(2), v));
    assert_eq!(again, Some(Outcome::Created(Ok(false))), "created once");
    let loaded = net.call(0, 10, |c, w, v| c.load_account(w, "a@x".into(), v));
    assert_eq!(loaded, Some(Outcome::Account(Ok(Some(account(1))))));
    assert_eq!(net.write(0, "a@x", 7), Some(Outcome::Written(Ok(()))));
    // A batch on a stale base is refused where it is applied.
    let stale = net.call(0, 10, |c, w, _| {
        c.write(w, "a@x".into(), vec![roster_ver("a@x", 9)], Some(0))
    });
    assert!(matches!(stale, Some(Outcome::Written(Err(_)))), "{stale:?}");
    assert_eq!(net.read(0, "a@x"), Ok(7));
    // A crash loses nothing acknowledged; the node goes on from its log.
    net.crash(0);
    net.restart(0);
    assert_eq!(net.read(0, "a@x"), Ok(7));
    assert_eq!(net.write(0, "a@x", 8), Some(Outcome::Written(Ok(()))));
    assert_eq!(net.read(0, "a@x"), Ok(8));
}

#[test]
fn a_cluster_grows_from_its_first_node_and_keeps_what_it_acknowledged() {
    let mut net = Net::new(3, false);
    for (i, u) in users().iter().enumerate() {
        // A snapshot carries the users with an account (nothing is stored for the others).
        let created = net.call(0, 10, |c, w, v| c.create_account(w, u.clone(), account(1), v));
        assert_eq!(created, Some(Outcome::Created(Ok(true))));
        assert_eq!(net.write(0, u, i as u64 + 1), Some(Outcome::Written(Ok(()))), "{u}");
    }
    // Two nodes join: every slot gets the three as members, from snapshots.
    net.members(&[0, 1, 2]);
    net.ticks(200);
    for i in 0..3 {
        assert_eq!(net.voters(i), vec![vec![1, 2, 3]; SLOTS as usize], "node {i}");
    }
    for (i, u) in users().iter().enumerate() {
        assert_eq!(net.read(1, u), Ok(i as u64 + 1), "{u} at its owner");
    }
    // Leadership followed the ring: each slot is led by its owner.
    for h in &net.hosts {
        for (slot, leader, _, _, _) in h.c.status() {
            let owner = place_slot(&h.view, slot, 1).0;
            assert_eq!(leader, Some(owner), "slot {slot} on node {}", h.view.me);
        }
    }
    // A node dies: the other two still have a majority of every group.
    net.crash(2);
    net.members(&[0, 1]);
    net.ticks(100);
    for (i, u) in users().iter().enumerate() {
        assert_eq!(net.write(0, u, 100 + i as u64), Some(Outcome::Written(Ok(()))), "{u}");
    }
    // A second one dies: no group has a majority; nothing is acknowledged, nothing is read.
    net.crash(1);
    net.members(&[0]);
    let u = &users()[0];
    assert!(matches!(net.write(0, u, 999), Some(Outcome::Written(Err(_)))));
    assert!(net.read(0, u).is_err(), "no read index without a majority");
    // Both come back: every acknowledged write is there.
    net.restart(1);
    net.restart(2);
    net.members(&[0, 1, 2]);
    net.ticks(100);
    for (i, u) in users().iter().enumerate() {
        let got = net.read(0, u).unwrap();
        assert!(got == 100 + i as u64 || got == 999, "{u}: {got}");
    }
}

/// `cluster leave` at three nodes with replication 3: every group replaces the leaver (two
/// members remain: it goes all the same), it hosts nothing, and what it acknowledged is
/// served by the other two once it is gone.
#[test]
fn a_leaving_node_hands_its_slots_over_even_below_the_replication() {
    let mut net = Net::new(3, false);
    net.members(&[0, 1, 2]);
    net.ticks(200);
    for (i, u) in users().iter().enumerate() {
        let created = net.call(2, 10, |c, w, v| c.create_account(w, u.clone(), account(1), v));
        assert_eq!(created, Some(Outcome::Created(Ok(true))));
        assert_eq!(net.write(2, u, i as u64 + 1), Some(Outcome::Written(Ok(()))), "{u}");
    }
    net.leave(2);
    net.ticks(200);
    assert!(
        net.hosts[2].c.groups.is_empty(),
        "the leaver still hosts {:?}",
        net.hosts[2].c.slots()
    );
    for i in 0..2 {
        assert_eq!(net.voters(i), vec![vec![1, 2]; SLOTS as usize], "node {i}");
    }
    // It stops; the other two serve everything it acknowledged, and take writes.
    net.crash(2);
    net.members(&[0, 1]);
    net.hosts[0].view.leaving.clear();
    net.hosts[1].view.leaving.clear();
    net.ticks(50);
    for (i, u) in users().iter().enumerate() {
        assert_eq!(net.read(0, u), Ok(i as u64 + 1), "{u} without the leaver");
        assert_eq!(net.write(0, u, 50 + i as u64), Some(Outcome::Written(Ok(()))), "{u}");
    }
}

/// A node that joins is cut off while still a learner of some slots, and leaves: the leaders
/// remove it without hearing from it. A learner never campaigns, so it is not told by the
/// answer to a campaign; after the heal it asks (`ASK`), is told (`TOMBSTONE`), and drops
/// every copy — the leave can end.
#[test]
fn a_learner_removed_while_cut_off_learns_it_after_the_heal() {
    let mut net = Net::new(3, false);
    net.members(&[0, 1]);
    net.ticks(100);
    for (i, u) in users().iter().enumerate() {
        assert_eq!(net.write(0, u, i as u64 + 1), Some(Outcome::Written(Ok(()))), "{u}");
    }
    net.members(&[0, 1, 2]);
    let learner = |net: &Net| net.learner_with_data(2);
    net.until_learner_with_data(2);
    net.cut = vec![(2, 0), (2, 1)];
    net.leave(2);
    net.ticks(200);
    for i in 0..2 {
        assert_eq!(net.voters(i), vec![vec![1, 2]; SLOTS as usize], "node {i}");
    }
    assert!(learner(&net), "cut off, node 2 still holds its learner copies");
    net.cut.clear();
    net.ticks(100);
    assert!(
        net.hosts[2].c.groups.is_empty(),
        "after the heal node 2 still hosts {:?}",
        net.hosts[2].c.slots()
    );
    for (i, u) in users().iter().enumerate() {
        assert_eq!(net.read(0, u), Ok(i as u64 + 1), "{u}");
    }
}

/// The same, when every voter the learner knows has left the group meanwhile (it was added
/// while the first node was the only voter, missed its promotion, and the groups then moved
/// to other nodes altogether): it asks the ring's members for the slot too, and is told.
#[test]
fn a_learner_whose_voters_all_left_learns_its_removal_from_the_ring() {
    let mut net = Net::new(5, false);
    net.members(&[0]);
    net.ticks(50);
    net.members(&[0, 1, 2, 3]);
    let learner = |net: &Net| net.learner_with_data(3);
    net.until_learner_with_data(3);
    net.cut = (0..5).filter(|n| *n != 3).flat_map(|n| [(3, n), (n, 3)]).collect();
    net.members(&[1, 2, 4]);
    net.ticks(400);
    assert!(
        net.hosts[0].c.groups.is_empty(),
        "node 0 left every group: {:?}",
        net.hosts[0].c.slots()
    );
    assert!(learner(&net), "cut off, node 3 still holds its learner copies");
    net.cut.clear();
    net.ticks(200);
    let left: Vec<String> = net.hosts[3]
        .c
        .groups
        .iter()
        .map(|(slot, g)| {
            let others: Vec<String> = (0..5)
                .filter_map(|n| {
                    let o = net.hosts[n].c.groups.get(slot)?;
                    Some(format!(
                        "n{n}: conf {:?} applied {} leader {}",
                        o.conf(),
                        o.applied,
                        o.is_leader()
                    ))
                })
                .collect();
            format!(
                "slot {slot}: learner {} conf {:?} last {} unheard {} | {others:?}",
                g.is_learner(),
                g.conf(),
                g.last_index(),
                g.unheard()
            )
        })
        .collect();
    assert!(left.is_empty(), "after the heal node 3 still hosts {left:#?}");
}

/// A voter cut off, then removed with every other voter it knows (the groups moved to three
/// other nodes altogether): its campaigns reach only nodes without the slot, which ignore
/// them; once it has long known no leader it asks the ring's members, and is told.
#[test]
fn a_voter_whose_voters_all_left_learns_its_removal_from_the_ring() {
    let mut net = Net::new(6, false);
    net.members(&[0, 1, 3]);
    net.ticks(200);
    assert_eq!(net.voters(3), vec![vec![1, 2, 4]; SLOTS as usize]);
    net.cut = (0..6).filter(|n| *n != 3).flat_map(|n| [(3, n), (n, 3)]).collect();
    net.members(&[2, 4, 5]);
    net.ticks(400);
    for i in [0, 1] {
        assert!(net.hosts[i].c.groups.is_empty(), "node {i} left every group");
    }
    assert_eq!(
        net.hosts[3].c.groups.len(),
        SLOTS as usize,
        "cut off, node 3 keeps its copies"
    );
    net.cut.clear();
    net.ticks(300);
    assert!(
        net.hosts[3].c.groups.is_empty(),
        "after the heal node 3 still hosts {:?}",
        net.hosts[3].c.slots()
    );
}

#[test]
fn a_minority_side_serves_nothing_stale() {
    let mut net = Net::new(3, false);
    net.members(&[0, 1, 2]);
    net.ticks(200);
    let u = "p@x";
    assert_eq!(net.write(0, u, 1), Some(Outcome::Written(Ok(()))));
    // The owner is cut off from both others, which see it gone.
    let owner = net.owner(0, u);
    let others: Vec<u32> = (0..3).filter(|n| *n != owner).collect();
    for o in &others {
        net.cut.push((owner, *o));
    }
    let ring = Ring::new(others.iter().map(|n| format!("n{n}")));
    for o in &others {
        net.hosts[*o as usize].view.ring = ring.clone();
    }
    net.ticks(100);
    let new_owner = net.owner(others[0], u);
    assert_ne!(new_owner, owner);
    assert_eq!(net.write(new_owner, u, 2), Some(Outcome::Written(Ok(()))));
    // The old owner, on its own, still thinks it owns the key: it gets no read index and
    // commits nothing.
    let stale = net.call(owner, 200, |c, w, _| c.pull(w, u.into()));
    assert!(matches!(stale, Some(Outcome::Pulled(Err(_)))), "{stale:?}");
    // Healed, it serves the majority's write.
    net.cut.clear();
    net.members(&[0, 1, 2]);
    net.ticks(100);
    assert_eq!(net.read(0, u), Ok(2));
    assert_eq!(net.hosts[owner as usize].store.load_user(u).unwrap().roster_ver, 2);
}

#[test]
fn the_same_run_twice_is_the_same() {
    let run = || {
        let mut net = Net::new(3, false);
        net.members(&[0, 1, 2]);
        net.ticks(150);
        for u in users().iter().take(4) {
            net.write(0, u, 5);
        }
        net.crash(1);
        net.members(&[0, 2]);
        net.ticks(60);
        net.restart(1);
        net.members(&[0, 1, 2]);
        net.ticks(60);
        net.hosts
            .iter()
            .map(|h| (h.c.status(), h.store.raft_slots().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn a_write_another_node_made_tells_this_one_its_actor_is_stale() {
    let mut net = Net::new(3, false);
    net.members(&[0, 1, 2]);
    net.ticks(200);
    let u = "s@x";
    let owner = net.owner(0, u);
    assert_eq!(net.write(0, u, 1), Some(Outcome::Written(Ok(()))));
    assert!(
        net.stale.iter().all(|(n, _)| *n != owner),
        "its own write is not stale: {:?}",
        net.stale
    );
    // Another member writes the same user's history (an actor there, with another view).
    let other = (0..3).find(|n| *n != owner).unwrap();
    let written = net.call(other, 200, |c, w, _| {
        c.write(w, u.into(), vec![roster_ver(u, 2)], Some(1))
    });
    assert_eq!(written, Some(Outcome::Written(Ok(()))));
    assert!(net.stale.contains(&(owner, u.to_string())), "{:?}", net.stale);
    // And the owner's next write on its old base is refused where it is applied.
    let late = net.call(owner, 200, |c, w, _| {
        c.write(w, u.into(), vec![roster_ver(u, 3)], Some(1))
    });
    assert!(matches!(late, Some(Outcome::Written(Err(_)))), "{late:?}");
}
