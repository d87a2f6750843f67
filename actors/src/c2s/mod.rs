//! The client-to-server session (RFC 6120): stream negotiation (STARTTLS, SASL, resource
//! binding), then the bridge between the client's stream and the router.
//!
//! Sans-io: the host feeds [`Input`]s with `now` and drains [`Output`]: bytes to write and
//! [`Action`]s (start TLS, look up an account, route an envelope, close).

mod auth;
mod bound;
mod register;
mod server_iq;

use std::collections::VecDeque;
use std::rc::Rc;

use jid::{BareJid, FullJid, Jid};
use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use starling_storage::Account;

use crate::address::SessionAddr;
use crate::msg::{Envelope, SessionMsg, UserMsg};
use crate::ns;
use crate::parser::{Limits, StreamEvent, StreamParser};
use crate::stanza;
use crate::throttle::AuthThrottle;
use crate::xml::{attr_escaped, Element};

/// Settings shared by every session of a shard.
#[derive(Clone, Debug)]
pub struct C2sConfig {
    pub domains: Vec<String>,
    pub require_tls: bool,
    pub tls_available: bool,
    pub anonymous: bool,
    pub registration_open: bool,
    pub limits: Limits,
    pub scram_iterations: u32,
    /// Stanzas a session keeps while its bind request is in flight.
    pub max_pending: usize,
    pub version: String,
}

pub enum Input<'a> {
    Bytes(&'a [u8]),
    /// The TLS handshake asked for by [`Action::StartTls`] completed.
    TlsEstablished,
    /// Answer to [`Action::LoadAccount`].
    Account(Option<Account>),
    /// Answer to [`Action::CreateAccount`]: created, or taken already; `None` when it could
    /// not be stored (storage failure, too few copies reachable in a cluster).
    AccountCreated(Option<bool>),
    /// Answer to [`Action::SetPassword`].
    PasswordSet(bool),
    Router(SessionMsg),
    /// The client did not finish negotiating (or stopped reading) in time.
    TimedOut,
    /// The connection is gone.
    Closed,
}

#[derive(Debug, PartialEq)]
pub enum Action {
    /// Write what is buffered so far in plain text, then run the TLS handshake.
    StartTls,
    LoadAccount(String),
    CreateAccount {
        user: String,
        account: Account,
    },
    SetPassword {
        user: String,
        account: Account,
    },
    Route(Envelope),
    /// Flush the output and close the connection.
    Close,
}

/// Counters the host turns into metrics.
#[derive(Default, Clone, Copy, Debug)]
pub struct SessionStats {
    /// Stanzas from the bound client: message, presence, iq.
    pub stanzas_in: [u64; 3],
    pub auth_failures: u64,
    pub stream_errors: u64,
}

#[derive(Default)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub actions: Vec<Action>,
}

/// Shard-wide state sessions consult.
pub struct Ctx<'a> {
    pub throttle: &'a mut AuthThrottle,
}

#[derive(Debug)]
enum State {
    /// Waiting for the client's stream header.
    Header,
    /// Features sent; negotiating.
    Negotiating,
    TlsProceeding,
    /// A SASL mechanism waits on an account lookup or the client.
    Sasl(auth::SaslState),
    /// An in-band registration waits on storage.
    Registering(Element),
    /// A password change waits on storage.
    ChangingPassword(Element),
    /// The bind request and the resource asked of the user actor.
    BindPending(Element, String),
    Bound,
    Closed,
}

pub struct C2sSession {
    pub addr: SessionAddr,
    cfg: Rc<C2sConfig>,
    parser: StreamParser,
    state: State,
    tls: bool,
    header_sent: bool,
    domain: String,
    ip: u128,
    rng: ChaCha20Rng,
    /// Set once SASL succeeded.
    user: Option<BareJid>,
    anonymous: bool,
    jid: Option<FullJid>,
    /// What this session told its user actor of itself, for a later incarnation of that actor
    /// (`UserMsg::Rebind`).
    me: Registered,
    pending: VecDeque<Element>,
    out: Output,
    events: Vec<StreamEvent>,
    stats: SessionStats,
}

