//! Presence the user sends (RFC 6121 §4): initial presence with probes and offline delivery,
//! broadcasts to subscribers and the user's own resources, directed presence, unavailable.

use jid::Jid;
use starling_storage::Subscription;

use super::{Session, UserActor};
use crate::msg::{Envelope, SessionMsg, UserMsg};
use crate::ns;
use crate::xml::Element;

impl UserActor {
    pub(super) fn outbound_presence(&mut self, resource: &str, st: Element, now: u64) {
        let ty = st.attr("type").map(str::to_owned);
        let to = st.attr("to").and_then(|t| Jid::new(t).ok());
        match (ty.as_deref(), to) {
            (Some(t @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")), Some(to)) => {
                let t = t.to_string();
                self.outbound_subscription(&t, to.to_bare(), st)
            }
            (None, None) => self.broadcast_available(resource, st, now),
            (Some("unavailable"), None) => self.broadcast_unavailable(resource, st),
            (None | Some("unavailable"), Some(to)) => self.directed(resource, to, st),
            (Some("error"), Some(to)) => {
                let env = self.route_to(&to, st);
                self.send(env)
            }
            // Probes are the server's business, not the client's; unknown types are dropped.
            _ => {}
        }
    }

    fn broadcast_available(&mut self, resource: &str, st: Element, now: u64) {
        let Some((initial, addr, priority)) = self.set_available(resource, &st) else {
            return;
        };
        let full = self.full_jid(resource);
        self.send_to_subscribers(&st);
        // The user's own available resources, including this one (§4.2.2).
        let own: Vec<(crate::address::SessionAddr, String)> = self
            .sessions
            .iter()
            .filter(|s| s.available)
            .map(|s| (s.addr, self.full_jid(&s.resource)))
            .collect();
        for (a, to) in &own {
            let mut p = st.clone();
            p.set_attr("to", to.as_str());
            self.send(Envelope::to_session(*a, SessionMsg::Stanza(p)));
        }
        if !initial {
            return;
        }
        // Initial presence: probe the contacts we are subscribed to…
        self.probe_contacts(false);
        // …show this resource the user's other available resources…
        let others: Vec<Element> = self
            .sessions
            .iter()
            .filter(|s| s.available && s.resource != resource)
            .filter_map(|s| s.presence.clone())
            .collect();
        for mut p in others {
            p.set_attr("to", full.as_str());
            self.send(Envelope::to_session(addr, SessionMsg::Stanza(p)));
        }
        // …subscription requests that waited for the user (§3.1.3)…
        let pending: Vec<(String, Option<String>)> = self
            .roster
            .values()
            .filter(|i| i.pending_in)
            .map(|i| (i.jid.clone(), i.pending_stanza.clone()))
            .collect();
        for (c, stored) in pending {
            let req = stored.and_then(|xml| self.parse_stored(&xml, "pending subscription request"));
            let mut req = req.unwrap_or_else(|| Element::new("presence", ns::CLIENT));
            // The addressing is the server's, whatever was stored.
            req.set_attr("type", "subscribe");
            req.set_attr("from", c.as_str());
            req.set_attr("to", self.jid.to_string());
            self.send(Envelope::to_session(addr, SessionMsg::Stanza(req)));
        }
        // …and the offline queue (XEP-0160), to a resource with non-negative priority.
        if priority >= 0 {
            self.deliver_offline(addr, &full, now);
        }
    }

    /// A moved session's available presence (`UserMsg::Rebind`): to its subscribers again,
    /// probes to the contacts, and the offline messages stored meanwhile — not what its
    /// client has had from the earlier incarnation (its own echo, the other resources'
    /// presence, waiting subscription requests).
    pub(super) fn refresh_presence(&mut self, resource: &str, st: Element, now: u64) {
        let Some((_, addr, priority)) = self.set_available(resource, &st) else {
            return;
        };
        self.send_to_subscribers(&st);
        self.probe_contacts(true);
        if priority >= 0 {
            let full = self.full_jid(resource);
            self.deliver_offline(addr, &full, now);
        }
    }

    /// Records `st` as the resource's available presence: (whether it was unavailable, its
    /// session, its priority).
    fn set_available(&mut self, resource: &str, st: &Element) -> Option<(bool, crate::address::SessionAddr, i8)> {
        let priority = st
            .child("priority", ns::CLIENT)
            .and_then(|p| p.text().trim().parse::<i32>().ok())
            .map(|p| p.clamp(-128, 127) as i8)
            .unwrap_or(0);
        let s = self.session_mut(resource)?;
        let initial = !s.available;
        s.available = true;
        s.priority = priority;
        s.presence = Some(st.clone());
        Some((initial, s.addr, priority))
    }

    /// `st` to the user's subscribers (from/both).
    fn send_to_subscribers(&mut self, st: &Element) {
        let contacts = self.contacts(Subscription::has_from);
        for c in &contacts {
            let mut p = st.clone();
            p.set_attr("to", c.as_str());
            if let Ok(j) = Jid::new(c) {
                self.send(Envelope::to_user(j.to_bare(), UserMsg::Inbound { stanza: p }));
            }
        }
    }

    /// A probe to each contact the user is subscribed to (to/both). `resync`: the client may
    /// have seen resources that went meanwhile (a moved session, `refresh_presence`); the
    /// answer starts with unavailable from the bare JID (`ns::RESYNC`, empty).
    pub(super) fn probe_contacts(&mut self, resync: bool) {
        for c in self.contacts(Subscription::has_to) {
            self.probe_contact(&c, resync);
        }
    }

    /// A probe to `contact` (see `probe_contacts`).
    pub(super) fn probe_contact(&mut self, contact: &str, resync: bool) {
        let Ok(j) = Jid::new(contact) else { return };
        let mut probe = Element::new("presence", ns::CLIENT)
            .with_attr("type", "probe")
            .with_attr("from", self.jid.to_string())
            .with_attr("to", contact);
        if resync {
            probe.push_child(Element::new("resync", ns::RESYNC));
        }
        self.send(Envelope::to_user(j.to_bare(), UserMsg::Inbound { stanza: probe }));
    }

    fn broadcast_unavailable(&mut self, resource: &str, st: Element) {
        let Some(i) = self.sessions.iter().position(|s| s.resource == resource) else {
            return;
        };
        let s = &mut self.sessions[i];
        let snapshot = Session::bare(s.resource.clone(), s.addr, s.available, std::mem::take(&mut s.directed));
        let envs = self.unavailable_broadcast(&snapshot, Some(st));
        let s = &mut self.sessions[i];
        s.available = false;
        s.presence = None;
        for e in envs {
            self.send(e);
        }
    }

    /// Unavailable presence from `s` to its subscribers, its directed-presence recipients and
    /// the user's available resources.
    pub(super) fn unavailable_broadcast(&self, s: &Session, st: Option<Element>) -> Vec<Envelope> {
        let full = self.full_jid(&s.resource);
        let base = st.unwrap_or_else(|| {
            Element::new("presence", ns::CLIENT)
                .with_attr("type", "unavailable")
                .with_attr("from", full.clone())
        });
        let mut out = Vec::new();
        let mut targets: Vec<String> = Vec::new();
        if s.available {
            targets.extend(
                self.roster
                    .values()
                    .filter(|i| i.in_roster && i.subscription.has_from())
                    .map(|i| i.jid.clone()),
            );
        }
        for d in &s.directed {
            if !targets.contains(d) {
                targets.push(d.clone());
            }
        }
        for t in targets {
            if let Ok(j) = Jid::new(&t) {
                let mut p = base.clone();
                p.set_attr("to", t.as_str());
                out.push(Envelope::to_user(j.to_bare(), UserMsg::Inbound { stanza: p }));
            }
        }
        for o in self.sessions.iter().filter(|o| o.available || o.resource == s.resource) {
            let mut p = base.clone();
            p.set_attr("to", self.full_jid(&o.resource));
            out.push(Envelope::to_session(o.addr, SessionMsg::Stanza(p)));
        }
        out
    }

    fn directed(&mut self, resource: &str, to: Jid, st: Element) {
        let available = st.attr("type").is_none();
        let subscriber = self
            .roster
            .get(to.to_bare().as_str())
            .is_some_and(|i| i.subscription.has_from());
        if !subscriber && to.to_bare() != self.jid {
            let key = to.to_string();
            if let Some(s) = self.session_mut(resource) {
                if available {
                    s.directed.insert(key);
                } else {
                    s.directed.remove(&key);
                }
            }
        }
        let env = self.route_to(&to, st);
        self.send(env);
    }

    /// The current presence of each available resource, addressed to `to` (answers to probes,
    /// and what a new subscriber gets).
    pub(super) fn current_presences(&self, to: &str) -> Vec<Envelope> {
        let Ok(j) = Jid::new(to) else { return Vec::new() };
        self.sessions
            .iter()
            .filter(|s| s.available)
            .filter_map(|s| s.presence.clone())
            .map(|mut p| {
                p.set_attr("to", to);
                Envelope::to_user(j.to_bare(), UserMsg::Inbound { stanza: p })
            })
            .collect()
    }

    /// Unavailable presence from each available resource, to `to` (after a subscription ends).
    pub(super) fn unavailable_to(&self, to: &str) -> Vec<Envelope> {
        let Ok(j) = Jid::new(to) else { return Vec::new() };
        self.sessions
            .iter()
            .filter(|s| s.available)
            .map(|s| {
                let p = Element::new("presence", ns::CLIENT)
                    .with_attr("type", "unavailable")
                    .with_attr("from", self.full_jid(&s.resource))
                    .with_attr("to", to);
                Envelope::to_user(j.to_bare(), UserMsg::Inbound { stanza: p })
            })
            .collect()
    }

    /// Roster contacts whose subscription satisfies `pred`.
    pub(super) fn contacts(&self, pred: fn(Subscription) -> bool) -> Vec<String> {
        self.roster
            .values()
            .filter(|i| i.in_roster && pred(i.subscription))
            .map(|i| i.jid.clone())
            .collect()
    }

    /// Whether `contact` may see the user's presence.
    pub(super) fn subscription_of(&self, contact: &str) -> Subscription {
        self.roster.get(contact).map(|i| i.subscription).unwrap_or_default()
    }
}
