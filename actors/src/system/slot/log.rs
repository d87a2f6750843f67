//! One slot's Raft log in memory, as raft-rs reads it (its `Storage` trait), and its stored
//! form: the host keeps the durable copy (`starling_storage::Storage::raft_write`), this
//! module says what to write and rebuilds the log from what was stored.
//!
//! The log starts after a snapshot position (`snap_index`, `snap_term`): a bootstrapped
//! group's first five entries are a snapshot (so a newcomer always starts from one and learns
//! the configuration from it, as raft-rs's docs advise), and compaction moves the position on.
//! Snapshots to send are made by the host from the stored data ([`SlotLog::want_snapshot`],
//! [`SlotLog::offer`]): raft-rs asks, gets `SnapshotTemporarilyUnavailable`, and asks again on
//! a later heartbeat, by which time the host has made one; each is sent once.

use std::cell::{Cell, RefCell};

use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use serde::{Deserialize, Serialize};
use starling_storage::{RaftStored, RaftWrite};

/// The state that goes with the log: hard state, applied configuration, snapshot position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Disk {
    term: u64,
    vote: u64,
    commit: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    voters_outgoing: Vec<u64>,
    learners_next: Vec<u64>,
    auto_leave: bool,
    /// The index of the configuration change `voters`… come from (re-applied after a restart,
    /// a change at or below it is skipped: it is in the configuration already).
    conf_index: u64,
    snap_index: u64,
    snap_term: u64,
}

/// A log entry as stored.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    kind: i32,
    term: u64,
    data: Vec<u8>,
    context: Vec<u8>,
}

pub struct SlotLog {
    hs: HardState,
    cs: ConfState,
    pub(crate) conf_index: u64,
    snap_index: u64,
    snap_term: u64,
    entries: Vec<Entry>,
    /// A snapshot with the slot's data, made by the host, for raft to send.
    offered: RefCell<Option<Snapshot>>,
    /// raft asked for a snapshot newer than the one offered (or none was).
    wanted: Cell<bool>,
}

fn conf_state(d: &Disk) -> ConfState {
    ConfState {
        voters: d.voters.clone(),
        learners: d.learners.clone(),
        voters_outgoing: d.voters_outgoing.clone(),
        learners_next: d.learners_next.clone(),
        auto_leave: d.auto_leave,
        ..Default::default()
    }
}

impl SlotLog {
    /// A member that has nothing yet (created by a leader's message): no configuration, an
    /// empty log; a snapshot brings both.
    pub fn empty() -> Self {
        SlotLog {
            hs: HardState::default(),
            cs: ConfState::default(),
            conf_index: 0,
            snap_index: 0,
            snap_term: 0,
            entries: Vec::new(),
            offered: RefCell::new(None),
            wanted: Cell::new(false),
        }
    }

    /// A new group with `voters`, its log starting after a snapshot at `index` (term `index`).
    pub fn bootstrap(voters: &[u64], index: u64) -> Self {
        let mut log = Self::empty();
        log.cs = ConfState::from((voters.to_vec(), Vec::<u64>::new()));
        log.snap_index = index;
        log.snap_term = index;
        log.hs.term = index;
        log.hs.commit = index;
        log
    }

    /// The log as it was stored.
    pub fn restore(stored: &RaftStored) -> Result<Self, String> {
        let d: Disk = postcard::from_bytes(&stored.state).map_err(|e| format!("raft state: {e}"))?;
        let mut log = Self::empty();
        log.hs = HardState {
            term: d.term,
            vote: d.vote,
            commit: d.commit,
            ..Default::default()
        };
        log.cs = conf_state(&d);
        log.conf_index = d.conf_index;
        log.snap_index = d.snap_index;
        log.snap_term = d.snap_term;
        for (index, bytes) in &stored.entries {
            let e: StoredEntry = postcard::from_bytes(bytes).map_err(|e| format!("raft entry {index}: {e}"))?;
            let kind = [EntryType::EntryNormal, EntryType::EntryConfChangeV2]
                .into_iter()
                .find(|k| *k as i32 == e.kind)
                .ok_or_else(|| format!("raft entry {index}: kind {}", e.kind))?;
            if *index != log.last() + 1 {
                return Err(format!("raft entry {index} after {}", log.last()));
            }
            log.entries.push(Entry {
                entry_type: kind,
                term: e.term,
                index: *index,
                data: e.data.into(),
                context: e.context.into(),
                ..Default::default()
            });
        }
        if log.hs.commit > log.last() {
            return Err(format!(
                "committed {} beyond the log's end {}",
                log.hs.commit,
                log.last()
            ));
        }
        Ok(log)
    }

