//! Planted bugs: deliberate defects the simulator switches on to prove that its oracles catch
//! them (sim/README.md). They exist only with the `planted-bugs` feature, which production
//! builds never enable; without it [`active`] is a constant `false` and the checks compile
//! away. With it, the switch is per thread (the simulator runs one seed per thread) and off
//! unless [`set`] turns it on.

/// Whether this build has the planted bugs compiled in (switched off unless a simulator run
/// turns one on): `starling --version` says so, and the end-to-end tests refuse such a binary.
pub const COMPILED_IN: bool = cfg!(feature = "planted-bugs");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bug {
    /// `store_offline` forgets the message: neither stored nor bounced.
    DropOffline,
    /// Offline messages handed to a session are not deleted afterwards.
    KeepDeliveredOffline,
    /// Roster changes caused by a contact (subscription state) are not pushed.
    ForgetRosterPush,
    /// The per-user offline cap is not enforced.
    IgnoreOfflineCap,
    /// A host acknowledges (sends a `Persist`'s follow-ups) before the writes are flushed.
    /// Only the simulator's host reads this switch; the node's `user_host` has none.
    AckBeforeFlush,
    /// A full mailbox drops a control message instead of holding it (`system::shard`, the
    /// routing code both hosts run).
    DropHeld,
    /// A user actor's write is answered as soon as it is proposed, before its entry is
    /// committed on a majority (`system::consensus`, which both hosts run).
    AckBeforeCommit,
}

impl Bug {
    pub const ALL: [Bug; 7] = [
        Bug::DropOffline,
        Bug::KeepDeliveredOffline,
        Bug::ForgetRosterPush,
        Bug::IgnoreOfflineCap,
        Bug::AckBeforeFlush,
        Bug::DropHeld,
        Bug::AckBeforeCommit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::DropOffline => "drop-offline",
            Bug::KeepDeliveredOffline => "keep-delivered-offline",
            Bug::ForgetRosterPush => "forget-roster-push",
            Bug::IgnoreOfflineCap => "ignore-offline-cap",
            Bug::AckBeforeFlush => "ack-before-flush",
            Bug::DropHeld => "drop-held",
            Bug::AckBeforeCommit => "ack-before-commit",
        }
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

#[cfg(feature = "planted-bugs")]
thread_local! {
    static ACTIVE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether `bug` is switched on for this thread. Always `false` without the feature.
#[inline(always)]
pub fn active(bug: Bug) -> bool {
    #[cfg(feature = "planted-bugs")]
    {
        ACTIVE.with(|a| a.get() & bug.bit() != 0)
    }
    #[cfg(not(feature = "planted-bugs"))]
    {
        let _ = bug.bit();
        false
    }
}

/// Switches the given bugs on for this thread (and every other one off).
#[cfg(feature = "planted-bugs")]
pub fn set(bugs: &[Bug]) {
    ACTIVE.with(|a| a.set(bugs.iter().fold(0, |m, b| m | b.bit())));
}
