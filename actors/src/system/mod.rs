//! The actor system both hosts run (DESIGN.md "One actor system, two hosts"): the actor trait
//! and the effect loop of a placed actor's life (`runner`: one message at a time, effects in
//! order, writes awaited, the end after a failed write), each shard's mailboxes, routing,
//! backpressure and held control messages, activation and passivation (`shard`:
//! `ShardCore`), a connection's effect loop (`conn`), group commit (`commit`), the cluster's
//! rules (`cluster`: placement, slots, which sessions reconnect), the replicated state on Raft
//! (`slot`: one slot's group over raft-rs; `consensus`: the groups of a shard, writes,
//! read-index reads, membership, snapshots), when a leaving node may stop (`leave`), every limit and timeout in one place
//! (`limits`), the rules around an actor's life (`life`), and those for a stanza that reaches
//! a vanished session or cannot be delivered (`crate::msg::session_gone`,
//! `crate::msg::undeliverable`). The node (`node/`) and the simulator (`sim/`) only move bytes
//! and time around them.

pub mod cluster;
pub mod commit;
pub mod conn;
pub mod consensus;
pub mod leave;
pub mod life;
pub mod limits;
pub mod queues;
pub mod runner;
pub mod shard;
pub mod slot;
