//! What travels between nodes: length-prefixed rkyv archives of [`Frame`]s, validated
//! (bytecheck) before use — a corrupt or hostile frame is an error, never undefined behaviour.
//!
//! Elements travel flattened (pre-order, each node naming its parent): no recursive archived
//! type, so validation cannot recurse deeply, and the depth of a received tree is checked
//! against the same limit as a client's stanza.

use rkyv::rancor;

use crate::address::{Address, SessionAddr};
use crate::msg::{Envelope, SessionMsg, UserMsg};
use crate::xml::{Element, Node};

/// Frames larger than this are refused (a stanza is limited far below it).
pub const MAX_FRAME: usize = 4 << 20;
/// Deepest element tree accepted from a peer (a client's limit is lower).
pub const MAX_DEPTH: usize = 64;

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Frame {
    /// First frame on every link: who is speaking.
    Hello {
        name: String,
        generation: u64,
    },
    Envelope(WireEnvelope),
    /// Account operations go to the node that owns the account (its slot's owner), served
    /// there behind a read index or through the slot's log (`system::consensus`).
    AccountReq {
        id: u64,
        op: AccountOp,
    },
    AccountResp {
        id: u64,
        result: AccountResult,
    },
    /// Raft messages for the receiver's slots (`system::consensus`; each goes to its slot's
    /// shard there), checked again by `RaftMsg::into_raft` before raft-rs sees them.
    Raft(Vec<WireRaft>),
}

/// One slot's Raft message.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireRaft {
    pub slot: u32,
    pub msg: crate::system::slot::RaftMsg,
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireEnvelope {
    pub to: WireAddr,
    pub msg: WireMsg,
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireAddr {
    User(String),
    Session(WireSession),
}

#[derive(Clone, Copy, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireSession {
    pub node: u32,
    pub node_gen: u64,
    pub shard: u16,
    pub id: u64,
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireMsg {
    Bind {
        session: WireSession,
        resource: String,
    },
    Unbind {
        session: WireSession,
        resource: String,
    },
    Outbound {
        session: WireSession,
        resource: String,
        stanza: WireElement,
    },
    Inbound {
        stanza: WireElement,
    },
    OfflineDelivered {
        session: WireSession,
        upto: u64,
    },
    NodeDown {
        node: u32,
        gen: u64,
    },
    Resync {
        moved: Vec<u32>,
        slots: u32,
    },
    Again {
        stanza: WireElement,
        tries: u8,
    },
    Bound {
        resource: String,
    },
    BindFailed {
        condition: String,
    },
    Stanza(WireElement),
    Offline(WireElement),
    OfflineSent {
        upto: u64,
    },
    Kick {
        condition: String,
        text: String,
    },
    Rebind {
        session: WireSession,
        resource: String,
        presence: Option<WireElement>,
        roster_ver: Option<String>,
        directed: Vec<String>,
        offline_upto: u64,
    },
    Handoff,
    RebindSession {
        again: Option<WireElement>,
    },
}

/// An element tree in pre-order; `nodes[0]` is the root element.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireElement {
    pub nodes: Vec<FlatNode>,
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum FlatNode {
    Element {
        parent: u32,
        name: String,
        ns: String,
        attrs: Vec<(String, String)>,
    },
    Text {
        parent: u32,
        text: String,
    },
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireCreds {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireAccount {
    pub sha1: WireCreds,
    pub sha256: WireCreds,
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AccountOp {
    Load { user: String },
    Create { user: String, account: WireAccount },
    Put { user: String, account: WireAccount },
}

#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AccountResult {
    Loaded(Option<WireAccount>),
    Created(bool),
    Done,
    Failed(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("frame does not validate: {0}")]
    Invalid(String),
    #[error("bad content: {0}")]
    Content(&'static str),
}

/// Appends `frame` to `buf` as a 4-byte big-endian length and the archive.
pub fn encode(frame: &Frame, buf: &mut Vec<u8>) -> Result<(), WireError> {
    let bytes = rkyv::to_bytes::<rancor::Error>(frame).map_err(|e| WireError::Invalid(e.to_string()))?;
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge(bytes.len()));
    }
    buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    buf.extend_from_slice(&bytes);
    Ok(())
}

/// The length a frame header announces, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let n = u32::from_be_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(WireError::TooLarge(n));
    }
    Ok(n)
}

