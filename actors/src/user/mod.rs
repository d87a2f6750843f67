//! The user actor: one per bare JID, placed by its key. It holds the user's sessions, roster,
//! presence and offline queue, and applies RFC 6121 to everything addressed to or sent by the
//! user.
//!
//! Sans-io: [`UserActor::handle`] takes a message and `now` and returns [`Effect`]s. Writes
//! that a client is told about (roster pushes, subscription changes, offline storage) come as
//! [`Effect::Persist`], whose follow-up messages the host sends only once the writes are
//! durable.

mod delivery;
mod offline;
mod presence;
mod roster;
mod subscription;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use jid::{BareJid, Jid};
use starling_storage::{OfflineMessage, RosterItem, UserData, Write};

use crate::address::SessionAddr;
use crate::msg::{Envelope, SessionMsg, UserMsg};
use crate::ns;
use crate::stanza;
use crate::xml::Element;

/// What an account (its bare JID, or an IQ without `to` from its own session) advertises in
/// disco#info besides its `account/registered` identity.
pub const ACCOUNT_FEATURES: &[&str] = &[ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING];

#[derive(Clone, Debug)]
pub struct UserConfig {
    pub max_offline: usize,
    pub max_roster_items: usize,
}

pub use crate::system::runner::Effect;

#[derive(Debug)]
struct Session {
    resource: String,
    addr: SessionAddr,
    /// Sent initial presence and not unavailable since (RFC 6121 §4.2).
    available: bool,
    presence: Option<Element>,
    priority: i8,
    /// Asked for the roster: receives roster pushes (RFC 6121 §2.1.6).
    interested: bool,
    /// Full or bare JIDs that got directed presence from this resource (§4.6).
    directed: BTreeSet<String>,
    /// A moved session: the offline messages up to this sequence number reached its client
    /// from an earlier incarnation (`UserMsg::Rebind`'s `offline_upto`); they are not sent
    /// again, even while their deletion is still on its way.
    offline_had: u64,
}

impl Session {
    /// A session as far as presence goes: `available` or not, with these directed-presence
    /// recipients, no presence stanza kept, priority 0, not asking for roster pushes.
    fn bare(resource: String, addr: SessionAddr, available: bool, directed: BTreeSet<String>) -> Self {
        Session {
            resource,
            addr,
            available,
            presence: None,
            priority: 0,
            interested: false,
            directed,
            offline_had: 0,
        }
    }
}

pub struct UserActor {
    jid: BareJid,
    exists: bool,
    cfg: Rc<UserConfig>,
    roster: BTreeMap<String, RosterItem>,
    roster_ver: u64,
    offline: VecDeque<OfflineMessage>,
    /// Offline messages sent to a session and not yet confirmed written: (session, last seq).
    offline_inflight: Option<(SessionAddr, u64)>,
    next_seq: u64,
    sessions: Vec<Session>,
    /// Contacts' resources whose available presence this user's sessions were given, with no
    /// unavailable since: what to check again when a cluster node goes (`Resync`). Empty
    /// while no session is available.
    contacts_seen: BTreeMap<String, BTreeSet<String>>,
    fx: Vec<Effect>,
    /// While handling `UserMsg::Again`: the failed writes the stanza met before.
    tries: u8,
    /// A session of an earlier incarnation registered here (`UserMsg::Rebind`): what its
    /// client saw of the contacts is not known here, so each `Resync` asks all of them.
    rebound: bool,
    /// Confirmations of offline messages another incarnation handed out, numbered beyond
    /// what this one knows: its state is behind (`Act::Stale` is coming), so they wait for
    /// the next incarnation (`leftovers`) or the new placement (`Handoff`).
    held_confirms: Vec<(SessionAddr, u64)>,
}

impl UserActor {
    /// `exists`: the account exists (an anonymous user has no account but may bind).
    pub fn new(jid: BareJid, exists: bool, data: UserData, cfg: Rc<UserConfig>) -> Self {
        // Unique per user for ever, not only within this incarnation: every write batch
        // raises the version (`Write::NextVersion`), so an earlier incarnation gave out at
        // most `data.version` numbers. A confirmation from a session that incarnation served
        // then names only messages it sent (`offline_delivered`).
        let next_seq = data
            .offline
            .iter()
            .chain(&data.unreadable)
            .map(|m| m.seq + 1)
            .max()
            .unwrap_or(1)
            .max(data.version + 1);
        UserActor {
            jid,
            exists,
            cfg,
            roster: data.roster.into_iter().map(|i| (i.jid.clone(), i)).collect(),
            roster_ver: data.roster_ver,
            offline: data.offline.into(),
            offline_inflight: None,
            next_seq,
            sessions: Vec::new(),
            contacts_seen: BTreeMap::new(),
            fx: Vec::new(),
            tries: 0,
            rebound: false,
            held_confirms: Vec::new(),
        }
    }

