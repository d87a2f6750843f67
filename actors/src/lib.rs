//! Starling's XMPP core, sans-io: every state machine here takes inputs and `now` and returns
//! effects; none touches a socket, clock, thread, random source or disk (DESIGN.md).

pub mod address;
pub mod c2s;
pub mod msg;
pub mod ns;
pub mod parser;
pub mod planted;
pub mod scram;
pub mod stanza;
pub mod system;
pub mod throttle;
pub mod user;
pub mod wire;
pub mod xml;