/// Validates and deserializes one frame body (without its length prefix). The bytes are
/// copied into an aligned buffer first: archives need their alignment.
pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<Frame, rancor::Error>(&aligned).map_err(|e| WireError::Invalid(e.to_string()))
}

fn session_out(a: SessionAddr) -> WireSession {
    WireSession {
        node: a.node,
        node_gen: a.node_gen,
        shard: a.shard,
        id: a.id,
    }
}

fn session_in(s: WireSession) -> SessionAddr {
    SessionAddr {
        node: s.node,
        node_gen: s.node_gen,
        shard: s.shard,
        id: s.id,
    }
}

pub fn element_out(e: &Element) -> WireElement {
    fn walk(e: &Element, parent: u32, out: &mut Vec<FlatNode>) {
        let me = out.len() as u32;
        out.push(FlatNode::Element {
            parent,
            name: e.name.clone(),
            ns: e.ns.clone(),
            attrs: e.attrs.clone(),
        });
        for c in &e.children {
            match c {
                Node::Element(c) => walk(c, me, out),
                Node::Text(t) => out.push(FlatNode::Text {
                    parent: me,
                    text: t.clone(),
                }),
            }
        }
    }
    let mut nodes = Vec::new();
    walk(e, u32::MAX, &mut nodes);
    WireElement { nodes }
}

/// Rebuilds the tree without recursion: every node's parent must come before it (pre-order)
/// and be an element; depth is limited.
pub fn element_in(w: WireElement) -> Result<Element, WireError> {
    let n = w.nodes.len();
    if n == 0 {
        return Err(WireError::Content("empty element"));
    }
    let mut depth = vec![0usize; n];
    let mut built: Vec<Option<Element>> = Vec::with_capacity(n);
    let mut children: Vec<Vec<Node>> = Vec::with_capacity(n);
    let mut texts: Vec<Option<(u32, String)>> = Vec::with_capacity(n);
    let mut parents = Vec::with_capacity(n);
    for (i, node) in w.nodes.into_iter().enumerate() {
        let parent = match &node {
            FlatNode::Element { parent, .. } | FlatNode::Text { parent, .. } => *parent,
        };
        if i == 0 {
            if parent != u32::MAX || !matches!(node, FlatNode::Element { .. }) {
                return Err(WireError::Content("the first node must be the root element"));
            }
        } else {
            let p = parent as usize;
            if p >= i || built[p].is_none() {
                return Err(WireError::Content("a node's parent must be an earlier element"));
            }
            depth[i] = depth[p] + 1;
            if depth[i] > MAX_DEPTH {
                return Err(WireError::Content("element tree too deep"));
            }
        }
        parents.push(parent);
        children.push(Vec::new());
        match node {
            FlatNode::Element { name, ns, attrs, .. } => {
                built.push(Some(Element {
                    name,
                    ns,
                    attrs,
                    children: Vec::new(),
                }));
                texts.push(None);
            }
            FlatNode::Text { parent, text } => {
                built.push(None);
                texts.push(Some((parent, text)));
            }
        }
    }
    // Children have higher indices than their parents: attach from the end, then reverse.
    for i in (1..n).rev() {
        let node = match texts[i].take() {
            Some((_, t)) => Node::Text(t),
            None => {
                let mut e = built[i].take().expect("an element");
                e.children = std::mem::take(&mut children[i]);
                e.children.reverse();
                Node::Element(e)
            }
        };
        children[parents[i] as usize].push(node);
    }
    let mut root = built[0].take().expect("checked");
    root.children = std::mem::take(&mut children[0]);
    root.children.reverse();
    Ok(root)
}

