//! Membership over a simulated network in virtual time: joins through a seed, failure
//! detection within the stated bound, restarts, partitions, garbage.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use starling_gossip::{Change, Membership, NodeIdentity, Output, Timer, Timings};

enum Ev {
    Packet {
        to: String,
        data: Vec<u8>,
    },
    Timer {
        node: String,
        life: u64,
        timer: Timer<NodeIdentity>,
    },
    Tick,
}

/// Nodes by name; `down` nodes drop everything; `cut` pairs of names drop packets.
struct Net {
    now: Duration,
    seq: u64,
    queue: BTreeMap<(Duration, u64), Ev>,
    nodes: BTreeMap<String, Membership>,
    down: BTreeSet<String>,
    /// How many times each node's process was started (its timers carry it).
    lives: BTreeMap<String, u64>,
    cut: BTreeSet<(String, String)>,
    changes: Vec<(Duration, String, Change)>,
}

fn ident(name: &str, generation: u64) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        gossip: format!("{name}:gossip"),
        transport: format!("{name}:tcp"),
        generation,
    }
}

impl Net {
    fn new() -> Self {
        let mut n = Net {
            now: Duration::ZERO,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: BTreeMap::new(),
            down: BTreeSet::new(),
            lives: BTreeMap::new(),
            cut: BTreeSet::new(),
            changes: Vec::new(),
        };
        n.push(Duration::from_secs(1), Ev::Tick);
        n
    }

