//! Membership: SWIM (foca) as a sans-io state machine. The host feeds it datagrams, fired
//! timers and `now`-free ticks, and carries out what it asks for: datagrams to send, timers to
//! set. It never touches a socket, clock or OS random source: the RNG is seeded by the host,
//! so the simulator replays a cluster exactly.
//!
//! A node is known by a [`NodeIdentity`]: its stable name (placement hashes names), the UDP
//! address gossip uses, the TCP address of its node-to-node transport, and a generation that
//! a restarted node bumps so that the cluster tells the new process from the old one.
//! Seeds are only addresses: they are announced to under a placeholder identity (generation
//! 0, empty name) which the real one replaces as soon as it answers (same address, higher
//! generation wins — foca's address-conflict rule).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{BroadcastHandler, Config, Foca, Identity, Invalidates, OwnedNotification, PostcardCodec, Timer};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::placement::Ring;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// `cluster.node_name`: unique in the cluster, stable across restarts.
    pub name: String,
    /// `cluster.gossip`, as `host:port` (UDP).
    pub gossip: String,
    /// `cluster.transport`, as `host:port` (TCP).
    pub transport: String,
    /// Bumped on every start (the host uses its start time) and on a rejoin.
    pub generation: u64,
}

impl NodeIdentity {
    /// What a seed is called before it has answered.
    pub fn seed(gossip: &str) -> Self {
        NodeIdentity {
            name: String::new(),
            gossip: gossip.into(),
            transport: String::new(),
            generation: 0,
        }
    }

    pub fn is_placeholder(&self) -> bool {
        self.generation == 0
    }
}

impl Identity for NodeIdentity {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity {
            generation: self.generation.wrapping_add(1).max(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.gossip.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A node's name hashed to the `NodeId` that session addresses carry (32 bits: two names
/// colliding is checked at join, see [`Membership::ring`]).
pub fn node_id(name: &str) -> u32 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as u32
}

/// foca takes rand 0.10's RNG traits; the rest of Starling uses rand_chacha 0.3. This is a
/// seeded ChaCha8 behind the newer traits.
pub struct SeededRng(ChaCha8Rng);

impl rand_core_010::TryRng for SeededRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

/// How a member is seen, for `starling cluster status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
}

/// A change the host must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Up(NodeIdentity),
    Down(NodeIdentity),
    /// A member (perhaps this node) is being decommissioned (`starling cluster leave`): it
    /// stays up and reachable, but leaves the ring, so its slots and actors move away.
    Leaving(NodeIdentity),
}

/// What a leaving member gossips (a foca custom broadcast): its name and generation, and a
/// sequence it bumps each time it says it again (a member that joins later learns it too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeavingNote {
    name: String,
    generation: u64,
    seq: u64,
}

impl Invalidates for LeavingNote {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && (self.generation, self.seq) >= (other.generation, other.seq)
    }
}

/// The leaving notes heard, by name: (generation, seq). Shared with foca's handler (foca
/// owns the handler and offers no way back to it).
type Leavers = Arc<Mutex<BTreeMap<String, (u64, u64)>>>;

struct LeavingHandler(Leavers);

impl BroadcastHandler<NodeIdentity> for LeavingHandler {
    type Key = LeavingNote;
    type Error = postcard::Error;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeIdentity>,
    ) -> Result<Option<LeavingNote>, postcard::Error> {
        let note: LeavingNote = postcard::from_bytes(data)?;
        let mut heard = self.0.lock().expect("leavers lock");
        match heard.get(&note.name) {
            Some(had) if *had >= (note.generation, note.seq) => Ok(None),
            _ => {
                heard.insert(note.name.clone(), (note.generation, note.seq));
                Ok(Some(note))
            }
        }
    }
}

/// What the state machine asks of its host.
#[derive(Debug, Default)]
pub struct Output {
    /// Datagrams: (gossip address, bytes).
    pub send: Vec<(String, Vec<u8>)>,
    /// Call [`Membership::handle_timer`] with this after the delay.
    pub timers: Vec<(Duration, Timer<NodeIdentity>)>,
    /// Members that came up or went down (placeholders never appear).
    pub changes: Vec<Change>,
    /// The others had declared this node down, and it rejoined under a new generation: they
    /// have dropped its sessions and may have taken over its users meanwhile, so the host
    /// must treat its sessions and user actors as a restarted node would (found by the
    /// simulator: a lossy network made nodes rejoin while their sessions stayed connected).
    pub rejoined: bool,
}