/// Conditions travel as text; the actors keep `&'static str`s. Unknown ones become
/// `undefined-condition` (RFC 6120 §4.9.3.21).
fn condition_in(c: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "bad-format",
        "conflict",
        "connection-timeout",
        "host-gone",
        "internal-server-error",
        "item-not-found",
        "not-authorized",
        "policy-violation",
        "remote-connection-failed",
        "reset",
        "resource-constraint",
        "service-unavailable",
        "system-shutdown",
        "undefined-condition",
    ];
    KNOWN
        .iter()
        .find(|k| **k == c)
        .copied()
        .unwrap_or("undefined-condition")
}

pub fn envelope_out(env: &Envelope) -> WireEnvelope {
    match env {
        Envelope::User { to, msg } => WireEnvelope {
            to: WireAddr::User(to.to_string()),
            msg: user_msg_out(msg),
        },
        Envelope::Session { to, msg } => WireEnvelope {
            to: WireAddr::Session(session_out(*to)),
            msg: session_msg_out(msg),
        },
    }
}

fn user_msg_out(m: &UserMsg) -> WireMsg {
    match m {
        UserMsg::Bind { session, resource } => WireMsg::Bind {
            session: session_out(*session),
            resource: resource.clone(),
        },
        UserMsg::Unbind { session, resource } => WireMsg::Unbind {
            session: session_out(*session),
            resource: resource.clone(),
        },
        UserMsg::Outbound {
            session,
            resource,
            stanza,
        } => WireMsg::Outbound {
            session: session_out(*session),
            resource: resource.clone(),
            stanza: element_out(stanza),
        },
        UserMsg::Inbound { stanza } => WireMsg::Inbound {
            stanza: element_out(stanza),
        },
        UserMsg::OfflineDelivered { session, upto } => WireMsg::OfflineDelivered {
            session: session_out(*session),
            upto: *upto,
        },
        UserMsg::NodeDown { node, gen } => WireMsg::NodeDown { node: *node, gen: *gen },
        UserMsg::Resync { moved, slots } => WireMsg::Resync {
            moved: moved.clone(),
            slots: *slots,
        },
        UserMsg::Again { stanza, tries } => WireMsg::Again {
            stanza: element_out(stanza),
            tries: *tries,
        },
        UserMsg::Rebind {
            session,
            resource,
            presence,
            roster_ver,
            directed,
            offline_upto,
        } => WireMsg::Rebind {
            session: session_out(*session),
            resource: resource.clone(),
            presence: presence.as_ref().map(element_out),
            roster_ver: roster_ver.clone(),
            directed: directed.clone(),
            offline_upto: *offline_upto,
        },
        UserMsg::Handoff => WireMsg::Handoff,
    }
}

fn session_msg_out(m: &SessionMsg) -> WireMsg {
    match m {
        SessionMsg::Bound { resource } => WireMsg::Bound {
            resource: resource.clone(),
        },
        SessionMsg::BindFailed { condition } => WireMsg::BindFailed {
            condition: condition.to_string(),
        },
        SessionMsg::Stanza(e) => WireMsg::Stanza(element_out(e)),
        SessionMsg::Offline(e) => WireMsg::Offline(element_out(e)),
        SessionMsg::OfflineSent { upto } => WireMsg::OfflineSent { upto: *upto },
        SessionMsg::Kick { condition, text } => WireMsg::Kick {
            condition: condition.to_string(),
            text: text.clone(),
        },
        SessionMsg::Rebind { again } => WireMsg::RebindSession {
            again: again.as_ref().map(element_out),
        },
    }
}

/// A message decoded before it is matched with its address.
enum Msg {
    User(UserMsg),
    Session(SessionMsg),
}