    pub fn jid(&self) -> &BareJid {
        &self.jid
    }

    /// No session is bound (and it keeps nothing for a later incarnation): the actor may be
    /// dropped; its durable state reloads on demand.
    pub fn is_idle(&self) -> bool {
        self.sessions.is_empty() && self.held_confirms.is_empty()
    }

    /// The confirmations kept for a later incarnation, as messages to it.
    fn take_held_confirms(&mut self) -> Vec<Envelope> {
        std::mem::take(&mut self.held_confirms)
            .into_iter()
            .map(|(session, upto)| Envelope::to_user(self.jid.clone(), UserMsg::OfflineDelivered { session, upto }))
            .collect()
    }

    /// Its sessions and their resources: if this actor dies, the host ends them and tells the
    /// next incarnation they are gone (which then tells the contacts).
    pub fn sessions(&self) -> Vec<(SessionAddr, String)> {
        self.sessions.iter().map(|s| (s.addr, s.resource.clone())).collect()
    }

    pub fn offline_len(&self) -> usize {
        self.offline.len()
    }

    pub fn handle(&mut self, msg: UserMsg, now: u64) -> Vec<Effect> {
        match msg {
            UserMsg::Bind { session, resource } => self.bind(session, resource),
            UserMsg::Unbind { session, resource } => self.unbind(session, &resource),
            UserMsg::Outbound {
                session,
                resource,
                stanza,
            } => self.outbound(session, &resource, stanza, now),
            UserMsg::Inbound { stanza } => self.inbound(stanza, now),
            UserMsg::Again { stanza, tries } => {
                self.tries = tries;
                self.inbound(stanza, now);
                self.tries = 0;
            }
            UserMsg::OfflineDelivered { session, upto } => self.offline_delivered(session, upto),
            UserMsg::NodeDown { node, gen } => {
                for (session, resource) in self.sessions() {
                    if session.node == node && session.node_gen <= gen {
                        self.unbind(session, &resource);
                    }
                }
            }
            UserMsg::Resync { moved, slots } => self.resync_presence(&moved, slots),
            UserMsg::Rebind {
                session,
                resource,
                presence,
                roster_ver,
                directed,
                offline_upto,
            } => self.rebind(session, resource, presence, roster_ver, directed, offline_upto, now),
            UserMsg::Handoff => self.handoff(),
        }
        if !self.sessions.iter().any(|s| s.available) {
            self.contacts_seen.clear();
        }
        std::mem::take(&mut self.fx)
    }

    /// The membership changed a moment ago (`UserMsg::Resync`): contacts whose actors lived
    /// on a node that went died with it, and so did what they knew of their sessions; a
    /// session that closed just before may have sent its unavailable presence to an actor
    /// that never handled it. Ask every contact this user sees available for its presence
    /// again, naming the resources seen: the answer says which are gone (found by the
    /// simulator: a contact seen online forever after a crash). Contacts in slots that moved
    /// may have answered a probe before their sessions registered with their new actor (the
    /// simulator: a contact seen offline for ever after a join): they are asked in full,
    /// and so are all contacts when this actor took moved sessions itself.
    fn resync_presence(&mut self, moved: &[u32], slots: u32) {
        if !self.sessions.iter().any(|s| s.available) {
            return;
        }
        if self.rebound {
            // A moved session's client: contacts were probed when it registered, but the
            // membership may not have settled then (the incarnation that answered may not
            // have known the contact's own sessions, during a partition say): ask again,
            // now that it has.
            self.probe_contacts(true);
            return;
        }
        // Contacts whose actors moved: whatever the client saw of them is asked again.
        let in_moved: Vec<String> = self
            .contacts(starling_storage::Subscription::has_to)
            .into_iter()
            .filter(|c| moved.contains(&crate::system::cluster::slot_of(c.as_bytes(), slots)))
            .collect();
        for c in &in_moved {
            self.probe_contact(c, true);
        }
        let probes: Vec<(String, Vec<String>)> = self
            .contacts_seen
            .iter()
            .filter(|(c, _)| self.subscription_of(c).has_to() && !in_moved.contains(c))
            .map(|(c, rs)| (c.clone(), rs.iter().cloned().collect()))
            .collect();
        for (c, resources) in probes {
            let Ok(j) = Jid::new(&c) else { continue };
            let mut list = Element::new("resync", ns::RESYNC);
            for r in resources {
                list.push_child(Element::new("resource", ns::RESYNC).with_text(r));
            }
            let probe = Element::new("presence", ns::CLIENT)
                .with_attr("type", "probe")
                .with_attr("from", self.jid.to_string())
                .with_attr("to", c.as_str())
                .with_child(list);
            self.send(Envelope::to_user(j.to_bare(), UserMsg::Inbound { stanza: probe }));
        }
    }

