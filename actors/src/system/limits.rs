//! Every fixed bound and timeout of the actor system, read by both hosts (the node and the
//! simulator), so that the simulator runs with the node's numbers. Per-deployment ones
//! (mailbox size, stanza limits, offline and roster caps) come from the configuration.

/// Envelopes one shard's channel to another shard holds before senders wait (`route_wait`)
/// or stanzas bounce (`route`).
pub const MESH_CAPACITY: usize = 1024;

/// Frames waiting on one shard's link to one other node; beyond it frames are lost with the
/// link (counted, and the stanzas' senders excused by the simulator as the node counts them).
pub const LINK_QUEUE: usize = 4096;

/// How long a remote account operation (load, create, replicate, pull) may take before it
/// fails.
pub const ACCOUNT_TIMEOUT_MS: u64 = 5_000;

/// The period of the Raft groups' clock (`system::consensus`): a leader's heartbeat every two
/// ticks, a follower campaigns after about twenty without one, a leader that heard from no
/// majority for ten steps down (`system::slot`): slow disks delay the answers that wait for
/// their flush, so the window is not much shorter than a slow fsync.
pub const RAFT_TICK_MS: u64 = 100;

/// Users handed to their new replicas at once after a ring change (each is one request and
/// one flush on the receiver).
pub const HANDOFF_PARALLEL: usize = 32;

/// Tries of a handoff's conditional replacement before it gives up (a replicated batch
/// landing between its read and its write makes it fail and compare again).
pub const HANDOFF_TRIES: usize = 3;

/// The pause per earlier failure before an inbound stanza whose write failed is handed to
/// the actor's next incarnation (`UserMsg::Again`).
pub const AGAIN_AFTER_MS: u64 = 1_000;

/// How often held control messages (a full mailbox) and control messages that met a full
/// mesh channel are tried again.
pub const RETRY_MS: u64 = 5;

/// Requests waiting for the storage thread before senders wait.
pub const STORAGE_QUEUE: usize = 8192;

/// Write batches one group commit covers at most (one flush for all of them).
pub const GROUP_COMMIT_MAX: usize = 1024;

pub use crate::msg::{MAX_TRIES, RESYNC_AFTER_MS};
