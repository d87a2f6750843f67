//! Cluster membership and placement (DESIGN.md "Addresses and placement"), sans-io.
//!
//! [`Membership`] runs SWIM (foca) for the host: datagrams and timers in, datagrams, timers
//! and member changes out. [`Ring`] answers "which node owns this key" and "who are its
//! replicas" for a given membership.

mod membership;
mod placement;

pub use foca::Timer;
pub use membership::{node_id, Change, MemberState, Membership, NodeIdentity, Output, Timings};
pub use placement::{NodeName, Ring};
