//! Starling's deterministic simulator (sim/README.md).
//!
//! One thread runs the real sans-io actors of a whole deployment — N nodes × M shards of
//! [`C2sSession`](starling_actors::c2s::C2sSession)s and
//! [`UserActor`](starling_actors::user::UserActor)s over the in-memory storage — in virtual
//! time. Every choice (delays, faults, what each scripted client does next) is drawn from one
//! ChaCha RNG seeded by the run's seed, and events are ordered by (virtual time, sequence
//! number), so a seed replays exactly. Oracles check the invariants while it runs and at
//! quiescence.

mod client;
mod cluster;
mod faults;
mod host;
mod oracle;
mod rng;
mod trace;
mod world;

pub use faults::Faults;
pub use oracle::Violation;
pub use starling_actors::planted::Bug;

/// The shape of one simulated deployment. Everything else is drawn from the seed.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: u32,
    pub shards: u16,
    pub clients: usize,
    /// Virtual milliseconds of client activity and faults before quiescence.
    pub duration_ms: u64,
    /// Planted bugs switched on for this run (tests of the oracles only).
    pub bugs: Vec<Bug>,
    /// Faults are drawn from the seed; `false` runs without any (a baseline).
    pub faults: bool,
    /// Events kept for the report of a failure.
    pub keep_events: usize,
    /// Clients also remove contacts and cancel subscriptions.
    pub churn: bool,
    /// With N > 1: the cluster faults allowed (`loss`, `partitions`, `joins`, `crashes`);
    /// `None` allows every one.
    pub cluster_faults: Option<Vec<String>>,
    /// How long an idle user actor stays before it is let go (the node's
    /// `actors.passivate_after_ms`; 0 at once, the default).
    pub passivate_after_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 1,
            shards: 3,
            clients: 12,
            duration_ms: 20_000,
            bugs: Vec::new(),
            faults: true,
            keep_events: 40,
            churn: true,
            cluster_faults: None,
            passivate_after_ms: 0,
        }
    }
}

/// What one run found.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    /// xxh3 over every event in order: equal for equal seeds and configs.
    pub trace_hash: u64,
    pub events: u64,
    pub virtual_ms: u64,
    pub violation: Option<Violation>,
    /// The last events before the end (or the violation), oldest first.
    pub last_events: Vec<String>,
    pub stats: Stats,
    pub faults: Faults,
}

/// Counters to show that a run exercised what it claims to.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub logins: u64,
    pub messages_accepted: u64,
    pub messages_handed: u64,
    pub messages_stored_offline: u64,
    pub messages_errored: u64,
    pub messages_lost_in_crash: u64,
    pub duplicates_excused: u64,
    pub roster_pushes: u64,
    pub connections_cut: u64,
    pub node_crashes: u64,
    pub shard_crashes: u64,
    pub bounces: u64,
    // The cluster (multi-node runs).
    pub partitions: u64,
    pub node_joins: u64,
    pub rejoins: u64,
    pub datagrams_lost: u64,
    pub frames_lost: u64,
    pub messages_lost_with_link: u64,
    /// Sessions told to register with their user's moved actor, and actors that handed
    /// their users off (a membership change placed them elsewhere).
    pub moved_rebinds: u64,
    pub handoffs: u64,
    /// Sessions closed because their node rejoined.
    pub rejoin_kicks: u64,
    /// Raft frames lost with a link (raft sends again).
    pub raft_frames_lost: u64,
    /// Snapshots of a slot made to send, or installed.
    pub snapshots: u64,
    /// Configuration changes proposed (a slot's members moved toward the ring).
    pub conf_changes: u64,
    /// Times a node became a slot's leader.
    pub leader_changes: u64,
    /// User actors ended because another incarnation's write was applied under them.
    pub stale_ends: u64,
    /// User actors that did not start: no read index in time (no leader, no majority).
    pub activations_failed: u64,
    pub write_failures: u64,
    /// Idle user actors let go after `passivate_after_ms`, and those that got a message
    /// before it passed (kept, with their state in memory).
    pub passivated_late: u64,
    pub idle_reused: u64,
    /// `cluster leave`: started, finished (the node stopped once its slots had moved), and
    /// given up because the leaving node crashed.
    pub leaves_started: u64,
    pub leaves_done: u64,
    pub leaves_abandoned: u64,
}

/// Runs one simulation.
pub fn run(seed: u64, cfg: &Config) -> Outcome {
    starling_actors::planted::set(&cfg.bugs);
    let out = world::World::new(seed, cfg.clone()).run();
    starling_actors::planted::set(&[]);
    out
}

impl Outcome {
    /// The human report: verdict, hash, and on failure the invariant and the last events.
    pub fn report(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let verdict = if self.violation.is_some() { "FAIL" } else { "ok" };
        let _ = writeln!(
            s,
            "seed {} {verdict} trace {:016x} events {} virtual {} ms",
            self.seed, self.trace_hash, self.events, self.virtual_ms
        );
        let st = &self.stats;
        let _ = writeln!(
            s,
            "  logins {} accepted {} handed {} offline {} errored {} lost-in-crash {} dup-excused {} pushes {} cuts {} node-crashes {} shard-crashes {} bounces {}",
            st.logins,
            st.messages_accepted,
            st.messages_handed,
            st.messages_stored_offline,
            st.messages_errored,
            st.messages_lost_in_crash,
            st.duplicates_excused,
            st.roster_pushes,
            st.connections_cut,
            st.node_crashes,
            st.shard_crashes,
            st.bounces
        );
        if st.partitions + st.node_joins + st.conf_changes + st.datagrams_lost > 0 {
            let _ = writeln!(
                s,
                "  cluster: partitions {} joins {} rejoins {} datagrams-lost {} frames-lost {} lost-with-link {} rebinds {} handoffs {} rejoin-kicks {} raft: frames-lost {} snapshots {} conf-changes {} leaders {} write-failures {} activations-failed {}",
                st.partitions,
                st.node_joins,
                st.rejoins,
                st.datagrams_lost,
                st.frames_lost,
                st.messages_lost_with_link,
                st.moved_rebinds,
                st.handoffs,
                st.rejoin_kicks,
                st.raft_frames_lost,
                st.snapshots,
                st.conf_changes,
                st.leader_changes,
                st.write_failures,
                st.activations_failed
            );
        }
        if st.leaves_started > 0 {
            let _ = writeln!(
                s,
                "  leaves: started {} done {} abandoned (crashed) {}",
                st.leaves_started, st.leaves_done, st.leaves_abandoned
            );
        }
        if st.passivated_late + st.idle_reused > 0 {
            let _ = writeln!(
                s,
                "  actors: passivated-late {} idle-reused {}",
                st.passivated_late, st.idle_reused
            );
        }
        let _ = writeln!(s, "  faults {:?}", self.faults);
        if let Some(v) = &self.violation {
            let _ = writeln!(
                s,
                "  VIOLATED invariant {} ({}) at {} ms: {}",
                v.invariant,
                oracle::invariant_name(v.invariant),
                v.at_ms,
                v.what
            );
            let _ = writeln!(s, "  last events:");
            for e in &self.last_events {
                let _ = writeln!(s, "    {e}");
            }
        }
        s
    }
}
