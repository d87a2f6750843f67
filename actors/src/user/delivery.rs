//! Stanzas addressed to the user (RFC 6121 §8.5): delivery rules for bare and full JIDs and
//! each stanza type, probes, IQs answered on the account's behalf, unknown users.

use jid::Jid;

use super::UserActor;
use crate::msg::{Envelope, SessionMsg, UserMsg};
use crate::ns;
use crate::xml::Element;

impl UserActor {
    pub(super) fn inbound(&mut self, st: Element, now: u64) {
        let Some(to) = st.attr("to").and_then(|t| Jid::new(t).ok()) else {
            return;
        };
        let Some(from) = st.attr("from").and_then(|f| Jid::new(f).ok()) else {
            return;
        };
        if !self.exists && self.sessions.is_empty() {
            // No such user (§8.5.1): errors for messages and IQs, silence for presence.
            if st.name != "presence" {
                self.bounce(&st, "service-unavailable", None);
            }
            return;
        }
        let resource = to.resource().map(|r| r.to_string());
        match st.name.as_str() {
            "message" => self.inbound_message(resource.as_deref(), st, now),
            "presence" => self.inbound_presence(resource.as_deref(), from, st),
            "iq" => match resource {
                Some(r) => match self.session(&r) {
                    Some(s) => {
                        let a = s.addr;
                        self.send(Envelope::to_session(a, SessionMsg::Stanza(st)));
                    }
                    None => self.bounce(&st, "service-unavailable", None),
                },
                None => self.account_iq(None, st),
            },
            _ => {}
        }
    }

    fn inbound_message(&mut self, resource: Option<&str>, st: Element, now: u64) {
        let ty = st.attr("type").unwrap_or("normal").to_string();
        if let Some(r) = resource {
            if let Some(s) = self.session(r) {
                let a = s.addr;
                return self.send(Envelope::to_session(a, SessionMsg::Stanza(st)));
            }
            // §8.5.3.2.1: no such resource.
            match ty.as_str() {
                "groupchat" => return self.bounce(&st, "service-unavailable", None),
                "headline" | "error" => return,
                _ => {} // normal and chat: as if to the bare JID
            }
        }
        match ty.as_str() {
            "groupchat" => self.bounce(&st, "service-unavailable", None),
            "headline" => {
                for e in self.to_available_nonneg(&st, false) {
                    self.send(e);
                }
            }
            "error" => {
                for e in self.to_available_nonneg(&st, true) {
                    self.send(e);
                }
            }
            _ => {
                let targets = self.to_available_nonneg(&st, true);
                if targets.is_empty() {
                    self.store_offline(st, now);
                } else {
                    for e in targets {
                        self.send(e);
                    }
                }
            }
        }
    }

    /// Copies of `st` for the available resources with non-negative priority; only those of
    /// the highest priority when `highest` (§8.5.2.1.1).
    fn to_available_nonneg(&self, st: &Element, highest: bool) -> Vec<Envelope> {
        let eligible = self.sessions.iter().filter(|s| s.available && s.priority >= 0);
        let max = eligible.clone().map(|s| s.priority).max();
        eligible
            .filter(|s| !highest || Some(s.priority) == max)
            .map(|s| Envelope::to_session(s.addr, SessionMsg::Stanza(st.clone())))
            .collect()
    }

    /// Copies of `st` for every available resource (presence to the bare JID).
    pub(super) fn to_available(&self, st: &Element) -> Vec<Envelope> {
        self.sessions
            .iter()
            .filter(|s| s.available)
            .map(|s| Envelope::to_session(s.addr, SessionMsg::Stanza(st.clone())))
            .collect()
    }

    fn inbound_presence(&mut self, resource: Option<&str>, from: Jid, st: Element) {
        let ty = st.attr("type").map(str::to_owned);
        match ty.as_deref() {
            Some(t @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")) => {
                let t = t.to_string();
                self.inbound_subscription(&t, from.to_bare(), st)
            }
            Some("probe") => {
                // §4.3.2: answer only subscribers (from/both); say nothing to others.
                let prober = from.to_bare().to_string();
                if self.subscription_of(&prober).has_from() {
                    let resync = st.child("resync", ns::RESYNC);
                    if resync.is_some_and(|l| l.elements().next().is_none()) {
                        // A moved session's probe: whatever its client saw of this user's
                        // resources is replaced by what follows (RFC 6121 §4.3.2 lets the
                        // answer for no resource be unavailable).
                        let p = Element::new("presence", ns::CLIENT)
                            .with_attr("type", "unavailable")
                            .with_attr("from", self.jid.to_string())
                            .with_attr("to", prober.as_str());
                        self.send(Envelope::to_user(from.to_bare(), UserMsg::Inbound { stanza: p }));
                    }
                    for e in self.current_presences(&from.to_string()) {
                        self.send(e);
                    }
                    // A resync (`ns::RESYNC`): the resources the prober sees that are gone.
                    if let Some(list) = st.child("resync", ns::RESYNC) {
                        for r in list.elements().filter(|e| e.is("resource", ns::RESYNC)) {
                            let r = r.text();
                            if self.session(&r).is_none_or(|s| !s.available) {
                                let p = Element::new("presence", ns::CLIENT)
                                    .with_attr("type", "unavailable")
                                    .with_attr("from", self.full_jid(&r))
                                    .with_attr("to", prober.as_str());
                                self.send(Envelope::to_user(from.to_bare(), UserMsg::Inbound { stanza: p }));
                            }
                        }
                    }
                }
            }
            Some("error") if st.child("resync", ns::RESYNC).is_some() => {
                // Our resync probe bounced: the contact's actor could not start (its copies
                // unreachable). It cannot serve sessions either, so the resources asked about
                // are taken as gone; if any is in fact online, it is closed and binds again
                // once the cluster agrees, and its new presence comes then.
                let list = st.child("resync", ns::RESYNC).expect("checked");
                let gone: Vec<String> = list
                    .elements()
                    .filter(|e| e.is("resource", ns::RESYNC))
                    .map(Element::text)
                    .collect();
                let bare = from.to_bare();
                for r in gone {
                    let Ok(full) = Jid::new(&format!("{bare}/{r}")) else {
                        continue;
                    };
                    let p = Element::new("presence", ns::CLIENT)
                        .with_attr("type", "unavailable")
                        .with_attr("from", full.to_string())
                        .with_attr("to", self.jid.to_string());
                    self.note_contact_presence(&full, false);
                    for e in self.to_available(&p) {
                        self.send(e);
                    }
                }
            }
            None | Some("unavailable") | Some("error") => {
                if ty.as_deref() != Some("error") && self.sessions.iter().any(|s| s.available) {
                    self.note_contact_presence(&from, ty.is_none());
                }
                match resource {
                    Some(r) => {
                        if let Some(s) = self.session(r) {
                            let a = s.addr;
                            self.send(Envelope::to_session(a, SessionMsg::Stanza(st)));
                        }
                    }
                    None => {
                        for e in self.to_available(&st) {
                            self.send(e);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}
