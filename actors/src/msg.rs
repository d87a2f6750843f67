//! Messages between actors. Owned and `Send` so that the host can move them between shards.

use crate::address::{Address, SessionAddr};
use crate::xml::Element;

#[derive(Clone, Debug, PartialEq)]
pub enum UserMsg {
    /// A session authenticated as this user asks to bind `resource`.
    Bind { session: SessionAddr, resource: String },
    /// The session is gone (stream closed, connection lost, kicked).
    Unbind { session: SessionAddr, resource: String },
    /// A stanza from one of the user's own sessions that the user's server processes for the
    /// user (presence broadcast, subscriptions, roster, IQs to the account). `from` is stamped.
    Outbound { resource: String, stanza: Element },
    /// A stanza addressed to this user (bare or full JID); `from` is stamped by the sender's
    /// server.
    Inbound { stanza: Element },
}

#[derive(Clone, Debug, PartialEq)]
pub enum SessionMsg {
    /// The bind request succeeded with this resource.
    Bound { resource: String },
    /// The account is gone or cannot take sessions.
    BindFailed { condition: &'static str },
    /// Deliver to the client.
    Stanza(Element),
    /// End the session with a stream error (e.g. `conflict` when another session took the
    /// resource, `system-shutdown`).
    Kick { condition: &'static str, text: String },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    User(UserMsg),
    Session(SessionMsg),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub to: Address,
    pub msg: Msg,
}

impl Envelope {
    pub fn to_session(to: SessionAddr, msg: SessionMsg) -> Self {
        Envelope {
            to: Address::Session(to),
            msg: Msg::Session(msg),
        }
    }
    pub fn to_user(to: jid::BareJid, msg: UserMsg) -> Self {
        Envelope {
            to: Address::User(to),
            msg: Msg::User(msg),
        }
    }
}
