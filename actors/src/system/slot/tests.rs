//! Members of one group on a deterministic in-memory network, each with its own store (the
//! simulator's `MemoryStorage`, which loses what was not flushed when it crashes): elections,
//! commits, a lost leader, a minority that cannot commit, replay, a restart from the stored
//! log, a newcomer that joins from a snapshot, and compaction.

use std::collections::VecDeque;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, Message, MessageType};
use starling_storage::{MemoryStorage, Storage};

use super::*;

/// How many entries past the applied point a log keeps (small, so tests compact).
const KEEP: u64 = 4;

struct Member {
    slot: Option<Slot>,
    store: MemoryStorage,
    /// The data of the entries applied, in order (a snapshot installed replaces it).
    applied: Vec<Vec<u8>>,
}

struct Net {
    members: Vec<Member>,
    /// Members cut off from every other (messages to and from them are dropped).
    cut: Vec<u64>,
    queue: VecDeque<RaftMsg>,
    /// Who led, term by term, as seen when leadership changed.
    leaders: Vec<(u64, u64)>,
}

impl Net {
    /// `n` members, the first `voters` of them a bootstrapped group, the rest without one.
    fn new(n: u64, voters: u64) -> Net {
        let ids: Vec<u64> = (1..=voters).collect();
        let members = (1..=n)
            .map(|id| {
                let mut store = MemoryStorage::new();
                let slot = (id <= voters).then(|| {
                    let (s, w) = Slot::bootstrap(0, id, &ids).unwrap();
                    store.raft_write(&w).unwrap();
                    store.flush().unwrap();
                    s
                });
                Member {
                    slot,
                    store,
                    applied: Vec::new(),
                }
            })
            .collect();
        Net {
            members,
            cut: Vec::new(),
            queue: VecDeque::new(),
            leaders: Vec::new(),
        }
    }

    fn m(&mut self, id: u64) -> &mut Member {
        &mut self.members[id as usize - 1]
    }

    fn slot(&mut self, id: u64) -> &mut Slot {
        self.m(id).slot.as_mut().expect("a member")
    }

    fn applied(&self, id: u64) -> &[Vec<u8>] {
        &self.members[id as usize - 1].applied
    }

    /// Carries out member `i`'s ready the way a host does: write and flush, then send.
    fn ready(&mut self, i: usize) {
        let Some(slot) = self.members[i].slot.as_mut() else {
            return;
        };
        let out = slot.ready();
        if out.leader == Some(true) {
            self.leaders.push((slot.term(), slot.id()));
        }
        let m = &mut self.members[i];
        let slot = m.slot.as_mut().unwrap();
        if let Some((index, data)) = &out.install {
            m.applied = decode(data);
            slot.applied_to(*index, KEEP);
        }
        self.queue.extend(out.messages);
        if let Some(w) = &out.log {
            m.store.raft_write(w).unwrap();
        }
        for (index, data) in &out.apply {
            m.store.apply_committed(0, *index, &[]).unwrap();
            if !data.is_empty() {
                m.applied.push(data.clone());
            }
        }
        if let Some((last, _)) = out.apply.last() {
            if let Some(w) = slot.applied_to(*last, KEEP) {
                m.store.raft_write(&w).unwrap();
            }
        }
        m.store.flush().unwrap();
        if out.log.is_some() {
            self.queue.extend(slot.persisted(out.number));
        }
        if slot.want_snapshot() {
            let (index, term) = slot.submitted;
            let cs = slot.conf().clone();
            slot.offer(index, term, cs, encode(&m.applied));
        }
    }

    /// Readies every member and delivers messages until nothing moves.
    fn pump(&mut self) {
        for _ in 0..1000 {
            for i in 0..self.members.len() {
                self.ready(i);
            }
            if self.queue.is_empty() {
                return;
            }
            while let Some(msg) = self.queue.pop_front() {
                if self.cut.contains(&msg.to) || self.cut.contains(&msg.from) {
                    continue;
                }
                let m = &mut self.members[msg.to as usize - 1];
                let slot = m.slot.get_or_insert_with(|| {
                    let (s, w) = Slot::joining(0, msg.to).unwrap();
                    m.store.raft_write(&w).unwrap();
                    s
                });
                if let Err(e) = slot.step(msg) {
                    // A response from a member removed meanwhile: raft-rs refuses it.
                    assert!(e.contains("peer not found"), "{e}");
                }
            }
        }
        panic!("the network never went quiet");
    }

    fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            for m in &mut self.members {
                if let Some(s) = m.slot.as_mut() {
                    s.tick();
                }
            }
            self.pump();
        }
    }

    fn leaders_now(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter_map(|m| m.slot.as_ref())
            .filter(|s| s.is_leader())
            .map(|s| s.id())
            .collect()
    }

    fn leader(&self) -> u64 {
        let l = self.leaders_now();
        assert_eq!(l.len(), 1, "one leader: {l:?}");
        l[0]
    }

    /// Member `id` loses its memory and what it had not flushed, and starts from its store.
    fn crash(&mut self, id: u64) {
        let m = self.m(id);
        m.store.crash();
        let stored = m.store.raft_stored(0).unwrap().expect("stored");
        // The test's data beside the store is flushed with it, every ready.
        m.slot = Some(Slot::restore(0, id, &stored).unwrap());
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn encode(v: &[Vec<u8>]) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap()
}

fn decode(d: &[u8]) -> Vec<Vec<u8>> {
    postcard::from_bytes(d).unwrap()
}

#[test]
fn three_voters_elect_one_leader_and_commit_on_all() {
    let mut net = Net::new(3, 3);
    net.ticks(30);
    let leader = net.leader();
    net.slot(leader).propose(b("a")).unwrap();
    net.pump();
    for id in 1..=3 {
        assert_eq!(net.applied(id), [b("a")], "member {id}");
    }
    // A follower's proposal goes to the leader.
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    net.slot(follower).propose(b("b")).unwrap();
    net.pump();
    assert_eq!(net.applied(leader), [b("a"), b("b")]);
}

#[test]
fn a_lost_leader_is_replaced_and_nothing_committed_is_lost() {
    let mut net = Net::new(3, 3);
    net.ticks(30);
    let old = net.leader();
    for x in ["a", "b"] {
        net.slot(old).propose(b(x)).unwrap();
        net.pump();
    }
    net.cut = vec![old];
    net.ticks(40);
    let others: Vec<u64> = (1..=3).filter(|i| *i != old).collect();
    let new = net.leaders_now().into_iter().find(|l| *l != old).expect("a new leader");
    assert!(others.contains(&new));
    // The old leader, alone, cannot commit what it is asked (check quorum steps it down).
    let _ = net.slot(old).propose(b("lost"));
    net.slot(new).propose(b("c")).unwrap();
    net.pump();
    for i in &others {
        assert_eq!(net.applied(*i), [b("a"), b("b"), b("c")], "voter {i}");
    }
    assert_eq!(net.applied(old), [b("a"), b("b")], "the minority commits nothing");
    // Back, it catches up and drops what it never committed.
    net.cut.clear();
    net.ticks(30);
    assert_eq!(net.leader(), new);
    assert_eq!(net.applied(old), [b("a"), b("b"), b("c")]);
}

#[test]
fn the_same_schedule_gives_the_same_run() {
    let run = || {
        let mut net = Net::new(3, 3);
        net.ticks(25);
        let l = net.leader();
        net.slot(l).propose(b("a")).unwrap();
        net.cut = vec![l];
        net.ticks(40);
        net.cut.clear();
        net.ticks(20);
        (
            net.leaders,
            net.members.into_iter().map(|m| m.applied).collect::<Vec<_>>(),
        )
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.0.len() >= 2, "a second election happened: {:?}", a.0);
}

#[test]
fn a_member_restarted_from_its_store_keeps_its_log_and_its_vote() {
    let mut net = Net::new(3, 3);
    net.ticks(30);
    let l = net.leader();
    for x in ["a", "b", "c"] {
        net.slot(l).propose(b(x)).unwrap();
        net.pump();
    }
    // Every member restarts; what they flushed is all they have.
    for id in 1..=3 {
        net.crash(id);
    }
    let term = net.slot(1).term();
    assert!(term > BOOTSTRAP_INDEX, "the term was stored: {term}");
    net.ticks(40);
    let l = net.leader();
    net.slot(l).propose(b("d")).unwrap();
    net.pump();
    for id in 1..=3 {
        // The entries after the stored applied index were applied again, once.
        assert_eq!(net.applied(id), [b("a"), b("b"), b("c"), b("d")], "member {id}");
    }
}

