//! Messages between actors. Owned and `Send` so that the host can move them between shards.

use jid::BareJid;

use crate::address::{Address, MailboxKey, NodeId, SessionAddr};
use crate::xml::Element;

#[derive(Clone, Debug, PartialEq)]
pub enum UserMsg {
    /// A session authenticated as this user asks to bind `resource`.
    Bind { session: SessionAddr, resource: String },
    /// The session is gone (stream closed, connection lost, kicked).
    Unbind { session: SessionAddr, resource: String },
    /// A stanza from one of the user's own sessions that the user's server processes for the
    /// user (presence broadcast, subscriptions, roster, IQs to the account). `from` is stamped.
    /// `session` is checked: a stanza from a session that has since been replaced by a newer
    /// one with the same resource (a reconnect, RFC 6120 §7.7.2.2) must not act for the new
    /// one — e.g. the old connection's late unavailable presence.
    Outbound {
        session: SessionAddr,
        resource: String,
        stanza: Element,
    },
    /// A stanza addressed to this user (bare or full JID); `from` is stamped by the sender's
    /// server.
    Inbound { stanza: Element },
    /// The session wrote the offline messages up to `upto` to its client: now they may be
    /// deleted (answer to [`SessionMsg::OfflineSent`]).
    OfflineDelivered { session: SessionAddr, upto: u64 },
    /// A cluster node's incarnations up to generation `gen` died, restarted or were declared
    /// down: the sessions they hosted are gone (their clients will reconnect). Each is unbound
    /// as if it had closed; a session the node accepted under a later generation (it rejoined
    /// and a client bound again before this node heard of it) stays.
    NodeDown { node: NodeId, gen: u64 },
    /// The membership changed a moment ago (hosts send it [`RESYNC_AFTER_MS`] after each
    /// change, once the membership has settled): contacts whose actors died with a node, and
    /// what they knew of their sessions, are asked for their presence again (`ns::RESYNC`);
    /// an actor that took moved sessions asks all its contacts; the others ask the
    /// contacts in `moved` slots (of `slots`: `cluster::moved_slots`), whose actors may have
    /// answered before they knew their sessions.
    Resync { moved: Vec<u32>, slots: u32 },
    /// An inbound stanza whose write failed in an earlier incarnation of this actor
    /// (`Effect::Persist::failed`), handled like `Inbound`. `tries` counts those failures:
    /// the hosts wait `tries` seconds before sending it (a cluster's views agree again by
    /// then), and after [`MAX_TRIES`] it is dropped with a log line, so a broken store
    /// cannot loop.
    Again { stanza: Element, tries: u8 },
    /// A session bound to an earlier incarnation of this actor (it moved with a membership
    /// change, or ended stale) registers with this one, with what it knows of itself, so
    /// that its client notices nothing (issue 17): its last available presence (`None`:
    /// unavailable), the roster version its client has if it asked for the roster (it
    /// receives pushes), the directed-presence recipients it named, and the last offline
    /// message it confirmed (`offline_upto`, 0: none), which this incarnation deletes if
    /// still stored.
    Rebind {
        session: SessionAddr,
        resource: String,
        presence: Option<Element>,
        roster_ver: Option<String>,
        directed: Vec<String>,
        offline_upto: u64,
    },
    /// The actor's key is placed on another node now: it forgets its sessions without a
    /// word (they register with the new incarnation, `Rebind`) and goes once idle.
    Handoff,
}

/// How long after a node goes its survivors' user actors check the contacts' presence they
/// see (`UserMsg::Resync`): long enough for the membership to settle (a restarted node
/// answers for its users only once it sees the others), short next to a client's patience.
pub const RESYNC_AFTER_MS: u64 = 2_000;

/// Failed writes after which a stanza is no longer tried again (`UserMsg::Again`).
pub const MAX_TRIES: u8 = 3;

