//! One slot's Raft group on one node (issue 17, first step): tikv's raft-rs `RawNode` driven
//! sans-io like the rest of `system/`. The host ticks it, steps it with the messages other
//! voters sent, proposes write batches on the leader, and carries out what [`Slot::ready`]
//! returns, in order: persist the entries and hard state (here: raft-rs's in-memory log; the
//! node's sled log is a later step), send the messages, apply the committed entries.
//!
//! Determinism: raft-rs draws each election timeout from the thread RNG in
//! `[min_election_tick, max_election_tick)`; a range one tick wide, different per voter
//! (`ELECTION_TICKS + id`), makes the draw constant, so the simulator replays a run exactly and
//! two voters rarely campaign on the same tick.
//!
//! Messages cross the network in our own form ([`RaftMsg`], archived in our frames like
//! every other node-to-node message): raft's protobuf types are only its in-memory
//! representation here, never parsed from bytes a peer sent (DESIGN.md: protobuf 2's parser
//! has a recursion advisory), and a message of a kind only a node makes for itself is refused.

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message, MessageType, Snapshot, SnapshotMetadata};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};

/// Ticks without a leader's heartbeat before a follower campaigns (plus its raft id).
pub const ELECTION_TICKS: usize = 10;
/// Ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;

/// A Raft message in our own form: an rkyv archive, validated on receipt like every frame
/// (`wire.rs`), then checked again by [`RaftMsg::into_raft`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RaftMsg {
    pub kind: i32,
    pub to: u64,
    pub from: u64,
    pub term: u64,
    pub log_term: u64,
    pub index: u64,
    pub entries: Vec<RaftEntry>,
    pub commit: u64,
    pub commit_term: u64,
    pub snapshot: Option<RaftSnapshot>,
    pub request_snapshot: u64,
    pub reject: bool,
    pub reject_hint: u64,
    pub context: Vec<u8>,
    pub priority: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RaftEntry {
    pub kind: i32,
    pub term: u64,
    pub index: u64,
    pub data: Vec<u8>,
    pub context: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RaftSnapshot {
    pub data: Vec<u8>,
    pub index: u64,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    pub learners_next: Vec<u64>,
    pub auto_leave: bool,
}

/// The message kinds a peer may send (raft's local kinds — hup, beat, unreachable, snapshot
/// status, check quorum — and proposals, which this code never forwards, are refused).
const FROM_PEERS: [MessageType; 13] = [
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
];

const ENTRY_KINDS: [EntryType; 3] = [
    EntryType::EntryNormal,
    EntryType::EntryConfChange,
    EntryType::EntryConfChangeV2,
];

impl From<&Entry> for RaftEntry {
    fn from(e: &Entry) -> Self {
        RaftEntry {
            kind: e.entry_type as i32,
            term: e.term,
            index: e.index,
            data: e.data.to_vec(),
            context: e.context.to_vec(),
        }
    }
}

impl RaftEntry {
    fn into_raft(self) -> Result<Entry, String> {
        let kind = ENTRY_KINDS
            .into_iter()
            .find(|k| *k as i32 == self.kind)
            .ok_or_else(|| format!("unknown raft entry kind {}", self.kind))?;
        Ok(Entry {
            entry_type: kind,
            term: self.term,
            index: self.index,
            data: self.data.into(),
            context: self.context.into(),
            ..Default::default()
        })
    }
}

impl From<&Message> for RaftMsg {
    fn from(m: &Message) -> Self {
        let snapshot = m.snapshot.as_ref().filter(|s| !s.is_empty()).map(|s| {
            let meta = s.get_metadata();
            let cs = meta.get_conf_state();
            RaftSnapshot {
                data: s.data.to_vec(),
                index: meta.index,
                term: meta.term,
                voters: cs.voters.clone(),
                learners: cs.learners.clone(),
                voters_outgoing: cs.voters_outgoing.clone(),
                learners_next: cs.learners_next.clone(),
                auto_leave: cs.auto_leave,
            }
        });
        RaftMsg {
            kind: m.msg_type as i32,
            to: m.to,
            from: m.from,
            term: m.term,
            log_term: m.log_term,
            index: m.index,
            entries: m.entries.iter().map(RaftEntry::from).collect(),
            commit: m.commit,
            commit_term: m.commit_term,
            snapshot,
            request_snapshot: m.request_snapshot,
            reject: m.reject,
            reject_hint: m.reject_hint,
            context: m.context.to_vec(),
            priority: m.priority,
        }
    }
}

impl RaftMsg {
    /// raft's message, or why a peer's message is refused.
    pub fn into_raft(self) -> Result<Message, String> {
        let kind = FROM_PEERS
            .into_iter()
            .find(|k| *k as i32 == self.kind)
            .ok_or_else(|| format!("raft message kind {} is not for peers", self.kind))?;
        let entries = self
            .entries
            .into_iter()
            .map(RaftEntry::into_raft)
            .collect::<Result<Vec<_>, _>>()?;
        let snapshot = self.snapshot.map(|s| Snapshot {
            data: s.data.into(),
            metadata: Some(SnapshotMetadata {
                conf_state: Some(ConfState {
                    voters: s.voters,
                    learners: s.learners,
                    voters_outgoing: s.voters_outgoing,
                    learners_next: s.learners_next,
                    auto_leave: s.auto_leave,
                    ..Default::default()
                })
                .into(),
                index: s.index,
                term: s.term,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        });
        Ok(Message {
            msg_type: kind,
            to: self.to,
            from: self.from,
            term: self.term,
            log_term: self.log_term,
            index: self.index,
            entries: entries.into(),
            commit: self.commit,
            commit_term: self.commit_term,
            snapshot: snapshot.into(),
            request_snapshot: self.request_snapshot,
            reject: self.reject,
            reject_hint: self.reject_hint,
            context: self.context.into(),
            priority: self.priority,
            ..Default::default()
        })
    }
}

/// What the host carries out after a step, in order.
#[derive(Debug, Default)]
pub struct SlotOut {
    /// Messages to send to other voters (after the entries are persisted, as raft-rs orders
    /// them: `messages` may go at once, `persisted` only after the write).
    pub messages: Vec<RaftMsg>,
    /// Entries committed on a majority, to apply in order: (index, data) of normal entries.
    pub committed: Vec<(u64, Vec<u8>)>,
    /// This node became leader (`Some(true)`) or stopped being it (`Some(false)`).
    pub leader: Option<bool>,
}

/// One slot's Raft group on this node.
pub struct Slot {
    rn: RawNode<MemStorage>,
    was_leader: bool,
}

impl Slot {
    /// A voter `id` (raft ids start at 1) of a new group whose voters are `voters`.
    pub fn new(id: u64, voters: &[u64]) -> Result<Self, String> {
        let cfg = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            min_election_tick: ELECTION_TICKS + id as usize,
            max_election_tick: ELECTION_TICKS + id as usize + 1,
            pre_vote: true,
            check_quorum: true,
            ..Default::default()
        };
        let cs = ConfState::from((voters.to_vec(), Vec::<u64>::new()));
        let store = MemStorage::new_with_conf_state(cs);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let rn = RawNode::new(&cfg, store, &logger).map_err(|e| e.to_string())?;
        Ok(Slot { rn, was_leader: false })
    }

    pub fn tick(&mut self) {
        self.rn.tick();
    }

    /// A message from another voter.
    pub fn step(&mut self, m: RaftMsg) -> Result<(), String> {
        let m = m.into_raft()?;
        self.rn.step(m).map_err(|e| e.to_string())
    }

    pub fn is_leader(&self) -> bool {
        self.rn.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> u64 {
        self.rn.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.rn.raft.term
    }

    /// Proposes `data` (a write batch) on the leader; `Err` elsewhere (the host sends the
    /// work to the leader's node instead).
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), String> {
        if !self.is_leader() {
            return Err(format!("not the leader (the leader is {})", self.leader()));
        }
        self.rn.propose(Vec::new(), data).map_err(|e| e.to_string())
    }

    /// What the last steps produced: persists it (the in-memory log), then gives the host the
    /// messages to send and the entries to apply.
    pub fn ready(&mut self) -> SlotOut {
        let mut out = SlotOut::default();
        let leader = self.is_leader();
        if leader != self.was_leader {
            self.was_leader = leader;
            out.leader = Some(leader);
        }
        if !self.rn.has_ready() {
            return out;
        }
        let mut rd = self.rn.ready();
        out.messages.extend(rd.take_messages().iter().map(RaftMsg::from));
        if !rd.snapshot().is_empty() {
            let s = rd.snapshot().clone();
            if let Err(e) = self.rn.mut_store().wl().apply_snapshot(s) {
                tracing::error!(error = %e, "raft: snapshot not applied");
            }
        }
        committed(&mut out, rd.take_committed_entries());
        if !rd.entries().is_empty() {
            if let Err(e) = self.rn.mut_store().wl().append(rd.entries()) {
                tracing::error!(error = %e, "raft: entries not appended");
            }
        }
        if let Some(hs) = rd.hs() {
            let hs: HardState = hs.clone();
            self.rn.mut_store().wl().set_hardstate(hs);
        }
        out.messages
            .extend(rd.take_persisted_messages().iter().map(RaftMsg::from));
        let mut light = self.rn.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.rn.mut_store().wl().mut_hard_state().commit = commit;
        }
        out.messages.extend(light.take_messages().iter().map(RaftMsg::from));
        committed(&mut out, light.take_committed_entries());
        self.rn.advance_apply();
        let leader = self.is_leader();
        if leader != self.was_leader {
            self.was_leader = leader;
            out.leader = Some(leader);
        }
        out
    }
}

fn committed(out: &mut SlotOut, entries: Vec<Entry>) {
    for e in entries {
        // Empty entries are the ones a new leader appends; configuration changes come with
        // the membership step of the plan.
        if e.entry_type == EntryType::EntryNormal && !e.data.is_empty() {
            out.committed.push((e.index, e.data.to_vec()));
        }
    }
}

#[cfg(test)]
mod tests;
