//! Cluster membership and placement (DESIGN.md "Addresses and placement"), sans-io.
//!
//! So far only placement: [`Ring`] answers "which node owns this key" and "who are its
//! replicas" for a given membership. Membership (SWIM with foca) comes with the rest of the
//! cluster issue.

mod placement;

pub use placement::{NodeName, Ring};
