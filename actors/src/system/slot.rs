//! One slot's Raft group on one node (issue 17): tikv's raft-rs `RawNode` driven sans-io like
//! the rest of `system/`. The host ticks it, steps it with what other members sent, proposes on
//! it, and carries out what [`Slot::ready`] returns, in order: the log write (durable before
//! [`Slot::persisted`] is called with its number; the messages raft may only send after it are
//! held until then), the messages to send now, a snapshot to install, the committed entries to
//! apply (in order: the host must run its storage calls in the order given).
//!
//! Persistence is asynchronous (raft-rs's `advance_append_async` / `on_persist_ready`), so a
//! group never waits for a flush to go on and one flush covers every group of a node. An
//! entry is committed only once a majority has it durable, this node's copy counted only after
//! its own write: what raft-rs says is committed is never lost with a minority of the members.
//!
//! Determinism: raft-rs draws each election timeout from the thread RNG in
//! `[min_election_tick, max_election_tick)`; that range is one tick wide here, so its draw is
//! constant, and the spread that keeps members from campaigning together comes from the ticks
//! instead: a member that is not the leader lets each tick pass with probability one half,
//! drawn from the group's own generator (seeded by the member and the slot). Its election
//! timeout is then `ELECTION_TICKS` counted ticks, about twice that many host ticks, different
//! per member and per election: runs replay exactly.

use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, Message};
use raft::{Config, RawNode, StateRole};

mod log;
mod wire;

pub use log::SlotLog;
pub use wire::{RaftEntry, RaftMsg, RaftSnapshot, ASK, MAX_CONF_CHANGE, TOMBSTONE};

use starling_storage::{RaftStored, RaftWrite};

/// Counted ticks without a leader's heartbeat before a follower campaigns (a follower counts
/// about one host tick in two, see the module's doc).
pub const ELECTION_TICKS: usize = 10;
/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// The index a bootstrapped group's log starts after (its configuration is a snapshot there).
pub const BOOTSTRAP_INDEX: u64 = 5;

/// What the host carries out after a step, in order.
#[derive(Debug, Default)]
pub struct SlotOut {
    /// Make this durable (with `install` before it), then call `persisted(number)`.
    pub log: Option<RaftWrite>,
    pub number: u64,
    /// Messages to send now (the ones that wait for the write are held by the slot).
    pub messages: Vec<RaftMsg>,
    /// A snapshot received: its index and data, to install before anything after it applies.
    pub install: Option<(u64, Vec<u8>)>,
    /// Committed entries to apply, in order: (index, data). Configuration changes and a new
    /// leader's empty entry come with empty data (the applied index still moves).
    pub apply: Vec<(u64, Vec<u8>)>,
    /// Read indexes granted: (request context, index).
    pub reads: Vec<(Vec<u8>, u64)>,
    /// This node became leader (`Some(true)`) or stopped being it (`Some(false)`).
    pub leader: Option<bool>,
    /// An applied configuration change took this node out of the group.
    pub removed: bool,
}

/// Readies waiting for their write, each with the messages to send once it is durable.
struct Held {
    number: u64,
    writes: bool,
    messages: Vec<RaftMsg>,
    /// The index of the snapshot it installs: applied once it is durable.
    snapshot: Option<u64>,
}

/// One slot's Raft group on this node.
pub struct Slot {
    pub slot: u32,
    rn: RawNode<SlotLog>,
    rng: u64,
    was_leader: bool,
    held: std::collections::VecDeque<Held>,
    /// The last committed entry handed to the host to apply, and its term.
    pub submitted: (u64, u64),
    /// The last entry the host's storage applied.
    pub applied: u64,
    /// Host ticks in a row this member has known no leader.
    leaderless: u64,
}

fn config(id: u64, applied: u64) -> Config {
    Config {
        id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        min_election_tick: ELECTION_TICKS,
        max_election_tick: ELECTION_TICKS + 1,
        applied,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    }
}

