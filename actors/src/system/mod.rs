//! The actor system both hosts run (DESIGN.md "One actor system, two hosts"). It is being
//! moved here from `node/` and `sim/` step by step (issue 16); so far: the actor trait and the
//! effect loop of a placed actor's life (`runner`: one message at a time, effects in order,
//! writes awaited, the end after a failed write), each shard's mailboxes,
//! routing, backpressure and held control messages, activation and passivation of user
//! actors (`shard`: `ShardCore`), every limit and timeout of routing, links and storage in
//! one place (`limits`), the rules around an actor's life (`life`: an actor that cannot
//! start, that ends early, what it sends instead), and those for a stanza that reaches a
//! vanished session or cannot be delivered (`crate::msg::session_gone`,
//! `crate::msg::undeliverable`).

pub mod cluster;
pub mod commit;
pub mod conn;
pub mod life;
pub mod limits;
pub mod queues;
pub mod runner;
pub mod shard;
