//! What the storage keeps of each slot's Raft group (issue 17): its log entries, its state
//! (hard state, configuration, snapshot position: bytes the caller encodes) and the index of
//! the last entry applied to the data. A log write is durable after [`crate::Storage::flush`]
//! like every other write, and group-committed with them; an entry's application and the
//! applied index change together (all or none), so after a crash a node re-applies exactly
//! the entries after the applied index.

/// One slot's Raft log and state as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStored {
    pub state: Vec<u8>,
    /// `(index, entry)` in index order.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// The last entry applied to the data (0: none).
    pub applied: u64,
}

/// A change to one slot's stored log, applied in this order: `clear`, `compact_below`,
/// `entries`, `state`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftWrite {
    pub slot: u32,
    /// Drops every stored entry (a snapshot replaced the log).
    pub clear: bool,
    /// Drops the entries below this index (the log was compacted up to a snapshot).
    pub compact_below: Option<u64>,
    /// New entries: they replace every stored entry from the first one's index on (a new
    /// leader may overwrite an uncommitted tail).
    pub entries: Vec<(u64, Vec<u8>)>,
    pub state: Option<Vec<u8>>,
}

impl RaftStored {
    /// Applies `w` (the in-memory store's way, and the reference for the others).
    pub fn write(&mut self, w: &RaftWrite) {
        if w.clear {
            self.entries.clear();
        }
        if let Some(below) = w.compact_below {
            self.entries.retain(|(i, _)| *i >= below);
        }
        if let Some((first, _)) = w.entries.first() {
            self.entries.retain(|(i, _)| i < first);
            self.entries.extend(w.entries.iter().cloned());
        }
        if let Some(s) = &w.state {
            self.state = s.clone();
        }
    }
}
