//! Simulated clients: scripted XMPP users that speak real XML to the session actors. Each one
//! logs in (PLAIN, bind, roster get, initial presence), then acts at random — messages to
//! online and offline users, roster adds and removals with subscription requests, presence
//! changes, logouts — and answers what it receives the way a typical client does
//! (subscription requests are approved, roster pushes acknowledged). It keeps the view the
//! server gave it (roster, contacts' presence), which the oracles compare with the truth.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use starling_actors::parser::{Limits, StreamEvent, StreamParser};
use starling_actors::xml::{attr_escaped, Element};

use crate::rng::Rng;

pub const DOMAIN: &str = "localhost";
pub const RESOURCE: &str = "sim";
const ROSTER: &str = "jabber:iq:roster";
const CLIENT: &str = "jabber:client";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Offline,
    Features1,
    Auth,
    Features2,
    Bind,
    Online,
}

/// A roster item as the client was told: subscription and whether a request is pending.
pub type ItemView = (String, bool);

/// What the client tells the world (and the oracles) besides bytes.
#[derive(Debug)]
pub enum Note {
    Received {
        id: String,
        delayed: bool,
    },
    ErrorFor {
        id: String,
        condition: String,
    },
    LoggedIn,
    Push,
    /// A roster fetch after a reconnect lacks an item the client had been told about.
    ToldItemMissing {
        contact: String,
    },
    Unexpected(String),
}

#[derive(Default)]
pub struct Out {
    pub bytes: Vec<u8>,
    pub close: bool,
    pub notes: Vec<Note>,
}

pub struct Client {
    pub idx: usize,
    pub user: String,
    pub password: String,
    pub conn: Option<u64>,
    pub stage: Stage,
    parser: StreamParser,
    events: Vec<StreamEvent>,
    /// The roster as the server last told it (fetch plus pushes), by contact.
    pub roster: BTreeMap<String, ItemView>,
    /// The fetch of this connection has been answered.
    pub roster_known: bool,
    roster_fetch: Option<String>,
    /// Contacts whose removal was asked for and not yet confirmed, with how many removals
    /// are outstanding (two requests, one push: one is still on its way).
    removing: BTreeMap<String, u32>,
    /// Contacts' presence as received: contact → resource → available.
    pub presence: BTreeMap<String, BTreeMap<String, bool>>,
    /// Sent available presence on this connection (and not unavailable since).
    pub available: bool,
    /// Whether the script wants to be online (it reconnects when cut).
    pub wants_online: bool,
    next_id: u64,
    pub sent_messages: u64,
    /// Contacts this client removed or unsubscribed from at least once.
    pub churned_with: BTreeSet<String>,
}

