//! Raft messages in our own form (issue 17): what crosses the network between nodes is an
//! rkyv archive of these, validated on receipt like every frame (`crate::wire`), then checked
//! again by [`RaftMsg::into_raft`]. raft's protobuf types are only its in-memory
//! representation, never parsed from bytes a peer sent (DESIGN.md: protobuf 2's parser has a
//! recursion advisory) — but for one thing raft-rs itself parses: a configuration change's
//! entry data, which this code bounds ([`MAX_CONF_CHANGE`]) before raft sees it.

use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata};

/// The largest configuration change entry accepted from a peer (ours are a few dozen bytes):
/// raft-rs parses these bytes with protobuf 2, so their nesting is bounded by their size.
pub const MAX_CONF_CHANGE: usize = 256;

/// Not a raft-rs message but ours: "you are not a member of this slot's group as of my
/// applied index `index`" — the answer to a message from a member removed by a change it
/// never learnt of (raft-rs stops talking to a removed member; it would wait forever).
pub const TOMBSTONE: i32 = -1;

/// Ours too: "am I still in this slot's group?" — sent by a learner that has heard from no
/// leader for a while to the voters it knows. A learner never campaigns, so a learner removed
/// by a change it never learnt of would otherwise wait for ever (found by the simulator:
/// 3 nodes, seeds 196 and 241, a node that joined late left while still a learner, and its
/// copies kept it from ever stopping); a voter whose applied configuration lacks it answers
/// [`TOMBSTONE`].
pub const ASK: i32 = -2;

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

/// The message kinds a peer may send: raft's local kinds — hup, beat, unreachable, snapshot
/// status, check quorum — are refused. Proposals are a follower's, forwarded to its leader.
const FROM_PEERS: [MessageType; 14] = [
    MessageType::MsgPropose,
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

/// Configuration changes are always V2 here (joint consensus).
const ENTRY_KINDS: [EntryType; 2] = [EntryType::EntryNormal, EntryType::EntryConfChangeV2];

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
    pub fn into_raft(self) -> Result<Entry, String> {
        let kind = ENTRY_KINDS
            .into_iter()
            .find(|k| *k as i32 == self.kind)
            .ok_or_else(|| format!("unknown raft entry kind {}", self.kind))?;
        if kind == EntryType::EntryConfChangeV2 && self.data.len() > MAX_CONF_CHANGE {
            return Err(format!("a configuration change of {} bytes", self.data.len()));
        }
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

impl RaftMsg {
    /// [`TOMBSTONE`] from `from` to `to`, as of `applied`.
    pub fn tombstone(from: u64, to: u64, applied: u64) -> Self {
        RaftMsg {
            kind: TOMBSTONE,
            index: applied,
            ..Self::ask(from, to)
        }
    }

    /// [`ASK`] from `from` to `to`.
    pub fn ask(from: u64, to: u64) -> Self {
        RaftMsg {
            kind: ASK,
            to,
            from,
            term: 0,
            log_term: 0,
            index: 0,
            entries: Vec::new(),
            commit: 0,
            commit_term: 0,
            snapshot: None,
            request_snapshot: 0,
            reject: false,
            reject_hint: 0,
            context: Vec::new(),
            priority: 0,
        }
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
        if kind == MessageType::MsgPropose && self.entries.iter().any(|e| e.kind != EntryType::EntryNormal as i32) {
            return Err("a configuration change proposed by a peer".into());
        }
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
