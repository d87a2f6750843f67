//! The `starling` node: configuration, the glommio shards and their listeners, TLS, the
//! storage thread, and the ractor control plane.

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod control;
pub mod metrics;
pub mod shard;
pub mod storage_thread;
pub mod tls;
pub mod user_host;