impl Client {
    pub fn new(idx: usize) -> Self {
        Client {
            idx,
            user: user_jid(idx),
            password: format!("pw{idx}"),
            conn: None,
            stage: Stage::Offline,
            parser: StreamParser::new(Limits {
                max_stanza_bytes: 1 << 20,
                max_depth: 64,
                max_attrs: 64,
            }),
            events: Vec::new(),
            roster: BTreeMap::new(),
            roster_known: false,
            roster_fetch: None,
            removing: BTreeMap::new(),
            presence: BTreeMap::new(),
            available: false,
            wants_online: true,
            next_id: 0,
            sent_messages: 0,
            churned_with: BTreeSet::new(),
        }
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}-{}", self.idx, self.next_id)
    }

    /// A new connection: the stream header.
    pub fn connect(&mut self, conn: u64) -> Vec<u8> {
        self.conn = Some(conn);
        self.stage = Stage::Features1;
        self.parser.reset();
        self.roster_known = false;
        header().into_bytes()
    }

    /// The connection is gone (cut, closed by either side, or the node died).
    pub fn closed(&mut self) {
        self.conn = None;
        self.stage = Stage::Offline;
        self.available = false;
        self.presence.clear();
    }

    pub fn online(&self) -> bool {
        self.stage == Stage::Online
    }

    pub fn on_bytes(&mut self, bytes: &[u8]) -> Out {
        let mut out = Out::default();
        let mut events = std::mem::take(&mut self.events);
        let r = self.parser.feed(bytes, &mut events);
        for ev in events.drain(..) {
            if out.close {
                break;
            }
            match ev {
                StreamEvent::Header(_) => {}
                StreamEvent::Stanza(el) => self.on_stanza(el, &mut out),
                StreamEvent::End => out.close = true,
            }
        }
        self.events = events;
        if let Err(e) = r {
            out.notes.push(Note::Unexpected(format!(
                "client cannot parse the server's stream: {e:?}"
            )));
            out.close = true;
        }
        out
    }

    fn on_stanza(&mut self, el: Element, out: &mut Out) {
        let send = |out: &mut Out, s: &str| out.bytes.extend_from_slice(s.as_bytes());
        match self.stage {
            Stage::Features1 if el.name == "features" => {
                let creds = format!("\0{}\0{}", self.user.split('@').next().unwrap_or(""), self.password);
                let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
                send(
                    out,
                    &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b64}</auth>"),
                );
                self.stage = Stage::Auth;
            }
            Stage::Auth if el.name == "success" => {
                self.parser.reset();
                send(out, &header());
                self.stage = Stage::Features2;
            }
            Stage::Features2 if el.name == "features" => {
                send(
                    out,
                    &format!(
                        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{RESOURCE}</resource></bind></iq>"
                    ),
                );
                self.stage = Stage::Bind;
            }
            Stage::Bind if el.name == "iq" && el.attr("id") == Some("bind") => {
                if el.attr("type") != Some("result") {
                    // A cluster node that cannot reach enough copies of the user's state
                    // refuses the bind (internal-server-error): the client tries again later.
                    let transient = el.child("error", "jabber:client").is_some_and(|e| {
                        e.child("internal-server-error", starling_actors::ns::STANZAS_ERR)
                            .is_some()
                    });
                    if !transient {
                        out.notes
                            .push(Note::Unexpected(format!("bind failed: {}", el.to_client_xml())));
                    }
                    out.close = true;
                    return;
                }
                self.stage = Stage::Online;
                let id = self.id("roster");
                send(
                    out,
                    &format!("<iq type='get' id='{id}'><query xmlns='{ROSTER}'/></iq><presence/>"),
                );
                self.roster_fetch = Some(id);
                self.available = true;
                out.notes.push(Note::LoggedIn);
            }
            Stage::Online => self.on_online_stanza(el, out),
            _ => {
                if el.name == "error" {
                    // A stream error (e.g. after a shard restart): the connection ends.
                    out.close = true;
                } else if el.name == "failure" {
                    out.notes.push(Note::Unexpected(format!(
                        "negotiation failed in {:?}: {}",
                        self.stage,
                        el.to_client_xml()
                    )));
                    out.close = true;
                }
            }
        }
    }

    fn on_online_stanza(&mut self, el: Element, out: &mut Out) {
        let from_bare = el.attr("from").map(|f| f.split('/').next().unwrap_or(f).to_string());
        match el.name.as_str() {
            "message" => {
                let Some(id) = el.attr("id").filter(|i| i.starts_with('m')) else {
                    return;
                };
                if el.attr("type") == Some("error") {
                    let condition = el
                        .child("error", CLIENT)
                        .and_then(|e| e.elements().next())
                        .map(|c| c.name.clone())
                        .unwrap_or_default();
                    out.notes.push(Note::ErrorFor {
                        id: id.to_string(),
                        condition,
                    });
                } else {
                    let delayed = el.child("delay", "urn:xmpp:delay").is_some();
                    out.notes.push(Note::Received {
                        id: id.to_string(),
                        delayed,
                    });
                }
            }
            "presence" => {
                let Some(from) = el.attr("from") else { return };
                let bare = from_bare.clone().unwrap_or_default();
                if bare == self.user {
                    return;
                }
                match el.attr("type") {
                    None => {
                        let res = from.split_once('/').map(|(_, r)| r).unwrap_or("").to_string();
                        self.presence.entry(bare).or_default().insert(res, true);
                    }
                    Some("unavailable") => {
                        let res = from.split_once('/').map(|(_, r)| r).unwrap_or("").to_string();
                        let view = self.presence.entry(bare).or_default();
                        if res.is_empty() {
                            view.clear();
                        } else {
                            view.insert(res, false);
                        }
                    }
                    Some("subscribe") => {
                        // Approve, and ask back unless already subscribed or asking.
                        let mut s = format!("<presence to='{}' type='subscribed'/>", attr_escaped(&bare));
                        let known = self.roster.get(&bare);
                        let has_to = known.is_some_and(|(sub, ask)| sub == "to" || sub == "both" || *ask);
                        if !has_to {
                            s.push_str(&format!("<presence to='{}' type='subscribe'/>", attr_escaped(&bare)));
                        }
                        out.bytes.extend_from_slice(s.as_bytes());
                    }
                    _ => {}
                }
            }
            "iq" => {
                let ty = el.attr("type").unwrap_or("");
                let id = el.attr("id").unwrap_or("").to_string();
                if ty == "set" {
                    if let Some(q) = el.child("query", ROSTER) {
                        for item in q.elements() {
                            self.apply_item(item);
                        }
                        out.notes.push(Note::Push);
                        out.bytes
                            .extend_from_slice(format!("<iq type='result' id='{}'/>", attr_escaped(&id)).as_bytes());
                    }
                } else if ty == "result" && self.roster_fetch.as_deref() == Some(id.as_str()) {
                    self.roster_fetch = None;
                    let mut fetched = BTreeMap::new();
                    if let Some(q) = el.child("query", ROSTER) {
                        for item in q.elements() {
                            if let Some(j) = item.attr("jid") {
                                fetched.insert(j.to_string(), item_view(item));
                            }
                        }
                    }
                    // Invariant 2: what the server told us it stored is still there.
                    for contact in self.roster.keys() {
                        if !fetched.contains_key(contact) && !self.removing.contains_key(contact) {
                            out.notes.push(Note::ToldItemMissing {
                                contact: contact.clone(),
                            });
                        }
                    }
                    // A removal asked for on an earlier connection may still be on its way
                    // (its bytes reach the server after the new session's fetch): it stays
                    // excused until a fetch shows the item gone.
                    self.removing.retain(|c, _| fetched.contains_key(c));
                    self.roster = fetched;
                    self.roster_known = true;
                }
            }
            _ => {}
        }
    }

    fn apply_item(&mut self, item: &Element) {
        let Some(j) = item.attr("jid") else { return };
        if item.attr("subscription") == Some("remove") {
            self.roster.remove(j);
            if let Some(n) = self.removing.get_mut(j) {
                *n -= 1;
                if *n == 0 {
                    self.removing.remove(j);
                }
            }
        } else {
            self.roster.insert(j.to_string(), item_view(item));
        }
    }

    /// One scripted action while online: the XML to send, and whether to log out after it.
    /// `churn`: also remove contacts and cancel subscriptions (whose stanzas can cross
    /// an approval in flight; see oracle.rs on invariant 3).
    pub fn act(&mut self, rng: &mut Rng, users: usize, churn: bool) -> (String, bool) {
        let other = loop {
            let o = rng.below(users);
            if o != self.idx || users < 2 {
                break user_jid(o);
            }
        };
        let other_e = attr_escaped(&other);
        let mut roll = rng.below(100);
        if !churn && (67..=75).contains(&roll) {
            roll = 0;
        }
        match roll {
            0..=49 => {
                let id = self.id("m");
                self.sent_messages += 1;
                let to = if rng.chance(0.15) {
                    format!("{other_e}/{RESOURCE}")
                } else {
                    other_e
                };
                (
                    format!("<message to='{to}' type='chat' id='{id}'><body>hello {id}</body></message>"),
                    false,
                )
            }
            50..=66 => {
                let id = self.id("s");
                (
                    format!(
                        "<iq type='set' id='{id}'><query xmlns='{ROSTER}'><item jid='{other_e}'/></query></iq>\
                         <presence to='{other_e}' type='subscribe'/>"
                    ),
                    false,
                )
            }
            67..=72 => {
                let Some(contact) = self.roster.keys().nth(rng.below(self.roster.len().max(1))).cloned() else {
                    return (String::new(), false);
                };
                *self.removing.entry(contact.clone()).or_default() += 1;
                self.churned_with.insert(contact.clone());
                let id = self.id("s");
                (
                    format!(
                        "<iq type='set' id='{id}'><query xmlns='{ROSTER}'><item jid='{}' subscription='remove'/></query></iq>",
                        attr_escaped(&contact)
                    ),
                    false,
                )
            }
            73..=75 => {
                self.churned_with.insert(other.clone());
                (format!("<presence to='{other_e}' type='unsubscribe'/>"), false)
            }
            76..=89 => {
                let show = ["away", "dnd", "xa", "chat"][rng.below(4)];
                if rng.chance(0.5) {
                    (format!("<presence><show>{show}</show></presence>"), false)
                } else {
                    ("<presence/>".to_string(), false)
                }
            }
            90..=94 => {
                self.available = false;
                ("<presence type='unavailable'/></stream:stream>".to_string(), true)
            }
            _ => {
                // A message to a full JID that may not exist (treated as bare for chat).
                let id = self.id("m");
                self.sent_messages += 1;
                (
                    format!(
                        "<message to='{other_e}/gone' type='chat' id='{id}'><body>to a stale resource</body></message>"
                    ),
                    false,
                )
            }
        }
    }
}

fn item_view(item: &Element) -> ItemView {
    (
        item.attr("subscription").unwrap_or("none").to_string(),
        item.attr("ask") == Some("subscribe"),
    )
}

pub fn user_jid(idx: usize) -> String {
    format!("u{idx}@{DOMAIN}")
}

fn header() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}
