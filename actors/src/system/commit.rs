//! Group commit, the storage thread's rule, written once for both hosts: a write batch is
//! applied at once (later reads see it) and waits for the next flush; one flush makes every
//! batch applied before it durable, at most [`GROUP_COMMIT_MAX`](super::limits::GROUP_COMMIT_MAX)
//! of them; only then are their writers answered — all failed if the flush failed. A batch the
//! store refuses (a version condition, `StorageError::Conflict`) is answered at once. The host
//! runs the flush (the node's storage thread blocks on sled's fsync; the simulator takes
//! virtual time) and answers the waiters.

use starling_storage::{Storage, StorageError, Write};

use super::limits::GROUP_COMMIT_MAX;

/// Batches waiting for a flush, each with its writer (`W`: how the host answers it).
pub struct GroupCommit<W> {
    queued: Vec<W>,
    /// The flush in progress and who waits on it.
    flushing: Option<Vec<W>>,
}

impl<W> Default for GroupCommit<W> {
    fn default() -> Self {
        GroupCommit {
            queued: Vec::new(),
            flushing: None,
        }
    }
}

impl<W> GroupCommit<W> {
    /// Applies `writes`; `waiter` then waits for the flush that makes them durable. `Err`
    /// gives the waiter back with why the store refused them (answer it now).
    pub fn write(&mut self, store: &mut impl Storage, writes: &[Write], waiter: W) -> Result<(), (W, StorageError)> {
        match store.apply(writes) {
            Ok(()) => {
                self.queued.push(waiter);
                Ok(())
            }
            Err(e) => Err((waiter, e)),
        }
    }

    /// `waiter` waits for the next flush for something the host applied itself (an account
    /// created if absent).
    pub fn after(&mut self, waiter: W) {
        self.queued.push(waiter);
    }

    /// Batches applied and waiting for a flush.
    pub fn waiting(&self) -> usize {
        self.queued.len()
    }

    /// Whether the host must flush now: none in progress and some batch waits. It then
    /// flushes and calls [`flushed`](Self::flushed).
    pub fn start(&mut self) -> bool {
        if self.flushing.is_some() || self.queued.is_empty() {
            return false;
        }
        let rest = self.queued.split_off(self.queued.len().min(GROUP_COMMIT_MAX));
        self.flushing = Some(std::mem::replace(&mut self.queued, rest));
        true
    }

    /// Whether a flush is in progress.
    pub fn in_progress(&self) -> bool {
        self.flushing.is_some()
    }

    /// The flush finished: who waited on it, in the order they wrote.
    pub fn flushed(&mut self) -> Vec<W> {
        self.flushing.take().unwrap_or_default()
    }

    /// Every batch not yet durable is gone (a crash): its writers are never answered.
    pub fn crash(&mut self) {
        self.queued.clear();
        self.flushing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::MemoryStorage;

    fn batch(user: &str, base: u64) -> Vec<Write> {
        vec![Write::NextVersion {
            user: user.into(),
            base,
        }]
    }

    #[test]
    fn one_flush_answers_everything_applied_before_it() {
        let mut st = MemoryStorage::new();
        let mut gc = GroupCommit::default();
        assert!(!gc.start(), "nothing to flush");
        gc.write(&mut st, &batch("a@x", 0), 1).unwrap();
        assert_eq!(st.load_user("a@x").unwrap().version, 1, "applied at once");
        assert!(gc.start());
        // Written during the flush: waits for the next one.
        gc.write(&mut st, &batch("b@x", 0), 2).unwrap();
        gc.write(&mut st, &batch("a@x", 1), 3).unwrap();
        assert!(!gc.start(), "one flush at a time");
        assert_eq!(gc.flushed(), vec![1]);
        assert!(gc.start());
        assert_eq!(gc.flushed(), vec![2, 3]);
        assert!(!gc.start());
    }

    #[test]
    fn a_refused_batch_is_answered_at_once_and_a_flush_covers_at_most_the_limit() {
        let mut st = MemoryStorage::new();
        let mut gc = GroupCommit::default();
        let (w, e) = gc.write(&mut st, &batch("a@x", 5), 9).unwrap_err();
        assert_eq!(w, 9);
        assert!(matches!(e, StorageError::Conflict { .. }), "{e:?}");
        for i in 0..GROUP_COMMIT_MAX as u64 + 3 {
            gc.write(&mut st, &batch("a@x", i), i).unwrap();
        }
        assert!(gc.start());
        assert_eq!(gc.flushed().len(), GROUP_COMMIT_MAX);
        assert!(gc.start());
        let m = GROUP_COMMIT_MAX as u64;
        assert_eq!(gc.flushed(), (m..m + 3).collect::<Vec<_>>());
        gc.write(&mut st, &batch("b@x", 0), 1).unwrap();
        gc.crash();
        assert!(!gc.start() && gc.flushed().is_empty());
    }
}