    /// Keeps `contacts_seen` as the user's sessions see contacts' presence.
    fn note_contact_presence(&mut self, from: &Jid, available: bool) {
        let bare = from.to_bare();
        if bare == self.jid {
            return;
        }
        let key = bare.to_string();
        match (from.resource(), available) {
            (Some(r), true) => {
                self.contacts_seen.entry(key).or_default().insert(r.to_string());
            }
            (Some(r), false) => {
                if let Some(rs) = self.contacts_seen.get_mut(&key) {
                    rs.remove(r.as_str());
                    if rs.is_empty() {
                        self.contacts_seen.remove(&key);
                    }
                }
            }
            (None, true) => {}
            (None, false) => {
                self.contacts_seen.remove(&key);
            }
        }
    }

    /// A stanza the actor stored (`to_client_xml`) parsed back; `None`, with a log line,
    /// when it does not parse.
    fn parse_stored(&self, xml: &str, what: &str) -> Option<Element> {
        match stored_stanza(xml) {
            Ok(el) => Some(el),
            Err(e) => {
                tracing::error!(user = %self.jid, what, error = ?e, "stored stanza does not parse");
                None
            }
        }
    }

    fn send(&mut self, env: Envelope) {
        self.fx.push(Effect::Send(env));
    }

    /// Ends a session with a stream error.
    fn kick(&mut self, addr: SessionAddr, condition: &'static str, text: &str) {
        let text = text.to_string();
        self.send(Envelope::to_session(addr, SessionMsg::Kick { condition, text }));
    }

    fn persist(&mut self, writes: Vec<Write>, then: Vec<Envelope>, failed: Vec<Envelope>) {
        self.fx.push(Effect::Persist { writes, then, failed });
    }

    fn full_jid(&self, resource: &str) -> String {
        format!("{}/{}", self.jid, resource)
    }

    fn session(&self, resource: &str) -> Option<&Session> {
        self.sessions.iter().find(|s| s.resource == resource)
    }

    fn session_mut(&mut self, resource: &str) -> Option<&mut Session> {
        self.sessions.iter_mut().find(|s| s.resource == resource)
    }

    fn bind(&mut self, addr: SessionAddr, resource: String) {
        if let Some(i) = self.sessions.iter().position(|s| s.resource == resource) {
            // RFC 6120 §7.7.2.2: the newer session wins; the older one is told why it ends.
            let old = self.sessions.remove(i);
            tracing::info!(user = %self.jid, resource, "resource conflict: replacing the older session");
            self.kick(old.addr, "conflict", "replaced by a new connection");
            if old.available {
                let then = self.unavailable_broadcast(&old, None);
                for e in then {
                    self.send(e);
                }
            }
        }
        self.sessions
            .push(Session::bare(resource.clone(), addr, false, BTreeSet::new()));
        self.send(Envelope::to_session(addr, SessionMsg::Bound { resource }));
    }

    fn unbind(&mut self, addr: SessionAddr, resource: &str) {
        let Some(i) = self
            .sessions
            .iter()
            .position(|s| s.resource == resource && s.addr == addr)
        else {
            if self.session(resource).is_none() {
                // A session this incarnation never saw: it was bound before the actor was
                // restarted (a panic, a shard restart). Its contacts may still see it online,
                // so tell them it is gone; a second unavailable is harmless.
                let ghost = Session::bare(resource.to_string(), addr, true, BTreeSet::new());
                for e in self.unavailable_broadcast(&ghost, None) {
                    self.send(e);
                }
            }
            return;
        };
        let old = self.sessions.remove(i);
        if self.offline_inflight.is_some_and(|(a, _)| a == addr) {
            // It never confirmed: the next available session gets them again.
            self.offline_inflight = None;
        }
        if old.available || !old.directed.is_empty() {
            for e in self.unavailable_broadcast(&old, None) {
                self.send(e);
            }
        }
    }