pub fn envelope_in(w: WireEnvelope) -> Result<Envelope, WireError> {
    let to = match w.to {
        WireAddr::User(j) => Address::User(j.parse().map_err(|_| WireError::Content("bad bare JID"))?),
        WireAddr::Session(s) => Address::Session(session_in(s)),
    };
    let msg = match w.msg {
        WireMsg::Bind { session, resource } => Msg::User(UserMsg::Bind {
            session: session_in(session),
            resource,
        }),
        WireMsg::Unbind { session, resource } => Msg::User(UserMsg::Unbind {
            session: session_in(session),
            resource,
        }),
        WireMsg::Outbound {
            session,
            resource,
            stanza,
        } => Msg::User(UserMsg::Outbound {
            session: session_in(session),
            resource,
            stanza: element_in(stanza)?,
        }),
        WireMsg::Inbound { stanza } => Msg::User(UserMsg::Inbound {
            stanza: element_in(stanza)?,
        }),
        WireMsg::OfflineDelivered { session, upto } => Msg::User(UserMsg::OfflineDelivered {
            session: session_in(session),
            upto,
        }),
        WireMsg::NodeDown { node, gen } => Msg::User(UserMsg::NodeDown { node, gen }),
        WireMsg::Resync { moved, slots } => Msg::User(UserMsg::Resync { moved, slots }),
        WireMsg::Again { stanza, tries } => Msg::User(UserMsg::Again {
            stanza: element_in(stanza)?,
            tries,
        }),
        WireMsg::Bound { resource } => Msg::Session(SessionMsg::Bound { resource }),
        WireMsg::BindFailed { condition } => Msg::Session(SessionMsg::BindFailed {
            condition: condition_in(&condition),
        }),
        WireMsg::Stanza(e) => Msg::Session(SessionMsg::Stanza(element_in(e)?)),
        WireMsg::Offline(e) => Msg::Session(SessionMsg::Offline(element_in(e)?)),
        WireMsg::OfflineSent { upto } => Msg::Session(SessionMsg::OfflineSent { upto }),
        WireMsg::Kick { condition, text } => Msg::Session(SessionMsg::Kick {
            condition: condition_in(&condition),
            text,
        }),
        WireMsg::Rebind {
            session,
            resource,
            presence,
            roster_ver,
            directed,
            offline_upto,
        } => Msg::User(UserMsg::Rebind {
            session: session_in(session),
            resource,
            presence: presence.map(element_in).transpose()?,
            roster_ver,
            directed,
            offline_upto,
        }),
        WireMsg::Handoff => Msg::User(UserMsg::Handoff),
        WireMsg::RebindSession { again } => Msg::Session(SessionMsg::Rebind {
            again: again.map(element_in).transpose()?,
        }),
    };
    match (to, msg) {
        (Address::User(to), Msg::User(msg)) => Ok(Envelope::User { to, msg }),
        (Address::Session(to), Msg::Session(msg)) => Ok(Envelope::Session { to, msg }),
        _ => Err(WireError::Content("message kind does not match its address")),
    }
}

fn creds_out(c: &starling_storage::ScramCreds) -> WireCreds {
    WireCreds {
        salt: c.salt.clone(),
        iterations: c.iterations,
        stored_key: c.stored_key.clone(),
        server_key: c.server_key.clone(),
    }
}

fn creds_in(c: WireCreds) -> starling_storage::ScramCreds {
    starling_storage::ScramCreds {
        salt: c.salt,
        iterations: c.iterations,
        stored_key: c.stored_key,
        server_key: c.server_key,
    }
}

pub fn account_out(a: &starling_storage::Account) -> WireAccount {
    WireAccount {
        sha1: creds_out(&a.sha1),
        sha256: creds_out(&a.sha256),
    }
}