pub struct Membership {
    me: NodeIdentity,
    foca: Foca<NodeIdentity, PostcardCodec, SeededRng, LeavingHandler>,
    seeds: Vec<String>,
    /// Leaving notes heard (this node's own included).
    leavers: Leavers,
    /// This node is leaving: the sequence of its last note.
    leaving_seq: Option<u64>,
    /// The members seen leaving at the last drain (to report the new ones).
    leaving_seen: BTreeSet<String>,
    out: foca::AccumulatingRuntime<NodeIdentity>,
    /// Real members seen up, by name (BTreeMap: iteration order must not depend on a hasher).
    up: BTreeMap<String, NodeIdentity>,
    /// foca probes (its `Active` notification came, and no `Idle`, `Defunct` or `Rejoin`
    /// since). After a rejoin foca waits, probing nothing, for a message addressed to its new
    /// identity; its timers from before (a suspect's way to down among them) are void.
    connected: bool,
}

/// SWIM timings. LAN defaults from foca, with failure detection tightened for a data-centre
/// network: a dead node is suspected after one failed probe round and declared down
/// `suspect_to_down` later. Bound on detection ≈ probe_period × (members − 1) (worst case
/// until someone probes it) + probe_rtt + suspect_to_down.
#[derive(Clone, Debug)]
pub struct Timings {
    pub probe_period: Duration,
    pub probe_rtt: Duration,
    pub suspect_to_down: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            suspect_to_down: Duration::from_secs(2),
        }
    }
}