    /// A session of an earlier incarnation registers (`UserMsg::Rebind`): it is taken as it
    /// was, without a bind answer. Its available presence goes to its subscribers again and
    /// its contacts are probed, as after a reconnect but without the client's part: contacts
    /// that asked for the user's presence while no incarnation knew the session were told
    /// it is offline, and this incarnation must learn whom the user sees (`contacts_seen`);
    /// a presence repeated is harmless (RFC 6121 §4.4.2). The offline messages it confirmed
    /// are deleted, and those stored meanwhile delivered. A client whose roster is not this
    /// incarnation's version missed a change made while the session was on its way (a push
    /// cannot say what was removed): the session is closed, and the client fetches the
    /// roster when it reconnects — the one case a move costs a reconnect.
    #[allow(clippy::too_many_arguments)]
    fn rebind(
        &mut self,
        addr: SessionAddr,
        resource: String,
        presence: Option<Element>,
        roster_ver: Option<String>,
        directed: Vec<String>,
        offline_upto: u64,
        now: u64,
    ) {
        if let Some(known) = self.session(&resource).map(|s| s.addr) {
            if known != addr {
                // Another session took the resource meanwhile: the newer one wins (§7.7.2.2).
                tracing::info!(user = %self.jid, resource, "moved session's resource taken meanwhile; closing it");
                self.kick(addr, "conflict", "replaced by a new connection");
            }
            // Known already (this incarnation served it, or it registered twice); what it
            // confirmed may not have reached here (`life::not_started` asked it again).
            if known == addr && offline_upto > 0 && offline_upto < self.next_seq {
                if self
                    .offline_inflight
                    .is_some_and(|(a, u)| a == addr && u <= offline_upto)
                {
                    self.offline_inflight = None;
                }
                self.delete_confirmed(offline_upto);
            }
            return;
        }
        if offline_upto > 0 {
            self.offline_delivered(addr, offline_upto);
        }
        if roster_ver.as_ref().is_some_and(|v| *v != self.roster_ver.to_string()) {
            tracing::info!(user = %self.jid, resource, "moved session missed a roster change; closing it");
            self.kick(
                addr,
                "reset",
                "the roster changed while this session moved; please reconnect",
            );
            // Its contacts are told it went, as for any session that closes.
            let gone = Session::bare(resource, addr, presence.is_some(), directed.into_iter().collect());
            for e in self.unavailable_broadcast(&gone, None) {
                self.send(e);
            }
            return;
        }
        let interested = roster_ver.is_some();
        self.rebound = true;
        let directed = directed
            .into_iter()
            .filter(|d| {
                Jid::new(d)
                    .is_ok_and(|j| j.to_bare() != self.jid && !self.subscription_of(j.to_bare().as_str()).has_from())
            })
            .collect();
        self.sessions.push(Session {
            interested,
            offline_had: offline_upto,
            ..Session::bare(resource.clone(), addr, false, directed)
        });
        if let Some(p) = presence {
            // As initial presence, minus what the client had already: its own echo, the
            // other resources' presence and waiting subscription requests.
            self.refresh_presence(&resource, p, now);
        }
    }

    /// The user's key is placed elsewhere now (`UserMsg::Handoff`): its sessions register
    /// with the new incarnation themselves; this one forgets them without telling anyone and
    /// is let go once idle.
    fn handoff(&mut self) {
        tracing::debug!(user = %self.jid, sessions = self.sessions.len(), "handing off to the new placement");
        self.sessions.clear();
        self.offline_inflight = None;
        for env in self.take_held_confirms() {
            self.send(env);
        }
    }

    /// Stanzas the user's own session sends for processing by the user's server.
    fn outbound(&mut self, addr: SessionAddr, resource: &str, st: Element, now: u64) {
        if self.session(resource).is_none() {
            // A session of an earlier incarnation that has not registered here yet (its
            // node's view of the membership is behind, or its registration is on the way):
            // it registers and sends this again.
            tracing::debug!(user = %self.jid, resource, session = ?addr, "stanza from a session this incarnation does not know; asking it to register");
            self.send(Envelope::to_session(addr, SessionMsg::Rebind { again: Some(st) }));
            return;
        }
        if self.session(resource).is_some_and(|s| s.addr != addr) {
            tracing::debug!(user = %self.jid, resource, session = ?addr, "stanza from a session that is no longer bound; dropped");
            return;
        }
        match st.name.as_str() {
            "presence" => self.outbound_presence(resource, st, now),
            "iq" => self.account_iq(Some(resource), st),
            _ => {}
        }
    }