impl Slot {
    fn with_log(slot: u32, id: u64, log: SlotLog, applied: u64) -> Result<Self, String> {
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let rn = RawNode::new(&config(id, applied), log, &logger).map_err(|e| e.to_string())?;
        let mut s = Slot {
            slot,
            rn,
            rng: (id ^ (u64::from(slot) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            was_leader: false,
            held: Default::default(),
            submitted: (applied, 0),
            applied,
            leaderless: 0,
        };
        s.submitted.1 = s.rn.store().term_of(applied).unwrap_or(0);
        Ok(s)
    }

    /// A new group whose members are `voters` (raft ids start at 1), this node `id` among them;
    /// the write that stores it.
    pub fn bootstrap(slot: u32, id: u64, voters: &[u64]) -> Result<(Self, RaftWrite), String> {
        let log = SlotLog::bootstrap(voters, BOOTSTRAP_INDEX);
        let w = RaftWrite {
            slot,
            clear: true,
            state: Some(log.state_bytes()),
            ..Default::default()
        };
        Ok((Self::with_log(slot, id, log, BOOTSTRAP_INDEX)?, w))
    }

    /// A member with nothing yet, created for a message from the group's leader: it learns
    /// the group from the snapshot the leader sends. The write clears what an earlier member
    /// here may have left.
    pub fn joining(slot: u32, id: u64) -> Result<(Self, RaftWrite), String> {
        let log = SlotLog::empty();
        let w = RaftWrite {
            slot,
            clear: true,
            state: Some(log.state_bytes()),
            ..Default::default()
        };
        Ok((Self::with_log(slot, id, log, 0)?, w))
    }

    /// The group as this node stored it: the entries after the stored applied index are
    /// applied again (the applied index commits with their writes, so exactly those).
    pub fn restore(slot: u32, id: u64, stored: &RaftStored) -> Result<Self, String> {
        let log = SlotLog::restore(stored)?;
        let applied = stored.applied.max(log.first_index() - 1);
        Self::with_log(slot, id, log, applied)
    }

    fn coin(&mut self) -> bool {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng & 1 == 1
    }

    pub fn id(&self) -> u64 {
        self.rn.raft.id
    }

    /// The host's tick (every `limits::RAFT_TICK_MS`); a member that is not the leader
    /// counts about one in two (see the module's doc).
    pub fn tick(&mut self) {
        if self.is_leader() || self.coin() {
            self.rn.tick();
        }
        self.leaderless = if self.leader() == 0 { self.leaderless + 1 } else { 0 };
    }

    /// Host ticks in a row this member has known no leader (a voter's election clock
    /// restarts at each campaign, so `unheard` does not show it).
    pub fn leaderless(&self) -> u64 {
        self.leaderless
    }

    /// A message from another member.
    pub fn step(&mut self, mut m: RaftMsg) -> Result<(), String> {
        if m.kind == raft::eraftpb::MessageType::MsgHeartbeat as i32 && m.commit > self.last_index() {
            // A leader that has not applied this member's removal yet, talking to the empty
            // member made since (raft-rs would panic: a commit beyond the log means a lost
            // log). The real commit comes with the entries.
            tracing::debug!(
                slot = self.slot,
                commit = m.commit,
                last = self.last_index(),
                "raft: heartbeat commit beyond the log; clamped"
            );
            m.commit = self.last_index();
        }
        let m: Message = m.into_raft()?;
        self.rn.step(m).map_err(|e| e.to_string())
    }

    pub fn is_leader(&self) -> bool {
        self.rn.raft.state == StateRole::Leader
    }

    /// The leader's raft id as this member knows it (0: none known).
    pub fn leader(&self) -> u64 {
        self.rn.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.rn.raft.term
    }

    pub fn conf(&self) -> &ConfState {
        self.rn.store().conf()
    }

    /// Whether raft id `id` is in this member's configuration (voter or learner, incoming or
    /// outgoing).
    pub fn knows(&self, id: u64) -> bool {
        let c = self.conf();
        c.voters.contains(&id)
            || c.learners.contains(&id)
            || c.voters_outgoing.contains(&id)
            || c.learners_next.contains(&id)
    }

    /// A learner in its own configuration (no vote, incoming or outgoing): it never
    /// campaigns.
    pub fn is_learner(&self) -> bool {
        let c = self.conf();
        let id = self.id();
        !c.voters.contains(&id) && !c.voters_outgoing.contains(&id) && self.knows(id)
    }

    /// The voters this member's configuration names (incoming and outgoing), itself aside.
    pub fn voters(&self) -> Vec<u64> {
        let c = self.conf();
        let mut v: Vec<u64> = c.voters.iter().chain(c.voters_outgoing.iter()).copied().collect();
        v.sort_unstable();
        v.dedup();
        v.retain(|x| *x != self.id());
        v
    }

    /// Counted ticks since this member last heard from a leader (raft-rs's election clock;
    /// a voter's is reset at each campaign, a learner's only by a leader).
    pub fn unheard(&self) -> usize {
        self.rn.raft.election_elapsed
    }

    /// Whether this member has a configuration (a joining one has none until its snapshot).
    pub fn initialized(&self) -> bool {
        !self.conf().voters.is_empty()
    }

    pub fn last_index(&self) -> u64 {
        self.rn.raft.raft_log.last_index()
    }

    pub fn committed(&self) -> u64 {
        self.rn.raft.raft_log.committed
    }

    /// How far member `id`'s log matches the leader's (on the leader).
    pub fn matched(&self, id: u64) -> Option<u64> {
        self.rn.raft.prs().get(id).map(|p| p.matched)
    }

    /// A configuration change is proposed and not yet applied.
    pub fn conf_pending(&self) -> bool {
        self.rn.raft.has_pending_conf() || !self.conf().voters_outgoing.is_empty()
    }

    pub fn transferring(&self) -> bool {
        self.rn.raft.lead_transferee.is_some()
    }

    /// Proposes `data` (a command); a follower forwards it to its leader. `Err` when no
    /// leader is known or it was dropped (the host tries again later).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), String> {
        if self.leader() == 0 {
            return Err("no leader".into());
        }
        self.rn.propose(Vec::new(), data).map_err(|e| e.to_string())
    }

    /// Proposes a configuration change (on the leader).
    pub fn propose_conf(&mut self, cc: ConfChangeV2) -> Result<(), String> {
        self.rn.propose_conf_change(Vec::new(), cc).map_err(|e| e.to_string())
    }

    /// Asks for a read index under `ctx` (granted in a later `SlotOut::reads`, or not at all:
    /// the host asks again).
    pub fn read(&mut self, ctx: Vec<u8>) {
        self.rn.read_index(ctx);
    }

    /// Campaigns now (a group whose only member is this node need not wait for a timeout).
    pub fn campaign(&mut self) -> Result<(), String> {
        self.rn.campaign().map_err(|e| e.to_string())
    }

    pub fn transfer_leader(&mut self, to: u64) {
        self.rn.transfer_leader(to);
    }

    /// Raft asked for a snapshot to send (cleared): the host makes one from its data at
    /// `submitted` and `offer`s it.
    pub fn want_snapshot(&self) -> bool {
        self.rn.store().want_snapshot()
    }

    pub fn offer(&self, index: u64, term: u64, cs: ConfState, data: Vec<u8>) {
        self.rn.store().offer(index, term, cs, data);
    }

    /// The host's storage applied up to `index`; the log write of a compaction when the log
    /// has grown `keep` entries past the applied point twice over.
    pub fn applied_to(&mut self, index: u64, keep: u64) -> Option<RaftWrite> {
        self.applied = self.applied.max(index);
        let first = self.rn.store().first_index();
        if self.applied < first + 2 * keep {
            return None;
        }
        let slot = self.slot;
        self.rn.mut_store().compact(slot, self.applied - keep)
    }

    /// What the last steps produced; see the module's doc for the order.
    pub fn ready(&mut self) -> SlotOut {
        let mut out = SlotOut::default();
        if self.rn.has_ready() {
            self.ready_once(&mut out);
        }
        let leader = self.is_leader();
        if leader != self.was_leader {
            self.was_leader = leader;
            out.leader = Some(leader);
        }
        out
    }

    fn ready_once(&mut self, out: &mut SlotOut) {
        let mut rd = self.rn.ready();
        let number = rd.number();
        out.messages.extend(rd.take_messages().iter().map(RaftMsg::from));
        let mut write = RaftWrite {
            slot: self.slot,
            ..Default::default()
        };
        let mut writes = false;
        let mut snapshot = None;
        if !rd.snapshot().is_empty() {
            let s = rd.snapshot().clone();
            let meta = s.get_metadata();
            self.rn.mut_store().install(meta);
            out.install = Some((meta.index, s.data.to_vec()));
            self.submitted = (meta.index, meta.term);
            snapshot = Some(meta.index);
            write.clear = true;
            writes = true;
        }
        if !rd.entries().is_empty() {
            write.entries = self.rn.mut_store().append(rd.entries());
            writes = true;
        }
        if let Some(hs) = rd.hs() {
            self.rn.mut_store().set_hard_state(hs.clone());
            writes = true;
        }
        let committed = rd.take_committed_entries();
        out.reads
            .extend(rd.take_read_states().into_iter().map(|r| (r.request_ctx, r.index)));
        let later: Vec<RaftMsg> = rd.take_persisted_messages().iter().map(RaftMsg::from).collect();
        self.rn.advance_append_async(rd);
        // A snapshot handed to the host counts as sent: the member's progress goes back to
        // probing, so one lost on the way is made and sent again (raft-rs would wait for the
        // report forever).
        let snap = raft::eraftpb::MessageType::MsgSnapshot as i32;
        for to in out
            .messages
            .iter()
            .chain(&later)
            .filter(|m| m.kind == snap)
            .map(|m| m.to)
        {
            self.rn.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
        let conf_before = self.rn.store().conf_index;
        self.hand_out(committed, out);
        if writes || self.rn.store().conf_index != conf_before {
            write.state = Some(self.rn.store().state_bytes());
            out.log = Some(write);
            out.number = number;
            self.held.push_back(Held {
                number,
                writes: true,
                messages: later,
                snapshot,
            });
        } else if self.held.is_empty() {
            self.rn.on_persist_ready(number);
            out.messages.extend(later);
        } else {
            self.held.push_back(Held {
                number,
                writes: false,
                messages: later,
                snapshot: None,
            });
        }
    }

    fn hand_out(&mut self, entries: Vec<Entry>, out: &mut SlotOut) {
        let Some(last) = entries.last().map(|e| (e.index, e.term)) else {
            return;
        };
        for e in entries {
            if e.entry_type == EntryType::EntryConfChangeV2 {
                self.conf_change(&e, out);
                out.apply.push((e.index, Vec::new()));
            } else {
                out.apply.push((e.index, e.data.to_vec()));
            }
        }
        self.submitted = last;
        self.rn.advance_apply_to(last.0);
    }

    fn conf_change(&mut self, e: &Entry, out: &mut SlotOut) {
        if e.index <= self.rn.store().conf_index {
            return; // applied before a restart: in the configuration already
        }
        let cc: ConfChangeV2 = match protobuf::Message::parse_from_bytes(&e.data) {
            Ok(cc) => cc,
            Err(err) => {
                tracing::error!(slot = self.slot, index = e.index, error = %err, "raft: unreadable configuration change");
                return;
            }
        };
        match self.rn.apply_conf_change(&cc) {
            Ok(cs) => {
                let me = self.id();
                let member = cs.voters.contains(&me)
                    || cs.learners.contains(&me)
                    || cs.voters_outgoing.contains(&me)
                    || cs.learners_next.contains(&me);
                tracing::debug!(slot = self.slot, index = e.index, ?cs, "raft: configuration changed");
                self.rn.mut_store().set_conf(cs, e.index);
                out.removed |= !member;
            }
            Err(err) => {
                tracing::error!(slot = self.slot, index = e.index, error = %err, "raft: configuration change refused");
            }
        }
    }

    /// The log write of ready `number` (and every one before it) is durable: the messages
    /// held for it, to send now.
    pub fn persisted(&mut self, number: u64) -> Vec<RaftMsg> {
        let mut msgs = Vec::new();
        let mut upto = None;
        let mut snapshot = None;
        while let Some(h) = self.held.front() {
            if h.writes && h.number > number {
                break;
            }
            let h = self.held.pop_front().expect("front");
            upto = Some(h.number);
            snapshot = h.snapshot.or(snapshot);
            msgs.extend(h.messages);
        }
        if let Some(n) = upto {
            self.rn.on_persist_ready(n);
        }
        if let Some(index) = snapshot {
            // raft-rs's applied index moves to a snapshot once it is durable (it reads the
            // entries after its applied index, which a snapshot's log no longer has).
            if index > self.rn.raft.raft_log.applied {
                self.rn.advance_apply_to(index);
            }
        }
        msgs
    }
}

#[cfg(test)]
mod tests;
