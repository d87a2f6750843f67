//! Roster management (RFC 6121 §2) with versioning (XEP-0237): get, set, remove, pushes.

use jid::Jid;
use starling_storage::{RosterItem, Write};

use super::UserActor;
use crate::msg::{Envelope, SessionMsg, UserMsg, MAX_TRIES};
use crate::ns;
use crate::planted::{self, Bug};
use crate::stanza;
use crate::xml::Element;

pub(super) fn item_element(item: &RosterItem, removed: bool) -> Element {
    let mut e = Element::new("item", ns::ROSTER).with_attr("jid", item.jid.as_str());
    if removed {
        e.set_attr("subscription", "remove");
        return e;
    }
    if let Some(n) = &item.name {
        e.set_attr("name", n.as_str());
    }
    e.set_attr("subscription", item.subscription.as_str());
    if item.ask_out {
        e.set_attr("ask", "subscribe");
    }
    if item.approved {
        e.set_attr("approved", "true");
    }
    for g in &item.groups {
        e.push_child(Element::new("group", ns::ROSTER).with_text(g.as_str()));
    }
    e
}

impl UserActor {
    pub(super) fn roster_iq(&mut self, resource: &str, iq: &Element) {
        let query = iq.child("query", ns::ROSTER);
        match (iq.attr("type"), query) {
            (Some("get"), Some(q)) => {
                let ver = self.roster_ver.to_string();
                if let Some(s) = self.session_mut(resource) {
                    s.interested = true;
                }
                let mut res = stanza::iq_result(iq);
                res.remove_attr("from");
                if q.attr("ver") != Some(ver.as_str()) {
                    let mut q = Element::new("query", ns::ROSTER).with_attr("ver", ver);
                    for item in self.roster.values().filter(|i| i.in_roster) {
                        q.push_child(item_element(item, false));
                    }
                    res.push_child(q);
                }
                self.reply(iq, res);
            }
            (Some("set"), Some(q)) => self.roster_set(iq, q),
            _ => self.bounce(iq, "bad-request", None),
        }
    }

    fn roster_set(&mut self, iq: &Element, q: &Element) {
        let items: Vec<&Element> = q.elements().collect();
        let [item] = items.as_slice() else {
            return self.bounce(iq, "bad-request", Some("a roster set carries exactly one item"));
        };
        if !item.is("item", ns::ROSTER) {
            return self.bounce(iq, "bad-request", None);
        }
        let contact = match item.attr("jid").map(Jid::new) {
            Some(Ok(j)) if j.resource().is_none() => j.to_string(),
            _ => return self.bounce(iq, "bad-request", Some("the item needs a bare JID")),
        };
        let mut result = stanza::iq_result(iq);
        result.remove_attr("from");
        let Some(reply) = self.route_to_from(iq, result) else {
            return;
        };
        let mut err = stanza::error_reply(iq, "internal-server-error", Some("storage failure"));
        err.remove_attr("from");
        let Some(failed) = self.route_to_from(iq, err) else {
            return;
        };
        let reply = (reply, failed);
        if item.attr("subscription") == Some("remove") {
            let Some(old) = self.roster.get(&contact).cloned().filter(|i| i.in_roster) else {
                return self.bounce(iq, "item-not-found", None);
            };
            // RFC 6121 §2.5.2: cancel both directions of the subscription.
            let mut then = Vec::new();
            let cj = Jid::new(&contact).expect("stored JIDs parse").to_bare();
            let mk = |ty: &str| {
                Element::new("presence", ns::CLIENT)
                    .with_attr("type", ty)
                    .with_attr("from", self.jid.to_string())
                    .with_attr("to", contact.as_str())
            };
            if old.subscription.has_to() || old.ask_out {
                then.push(Envelope::to_user(
                    cj.clone(),
                    UserMsg::Inbound {
                        stanza: mk("unsubscribe"),
                    },
                ));
            }
            if old.subscription.has_from() || old.pending_in {
                then.extend(self.unavailable_to(&contact));
                then.push(Envelope::to_user(
                    cj,
                    UserMsg::Inbound {
                        stanza: mk("unsubscribed"),
                    },
                ));
            }
            return self.commit_item(old, true, Some(reply), then);
        }
        let mut new = self.roster.get(&contact).cloned().unwrap_or_else(|| RosterItem {
            jid: contact.clone(),
            ..Default::default()
        });
        if !new.in_roster && self.roster.values().filter(|i| i.in_roster).count() >= self.cfg.max_roster_items {
            return self.bounce(iq, "not-allowed", Some("the roster is full"));
        }
        new.in_roster = true;
        new.name = item.attr("name").filter(|n| !n.is_empty()).map(str::to_owned);
        let mut groups: Vec<String> = item
            .elements()
            .filter(|g| g.is("group", ns::ROSTER))
            .map(|g| g.text())
            .collect();
        if groups.iter().any(|g| g.is_empty()) {
            return self.bounce(iq, "not-acceptable", Some("empty group name"));
        }
        groups.sort();
        groups.dedup();
        new.groups = groups;
        self.commit_item(new, false, Some(reply), Vec::new());
    }

