//! The actor system both hosts run (DESIGN.md "One actor system, two hosts"). It is being
//! moved here from `node/` and `sim/` step by step (issue 16); so far: every limit and
//! timeout of routing, links and storage in one place (`limits`), and the rule for a stanza
//! that reaches a vanished session (`crate::msg::session_gone`).

pub mod limits;