    /// IQs addressed to the account (bare JID) — from the user's own session
    /// (`own_resource`) or from anyone else.
    fn account_iq(&mut self, own_resource: Option<&str>, iq: Element) {
        let ty = iq.attr("type").unwrap_or("");
        if ty == "result" || ty == "error" {
            return;
        }
        let Some(payload) = iq.first_child() else { return };
        if payload.ns == ns::ROSTER {
            match own_resource {
                Some(r) => return self.roster_iq(r, &iq),
                None => return self.reply(&iq, stanza::error_reply(&iq, "forbidden", None)),
            }
        }
        let reply = match (ty, payload.name.as_str(), payload.ns.as_str()) {
            ("get", "ping", ns::PING) => stanza::iq_result(&iq),
            ("get", "query", ns::DISCO_INFO) if payload.attr("node").is_none() => {
                let mut q = Element::new("query", ns::DISCO_INFO).with_child(
                    Element::new("identity", ns::DISCO_INFO)
                        .with_attr("category", "account")
                        .with_attr("type", "registered"),
                );
                for f in ACCOUNT_FEATURES {
                    q.push_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", *f));
                }
                stanza::iq_result(&iq).with_child(q)
            }
            ("get", "query", ns::DISCO_ITEMS) => {
                stanza::iq_result(&iq).with_child(Element::new("query", ns::DISCO_ITEMS))
            }
            _ => stanza::error_reply(&iq, "service-unavailable", None),
        };
        self.reply(&iq, reply);
    }

    /// Sends `reply` to whoever sent `req` (its `from`).
    fn reply(&mut self, req: &Element, reply: Element) {
        if let Some(env) = self.route_to_from(req, reply) {
            self.send(env);
        }
    }

    /// An envelope carrying `st` to the entity named by `req`'s `from`.
    fn route_to_from(&self, req: &Element, st: Element) -> Option<Envelope> {
        let from = Jid::new(req.attr("from")?).ok()?;
        Some(self.route_to(&from, st))
    }

    /// Envelope for a stanza to `to`: the user's own sessions directly, anyone else via their
    /// user actor.
    fn route_to(&self, to: &Jid, st: Element) -> Envelope {
        if to.to_bare() == self.jid {
            if let Some(s) = to.resource().and_then(|r| self.session(r.as_str())) {
                return Envelope::to_session(s.addr, SessionMsg::Stanza(st));
            }
        }
        Envelope::to_user(to.to_bare(), UserMsg::Inbound { stanza: st })
    }

    fn bounce(&mut self, st: &Element, condition: &str, text: Option<&str>) {
        if let Some(env) = self.bounce_env(st, condition, text) {
            self.send(env);
        }
    }

    /// The error reply to `st` (when one may be sent), addressed to its sender.
    fn bounce_env(&self, st: &Element, condition: &str, text: Option<&str>) -> Option<Envelope> {
        if !stanza::may_bounce(st) {
            return None;
        }
        self.route_to_from(st, stanza::error_reply(st, condition, text))
    }
}

/// Parses a stanza stored as `Element::to_client_xml` wrote it. Stored stanzas were accepted
/// within the client limits once; these limits only keep a corrupt record from costing much.
pub(crate) fn stored_stanza(xml: &str) -> Result<Element, crate::parser::ParseError> {
    crate::parser::parse_element(
        xml.as_bytes(),
        &[(String::new(), ns::CLIENT.to_string())],
        crate::parser::Limits {
            max_stanza_bytes: usize::MAX,
            max_depth: 64,
            max_attrs: 256,
        },
    )
}

/// RFC 3339 UTC timestamp (XEP-0082) from Unix milliseconds.
pub fn xmpp_timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests;

impl crate::system::runner::Actor for UserActor {
    type Msg = UserMsg;

    fn handle(&mut self, msg: UserMsg, now: u64) -> Vec<Effect> {
        UserActor::handle(self, msg, now)
    }

    fn is_idle(&self) -> bool {
        UserActor::is_idle(self)
    }

    fn sessions(&self) -> Vec<(SessionAddr, String)> {
        UserActor::sessions(self)
    }

    fn leftovers(&mut self) -> Vec<Envelope> {
        self.take_held_confirms()
    }
}
