//! The subscription state machine of RFC 6121 §3 and Appendix A, both directions, with
//! pre-approval (§3.4).

use jid::BareJid;
use starling_storage::{RosterItem, Subscription as S};

use super::UserActor;
use crate::msg::{Envelope, UserMsg};
use crate::xml::Element;

impl UserActor {
    fn item_for(&self, contact: &str) -> RosterItem {
        self.roster.get(contact).cloned().unwrap_or_else(|| RosterItem {
            jid: contact.to_string(),
            ..Default::default()
        })
    }

    /// The user sent a subscription stanza to `contact`.
    pub(super) fn outbound_subscription(&mut self, ty: &str, contact: BareJid, mut st: Element) {
        let c = contact.to_string();
        // Subscription stanzas carry the bare JID (§3.1.2).
        st.set_attr("from", self.jid.to_string());
        st.set_attr("to", c.as_str());
        let route = Envelope::to_user(contact.clone(), UserMsg::Inbound { stanza: st.clone() });
        let mut item = self.item_for(&c);
        let before = item.clone();
        let mut then = Vec::new();
        match ty {
            "subscribe" => {
                if !item.in_roster && self.roster.values().filter(|i| i.in_roster).count() >= self.cfg.max_roster_items
                {
                    return self.bounce(&st, "not-allowed", Some("the roster is full"));
                }
                if !item.subscription.has_to() {
                    item.ask_out = true;
                    item.in_roster = true;
                }
                then.push(route);
            }
            "subscribed" => {
                if item.pending_in {
                    item.pending_in = false;
                    item.in_roster = true;
                    item.subscription = if item.subscription.has_to() { S::Both } else { S::From };
                    then.push(route);
                    then.extend(self.current_presences(&c));
                } else if !item.subscription.has_from() && !item.approved {
                    item.approved = true;
                    item.in_roster = true;
                }
            }
            "unsubscribe" => {
                if item.subscription.has_to() || item.ask_out {
                    item.ask_out = false;
                    item.subscription = if item.subscription.has_from() { S::From } else { S::None };
                }
                then.push(route);
            }
            "unsubscribed" => {
                if item.subscription.has_from() || item.pending_in {
                    item.pending_in = false;
                    item.approved = false;
                    item.subscription = if item.subscription.has_to() { S::To } else { S::None };
                    then.push(route);
                    then.extend(self.unavailable_to(&c));
                } else if item.approved {
                    item.approved = false;
                }
            }
            _ => return,
        }
        if item != before {
            self.commit_subscription(item, then, None);
        } else {
            for e in then {
                self.send(e);
            }
        }
    }

    /// A subscription stanza from `contact` arrived for the user.
    pub(super) fn inbound_subscription(&mut self, ty: &str, contact: BareJid, mut st: Element) {
        let c = contact.to_string();
        st.set_attr("from", c.as_str());
        st.set_attr("to", self.jid.to_string());
        let mut item = self.item_for(&c);
        let before = item.clone();
        let mut then = Vec::new();
        let reply = |ty: &str, me: &BareJid| {
            let p = Element::new("presence", crate::ns::CLIENT)
                .with_attr("type", ty)
                .with_attr("from", me.to_string())
                .with_attr("to", c.as_str());
            Envelope::to_user(contact.clone(), UserMsg::Inbound { stanza: p })
        };
        let mut deliver = false;
        match ty {
            "subscribe" => {
                if item.subscription.has_from() {
                    // Already subscribed (§3.1.3): auto-reply, and send our presence too — the
                    // contact's side may have lost it (e.g. it removed us and subscribes
                    // again), and otherwise it would see us offline until we next change.
                    then.push(reply("subscribed", &self.jid));
                    then.extend(self.current_presences(&c));
                } else if item.approved {
                    item.approved = false;
                    item.subscription = if item.subscription.has_to() { S::Both } else { S::From };
                    then.push(reply("subscribed", &self.jid));
                    then.extend(self.current_presences(&c));
                } else {
                    if !item.pending_in {
                        item.pending_stanza = Some(pending_request(&self.jid, &st));
                    }
                    item.pending_in = true;
                    deliver = true;
                }
            }
            "subscribed" => {
                if item.ask_out && !item.subscription.has_to() {
                    item.ask_out = false;
                    item.subscription = if item.subscription.has_from() { S::Both } else { S::To };
                    deliver = true;
                    // The contact sends its presence with its approval, but that presence may
                    // have come before the approval (it was handled again after a failed
                    // write, sim partitions 12) or been lost: ask for it once the
                    // subscription is stored.
                    if self.sessions.iter().any(|s| s.available) {
                        let probe = Element::new("presence", crate::ns::CLIENT)
                            .with_attr("type", "probe")
                            .with_attr("from", self.jid.to_string())
                            .with_attr("to", c.as_str());
                        then.push(Envelope::to_user(contact.clone(), UserMsg::Inbound { stanza: probe }));
                    }
                }
            }
            "unsubscribe" => {
                if item.subscription.has_from() || item.pending_in {
                    item.pending_in = false;
                    item.subscription = if item.subscription.has_to() { S::To } else { S::None };
                    deliver = item.in_roster;
                    then.extend(self.unavailable_to(&c));
                }
            }
            "unsubscribed" => {
                if item.subscription.has_to() || item.ask_out {
                    item.ask_out = false;
                    item.subscription = if item.subscription.has_from() { S::From } else { S::None };
                    deliver = true;
                }
            }
            _ => return,
        }
        if deliver {
            then.extend(self.to_available(&st));
        }
        if item != before {
            self.commit_subscription(item, then, Some(st));
        } else {
            for e in then {
                self.send(e);
            }
        }
    }
}

/// Largest subscription request kept whole while pending (RFC 6121 §3.1.3); a larger one is
/// kept without its extended content (a roster holds up to `roster.max_items` of them).
pub(super) const MAX_PENDING_STANZA: usize = 16 * 1024;

/// The request as it is stored for delivery when the user comes online.
fn pending_request(user: &BareJid, st: &Element) -> String {
    let xml = st.to_client_xml();
    if xml.len() <= MAX_PENDING_STANZA {
        return xml;
    }
    tracing::warn!(%user, from = st.attr("from"), bytes = xml.len(), "subscription request too large to keep whole; its extended content is not kept");
    let mut bare = Element::new("presence", crate::ns::CLIENT);
    bare.attrs = st.attrs.clone();
    bare.to_client_xml()
}