    /// `commit_item` for a subscription stanza (`inbound`, `Some` when it came from the
    /// contact): should the write fail, the inbound stanza goes again to this user's next
    /// incarnation; an outbound one is dropped with its session (the client is told by the
    /// stream error and finds the roster unchanged when it reconnects).
    pub(super) fn commit_subscription(&mut self, item: RosterItem, then: Vec<Envelope>, inbound: Option<Element>) {
        let tries = self.tries + 1;
        let retry = inbound.and_then(|stanza| {
            if tries >= MAX_TRIES {
                tracing::warn!(user = %self.jid, ?stanza, tries, "a subscription stanza met failed writes too often; should its write fail, it is dropped");
                return None;
            }
            Some(Envelope::to_user(self.jid.clone(), UserMsg::Again { stanza, tries }))
        });
        self.commit_change(item, false, None, then, retry.into_iter().collect());
    }

    /// Stores a changed item and, when it is visible in the roster, bumps the version and
    /// pushes it to interested resources; `then` follows the pushes once durable. `reply`:
    /// a roster set's result, and the error result sent instead if the write fails.
    pub(super) fn commit_item(
        &mut self,
        item: RosterItem,
        removed: bool,
        reply: Option<(Envelope, Envelope)>,
        then: Vec<Envelope>,
    ) {
        let (reply, failed) = match reply {
            Some((ok, err)) => (Some(ok), vec![err]),
            None => (None, Vec::new()),
        };
        self.commit_change(item, removed, reply, then, failed)
    }

    fn commit_change(
        &mut self,
        item: RosterItem,
        removed: bool,
        reply: Option<Envelope>,
        then: Vec<Envelope>,
        failed: Vec<Envelope>,
    ) {
        let mut item = item;
        if !item.pending_in {
            item.pending_stanza = None;
        }
        let user = self.jid.to_string();
        let visible = removed || item.in_roster || self.roster.get(&item.jid).is_some_and(|o| o.in_roster);
        let forget = removed
            || (!item.in_roster
                && item.subscription == Default::default()
                && !item.pending_in
                && !item.ask_out
                && !item.approved);
        let mut writes = Vec::with_capacity(2);
        if forget {
            self.roster.remove(&item.jid);
            writes.push(Write::DeleteRosterItem {
                user: user.clone(),
                contact: item.jid.clone(),
            });
        } else {
            self.roster.insert(item.jid.clone(), item.clone());
            writes.push(Write::PutRosterItem {
                user: user.clone(),
                item: item.clone(),
            });
        }
        let mut all = Vec::new();
        // A change the user did not ask for (a contact's subscription answer) is pushed too;
        // the planted bug forgets exactly those pushes.
        let forget_push = reply.is_none() && planted::active(Bug::ForgetRosterPush);
        if visible {
            self.roster_ver += 1;
            writes.push(Write::SetRosterVer {
                user,
                ver: self.roster_ver,
            });
            let ver = self.roster_ver;
            for s in self.sessions.iter().filter(|s| s.interested && !forget_push) {
                let push = Element::new("iq", ns::CLIENT)
                    .with_attr("type", "set")
                    .with_attr("id", format!("push{ver}"))
                    .with_attr("to", self.full_jid(&s.resource))
                    .with_child(
                        Element::new("query", ns::ROSTER)
                            .with_attr("ver", ver.to_string())
                            .with_child(item_element(&item, removed)),
                    );
                all.push(Envelope::to_session(s.addr, SessionMsg::Stanza(push)));
            }
        }
        // The IQ result goes first, then pushes, then routed stanzas (RFC 6121 §2.3.2).
        let mut ordered: Vec<Envelope> = reply.into_iter().collect();
        ordered.extend(all);
        ordered.extend(then);
        self.persist(writes, ordered, failed);
    }
}