#[derive(Clone, Debug, PartialEq)]
pub enum SessionMsg {
    /// The bind request succeeded with this resource.
    Bound { resource: String },
    /// The account is gone or cannot take sessions.
    BindFailed { condition: &'static str },
    /// Deliver to the client.
    Stanza(Element),
    /// An offline message (XEP-0160) for the client. Unlike `Stanza`, one that cannot be
    /// delivered is not routed again (it is still stored) and a full mailbox never drops it.
    Offline(Element),
    /// Follows the offline messages up to `upto`: once the session has written them, it
    /// answers [`UserMsg::OfflineDelivered`]. Deleting them earlier would lose them in a
    /// crash while they wait in the session's mailbox (found by the simulator).
    OfflineSent { upto: u64 },
    /// End the session with a stream error (e.g. `conflict` when another session took the
    /// resource, `system-shutdown`).
    Kick { condition: &'static str, text: String },
    /// The user's actor moved or ended stale: register with its current incarnation
    /// (`UserMsg::Rebind`), then send `again` once more — a stanza of this session's that
    /// reached an incarnation that did not know it yet.
    Rebind { again: Option<Element> },
}

impl UserMsg {
    /// Control messages are never dropped when a mailbox is full (there are few: a handful
    /// per session); they wait for room, in order. Stanzas bounce instead.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            UserMsg::Bind { .. }
                | UserMsg::Unbind { .. }
                | UserMsg::OfflineDelivered { .. }
                | UserMsg::NodeDown { .. }
                | UserMsg::Resync { .. }
                | UserMsg::Again { .. }
                | UserMsg::Rebind { .. }
                | UserMsg::Handoff
        )
    }
}

impl SessionMsg {
    /// See [`UserMsg::is_control`].
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            SessionMsg::Kick { .. }
                | SessionMsg::Bound { .. }
                | SessionMsg::BindFailed { .. }
                | SessionMsg::OfflineSent { .. }
                | SessionMsg::Offline(_)
                | SessionMsg::Rebind { .. }
        )
    }
}

/// A message and its target, typed: a message for a user actor cannot be addressed to a
/// session, nor the other way round. New actor kinds add a variant each.
#[derive(Clone, Debug, PartialEq)]
pub enum Envelope {
    /// For a user actor, placed by its bare JID.
    User { to: BareJid, msg: UserMsg },
    /// For a c2s session, addressed by where its connection is.
    Session { to: SessionAddr, msg: SessionMsg },
}

/// Where an envelope goes, borrowed (placement looks at it on every route).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum To<'a> {
    User(&'a BareJid),
    Session(SessionAddr),
}

impl Envelope {
    pub fn to_session(to: SessionAddr, msg: SessionMsg) -> Self {
        Envelope::Session { to, msg }
    }
    pub fn to_user(to: BareJid, msg: UserMsg) -> Self {
        Envelope::User { to, msg }
    }
    pub fn to(&self) -> To<'_> {
        match self {
            Envelope::User { to, .. } => To::User(to),
            Envelope::Session { to, .. } => To::Session(*to),
        }
    }
    /// The target as an owned address.
    pub fn address(&self) -> Address {
        match self {
            Envelope::User { to, .. } => Address::User(to.clone()),
            Envelope::Session { to, .. } => Address::Session(*to),
        }
    }
    /// The target's mailbox on its shard.
    pub fn mailbox_key(&self) -> MailboxKey {
        match self {
            Envelope::User { to, .. } => MailboxKey::user(to),
            Envelope::Session { to, .. } => MailboxKey::Session(to.id),
        }
    }
    /// See [`UserMsg::is_control`].
    pub fn is_control(&self) -> bool {
        match self {
            Envelope::User { msg, .. } => msg.is_control(),
            Envelope::Session { msg, .. } => msg.is_control(),
        }
    }
}

