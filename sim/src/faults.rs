//! Fault probabilities, drawn once per run from its seed: different seeds stress different
//! things (some run calm, some cut connections often, some crash nodes under slow storage).

use crate::rng::Rng;

#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Mean one-way delay on client connections, µs.
    pub client_delay_us: u64,
    /// Probability that a client write is split into several reads on the server.
    pub split: f64,
    /// Probability that a client action is cut off mid-stanza (the connection drops).
    pub cut_mid_stanza: f64,
    /// Probability per second that a connected client's connection drops.
    pub cut_per_sec: f64,
    /// Mean delay of shard-to-shard delivery, µs (the mesh keeps order per pair).
    pub mesh_delay_us: u64,
    /// Mean storage read latency, µs.
    pub read_us: u64,
    /// Mean storage flush (fsync) latency, µs; "slow storage" runs have it high.
    pub flush_us: u64,
    /// Node crashes (with restart) during the run.
    pub node_crashes: u32,
    /// Shard crashes (with restart) during the run.
    pub shard_crashes: u32,
    /// Reconnect storms: most clients drop and come back at once.
    pub storms: u32,
    /// Mailbox capacity (small ones exercise the overflow rules).
    pub mailbox: usize,
    // The cluster (multi-node runs only).
    /// Mean delay of a gossip datagram, µs (datagrams overtake each other).
    pub gossip_delay_us: u64,
    /// Probability that a datagram is lost.
    pub gossip_loss: f64,
    /// Probability that a datagram arrives twice.
    pub gossip_dup: f64,
    /// Mean delay of a frame on a node-to-node link, µs (in order per link).
    pub link_delay_us: u64,
    /// Partitions (each heals after 1–8 s) during the run.
    pub partitions: u32,
    /// The last node starts part-way through the run (a join) instead of at the start.
    pub late_join: bool,
    /// `starling cluster leave`: (µs into the run, node) decommissioned (3 nodes or more).
    pub leave: Option<(u64, u32)>,
}

impl Faults {
    pub fn none() -> Self {
        Faults {
            client_delay_us: 200,
            mesh_delay_us: 20,
            read_us: 100,
            flush_us: 500,
            mailbox: 1024,
            gossip_delay_us: 300,
            link_delay_us: 200,
            ..Default::default()
        }
    }

    /// The cluster's faults, drawn after the others (so that single-node runs replay as
    /// before). `only`: the cluster faults kept (`loss`, `partitions`, `joins`, `crashes`;
    /// node crashes count as cluster faults here); `None` keeps every one drawn.
    pub fn draw_cluster(&mut self, rng: &mut Rng, only: Option<&[String]>) {
        self.gossip_delay_us = rng.range(100, 3_000);
        self.gossip_loss = if rng.chance(0.5) {
            rng.range(10, 150) as f64 / 1000.0
        } else {
            0.0
        };
        self.gossip_dup = if rng.chance(0.3) {
            rng.range(10, 100) as f64 / 1000.0
        } else {
            0.0
        };
        self.link_delay_us = rng.range(50, 3_000);
        self.partitions = if rng.chance(0.5) { rng.range(1, 2) as u32 } else { 0 };
        self.late_join = rng.chance(0.5);
        if let Some(only) = only {
            let has = |k: &str| only.iter().any(|o| o == k);
            if !has("loss") {
                self.gossip_loss = 0.0;
                self.gossip_dup = 0.0;
            }
            if !has("partitions") {
                self.partitions = 0;
            }
            if !has("joins") {
                self.late_join = false;
            }
            if !has("crashes") {
                self.node_crashes = 0;
            }
        }
    }

    /// A leave, drawn from its own generator (so that the other faults of a seed stay as
    /// they were before leaves were simulated).
    pub fn draw_leave(&mut self, seed: u64, nodes: u32, duration_us: u64, only: Option<&[String]>) {
        let mut rng = Rng::new(seed ^ 0x1ea5_e5ee_d000_0000);
        let allowed = only.is_none_or(|o| o.iter().any(|k| k == "leaves"));
        if nodes >= 3 && allowed && rng.chance(0.3) {
            let at = rng.range(duration_us / 5, duration_us * 3 / 5);
            self.leave = Some((at, rng.below(nodes as usize) as u32));
        }
    }

    pub fn draw(rng: &mut Rng) -> Self {
        let pick = |rng: &mut Rng, p: f64, lo: f64, hi: f64| {
            if rng.chance(p) {
                lo + (hi - lo) * (rng.range(0, 1000) as f64 / 1000.0)
            } else {
                0.0
            }
        };
        let slow_storage = rng.chance(0.3);
        Faults {
            client_delay_us: rng.range(50, 5_000),
            split: pick(rng, 0.5, 0.05, 0.5),
            cut_mid_stanza: pick(rng, 0.4, 0.005, 0.05),
            cut_per_sec: pick(rng, 0.4, 0.01, 0.1),
            mesh_delay_us: rng.range(5, 500),
            read_us: rng.range(20, 2_000),
            flush_us: if slow_storage {
                rng.range(20_000, 300_000)
            } else {
                rng.range(200, 5_000)
            },
            node_crashes: if rng.chance(0.4) { rng.range(1, 3) as u32 } else { 0 },
            shard_crashes: if rng.chance(0.3) { rng.range(1, 2) as u32 } else { 0 },
            storms: if rng.chance(0.3) { rng.range(1, 2) as u32 } else { 0 },
            mailbox: if rng.chance(0.2) {
                rng.range(2, 8) as usize
            } else {
                1024
            },
            ..Faults::none()
        }
    }
}