impl C2sSession {
    /// `tls`: the connection is already encrypted (Direct TLS, XEP-0368).
    pub fn new(addr: SessionAddr, cfg: Rc<C2sConfig>, ip: u128, tls: bool, rng: ChaCha20Rng) -> Self {
        let parser = StreamParser::new(cfg.limits);
        C2sSession {
            addr,
            domain: cfg.domains.first().cloned().unwrap_or_default(),
            cfg,
            parser,
            state: State::Header,
            tls,
            header_sent: false,
            ip,
            rng,
            user: None,
            anonymous: false,
            jid: None,
            me: Registered::default(),
            pending: VecDeque::new(),
            out: Output::default(),
            events: Vec::new(),
            stats: SessionStats::default(),
        }
    }

    pub fn jid(&self) -> Option<&FullJid> {
        self.jid.as_ref()
    }

    /// The user this session is bound to, or asked its user actor to bind it to (a bind in
    /// flight): from then on that actor may count it among its sessions.
    pub fn binding_user(&self) -> Option<&BareJid> {
        match self.state {
            State::BindPending(..) => self.user.as_ref(),
            _ => self.jid.as_ref().and(self.user.as_ref()),
        }
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Takes what the last inputs produced.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    pub fn handle(&mut self, input: Input<'_>, now: u64, ctx: &mut Ctx<'_>) {
        if self.is_closed() {
            return;
        }
        match input {
            Input::Bytes(b) => self.on_bytes(b, now, ctx),
            Input::TlsEstablished => {
                self.tls = true;
                self.parser.reset();
                self.header_sent = false;
                self.state = State::Header;
            }
            Input::Account(a) => self.on_account(a, now, ctx),
            Input::AccountCreated(ok) => self.on_account_created(ok),
            Input::PasswordSet(ok) => self.on_password_set(ok),
            Input::Router(m) => self.on_router(m),
            Input::TimedOut => {
                tracing::info!(session = ?self.addr, "connection timed out");
                self.stream_error("connection-timeout", None)
            }
            Input::Closed => self.close(None),
        }
    }

    fn on_bytes(&mut self, bytes: &[u8], now: u64, ctx: &mut Ctx<'_>) {
        let mut events = std::mem::take(&mut self.events);
        let r = self.parser.feed(bytes, &mut events);
        for ev in events.drain(..) {
            if self.is_closed() {
                break;
            }
            match ev {
                StreamEvent::Header(attrs) => self.on_header(&attrs),
                StreamEvent::Stanza(el) => self.on_stanza(el, now, ctx),
                StreamEvent::End => {
                    self.write("</stream:stream>");
                    self.close_quiet();
                }
            }
        }
        self.events = events;
        if let Err(e) = r {
            if !self.is_closed() {
                tracing::info!(session = ?self.addr, condition = e.condition(), reason = e.text(), "closing stream on bad XML");
                self.stream_error(e.condition(), Some(e.text()));
            }
        }
    }

    fn write(&mut self, s: &str) {
        self.out.bytes.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn send_element(&mut self, el: &Element) {
        let mut s = String::with_capacity(256);
        el.write_to(&mut s, ns::CLIENT);
        self.write(&s);
    }

    fn random_hex(&mut self, bytes: usize) -> String {
        let mut b = vec![0u8; bytes];
        self.rng.fill_bytes(&mut b);
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn send_header(&mut self) {
        let id = self.random_hex(8);
        let h = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' id='{id}' from='{}' version='1.0' xml:lang='en'>",
            attr_escaped(&self.domain)
        );
        self.write(&h);
        self.header_sent = true;
    }

    fn on_header(&mut self, attrs: &[(String, String)]) {
        let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        let to = get("to").map(|t| t.to_ascii_lowercase());
        match to {
            Some(d) if self.cfg.domains.contains(&d) => self.domain = d,
            Some(_) => return self.stream_error("host-unknown", Some("this server does not serve that domain")),
            None => {}
        }
        self.send_header();
        if get("version") != Some("1.0") {
            return self.stream_error("unsupported-version", Some("only XMPP 1.0 streams are supported"));
        }
        let features = self.features();
        self.write(&features);
        self.state = State::Negotiating;
    }

    fn features(&self) -> String {
        let mut f = String::from("<stream:features>");
        if self.user.is_some() {
            f.push_str("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>");
            f.push_str("<session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>");
            f.push_str("<ver xmlns='urn:xmpp:features:rosterver'/>");
            f.push_str("<sub xmlns='urn:xmpp:features:pre-approval'/>");
        } else {
            if !self.tls && self.cfg.tls_available {
                f.push_str("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>");
                if self.cfg.require_tls {
                    f.push_str("<required/>");
                }
                f.push_str("</starttls>");
            }
            if self.tls || !self.cfg.require_tls {
                f.push_str("<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
                for m in auth::mechanisms(&self.cfg, self.tls) {
                    f.push_str("<mechanism>");
                    f.push_str(m);
                    f.push_str("</mechanism>");
                }
                f.push_str("</mechanisms>");
                if self.cfg.registration_open {
                    f.push_str("<register xmlns='http://jabber.org/features/iq-register'/>");
                }
            }
        }
        f.push_str("</stream:features>");
        f
    }

    fn on_stanza(&mut self, el: Element, now: u64, ctx: &mut Ctx<'_>) {
        match &self.state {
            State::Header | State::TlsProceeding => {
                self.stream_error("not-authorized", Some("stanza before the stream was negotiated"))
            }
            State::Negotiating if self.user.is_none() => self.negotiate(el, now, ctx),
            State::Sasl(_) => self.on_sasl_element(el, now, ctx),
            State::Negotiating => self.on_bind_request(el),
            State::Registering(_) | State::ChangingPassword(_) | State::BindPending(..) => self.queue(el),
            State::Bound => self.on_bound_stanza(el),
            State::Closed => {}
        }
    }

    fn queue(&mut self, el: Element) {
        if self.pending.len() >= self.cfg.max_pending {
            return self.stream_error(
                "policy-violation",
                Some("too many stanzas before the previous request was answered"),
            );
        }
        self.pending.push_back(el);
    }

    fn negotiate(&mut self, el: Element, now: u64, ctx: &mut Ctx<'_>) {
        if el.is("starttls", ns::TLS) {
            if self.tls || !self.cfg.tls_available {
                self.write("<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>");
                return self.close_quiet();
            }
            self.write("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
            self.state = State::TlsProceeding;
            self.out.actions.push(Action::StartTls);
        } else if el.is("auth", ns::SASL) {
            self.on_auth(el, now, ctx);
        } else if el.is("iq", ns::CLIENT) && el.child("query", ns::REGISTER).is_some() {
            self.on_register_iq(el);
        } else {
            self.stream_error("not-authorized", Some("authenticate first"));
        }
    }

    fn on_bind_request(&mut self, el: Element) {
        let bind = el.child("bind", ns::BIND);
        if !el.is("iq", ns::CLIENT) || el.attr("type") != Some("set") || bind.is_none() {
            if el.is("iq", ns::CLIENT) {
                let mut e = stanza::error_reply(&el, "not-authorized", Some("bind a resource first"));
                e.remove_attr("from");
                return self.send_element(&e);
            }
            return self.stream_error("not-authorized", Some("bind a resource first"));
        }
        let user = self.user.clone().expect("authenticated");
        let requested = bind.and_then(|b| b.child("resource", ns::BIND)).map(|r| r.text());
        let resource = match requested.filter(|r| !r.is_empty()) {
            Some(r) => r,
            None => self.random_hex(8),
        };
        match FullJid::new(&format!("{user}/{resource}")) {
            Ok(full) => {
                let resource = full.resource().to_string();
                self.state = State::BindPending(el, resource.clone());
                self.route(Envelope::to_user(
                    user,
                    UserMsg::Bind {
                        session: self.addr,
                        resource,
                    },
                ));
            }
            Err(_) => {
                let mut e = stanza::error_reply(&el, "bad-request", Some("invalid resource"));
                e.remove_attr("from");
                self.send_element(&e);
            }
        }
    }

    fn on_router(&mut self, m: SessionMsg) {
        match m {
            SessionMsg::Bound { resource } => {
                let State::BindPending(iq, _) = std::mem::replace(&mut self.state, State::Bound) else {
                    return;
                };
                let user = self.user.clone().expect("authenticated");
                let full = FullJid::new(&format!("{user}/{resource}")).expect("resource was prepared");
                let mut res = stanza::iq_result(&iq);
                res.remove_attr("from");
                res.push_child(
                    Element::new("bind", ns::BIND)
                        .with_child(Element::new("jid", ns::BIND).with_text(full.to_string())),
                );
                self.send_element(&res);
                self.jid = Some(full);
                tracing::debug!(session = ?self.addr, jid = %self.jid.as_ref().expect("set"), "bound");
                while let Some(el) = self.pending.pop_front() {
                    if self.is_closed() {
                        break;
                    }
                    self.on_bound_stanza(el);
                }
            }
            SessionMsg::Rebind { again } => self.rebind(again),
            SessionMsg::BindFailed { condition } => {
                if let State::BindPending(iq, _) = std::mem::replace(&mut self.state, State::Negotiating) {
                    let mut e = stanza::error_reply(&iq, condition, None);
                    e.remove_attr("from");
                    self.send_element(&e);
                }
            }
            SessionMsg::Stanza(el) | SessionMsg::Offline(el) if matches!(self.state, State::Bound) => {
                self.me.note_in(&el);
                self.send_element(&el);
            }
            SessionMsg::Stanza(el) => {
                // Not bound (yet): its user's actor took the bind while its answer to us was
                // lost (a link to a node that did not yet see ours). A message goes back to
                // the bare JID, where an available session or offline storage takes it; the
                // actor never picks this session for the bare JID (it is not available).
                // Found by the simulator: such a message was dropped here, unaccounted for.
                // Once only: one already sent to the bare JID that comes back here (the actor
                // still counts this session available) is answered with an error, never
                // routed again — two such hops would loop for ever (the simulator found it).
                if el.name == "message" {
                    match el.attr("to").and_then(|t| Jid::new(t).ok()) {
                        Some(to) if to.resource().is_some() => {
                            tracing::info!(session = ?self.addr, "message for a session not bound; routed to the bare JID");
                            let mut el = el;
                            el.set_attr("to", to.to_bare().to_string());
                            self.route(Envelope::to_user(to.to_bare(), UserMsg::Inbound { stanza: el }));
                        }
                        _ => {
                            tracing::warn!(session = ?self.addr, "message for a session not bound; answered with an error");
                            if stanza::may_bounce(&el) {
                                if let Some(from) = el.attr("from").and_then(|f| Jid::new(f).ok()) {
                                    let err = stanza::error_reply(&el, "recipient-unavailable", None);
                                    self.route(Envelope::to_user(from.to_bare(), UserMsg::Inbound { stanza: err }));
                                }
                            }
                        }
                    }
                }
            }
            // Still stored: it comes again to a bound session.
            SessionMsg::Offline(_) => {}
            SessionMsg::OfflineSent { upto } => {
                // The host writes our output before it routes our actions, so this answer
                // follows the messages onto the socket.
                if let (State::Bound, Some(user)) = (&self.state, self.user.clone()) {
                    self.me.offline_upto = self.me.offline_upto.max(upto);
                    self.route(Envelope::to_user(
                        user,
                        UserMsg::OfflineDelivered {
                            session: self.addr,
                            upto,
                        },
                    ));
                }
            }
            SessionMsg::Kick { condition, text } => {
                tracing::info!(session = ?self.addr, condition, "session kicked");
                // Unbind still follows (on shutdown the user actor must learn the session is
                // gone); after a conflict it is a no-op, the actor matching on the address.
                self.stream_error(condition, Some(&text));
            }
        }
    }

    fn route(&mut self, env: Envelope) {
        self.out.actions.push(Action::Route(env));
    }

    /// The user's actor moved or ended (`SessionMsg::Rebind`): a bound session registers
    /// with the current incarnation, then sends `again`; a bind in flight asks again (its
    /// answer may have died with the old one; a second `Bound` is ignored).
    fn rebind(&mut self, again: Option<Element>) {
        let Some(user) = self.user.clone() else { return };
        match &self.state {
            State::Bound => {
                let resource = self.jid.as_ref().expect("bound").resource().to_string();
                tracing::debug!(session = ?self.addr, "registering with the user's new actor");
                self.route(Envelope::to_user(
                    user.clone(),
                    UserMsg::Rebind {
                        session: self.addr,
                        resource: resource.clone(),
                        presence: self.me.presence.clone(),
                        roster_ver: self.me.roster.clone(),
                        directed: self.me.directed.iter().cloned().collect(),
                        offline_upto: self.me.offline_upto,
                    },
                ));
                if let Some(stanza) = again {
                    self.route_own(user, resource, stanza);
                }
            }
            State::BindPending(_, resource) => {
                let resource = resource.clone();
                self.route(Envelope::to_user(
                    user,
                    UserMsg::Bind {
                        session: self.addr,
                        resource,
                    },
                ));
            }
            _ => {}
        }
    }

    /// Sends a stream error and closes (RFC 6120 §4.9).
    pub fn stream_error(&mut self, condition: &str, text: Option<&str>) {
        self.stats.stream_errors += 1;
        if !self.header_sent {
            self.send_header();
        }
        let e = stanza::stream_error(condition, text);
        self.write(&e);
        self.close(None);
    }

    fn close_quiet(&mut self) {
        self.close(None)
    }

    fn close(&mut self, _reason: Option<&str>) {
        if self.is_closed() {
            return;
        }
        // A bind in flight counts too: the user actor will bind us, so it must hear that we
        // are gone, or it keeps a ghost session that messages loop through (found by the
        // simulator).
        let resource = match (&self.state, self.jid.take()) {
            (_, Some(jid)) => Some(jid.resource().to_string()),
            (State::BindPending(_, r), None) => Some(r.clone()),
            _ => None,
        };
        if let (Some(user), Some(resource)) = (self.user.clone(), resource) {
            self.route(Envelope::to_user(
                user,
                UserMsg::Unbind {
                    session: self.addr,
                    resource,
                },
            ));
        }
        self.state = State::Closed;
        self.out.actions.push(Action::Close);
    }
}

/// What a bound session told its user actor of itself (RFC 6121 state the actor keeps per
/// session), so that it can register with a later incarnation after a move
/// (`UserMsg::Rebind`) and its client notices nothing.
#[derive(Debug, Default)]
struct Registered {
    /// Its last broadcast available presence, `from` stamped; `None` after unavailable.
    presence: Option<Element>,
    /// It asked for the roster (receives pushes): the roster version its client has.
    roster: Option<String>,
    /// Full or bare JIDs it sent directed available presence to, not since unavailable.
    directed: std::collections::BTreeSet<String>,
    /// The last offline message it confirmed.
    offline_upto: u64,
}

impl Registered {
    /// Notes a stamped stanza the session routes to its own user actor.
    fn note(&mut self, el: &Element) {
        match (el.name.as_str(), el.attr("type"), el.attr("to")) {
            ("presence", None, None) => self.presence = Some(el.clone()),
            ("presence", Some("unavailable"), None) => {
                self.presence = None;
                self.directed.clear();
            }
            ("presence", None, Some(to)) => {
                self.directed.insert(to.to_string());
            }
            ("presence", Some("unavailable"), Some(to)) => {
                self.directed.remove(to);
            }
            ("iq", Some("get"), _) if el.first_child().is_some_and(|p| p.ns == ns::ROSTER) => {
                // The answer names the version unless it is the one asked for (XEP-0237).
                let asked = el.first_child().and_then(|q| q.attr("ver")).unwrap_or("");
                self.roster = Some(asked.to_string());
            }
            _ => {}
        }
    }

    /// Notes a stanza for the client: a roster result or push names the client's version.
    fn note_in(&mut self, el: &Element) {
        if el.name != "iq" || self.roster.is_none() {
            return;
        }
        if let Some(ver) = el.child("query", ns::ROSTER).and_then(|q| q.attr("ver")) {
            self.roster = Some(ver.to_string());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