/// What a host does with a message that reached a session after it ended: route these
/// envelopes on (as sent by an actor), and answer `bounce`'s sender with its condition.
#[derive(Debug, Default, PartialEq)]
pub struct SessionGone {
    pub route: Vec<Envelope>,
    pub bounce: Option<(Envelope, &'static str)>,
}

/// The rule for a message that reached a session after it ended — written once, for both
/// hosts. A message for its full JID goes back to the user actor as for the bare JID
/// (RFC 6121 §8.5.3.2.1), and the actor is told the session is gone (its own unbind may have
/// been lost with a link: a stale record would keep taking messages). One already for the
/// bare JID is answered with an error, never routed again — the two hops would loop for
/// ever while the record lasts (found by the simulator). An IQ request for a full JID with
/// no session is answered `service-unavailable` (RFC 6121 §8.5.3.2.3). Presence for a
/// session that is gone is dropped (§8.5.3.2.3 too), and so is anything else.
pub fn session_gone(addr: SessionAddr, m: SessionMsg) -> SessionGone {
    let mut out = SessionGone::default();
    let SessionMsg::Stanza(st) = m else { return out };
    if st.name != "message" && st.name != "iq" {
        return out;
    }
    let Some(to) = st.attr("to").and_then(|t| jid::Jid::new(t).ok()) else {
        return out;
    };
    let bare = to.to_bare();
    let name = st.name.clone();
    match (st.name.as_str(), to.resource()) {
        ("message", Some(_)) => {
            let mut st = st;
            st.set_attr("to", bare.to_string());
            out.route
                .push(Envelope::to_user(bare.clone(), UserMsg::Inbound { stanza: st }));
        }
        ("message", None) => {
            let env = Envelope::to_user(bare, UserMsg::Inbound { stanza: st });
            out.bounce = Some((env, "recipient-unavailable"));
            return out;
        }
        (_, None) => return out,
        (_, Some(_)) => {
            if crate::stanza::may_bounce(&st) {
                let env = Envelope::to_user(bare.clone(), UserMsg::Inbound { stanza: st });
                out.bounce = Some((env, "service-unavailable"));
            }
        }
    }
    // The unbind goes with a message only: an IQ's answer is enough (and the extra unbind
    // for IQs shifted the simulator's partitions seed 12 onto a duplicate offline delivery
    // of the home-grown replication that the Raft issue replaces).
    if let (Some(r), "message") = (to.resource(), name.as_str()) {
        out.route.push(Envelope::to_user(
            bare,
            UserMsg::Unbind {
                session: addr,
                resource: r.to_string(),
            },
        ));
    }
    out
}

/// The error reply to an envelope that cannot be delivered (`condition`), addressed to its
/// stanza's sender's user actor; `None` for control messages and for stanzas that are never
/// answered with an error (errors, IQ results: RFC 6120 §8.3.1). Both hosts route it on.
pub fn undeliverable(env: Envelope, condition: &str) -> Option<Envelope> {
    let st = match env {
        Envelope::User {
            msg: UserMsg::Inbound { stanza } | UserMsg::Outbound { stanza, .. },
            ..
        } => stanza,
        Envelope::Session {
            msg: SessionMsg::Stanza(s),
            ..
        } => s,
        _ => return None,
    };
    if !crate::stanza::may_bounce(&st) {
        return None;
    }
    let from = st.attr("from").and_then(|f| jid::Jid::new(f).ok())?;
    let err = crate::stanza::error_reply(&st, condition, None);
    Some(Envelope::to_user(from.to_bare(), UserMsg::Inbound { stanza: err }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(xml: &str) -> Element {
        crate::parser::parse_element(
            xml.as_bytes(),
            &[(String::new(), crate::ns::CLIENT.into())],
            Default::default(),
        )
        .unwrap()
    }

    const GONE: SessionAddr = SessionAddr {
        node: 0,
        node_gen: 0,
        shard: 1,
        id: 9,
    };

    fn gone(xml: &str) -> SessionGone {
        session_gone(GONE, SessionMsg::Stanza(stanza(xml)))
    }

    #[test]
    fn an_iq_for_a_session_that_is_gone_is_answered_service_unavailable() {
        let g = gone("<iq from='a@x/1' to='b@x/r' type='get' id='q'><ping xmlns='urn:xmpp:ping'/></iq>");
        let (env, condition) = g.bounce.expect("answered");
        assert_eq!(condition, "service-unavailable");
        assert!(
            matches!(&env, Envelope::User { msg: UserMsg::Inbound { stanza }, .. } if stanza.attr("id") == Some("q"))
        );
        // Results and errors are never answered.
        assert!(gone("<iq from='a@x/1' to='b@x/r' type='result' id='q'/>")
            .bounce
            .is_none());
        assert!(gone("<iq from='a@x/1' to='b@x/r' type='error' id='q'/>")
            .bounce
            .is_none());
    }

    #[test]
    fn a_message_goes_back_to_the_bare_jid_and_presence_is_dropped() {
        let g = gone("<message from='a@x/1' to='b@x/r'><body>hi</body></message>");
        assert!(g.bounce.is_none());
        assert!(matches!(
            &g.route[0],
            Envelope::User { msg: UserMsg::Inbound { stanza }, .. } if stanza.attr("to") == Some("b@x")
        ));
        // The actor learns the session is gone.
        assert!(matches!(
            &g.route[1],
            Envelope::User { msg: UserMsg::Unbind { session, resource }, .. } if *session == GONE && resource == "r"
        ));
        let g = gone("<message from='a@x/1' to='b@x'><body>hi</body></message>");
        assert_eq!(g.bounce.map(|(_, c)| c), Some("recipient-unavailable"));
        assert!(g.route.is_empty());
        assert_eq!(gone("<presence from='a@x/1' to='b@x/r'/>"), SessionGone::default());
    }
}
