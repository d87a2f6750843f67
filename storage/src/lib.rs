//! Storage for Starling: the [`Storage`] trait, its sled implementation (the node's) and an
//! in-memory implementation with a durable and a volatile part (the simulator's).
//!
//! The trait is synchronous on purpose: the node calls it from a dedicated storage thread (sled's
//! `flush` blocks and must never run on a shard), the simulator calls it inline in virtual time.
//! Writes are applied in batches and made durable by [`Storage::flush`]; the node's storage
//! thread applies every queued batch, flushes once (group commit) and only then replies.

mod memory;
mod raft_log;
mod sled_store;
mod types;

pub use memory::MemoryStorage;
pub use raft_log::{RaftStored, RaftWrite};
pub use sled_store::SledStorage;
pub use types::*;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("the data directory {0} is in use by another process (is a server running on it?)")]
    Locked(String),
    #[error("storage backend error: {0}")]
    Backend(String),
    /// A conditional batch (`Write::NextVersion`) found another version: nothing was applied.
    #[error("{user}'s state is at version {have}, the batch was for version {base}")]
    Conflict { user: String, have: u64, base: u64 },
    /// A conditional batch (`Write::NoAccount`) found the account: nothing was applied.
    #[error("{0} already has an account")]
    Exists(String),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// The operations Starling needs from a store. Keys are bare JIDs as strings (`user@domain`,
/// already normalised by the caller).
pub trait Storage {
    /// The account's credentials, if it exists.
    fn account(&self, user: &str) -> Result<Option<Account>>;
    /// Creates an account; `false` when it already exists (nothing is changed then).
    fn create_account(&mut self, user: &str, account: &Account) -> Result<bool>;
    /// Everything the user actor needs on activation: roster, roster version, offline queue.
    fn load_user(&self, user: &str) -> Result<UserData>;
    /// Applies writes in order, all or none of them when the batch has conditions
    /// (`Write::NextVersion`). Not durable until [`Storage::flush`] returns.
    fn apply(&mut self, writes: &[Write]) -> Result<()>;
    /// Makes every applied write durable.
    fn flush(&mut self) -> Result<()>;
    /// All accounts, sorted.
    fn list_accounts(&self) -> Result<Vec<String>>;
    /// Whether the account exists, and the version of the user's state here (a handoff or
    /// read repair compares it, and conditions its replacement on it).
    fn copy_version(&self, user: &str) -> Result<(bool, u64)> {
        let exists = self.account(user)?.is_some();
        Ok((exists, self.load_user(user)?.version))
    }
    /// The user's whole state here as writes that recreate it elsewhere, with its version;
    /// `None` without an account (cluster handoff and read repair).
    fn snapshot(&self, user: &str) -> Result<Option<(u64, Vec<Write>)>> {
        let Some(account) = self.account(user)? else {
            return Ok(None);
        };
        let data = self.load_user(user)?;
        let version = data.version;
        Ok(Some((version, data.into_writes(user, account))))
    }
    /// The slots whose Raft state is stored here (issue 17).
    fn raft_slots(&self) -> Result<Vec<u32>>;
    /// One slot's stored Raft log and state; `None` when nothing is stored for it.
    fn raft_stored(&self, slot: u32) -> Result<Option<RaftStored>>;
    /// Changes one slot's stored log (not durable until [`Storage::flush`]).
    fn raft_write(&mut self, w: &RaftWrite) -> Result<()>;
    /// Applies a committed entry's writes — all or none, as [`Storage::apply`]: a
    /// `Conflict` leaves them out — and records `index` as the slot's applied entry either
    /// way, together with them.
    fn apply_committed(&mut self, slot: u32, index: u64, writes: &[Write]) -> Result<()>;
    /// Everything stored for the users `in_slot` selects, as writes that recreate it (a
    /// Raft snapshot's data): each user's account, roster, offline queue and version.
    fn slot_state(&self, in_slot: &dyn Fn(&str) -> bool) -> Result<Vec<Write>> {
        let mut out = Vec::new();
        for user in self.list_accounts()? {
            if !in_slot(&user) {
                continue;
            }
            if let Some((version, writes)) = self.snapshot(&user)? {
                out.extend(writes);
                out.push(Write::SetVersion { user, version });
            }
        }
        Ok(out)
    }
    /// Replaces what is stored for the users `in_slot` selects with `writes` (a snapshot
    /// installed), and records `index` as the slot's applied entry, together.
    fn install_slot(&mut self, slot: u32, index: u64, in_slot: &dyn Fn(&str) -> bool, writes: &[Write]) -> Result<()>;
    /// Offline messages stored for all users (applied writes included), for the metrics.
    fn offline_total(&self) -> u64;
    /// Offline messages set aside as unreadable (`Write::SetAsideOffline`), for the metrics.
    fn unreadable_total(&self) -> u64;
    /// Every unreadable record with its user, for the operator.
    fn unreadable(&self) -> Result<Vec<(String, OfflineMessage)>>;
}