    /// The state as stored.
    pub fn state_bytes(&self) -> Vec<u8> {
        let d = Disk {
            term: self.hs.term,
            vote: self.hs.vote,
            commit: self.hs.commit,
            voters: self.cs.voters.clone(),
            learners: self.cs.learners.clone(),
            voters_outgoing: self.cs.voters_outgoing.clone(),
            learners_next: self.cs.learners_next.clone(),
            auto_leave: self.cs.auto_leave,
            conf_index: self.conf_index,
            snap_index: self.snap_index,
            snap_term: self.snap_term,
        };
        postcard::to_stdvec(&d).expect("postcard encoding of plain structs cannot fail")
    }

    pub fn entry_bytes(e: &Entry) -> Vec<u8> {
        let s = StoredEntry {
            kind: e.entry_type as i32,
            term: e.term,
            data: e.data.to_vec(),
            context: e.context.to_vec(),
        };
        postcard::to_stdvec(&s).expect("postcard encoding of plain structs cannot fail")
    }

    /// The data of a stored entry.
    pub fn entry_data(bytes: &[u8]) -> Result<Vec<u8>, String> {
        let e: StoredEntry = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        Ok(e.data)
    }

    pub fn conf(&self) -> &ConfState {
        &self.cs
    }

    pub fn set_conf(&mut self, cs: ConfState, index: u64) {
        self.cs = cs;
        self.conf_index = index;
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hs = hs;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hs.commit = commit;
    }

    fn first(&self) -> u64 {
        self.snap_index + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snap_index, |e| e.index)
    }

    /// The log's first entry (the entries before are compacted away).
    pub fn first_index(&self) -> u64 {
        self.first()
    }

    /// The term of entry `index`, if the log has it (or it is the snapshot's).
    pub fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.snap_index {
            return Some(self.snap_term);
        }
        if index < self.first() || index > self.last() {
            return None;
        }
        Some(self.entries[(index - self.first()) as usize].term)
    }

    /// Appends entries a ready brought (replacing the tail from their first index on); the
    /// write that makes them durable.
    pub fn append(&mut self, ents: &[Entry]) -> Vec<(u64, Vec<u8>)> {
        let Some(first) = ents.first().map(|e| e.index) else {
            return Vec::new();
        };
        if first < self.first() {
            // Entries the snapshot already covers: raft-rs does not send these.
            tracing::error!(first, snapshot = self.snap_index, "raft: entries before the snapshot");
            return Vec::new();
        }
        let keep = (first - self.first()) as usize;
        self.entries.truncate(keep.min(self.entries.len()));
        self.entries.extend_from_slice(ents);
        ents.iter().map(|e| (e.index, Self::entry_bytes(e))).collect()
    }

    /// A snapshot received: the log restarts after it.
    pub fn install(&mut self, meta: &SnapshotMetadata) {
        self.snap_index = meta.index;
        self.snap_term = meta.term;
        self.entries.clear();
        self.hs.term = self.hs.term.max(meta.term);
        self.hs.commit = meta.index;
        self.cs = meta.get_conf_state().clone();
        self.conf_index = meta.index;
        self.offered.replace(None);
    }

    /// Drops the entries up to `index` (applied everywhere it matters: the data has them,
    /// and a member further behind gets a snapshot); the write that makes it durable.
    pub fn compact(&mut self, slot: u32, index: u64) -> Option<RaftWrite> {
        let term = self.term_of(index)?;
        if index <= self.snap_index {
            return None;
        }
        let n = (index - self.snap_index) as usize;
        self.entries.drain(..n.min(self.entries.len()));
        self.snap_index = index;
        self.snap_term = term;
        Some(RaftWrite {
            slot,
            compact_below: Some(index + 1),
            state: Some(self.state_bytes()),
            ..Default::default()
        })
    }

    /// Whether raft asked for a snapshot the host has not made yet (the flag is cleared).
    pub fn want_snapshot(&self) -> bool {
        self.wanted.replace(false)
    }

    /// A snapshot of the slot's data at `index` (term `term`, configuration `cs`), for raft
    /// to send.
    pub fn offer(&self, index: u64, term: u64, cs: ConfState, data: Vec<u8>) {
        let mut s = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = s.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs);
        self.offered.replace(Some(s));
    }
}

impl raft::Storage for SlotLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hs.clone(),
            conf_state: self.cs.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let (lo, hi) = ((low - self.first()) as usize, (high - self.first()) as usize);
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(idx).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The snapshot offered, once (its configuration is the one it was made under: a later
    /// member is not in it, so each one sent is made for the occasion).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut offered = self.offered.borrow_mut();
        match offered.take() {
            Some(s) if s.get_metadata().index >= request_index.max(self.snap_index) => Ok(s),
            _ => {
                self.wanted.set(true);
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}