impl Membership {
    pub fn new(me: NodeIdentity, seeds: Vec<String>, timings: &Timings, seed: u64) -> Self {
        let mut cfg = Config::new_lan(NonZeroU32::new(32).expect("non-zero"));
        cfg.probe_period = timings.probe_period;
        cfg.probe_rtt = timings.probe_rtt;
        cfg.suspect_to_down_after = timings.suspect_to_down;
        // Heal partitions in seconds rather than foca's LAN minute: a few datagrams more.
        cfg.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(5),
            num_members: std::num::NonZeroUsize::new(2).expect("non-zero"),
        });
        cfg.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: std::num::NonZeroUsize::new(1).expect("non-zero"),
        });
        let rng = SeededRng(ChaCha8Rng::seed_from_u64(seed));
        let leavers = Leavers::default();
        let foca = Foca::with_custom_broadcast(me.clone(), cfg, rng, PostcardCodec, LeavingHandler(leavers.clone()));
        let seeds = seeds.into_iter().filter(|s| *s != me.gossip).collect();
        Membership {
            me,
            foca,
            seeds,
            leavers,
            leaving_seq: None,
            leaving_seen: BTreeSet::new(),
            out: foca::AccumulatingRuntime::new(),
            up: BTreeMap::new(),
            connected: false,
        }
    }

    pub fn me(&self) -> &NodeIdentity {
        &self.me
    }

    /// Announces this node to every seed; call at start and from [`Membership::tick`].
    pub fn join(&mut self) -> Output {
        for s in self.seeds.clone() {
            if let Err(e) = self.foca.announce(NodeIdentity::seed(&s), &mut self.out) {
                tracing::warn!(error = %e, seed = %s, "gossip: announce failed");
            }
        }
        self.drain()
    }

    /// Called by the host every few seconds: while this node knows no live member, it keeps
    /// announcing itself to the seeds (they may have started after it, or a partition healed).
    /// While foca is not probing — after a rejoin it waits for a message addressed to its new
    /// identity, and nobody may send one: the others hold its old identity as down, and may
    /// have forgotten it (found by the simulator, 3 nodes, seed 36: two members left after a
    /// leave, both rejoined, never spoke again) — it announces itself to the seeds and to every
    /// member it knows of, down ones included (an announce is accepted by address).
    pub fn tick(&mut self) -> Output {
        if self.foca.num_members() == 0 {
            return self.join();
        }
        if !self.connected {
            let mut to: Vec<NodeIdentity> = self
                .foca
                .iter_membership_state()
                .map(|m| m.id().clone())
                .filter(|id| id.gossip != self.me.gossip)
                .collect();
            let seeds: Vec<NodeIdentity> = self
                .seeds
                .iter()
                .filter(|s| !to.iter().any(|m| m.gossip == **s))
                .map(|s| NodeIdentity::seed(s))
                .collect();
            to.extend(seeds);
            for id in to {
                if let Err(e) = self.foca.announce(id, &mut self.out) {
                    tracing::warn!(error = %e, "gossip: announce failed");
                }
            }
        }
        if self.leaving_seq.is_some() {
            // Said again every tick: foca stops disseminating a note after a few rounds, and
            // a member that joined or healed since must hear it too.
            self.say_leaving();
        }
        self.drain()
    }

    /// Starts decommissioning this node: the others (and this node) take it off the ring,
    /// so its slots' groups replace it and its actors move; it stays a member, reachable,
    /// until the host calls [`Membership::leave`].
    pub fn start_leaving(&mut self) -> Output {
        if self.leaving_seq.is_none() {
            self.leaving_seq = Some(0);
            self.say_leaving();
        }
        self.drain()
    }

    /// Whether this node is leaving.
    pub fn is_leaving(&self) -> bool {
        self.leaving_seq.is_some()
    }

    fn say_leaving(&mut self) {
        let seq = self.leaving_seq.map_or(0, |s| s + 1);
        self.leaving_seq = Some(seq);
        let note = LeavingNote {
            name: self.me.name.clone(),
            generation: self.me.generation,
            seq,
        };
        let data = postcard::to_stdvec(&note).expect("postcard encoding of a note cannot fail");
        if let Err(e) = self.foca.add_broadcast(&data) {
            tracing::warn!(error = %e, "gossip: the leaving note was not queued");
        }
        // Sent now to a few members rather than with the next probe.
        if let Err(e) = self.foca.gossip(&mut self.out) {
            tracing::debug!(error = %e, "gossip: the leaving note waits for the next round");
        }
    }

    /// The members leaving (by name), this node included when it is: a note is honoured for
    /// the generation that sent it (a restarted node is not leaving).
    pub fn leaving(&self) -> BTreeSet<String> {
        let heard = self.leavers.lock().expect("leavers lock");
        let mut out: BTreeSet<String> = heard
            .iter()
            .filter(|(name, (generation, _))| self.up.get(*name).is_some_and(|m| m.generation == *generation))
            .map(|(name, _)| name.clone())
            .collect();
        if self.leaving_seq.is_some() {
            out.insert(self.me.name.clone());
        }
        out
    }

    pub fn handle_data(&mut self, data: &[u8]) -> Output {
        if let Err(e) = self.foca.handle_data(data, &mut self.out) {
            // Malformed or stale packets are expected on a shared port: a debug line, no more.
            tracing::debug!(error = %e, "gossip: packet ignored");
        }
        self.drain()
    }

    pub fn handle_timer(&mut self, timer: Timer<NodeIdentity>) -> Output {
        if let Err(e) = self.foca.handle_timer(timer, &mut self.out) {
            tracing::warn!(error = %e, "gossip: timer failed");
        }
        self.drain()
    }

    /// Tells the others this node is leaving (a clean shutdown).
    pub fn leave(&mut self) -> Output {
        if let Err(e) = self.foca.leave_cluster(&mut self.out) {
            tracing::warn!(error = %e, "gossip: leave failed");
        }
        self.drain()
    }

    /// This node and every member seen up, by name, less those leaving.
    pub fn ring(&self) -> Ring {
        let leaving = self.leaving();
        Ring::new(
            std::iter::once(self.me.name.clone())
                .chain(self.up.keys().cloned())
                .filter(|n| !leaving.contains(n))
                .collect::<Vec<_>>(),
        )
    }

    /// The members up, this node included, sorted by name.
    pub fn up(&self) -> Vec<NodeIdentity> {
        let mut v: Vec<NodeIdentity> = self.up.values().cloned().collect();
        v.push(self.me.clone());
        v.sort();
        v
    }

    /// Every member foca knows (alive, suspect, recently down), this node included.
    pub fn members(&self) -> Vec<(NodeIdentity, MemberState)> {
        let mut v: Vec<(NodeIdentity, MemberState)> = self
            .foca
            .iter_membership_state()
            .filter(|m| !m.id().is_placeholder())
            .map(|m| {
                let s = match m.state() {
                    foca::State::Alive => MemberState::Alive,
                    foca::State::Suspect => MemberState::Suspect,
                    foca::State::Down => MemberState::Down,
                };
                (m.id().clone(), s)
            })
            .collect();
        v.push((self.me.clone(), MemberState::Alive));
        v.sort();
        v
    }

    fn drain(&mut self) -> Output {
        let mut out = Output::default();
        while let Some((to, data)) = self.out.to_send() {
            out.send.push((to.gossip, data.to_vec()));
        }
        while let Some((after, timer)) = self.out.to_schedule() {
            out.timers.push((after, timer));
        }
        while let Some(n) = self.out.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) if !id.is_placeholder() => {
                    if id.name == self.me.name {
                        tracing::error!(?id, "gossip: another node uses this node's name; ignored");
                        continue;
                    }
                    if node_id(&id.name) == node_id(&self.me.name) {
                        tracing::error!(
                            member = %id.name, me = %self.me.name, node_id = node_id(&id.name),
                            "gossip: a member's name hashes to this node's id; it is refused \
                             (rename one of them: cluster.node_name)"
                        );
                        continue;
                    }
                    // Two other members whose names hash to one id: every node keeps the
                    // one whose name sorts first, whichever it saw first, so all agree.
                    let rival = self
                        .up
                        .values()
                        .find(|m| m.name != id.name && node_id(&m.name) == node_id(&id.name))
                        .cloned();
                    if let Some(rival) = rival {
                        let (kept, refused) = if rival.name < id.name {
                            (&rival.name, &id.name)
                        } else {
                            (&id.name, &rival.name)
                        };
                        tracing::error!(
                            %kept, %refused, node_id = node_id(&id.name),
                            "gossip: two members' names hash to one node id; the second is refused \
                             (rename it: cluster.node_name)"
                        );
                        if rival.name < id.name {
                            continue;
                        }
                        self.up.remove(&rival.name);
                        out.changes.push(Change::Down(rival));
                    }
                    // A restart with a higher generation replaces the old process.
                    if let Some(old) = self.up.insert(id.name.clone(), id.clone()) {
                        if old != id {
                            out.changes.push(Change::Down(old));
                        }
                    }
                    out.changes.push(Change::Up(id));
                }
                OwnedNotification::MemberDown(id) if !id.is_placeholder() && self.up.get(&id.name) == Some(&id) => {
                    self.up.remove(&id.name);
                    out.changes.push(Change::Down(id));
                }
                OwnedNotification::Rename(old, new)
                    if !new.is_placeholder() && self.up.get(&old.name) == Some(&old) =>
                {
                    self.up.insert(new.name.clone(), new.clone());
                    out.changes.push(Change::Up(new));
                }
                OwnedNotification::Rejoin(id) => {
                    // Declared down (a partition, a pause) and back under a new generation.
                    tracing::warn!(?id, "gossip: this node was declared down; rejoined");
                    self.me = id;
                    out.rejoined = true;
                    self.connected = false;
                }
                OwnedNotification::Active => self.connected = true,
                OwnedNotification::Idle | OwnedNotification::Defunct => self.connected = false,
                _ => {}
            }
        }
        let leaving = self.leaving();
        if leaving != self.leaving_seen {
            for name in leaving.difference(&self.leaving_seen) {
                let id = if *name == self.me.name {
                    Some(self.me.clone())
                } else {
                    self.up.get(name).cloned()
                };
                out.changes.extend(id.map(Change::Leaving));
            }
            // (A leaver no longer leaving went down or restarted: its `Down` or `Up` says so.)
            self.leaving_seen = leaving;
        }
        out
    }
}