    fn push(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), ev);
    }

    fn start(&mut self, name: &str, generation: u64, seed: &str) {
        let mut m = Membership::new(
            ident(name, generation),
            vec![format!("{seed}:gossip")],
            &Timings::default(),
            generation * 1000 + name.len() as u64,
        );
        let out = m.join();
        self.nodes.insert(name.into(), m);
        *self.lives.entry(name.into()).or_default() += 1;
        self.down.remove(name);
        self.carry(name, out);
    }

    fn carry(&mut self, from: &str, out: Output) {
        let life = self.lives[from];
        for (to, data) in out.send {
            let to = to.trim_end_matches(":gossip").to_string();
            if self.cut.contains(&(from.to_string(), to.clone())) {
                continue;
            }
            // 1–5 ms of latency, in a fixed pattern.
            let lat = Duration::from_millis(1 + self.seq % 5);
            self.push(lat, Ev::Packet { to, data });
        }
        for (after, timer) in out.timers {
            self.push(
                after,
                Ev::Timer {
                    node: from.into(),
                    life,
                    timer,
                },
            );
        }
        for c in out.changes {
            self.changes.push((self.now, from.into(), c));
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > end {
                break;
            }
            let ((t, _), ev) = entry.remove_entry();
            self.now = t;
            match ev {
                Ev::Packet { to, data } => {
                    if self.down.contains(&to) || !self.nodes.contains_key(&to) {
                        continue;
                    }
                    let out = self.nodes.get_mut(&to).unwrap().handle_data(&data);
                    self.carry(&to, out);
                }
                Ev::Timer { node, life, timer } => {
                    // Timers die with their process.
                    if self.down.contains(&node) || self.lives[&node] != life {
                        continue;
                    }
                    let out = self.nodes.get_mut(&node).unwrap().handle_timer(timer);
                    self.carry(&node, out);
                }
                Ev::Tick => {
                    let names: Vec<String> = self.nodes.keys().cloned().collect();
                    for n in names {
                        if !self.down.contains(&n) {
                            let out = self.nodes.get_mut(&n).unwrap().tick();
                            self.carry(&n, out);
                        }
                    }
                    self.push(Duration::from_secs(1), Ev::Tick);
                }
            }
        }
        self.now = end;
    }

    fn kill(&mut self, name: &str) {
        self.down.insert(name.into());
    }

    fn up_names(&self, at: &str) -> Vec<String> {
        self.nodes[at].up().into_iter().map(|i| i.name).collect()
    }

    fn partition(&mut self, a: &[&str], b: &[&str]) {
        for x in a {
            for y in b {
                self.cut.insert((x.to_string(), y.to_string()));
                self.cut.insert((y.to_string(), x.to_string()));
            }
        }
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn nodes_join_through_one_seed_and_agree_on_the_ring() {
    let mut net = Net::new();
    net.start("n1", 1, "n1");
    for n in ["n2", "n3", "n4"] {
        net.start(n, 1, "n1");
    }
    net.run_for(Duration::from_secs(5));
    let all = names(&["n1", "n2", "n3", "n4"]);
    for n in ["n1", "n2", "n3", "n4"] {
        assert_eq!(net.up_names(n), all, "{n}'s view");
    }
    let ring = net.nodes["n1"].ring();
    for n in ["n2", "n3", "n4"] {
        assert_eq!(net.nodes[n].ring(), ring);
    }
    assert_eq!(ring.members(), &all[..]);
}

#[test]
fn a_dead_node_is_seen_down_within_the_bound_and_a_restart_comes_back() {
    let mut net = Net::new();
    for n in ["n1", "n2", "n3"] {
        net.start(n, 1, "n1");
    }
    net.run_for(Duration::from_secs(5));
    assert_eq!(net.up_names("n1").len(), 3);
    let killed_at = net.now;
    net.kill("n3");
    net.run_for(Duration::from_secs(10));
    for n in ["n1", "n2"] {
        assert_eq!(net.up_names(n), names(&["n1", "n2"]), "{n}'s view after the kill");
        let seen = net
            .changes
            .iter()
            .find(|(t, at, c)| at == n && *t > killed_at && matches!(c, Change::Down(id) if id.name == "n3"))
            .map(|(t, _, _)| *t - killed_at)
            .expect("a Down change");
        // Stated bound (Timings docs): probe_period × (members − 1) + probe_rtt +
        // suspect_to_down = 1.0 + 0.2 + 2.0 s, with slack for indirect probes.
        assert!(seen <= Duration::from_secs(5), "{n} saw n3 down after {seen:?}");
    }
    // The process comes back with a new generation at the same address.
    net.start("n3", 2, "n1");
    net.run_for(Duration::from_secs(5));
    for n in ["n1", "n2", "n3"] {
        assert_eq!(
            net.up_names(n),
            names(&["n1", "n2", "n3"]),
            "{n}'s view after the restart"
        );
    }
    let n3 = net.nodes["n1"].up().into_iter().find(|i| i.name == "n3").unwrap();
    assert_eq!(n3.generation, 2);
}

#[test]
fn a_partition_heals_into_one_membership() {
    let mut net = Net::new();
    for n in ["n1", "n2", "n3", "n4"] {
        net.start(n, 1, "n1");
    }
    net.run_for(Duration::from_secs(5));
    net.partition(&["n1", "n2"], &["n3", "n4"]);
    net.run_for(Duration::from_secs(15));
    assert_eq!(net.up_names("n1"), names(&["n1", "n2"]));
    assert_eq!(net.up_names("n4"), names(&["n3", "n4"]));
    net.cut.clear();
    net.run_for(Duration::from_secs(30));
    let all = names(&["n1", "n2", "n3", "n4"]);
    for n in ["n1", "n2", "n3", "n4"] {
        assert_eq!(net.up_names(n), all, "{n}'s view after the heal");
    }
}

#[test]
fn garbage_and_truncated_packets_are_ignored() {
    let mut m = Membership::new(ident("n1", 1), vec![], &Timings::default(), 7);
    for junk in [&b""[..], b"\x00", b"hello world", &[0xff; 2000][..]] {
        let out = m.handle_data(junk);
        assert!(out.changes.is_empty() && out.send.is_empty());
    }
    // A real packet, truncated.
    let mut other = Membership::new(ident("n2", 1), vec!["n1:gossip".into()], &Timings::default(), 8);
    let out = other.join();
    let (_, pkt) = &out.send[0];
    let out = m.handle_data(&pkt[..pkt.len() / 2]);
    assert!(out.changes.is_empty());
    assert_eq!(m.up().len(), 1);
    // And whole, it is understood.
    let out = m.handle_data(pkt);
    assert!(!out.send.is_empty(), "an announce gets an answer");
}

/// Two names whose node ids (32 bits of xxh3) collide, found by search.
fn colliding_names() -> (String, String) {
    let mut seen = std::collections::HashMap::new();
    for i in 0u32.. {
        let name = format!("node-{i}");
        if let Some(other) = seen.insert(starling_gossip::node_id(&name), name.clone()) {
            return if other < name { (other, name) } else { (name, other) };
        }
    }
    unreachable!()
}

#[test]
fn members_whose_names_collide_are_refused_the_same_way_everywhere() {
    let (low, high) = colliding_names();
    assert_eq!(starling_gossip::node_id(&low), starling_gossip::node_id(&high));
    for order in [[&high, &low], [&low, &high]] {
        let mut net = Net::new();
        net.start("n1", 1, "n1");
        net.start("n2", 1, "n1");
        net.run_for(Duration::from_secs(3));
        // The colliding pair joins one after the other, in both orders.
        net.start(order[0], 1, "n1");
        net.run_for(Duration::from_secs(3));
        net.start(order[1], 1, "n1");
        net.run_for(Duration::from_secs(10));
        let want = {
            let mut v = names(&["n1", "n2", &low]);
            v.sort();
            v
        };
        for n in ["n1", "n2"] {
            assert_eq!(net.up_names(n), want, "{n}'s view (joined {order:?})");
            assert_eq!(net.nodes[n].ring(), net.nodes["n1"].ring());
        }
        assert!(!net.up_names(&low).contains(&high), "{low} refuses {high}");
        assert!(!net.up_names(&high).contains(&low), "{high} refuses {low}");
    }
}

/// `cluster leave`: every member takes the leaver off the ring while it stays up, a member
/// that was cut off meanwhile learns it after the heal, the leaver's clean exit then removes
/// it, and a restart of the same name is not leaving.
#[test]
fn a_leaving_member_leaves_every_ring_but_stays_up_until_it_goes() {
    let mut net = Net::new();
    for n in ["n1", "n2", "n3", "n4"] {
        net.start(n, 1, "n1");
    }
    net.run_for(Duration::from_secs(5));
    net.partition(&["n4"], &["n1", "n2", "n3"]);
    let out = net.nodes.get_mut("n3").unwrap().start_leaving();
    net.carry("n3", out);
    assert!(net.nodes["n3"].is_leaving());
    net.run_for(Duration::from_secs(3));
    for n in ["n1", "n2", "n3"] {
        let ring = net.nodes[n].ring();
        assert!(
            !ring.members().contains(&"n3".to_string()) && ring.members().contains(&"n1".to_string()),
            "{n}'s ring {:?}",
            ring.members()
        );
        assert!(net.up_names(n).contains(&"n3".to_string()), "{n} still sees n3 up");
        assert_eq!(net.nodes[n].leaving(), BTreeSet::from(["n3".to_string()]));
        assert!(
            net.changes
                .iter()
                .any(|(_, at, c)| at == n && matches!(c, Change::Leaving(id) if id.name == "n3")),
            "{n} reported n3 leaving"
        );
    }
    net.cut.clear();
    net.run_for(Duration::from_secs(30));
    assert_eq!(
        net.nodes["n4"].leaving(),
        BTreeSet::from(["n3".to_string()]),
        "n4 after the heal"
    );
    assert_eq!(net.nodes["n4"].ring().members(), &names(&["n1", "n2", "n4"])[..]);
    let out = net.nodes.get_mut("n3").unwrap().leave();
    net.carry("n3", out);
    net.run_for(Duration::from_millis(500));
    net.kill("n3");
    net.run_for(Duration::from_secs(10));
    for n in ["n1", "n2", "n4"] {
        assert_eq!(net.up_names(n), names(&["n1", "n2", "n4"]), "{n} after n3 left");
        assert!(net.nodes[n].leaving().is_empty());
    }
    net.start("n3", 2, "n1");
    net.run_for(Duration::from_secs(10));
    for n in ["n1", "n2", "n3", "n4"] {
        assert_eq!(
            net.nodes[n].ring().members(),
            &names(&["n1", "n2", "n3", "n4"])[..],
            "{n} after the restart"
        );
    }
}