#[test]
fn a_newcomer_joins_as_a_learner_from_a_snapshot_and_is_promoted() {
    let mut net = Net::new(4, 3);
    net.ticks(30);
    let l = net.leader();
    for i in 0..12 {
        net.slot(l).propose(format!("e{i}").into_bytes()).unwrap();
        net.pump();
    }
    assert!(
        net.slot(l).rn.store().first_index() > BOOTSTRAP_INDEX + 1,
        "the leader's log was compacted"
    );
    let learner = ConfChangeV2 {
        changes: vec![ConfChangeSingle {
            change_type: ConfChangeType::AddLearnerNode,
            node_id: 4,
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    };
    net.slot(l).propose_conf(learner).unwrap();
    net.ticks(10);
    assert_eq!(
        net.slot(4).conf().learners,
        vec![4],
        "it learnt the group from the snapshot"
    );
    assert_eq!(net.applied(4).len(), 12, "and the data: {:?}", net.applied(4));
    assert_eq!(net.slot(l).matched(4), Some(net.slot(l).last_index()));
    // Promoted, with member 3 removed, in one joint change.
    let swap = ConfChangeV2 {
        changes: vec![
            ConfChangeSingle {
                change_type: ConfChangeType::AddNode,
                node_id: 4,
                ..Default::default()
            },
            ConfChangeSingle {
                change_type: ConfChangeType::RemoveNode,
                node_id: if l == 3 { 2 } else { 3 },
                ..Default::default()
            },
        ]
        .into(),
        ..Default::default()
    };
    net.slot(l).propose_conf(swap).unwrap();
    net.ticks(10);
    let mut voters = net.slot(l).conf().voters.clone();
    voters.sort_unstable();
    assert!(voters.contains(&4) && voters.len() == 3, "{voters:?}");
    assert!(!net.slot(l).conf_pending(), "the joint configuration was left");
    net.slot(l).propose(b("after")).unwrap();
    net.pump();
    assert_eq!(net.applied(4).last(), Some(&b("after")));
}

#[test]
fn a_peer_cannot_send_what_only_a_node_makes_for_itself() {
    let (mut s, _) = Slot::bootstrap(0, 1, &[1, 2, 3]).unwrap();
    for local in [MessageType::MsgHup, MessageType::MsgBeat, MessageType::MsgCheckQuorum] {
        let m = Message {
            msg_type: local,
            to: 1,
            from: 2,
            ..Default::default()
        };
        let ours = RaftMsg::from(&m);
        assert!(s.step(ours).is_err(), "{local:?}");
    }
    let mut m = RaftMsg::from(&Message::default());
    m.kind = 99;
    assert!(s.step(m).is_err());
    // A peer proposes data only, never a configuration change; and a change it appends is
    // small (raft-rs parses it with protobuf 2).
    let conf = RaftEntry {
        kind: raft::eraftpb::EntryType::EntryConfChangeV2 as i32,
        term: 1,
        index: 1,
        data: vec![0; 8],
        context: Vec::new(),
    };
    let mut prop = RaftMsg::from(&Message {
        msg_type: MessageType::MsgPropose,
        ..Default::default()
    });
    prop.entries = vec![conf.clone()];
    assert!(prop.into_raft().is_err());
    let big = RaftEntry {
        data: vec![0; MAX_CONF_CHANGE + 1],
        ..conf
    };
    assert!(big.into_raft().is_err());
    // A real message survives the round trip through our form.
    let mut net = Net::new(3, 3);
    net.ticks(30);
    let l = net.leader();
    net.slot(l).propose(b("a")).unwrap();
    let out = net.slot(l).ready();
    let append = out
        .messages
        .iter()
        .find(|m| m.kind == MessageType::MsgAppend as i32 && !m.entries.is_empty())
        .expect("an append");
    let back = RaftMsg::from(&append.clone().into_raft().unwrap());
    assert_eq!(&back, append);
}

#[test]
fn a_snapshot_message_survives_our_form() {
    let ours = RaftMsg {
        kind: MessageType::MsgSnapshot as i32,
        to: 2,
        from: 1,
        term: 3,
        log_term: 3,
        index: 0,
        entries: Vec::new(),
        commit: 0,
        commit_term: 0,
        snapshot: Some(RaftSnapshot {
            data: b("state"),
            index: 9,
            term: 3,
            voters: vec![1, 2, 3],
            learners: vec![4],
            voters_outgoing: Vec::new(),
            learners_next: Vec::new(),
            auto_leave: false,
        }),
        request_snapshot: 0,
        reject: false,
        reject_hint: 0,
        context: Vec::new(),
        priority: 0,
    };
    // Through an archive, as between nodes, and validated on the way in.
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&ours).unwrap();
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(&bytes);
    let read = rkyv::from_bytes::<RaftMsg, rkyv::rancor::Error>(&aligned).unwrap();
    assert_eq!(read, ours);
    let mut half = rkyv::util::AlignedVec::<16>::new();
    half.extend_from_slice(&aligned[..aligned.len() / 2]);
    assert!(
        rkyv::from_bytes::<RaftMsg, rkyv::rancor::Error>(&half).is_err(),
        "a truncated archive is refused"
    );
    let raft = ours.clone().into_raft().unwrap();
    assert_eq!(raft.get_snapshot().get_metadata().index, 9);
    assert_eq!(RaftMsg::from(&raft), ours);
}