pub fn account_in(a: WireAccount) -> starling_storage::Account {
    starling_storage::Account {
        sha1: creds_in(a.sha1),
        sha256: creds_in(a.sha256),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::{StreamEvent, StreamParser};

    fn parse(xml: &str) -> Element {
        let mut p = StreamParser::new(Default::default());
        let mut evs = Vec::new();
        p.feed(
            format!("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>{xml}")
                .as_bytes(),
            &mut evs,
        )
        .unwrap();
        match evs.pop() {
            Some(StreamEvent::Stanza(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    fn roundtrip(env: &Envelope) -> Envelope {
        let mut buf = Vec::new();
        encode(&Frame::Envelope(envelope_out(env)), &mut buf).unwrap();
        let n = frame_len(buf[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, buf.len() - 4);
        match decode(&buf[4..]).unwrap() {
            Frame::Envelope(w) => envelope_in(w).unwrap(),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn envelopes_survive_the_wire() {
        let st = parse(
            "<message to='bob@x/r' from='alice@x/a' type='chat' xml:lang='en'><body>hi <b xmlns='urn:x'>there</b> &amp; bye</body><thread>t1</thread><x xmlns='jabber:x:oob'><url>u</url></x></message>",
        );
        let s = SessionAddr {
            node: 7,
            node_gen: 1_700_000_000_001,
            shard: 3,
            id: 99,
        };
        let alice: jid::BareJid = "alice@x".parse().unwrap();
        for env in [
            Envelope::to_user(alice.clone(), UserMsg::Inbound { stanza: st.clone() }),
            Envelope::to_user(
                alice.clone(),
                UserMsg::Outbound {
                    session: s,
                    resource: "r".into(),
                    stanza: st.clone(),
                },
            ),
            Envelope::to_user(
                alice.clone(),
                UserMsg::Bind {
                    session: s,
                    resource: "r".into(),
                },
            ),
            Envelope::to_user(
                alice.clone(),
                UserMsg::Unbind {
                    session: s,
                    resource: "r".into(),
                },
            ),
            Envelope::to_user(alice.clone(), UserMsg::OfflineDelivered { session: s, upto: 5 }),
            Envelope::to_user(
                alice.clone(),
                UserMsg::NodeDown {
                    node: 7,
                    gen: 1_700_000_000_123,
                },
            ),
            Envelope::to_user(
                alice.clone(),
                UserMsg::Resync {
                    moved: vec![3, 17],
                    slots: 64,
                },
            ),
            Envelope::to_user(
                alice.clone(),
                UserMsg::Rebind {
                    session: s,
                    resource: "r".into(),
                    presence: Some(parse("<presence from='alice@x/r'><show>away</show></presence>")),
                    roster_ver: Some("7".into()),
                    directed: vec!["carol@y/c".into()],
                    offline_upto: 12,
                },
            ),
            Envelope::to_user(
                alice.clone(),
                UserMsg::Rebind {
                    session: s,
                    resource: "r".into(),
                    presence: None,
                    roster_ver: None,
                    directed: Vec::new(),
                    offline_upto: 0,
                },
            ),
            Envelope::to_user(alice, UserMsg::Handoff),
            Envelope::to_session(s, SessionMsg::Rebind { again: None }),
            Envelope::to_session(
                s,
                SessionMsg::Rebind {
                    again: Some(st.clone()),
                },
            ),
            Envelope::to_session(s, SessionMsg::Stanza(st.clone())),
            Envelope::to_session(s, SessionMsg::Offline(st)),
            Envelope::to_session(s, SessionMsg::OfflineSent { upto: 9 }),
            Envelope::to_session(s, SessionMsg::Bound { resource: "r".into() }),
            Envelope::to_session(
                s,
                SessionMsg::BindFailed {
                    condition: "not-authorized",
                },
            ),
            Envelope::to_session(
                s,
                SessionMsg::Kick {
                    condition: "conflict",
                    text: "replaced".into(),
                },
            ),
        ] {
            assert_eq!(roundtrip(&env), env);
        }
    }

    #[test]
    fn corrupt_frames_are_errors() {
        let st = parse("<message to='bob@x'><body>hello</body></message>");
        let mut buf = Vec::new();
        encode(
            &Frame::Envelope(envelope_out(&Envelope::to_session(
                SessionAddr {
                    node: 1,
                    node_gen: 0,
                    shard: 0,
                    id: 1,
                },
                SessionMsg::Stanza(st),
            ))),
            &mut buf,
        )
        .unwrap();
        let body = &buf[4..];
        // Truncations and single-byte flips: every one is an error or a valid frame, and
        // nothing panics (a flipped byte inside a string can still be a valid frame).
        for cut in 0..body.len() {
            let _ = decode(&body[..cut]);
        }
        let mut errors = 0;
        for i in 0..body.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = body.to_vec();
                b[i] ^= bit;
                match decode(&b) {
                    Err(_) => errors += 1,
                    Ok(Frame::Envelope(w)) => {
                        let _ = envelope_in(w);
                    }
                    Ok(_) => {}
                }
            }
        }
        assert!(
            errors > body.len() / 4,
            "only {errors} of {} flips detected",
            body.len() * 2
        );
        assert!(matches!(decode(b"\x00\x01garbage"), Err(WireError::Invalid(_))));
        assert!(matches!(decode(&[]), Err(WireError::Invalid(_))));
        assert_eq!(
            frame_len((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(WireError::TooLarge(MAX_FRAME + 1))
        );
    }

    #[test]
    fn hostile_trees_are_refused() {
        let el = |parent| FlatNode::Element {
            parent,
            name: "x".into(),
            ns: "jabber:client".into(),
            attrs: vec![],
        };
        // A parent after its child, a text parent, a second root, an empty tree, too deep.
        for nodes in [
            vec![el(u32::MAX), el(2), el(0)],
            vec![
                el(u32::MAX),
                FlatNode::Text {
                    parent: 0,
                    text: "t".into(),
                },
                el(1),
            ],
            vec![el(u32::MAX), el(u32::MAX)],
            vec![],
            (0..=MAX_DEPTH as u32 + 1)
                .map(|i| el(if i == 0 { u32::MAX } else { i - 1 }))
                .collect(),
        ] {
            assert!(element_in(WireElement { nodes }).is_err());
        }
        let ok: Vec<FlatNode> = (0..MAX_DEPTH as u32)
            .map(|i| el(if i == 0 { u32::MAX } else { i - 1 }))
            .collect();
        assert!(element_in(WireElement { nodes: ok }).is_ok());
        // A user message addressed to a session is refused.
        let w = WireEnvelope {
            to: WireAddr::Session(WireSession {
                node: 1,
                node_gen: 0,
                shard: 0,
                id: 1,
            }),
            msg: WireMsg::Inbound {
                stanza: WireElement {
                    nodes: vec![el(u32::MAX)],
                },
            },
        };
        assert!(envelope_in(w).is_err());
    }

    #[test]
    fn raft_messages_survive_the_wire_and_a_broken_frame_is_refused() {
        use crate::system::slot::{RaftEntry, RaftMsg};
        let msg = RaftMsg {
            kind: raft::eraftpb::MessageType::MsgAppend as i32,
            to: 2,
            from: 1,
            term: 7,
            log_term: 6,
            index: 41,
            entries: vec![RaftEntry {
                kind: 0,
                term: 7,
                index: 42,
                data: vec![1, 2, 3],
                context: Vec::new(),
            }],
            commit: 40,
            commit_term: 6,
            snapshot: None,
            request_snapshot: 0,
            reject: false,
            reject_hint: 0,
            context: Vec::new(),
            priority: 0,
        };
        let frame = Frame::Raft(vec![WireRaft { slot: 5, msg }]);
        let mut buf = Vec::new();
        encode(&frame, &mut buf).unwrap();
        assert_eq!(decode(&buf[4..]).unwrap(), frame);
        let mut broken = buf[4..].to_vec();
        broken.truncate(broken.len() / 2);
        assert!(decode(&broken).is_err());
    }
}
