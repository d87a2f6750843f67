//! Three voters on a deterministic in-memory network: elections, commits, a lost leader, a
//! minority that cannot commit, and replay.

use std::collections::VecDeque;

use super::*;

struct Net {
    slots: Vec<Slot>,
    /// Voters cut off from every other (messages to and from them are dropped).
    cut: Vec<u64>,
    queue: VecDeque<RaftMsg>,
    applied: Vec<Vec<Vec<u8>>>,
    /// Who led, term by term, as seen when leadership changed.
    leaders: Vec<(u64, u64)>,
}

impl Net {
    fn new(n: u64) -> Net {
        let voters: Vec<u64> = (1..=n).collect();
        Net {
            slots: voters.iter().map(|id| Slot::new(*id, &voters).unwrap()).collect(),
            cut: Vec::new(),
            queue: VecDeque::new(),
            applied: vec![Vec::new(); n as usize],
            leaders: Vec::new(),
        }
    }

    fn slot(&mut self, id: u64) -> &mut Slot {
        &mut self.slots[id as usize - 1]
    }

    /// Readies every voter and delivers messages until nothing moves.
    fn pump(&mut self) {
        for _ in 0..1000 {
            for i in 0..self.slots.len() {
                let out = self.slots[i].ready();
                if out.leader == Some(true) {
                    let s = &self.slots[i];
                    self.leaders.push((s.term(), i as u64 + 1));
                }
                self.applied[i].extend(out.committed.into_iter().map(|(_, d)| d));
                self.queue.extend(out.messages);
            }
            if self.queue.is_empty() {
                return;
            }
            while let Some(m) = self.queue.pop_front() {
                if self.cut.contains(&m.to) || self.cut.contains(&m.from) {
                    continue;
                }
                let to = m.to;
                self.slot(to).step(m).unwrap();
            }
        }
        panic!("the network never went quiet");
    }

    fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            for s in &mut self.slots {
                s.tick();
            }
            self.pump();
        }
    }

    fn leaders_now(&self) -> Vec<u64> {
        (1..=self.slots.len() as u64)
            .filter(|id| self.slots[*id as usize - 1].is_leader())
            .collect()
    }

    fn leader(&self) -> u64 {
        let l = self.leaders_now();
        assert_eq!(l.len(), 1, "one leader: {l:?}");
        l[0]
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[test]
fn three_voters_elect_one_leader_and_commit_on_all() {
    let mut net = Net::new(3);
    net.ticks(30);
    let leader = net.leader();
    assert_eq!(leader, 1, "the shortest election timeout wins (10 + id ticks)");
    net.slot(leader).propose(b("a")).unwrap();
    net.pump();
    assert!(net.applied.iter().all(|a| a == &[b("a")]), "{:?}", net.applied);
    let follower = 2;
    assert!(net.slot(follower).propose(b("x")).is_err(), "only the leader proposes");
}

#[test]
fn a_lost_leader_is_replaced_and_nothing_committed_is_lost() {
    let mut net = Net::new(3);
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
        assert_eq!(net.applied[*i as usize - 1], [b("a"), b("b"), b("c")], "voter {i}");
    }
    assert_eq!(
        net.applied[old as usize - 1],
        [b("a"), b("b")],
        "the minority commits nothing"
    );
    // Back, it catches up and drops what it never committed.
    net.cut.clear();
    net.ticks(30);
    assert_eq!(net.leader(), new);
    assert_eq!(net.applied[old as usize - 1], [b("a"), b("b"), b("c")]);
}

#[test]
fn the_same_schedule_gives_the_same_run() {
    let run = || {
        let mut net = Net::new(3);
        net.ticks(25);
        let l = net.leader();
        net.slot(l).propose(b("a")).unwrap();
        net.cut = vec![l];
        net.ticks(40);
        net.cut.clear();
        net.ticks(20);
        (net.leaders, net.applied)
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.0.len() >= 2, "a second election happened: {:?}", a.0);
}

#[test]
fn a_peer_cannot_send_what_only_a_node_makes_for_itself() {
    let mut s = Slot::new(1, &[1, 2, 3]).unwrap();
    for local in [MessageType::MsgHup, MessageType::MsgBeat, MessageType::MsgPropose] {
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
    // A real message survives the round trip through our form.
    let mut net = Net::new(3);
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
