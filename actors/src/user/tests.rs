//! User actors driven directly: a tiny router moves envelopes between two actors and records
//! what reaches sessions. No runtime, no storage (persists are taken as durable).

use std::collections::{BTreeMap, VecDeque};

use starling_storage::{OfflineMessage, Subscription};

use super::*;
use crate::msg::MAX_TRIES;
use crate::parser::{parse_element, Limits};

fn el(xml: &str) -> Element {
    parse_element(xml.as_bytes(), &[("".into(), ns::CLIENT.into())], Limits::default()).unwrap()
}

fn cfg() -> Rc<UserConfig> {
    Rc::new(UserConfig {
        max_offline: 2,
        max_roster_items: 10,
    })
}

/// In a test's `Outbound`: the session bound to that resource (the world fills it in).
const ANY: SessionAddr = SessionAddr {
    node: u32::MAX,
    node_gen: 0,
    shard: 0,
    id: 0,
};

struct World {
    users: BTreeMap<String, UserActor>,
    /// Bound sessions: (bare JID, resource) → address.
    bound: BTreeMap<(String, String), SessionAddr>,
    /// Sessions confirm the offline messages they were handed.
    confirm_offline: bool,
    /// What sessions received: (session id, stanza).
    delivered: Vec<(u64, Element)>,
    writes: Vec<Write>,
    kicked: Vec<u64>,
    /// Sessions asked to register again, with the stanza to send once more.
    rebinds: Vec<(u64, Option<Element>)>,
}

impl World {
    fn new(names: &[&str]) -> World {
        let users = names
            .iter()
            .map(|n| {
                let j: BareJid = format!("{n}@localhost").parse().unwrap();
                (j.to_string(), UserActor::new(j, true, UserData::default(), cfg()))
            })
            .collect();
        World {
            users,
            bound: BTreeMap::new(),
            confirm_offline: true,
            delivered: Vec::new(),
            writes: Vec::new(),
            kicked: Vec::new(),
            rebinds: Vec::new(),
        }
    }

    fn run(&mut self, to: &str, mut msg: UserMsg) {
        match &mut msg {
            UserMsg::Bind { session, resource } => {
                self.bound.insert((to.to_string(), resource.clone()), *session);
            }
            UserMsg::Outbound { session, resource, .. } if *session == ANY => {
                *session = self.bound[&(to.to_string(), resource.clone())];
            }
            _ => {}
        }
        let mut q = VecDeque::from([Envelope::to_user(to.parse().unwrap(), msg)]);
        while let Some(env) = q.pop_front() {
            match env {
                Envelope::User { to: j, msg: m } => {
                    let Some(actor) = self.users.get_mut(j.as_str()) else {
                        continue;
                    };
                    for fx in actor.handle(m, 1_700_000_000_000) {
                        match fx {
                            Effect::Send(e) => q.push_back(e),
                            Effect::Persist { writes, then, .. } => {
                                self.writes.extend(writes);
                                q.extend(then);
                            }
                        }
                    }
                }
                Envelope::Session {
                    to: a,
                    msg: SessionMsg::Stanza(s) | SessionMsg::Offline(s),
                } => self.delivered.push((a.id, s)),
                Envelope::Session {
                    to: a,
                    msg: SessionMsg::OfflineSent { upto },
                } if self.confirm_offline => {
                    // The session wrote them: it confirms, as c2s does.
                    let user = self.bound.iter().find(|(_, s)| **s == a).map(|((u, _), _)| u.clone());
                    if let Some(u) = user {
                        q.push_back(Envelope::to_user(
                            u.parse().unwrap(),
                            UserMsg::OfflineDelivered { session: a, upto },
                        ));
                    }
                }
                Envelope::Session {
                    to: a,
                    msg: SessionMsg::Kick { .. },
                } => self.kicked.push(a.id),
                Envelope::Session {
                    to: a,
                    msg: SessionMsg::Rebind { again },
                } => self.rebinds.push((a.id, again)),
                _ => {}
            }
        }
    }

    fn online(&mut self, user: &str, resource: &str, id: u64) {
        self.online_at(
            user,
            resource,
            SessionAddr {
                node: 0,
                node_gen: 0,
                shard: 0,
                id,
            },
        );
    }

    fn online_at(&mut self, user: &str, resource: &str, addr: SessionAddr) {
        self.run(
            &format!("{user}@localhost"),
            UserMsg::Bind {
                session: addr,
                resource: resource.into(),
            },
        );
        self.run(
            &format!("{user}@localhost"),
            UserMsg::Outbound {
                session: ANY,
                resource: resource.into(),
                stanza: el(&format!("<presence from='{user}@localhost/{resource}'/>")),
            },
        );
    }

    /// The user's client on `resource` sends `xml` (through the user's own actor).
    fn client_sends(&mut self, user: &str, resource: &str, xml: &str) {
        self.run(
            &format!("{user}@localhost"),
            UserMsg::Outbound {
                session: ANY,
                resource: resource.into(),
                stanza: el(xml),
            },
        );
    }

    fn take(&mut self, id: u64) -> Vec<Element> {
        let (mine, rest) = std::mem::take(&mut self.delivered)
            .into_iter()
            .partition(|(i, _)| *i == id);
        self.delivered = rest;
        mine.into_iter().map(|(_, s)| s).collect()
    }
}

#[test]
fn subscription_handshake_converges_and_presence_flows() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "a", 1);
    w.online("bob", "b", 2);
    w.take(1);
    w.take(2);
    w.client_sends(
        "alice",
        "a",
        "<presence from='alice@localhost/a' to='bob@localhost' type='subscribe'/>",
    );
    assert!(w
        .take(2)
        .iter()
        .any(|s| s.attr("type") == Some("subscribe") && s.attr("from") == Some("alice@localhost")));
    assert!(w.users["alice@localhost"].roster["bob@localhost"].ask_out);
    w.client_sends(
        "bob",
        "b",
        "<presence from='bob@localhost/b' to='alice@localhost' type='subscribed'/>",
    );
    assert_eq!(
        w.users["alice@localhost"].roster["bob@localhost"].subscription,
        Subscription::To
    );
    assert_eq!(
        w.users["bob@localhost"].roster["alice@localhost"].subscription,
        Subscription::From
    );
    // Alice got bob's current presence after approval.
    assert!(w
        .take(1)
        .iter()
        .any(|s| s.name == "presence" && s.attr("from") == Some("bob@localhost/b") && s.attr("type").is_none()));
    // Bob's next presence reaches alice; alice's does not reach bob (he has no "to").
    w.client_sends(
        "bob",
        "b",
        "<presence from='bob@localhost/b'><show>away</show></presence>",
    );
    assert!(w.take(1).iter().any(|s| s.child("show", ns::CLIENT).is_some()));
    w.take(2);
    w.client_sends(
        "alice",
        "a",
        "<presence from='alice@localhost/a'><show>dnd</show></presence>",
    );
    assert!(w.take(2).is_empty());
    // Unsubscribe by bob (unsubscribed): both sides drop the relation.
    w.client_sends(
        "bob",
        "b",
        "<presence from='bob@localhost/b' to='alice@localhost' type='unsubscribed'/>",
    );
    assert_eq!(
        w.users["alice@localhost"].roster["bob@localhost"].subscription,
        Subscription::None
    );
    assert_eq!(
        w.users["bob@localhost"].roster["alice@localhost"].subscription,
        Subscription::None
    );
    assert!(w.take(1).iter().any(|s| s.attr("type") == Some("unavailable")));
    assert!(
        w.writes.iter().any(|x| matches!(x, Write::SetRosterVer { .. })),
        "roster changes are persisted"
    );
}

#[test]
fn pre_approval_auto_accepts() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("bob", "b", 2);
    w.client_sends(
        "bob",
        "b",
        "<presence from='bob@localhost/b' to='alice@localhost' type='subscribed'/>",
    );
    assert!(w.users["bob@localhost"].roster["alice@localhost"].approved);
    w.take(2);
    w.online("alice", "a", 1);
    w.client_sends(
        "alice",
        "a",
        "<presence from='alice@localhost/a' to='bob@localhost' type='subscribe'/>",
    );
    assert_eq!(
        w.users["alice@localhost"].roster["bob@localhost"].subscription,
        Subscription::To
    );
    assert!(
        !w.take(2).iter().any(|s| s.attr("type") == Some("subscribe")),
        "pre-approved requests are not shown"
    );
}

#[test]
fn offline_queue_caps_with_an_error_and_delivers_with_delay() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "a", 1);
    w.take(1);
    for i in 0..3 {
        w.run("bob@localhost", UserMsg::Inbound { stanza: el(&format!("<message from='alice@localhost/a' to='bob@localhost' id='m{i}' type='chat'><body>{i}</body></message>")) });
    }
    assert_eq!(w.users["bob@localhost"].offline_len(), 2);
    let errs = w.take(1);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].attr("id"), Some("m2"));
    assert!(errs[0]
        .child("error", ns::CLIENT)
        .unwrap()
        .child("resource-constraint", ns::STANZAS_ERR)
        .is_some());
    w.online("bob", "b", 2);
    let got = w.take(2);
    let msgs: Vec<&Element> = got.iter().filter(|s| s.name == "message").collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0].child("delay", ns::DELAY).unwrap().attr("stamp"),
        Some("2023-11-14T22:13:20.000Z")
    );
    assert!(w
        .writes
        .iter()
        .any(|x| matches!(x, Write::DeleteOffline { upto: 2, .. })));
    assert_eq!(w.users["bob@localhost"].offline_len(), 0);
}

#[test]
fn roster_set_persists_then_answers_and_pushes_and_conflict_kicks() {
    let mut w = World::new(&["alice"]);
    w.online("alice", "a", 1);
    w.client_sends(
        "alice",
        "a",
        "<iq from='alice@localhost/a' type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>",
    );
    w.take(1);
    w.run("alice@localhost", UserMsg::Outbound {
            session: ANY, resource: "a".into(), stanza: el("<iq from='alice@localhost/a' type='set' id='s'><query xmlns='jabber:iq:roster'><item jid='carol@localhost' name='C'/></query></iq>") });
    let got = w.take(1);
    assert_eq!(got[0].attr("type"), Some("result"));
    assert_eq!(got[1].attr("type"), Some("set"), "push after the result");
    assert_eq!(got[1].child("query", ns::ROSTER).unwrap().attr("ver"), Some("1"));
    // Same resource again: the older session is kicked.
    w.run(
        "alice@localhost",
        UserMsg::Bind {
            session: SessionAddr {
                node: 0,
                node_gen: 0,
                shard: 1,
                id: 9,
            },
            resource: "a".into(),
        },
    );
    assert_eq!(w.kicked, vec![1]);
    // A message to a bare JID with only negative-priority sessions is stored.
    w.client_sends(
        "alice",
        "a",
        "<presence from='alice@localhost/a'><priority>-1</priority></presence>",
    );
    w.run(
        "alice@localhost",
        UserMsg::Inbound {
            stanza: el("<message from='x@localhost/r' to='alice@localhost'><body>k</body></message>"),
        },
    );
    assert_eq!(w.users["alice@localhost"].offline_len(), 1);
}

#[test]
fn timestamps_are_rfc3339() {
    assert_eq!(xmpp_timestamp(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(xmpp_timestamp(951_782_400_123), "2000-02-29T00:00:00.123Z");
}

#[test]
fn offline_messages_are_deleted_only_once_the_session_wrote_them() {
    let mut w = World::new(&["alice", "bob"]);
    w.confirm_offline = false;
    w.run(
        "bob@localhost",
        UserMsg::Inbound {
            stanza: el(
                "<message from='alice@localhost/a' to='bob@localhost' id='m0' type='chat'><body>0</body></message>",
            ),
        },
    );
    w.online("bob", "b", 2);
    assert_eq!(w.take(2).iter().filter(|s| s.name == "message").count(), 1);
    assert!(
        !w.writes.iter().any(|x| matches!(x, Write::DeleteOffline { .. })),
        "deleted before the session confirmed"
    );
    // The session ends without confirming: the next one gets the message again.
    let b = SessionAddr {
        node: 0,
        node_gen: 0,
        shard: 0,
        id: 2,
    };
    w.run(
        "bob@localhost",
        UserMsg::Unbind {
            session: b,
            resource: "b".into(),
        },
    );
    w.confirm_offline = true;
    w.online("bob", "c", 3);
    assert_eq!(w.take(3).iter().filter(|s| s.name == "message").count(), 1);
    assert!(w
        .writes
        .iter()
        .any(|x| matches!(x, Write::DeleteOffline { upto: 1, .. })));
    assert_eq!(w.users["bob@localhost"].offline_len(), 0);
}

#[test]
fn a_replaced_session_cannot_act_for_its_successor() {
    let mut w = World::new(&["alice", "bob"]);
    let old = SessionAddr {
        node: 0,
        node_gen: 0,
        shard: 0,
        id: 1,
    };
    w.online("alice", "a", 1);
    w.online("alice", "a", 2);
    // The old connection's late unavailable presence must not mark the new session unavailable.
    w.run(
        "alice@localhost",
        UserMsg::Outbound {
            session: old,
            resource: "a".into(),
            stanza: el("<presence type='unavailable' from='alice@localhost/a'/>"),
        },
    );
    w.run(
        "alice@localhost",
        UserMsg::Inbound {
            stanza: el(
                "<message from='bob@localhost/b' to='alice@localhost' id='m1' type='chat'><body>hi</body></message>",
            ),
        },
    );
    assert!(
        w.take(2).iter().any(|s| s.attr("id") == Some("m1")),
        "the new session is still available"
    );
}

/// Alice subscribes to bob and bob approves: alice sees bob's resources.
fn alice_sees_bob(w: &mut World) {
    w.client_sends(
        "alice",
        "a",
        "<presence from='alice@localhost/a' to='bob@localhost' type='subscribe'/>",
    );
    w.client_sends(
        "bob",
        "b",
        "<presence from='bob@localhost/b' to='alice@localhost' type='subscribed'/>",
    );
}

fn presence_from(got: &[Element], from: &str, ty: Option<&str>) -> bool {
    got.iter()
        .any(|s| s.name == "presence" && s.attr("from") == Some(from) && s.attr("type") == ty)
}

#[test]
fn a_node_going_ends_only_the_sessions_of_its_old_generation() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "a", 1);
    let on_n2 = |node_gen| SessionAddr {
        node: 2,
        node_gen,
        shard: 0,
        id: 2,
    };
    w.online_at("bob", "b", on_n2(11));
    alice_sees_bob(&mut w);
    assert!(presence_from(&w.take(1), "bob@localhost/b", None));
    // Node 2's generation 10 went (it rejoined as 11 and bob bound there since): bob stays.
    w.run("bob@localhost", UserMsg::NodeDown { node: 2, gen: 10 });
    assert!(!presence_from(&w.take(1), "bob@localhost/b", Some("unavailable")));
    assert!(!w.users["bob@localhost"].is_idle());
    // Generation 11 went too: bob's session is gone and alice is told.
    w.run("bob@localhost", UserMsg::NodeDown { node: 2, gen: 11 });
    assert!(presence_from(&w.take(1), "bob@localhost/b", Some("unavailable")));
    assert!(w.users["bob@localhost"].is_idle());
}

#[test]
fn a_node_going_makes_contacts_check_the_presence_they_see() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "a", 1);
    w.online("bob", "b", 2);
    alice_sees_bob(&mut w);
    assert!(presence_from(&w.take(1), "bob@localhost/b", None));
    // Bob's actor dies with its node, and with it bob's session's unavailable presence:
    // the next incarnation knows the roster, not that bob/b was online.
    let roster = w.users["bob@localhost"].roster.values().cloned().collect();
    let data = UserData {
        roster,
        ..UserData::default()
    };
    let bob: BareJid = "bob@localhost".parse().unwrap();
    w.users.insert(bob.to_string(), UserActor::new(bob, true, data, cfg()));
    // A moment after a node went, alice's actor asks bob again, naming bob/b, and is told
    // it is gone.
    w.run(
        "alice@localhost",
        UserMsg::Resync {
            moved: Vec::new(),
            slots: 64,
        },
    );
    assert!(presence_from(&w.take(1), "bob@localhost/b", Some("unavailable")));
    // Seen unavailable now: the next node going asks nothing.
    w.run(
        "alice@localhost",
        UserMsg::Resync {
            moved: Vec::new(),
            slots: 64,
        },
    );
    assert!(w.take(1).is_empty());
    // With bob back online, a resync answers his presence and no unavailable.
    w.online("bob", "b", 3);
    assert!(presence_from(&w.take(1), "bob@localhost/b", None));
    w.run(
        "alice@localhost",
        UserMsg::Resync {
            moved: Vec::new(),
            slots: 64,
        },
    );
    let got = w.take(1);
    assert!(presence_from(&got, "bob@localhost/b", None));
    assert!(!presence_from(&got, "bob@localhost/b", Some("unavailable")));
}

#[test]
fn a_resync_that_bounces_takes_the_resources_as_gone() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "a", 1);
    w.online("bob", "b", 2);
    alice_sees_bob(&mut w);
    assert!(presence_from(&w.take(1), "bob@localhost/b", None));
    // Bob's actor cannot start (its copies are unreachable): the host bounces the probe.
    w.users.remove("bob@localhost");
    w.run(
        "alice@localhost",
        UserMsg::Resync {
            moved: Vec::new(),
            slots: 64,
        },
    );
    assert!(w.take(1).is_empty());
    let bounce = el("<presence type='error' from='bob@localhost' to='alice@localhost'>\
        <resync xmlns='urn:starling:presence-resync:0'><resource>b</resource></resync>\
        <error type='wait'><internal-server-error xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>");
    w.run("alice@localhost", UserMsg::Inbound { stanza: bounce });
    let got = w.take(1);
    assert!(presence_from(&got, "bob@localhost/b", Some("unavailable")), "{got:?}");
    assert!(
        !got.iter().any(|s| s.attr("type") == Some("error")),
        "the bounce is ours, not the client's"
    );
}

/// What the `Persist` effects of one message say, handled directly by one actor: their
/// writes, and what each would send instead if it failed.
fn persists_of(actor: &mut UserActor, msg: UserMsg) -> (Vec<Write>, Vec<Envelope>) {
    let (mut writes, mut failed) = (Vec::new(), Vec::new());
    for fx in actor.handle(msg, 1_700_000_000_000) {
        if let Effect::Persist {
            writes: w, failed: f, ..
        } = fx
        {
            writes.extend(w);
            failed.extend(f);
        }
    }
    (writes, failed)
}

fn writes_of(actor: &mut UserActor, msg: UserMsg) -> Vec<Write> {
    persists_of(actor, msg).0
}

#[test]
fn a_confirmation_from_an_earlier_incarnations_session_deletes_what_it_was_sent() {
    let bob: BareJid = "bob@localhost".parse().unwrap();
    // An earlier incarnation sent seqs 5 and 6 to a session, then the actor moved: this one
    // loads them with the state at version 9.
    let data = UserData {
        offline: vec![stored(5), stored(6)],
        version: 9,
        ..UserData::default()
    };
    let mut a = UserActor::new(bob.clone(), true, data, cfg());
    let old = SessionAddr {
        node: 1,
        node_gen: 1,
        shard: 0,
        id: 77,
    };
    // A confirmation naming a number never given out is refused.
    assert!(writes_of(&mut a, UserMsg::OfflineDelivered { session: old, upto: 10 }).is_empty());
    let w = writes_of(&mut a, UserMsg::OfflineDelivered { session: old, upto: 6 });
    assert!(matches!(w.as_slice(), [Write::DeleteOffline { upto: 6, .. }]), "{w:?}");
    assert_eq!(a.offline_len(), 0);
    // Numbers are not reused once the queue is empty: the next message is 10, not 7, so a
    // late confirmation of 5..6 can never delete it.
    let msg = el("<message from='alice@localhost/a' to='bob@localhost' id='n1' type='chat'><body>y</body></message>");
    let w = writes_of(&mut a, UserMsg::Inbound { stanza: msg });
    assert!(
        matches!(w.as_slice(), [Write::PushOffline { msg, .. }] if msg.seq == 10),
        "{w:?}"
    );
    assert!(writes_of(&mut a, UserMsg::OfflineDelivered { session: old, upto: 6 }).is_empty());
    assert_eq!(a.offline_len(), 1);
}

/// An offline message for bob, numbered `seq`, stored with id `m{seq}`.
fn stored(seq: u64) -> OfflineMessage {
    OfflineMessage {
        seq,
        stamp_unix_ms: 1,
        xml: format!("<message to='bob@localhost' id='m{seq}'><body>x</body></message>"),
    }
}

fn failed_of(actor: &mut UserActor, msg: UserMsg) -> Vec<Envelope> {
    persists_of(actor, msg).1
}

#[test]
fn a_failed_write_says_what_to_send_instead() {
    let bob: BareJid = "bob@localhost".parse().unwrap();
    let mut a = UserActor::new(bob.clone(), true, UserData::default(), cfg());
    // A message that could not be stored offline: its sender gets an error.
    let msg = el("<message from='alice@localhost/a' to='bob@localhost' id='m1' type='chat'><body>x</body></message>");
    let f = failed_of(&mut a, UserMsg::Inbound { stanza: msg });
    let [Envelope::User {
        to,
        msg: UserMsg::Inbound { stanza: err },
    }] = f.as_slice()
    else {
        panic!("one error to the sender expected: {f:?}");
    };
    assert_eq!(to.as_str(), "alice@localhost");
    assert_eq!((err.attr("type"), err.attr("id")), (Some("error"), Some("m1")));
    assert!(err
        .child("error", ns::CLIENT)
        .unwrap()
        .child("internal-server-error", ns::STANZAS_ERR)
        .is_some());
    // An inbound subscription request: it goes again to bob's next incarnation.
    let sub = el("<presence from='alice@localhost' to='bob@localhost' type='subscribe'/>");
    let f = failed_of(&mut a, UserMsg::Inbound { stanza: sub });
    let [Envelope::User {
        to,
        msg: UserMsg::Again {
            stanza: again,
            tries: 1,
        },
    }] = f.as_slice()
    else {
        panic!("the request again expected: {f:?}");
    };
    assert_eq!((to, again.attr("type")), (&bob, Some("subscribe")));
    // ... and again, until it met MAX_TRIES failures.
    let mut fresh = UserActor::new(bob.clone(), true, UserData::default(), cfg());
    let f = failed_of(
        &mut fresh,
        UserMsg::Again {
            stanza: again.clone(),
            tries: 1,
        },
    );
    assert!(
        matches!(
            f.as_slice(),
            [Envelope::User {
                msg: UserMsg::Again { tries: 2, .. },
                ..
            }]
        ),
        "{f:?}"
    );
    let mut fresh = UserActor::new(bob.clone(), true, UserData::default(), cfg());
    let f = failed_of(
        &mut fresh,
        UserMsg::Again {
            stanza: again.clone(),
            tries: MAX_TRIES - 1,
        },
    );
    assert!(f.is_empty(), "dropped after MAX_TRIES: {f:?}");
    // A roster set: an error result instead of the result.
    let addr = SessionAddr {
        node: 0,
        node_gen: 0,
        shard: 0,
        id: 1,
    };
    a.handle(
        UserMsg::Bind {
            session: addr,
            resource: "r".into(),
        },
        0,
    );
    let set = el("<iq from='bob@localhost/r' type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query></iq>");
    let f = failed_of(
        &mut a,
        UserMsg::Outbound {
            session: addr,
            resource: "r".into(),
            stanza: set,
        },
    );
    let [Envelope::Session {
        to: s,
        msg: SessionMsg::Stanza(err),
    }] = f.as_slice()
    else {
        panic!("an error result expected: {f:?}");
    };
    assert_eq!(
        (*s, err.attr("type"), err.attr("id")),
        (addr, Some("error"), Some("s1"))
    );
}

#[test]
fn an_offline_message_with_xml_lang_is_delivered() {
    // slixmpp (and many clients) put xml:lang on every stanza; stored offline, it must parse
    // back without the stream header that declared nothing for it.
    let mut w = World::new(&["alice", "bob"]);
    w.run(
        "bob@localhost",
        UserMsg::Inbound {
            stanza: el("<message from='alice@localhost/a' to='bob@localhost' xml:lang='en' type='chat'><body xml:lang='de'>hallo</body></message>"),
        },
    );
    w.online("bob", "b", 2);
    let got = w.take(2);
    let m = got.iter().find(|s| s.name == "message").expect("the offline message");
    assert_eq!(m.attr("xml:lang"), Some("en"));
    assert_eq!(m.child("body", ns::CLIENT).unwrap().attr("xml:lang"), Some("de"));
    assert!(w
        .writes
        .iter()
        .any(|x| matches!(x, Write::DeleteOffline { upto: 1, .. })));
}

#[test]
fn an_unreadable_offline_message_is_set_aside_not_deleted() {
    let j: BareJid = "bob@localhost".parse().unwrap();
    let msg = |seq: u64, xml: &str| OfflineMessage {
        seq,
        stamp_unix_ms: 5,
        xml: xml.into(),
    };
    let data = UserData {
        offline: vec![
            msg(
                1,
                "<message from='alice@localhost/a' to='bob@localhost'><body>one</body></message>",
            ),
            msg(2, "<message><body>cut off"),
            msg(
                3,
                "<message from='alice@localhost/a' to='bob@localhost'><body>three</body></message>",
            ),
        ],
        version: 3,
        ..Default::default()
    };
    let mut w = World::new(&["alice"]);
    w.users.insert(j.to_string(), UserActor::new(j, true, data, cfg()));
    w.online("bob", "b", 2);
    let bodies: Vec<String> = w
        .take(2)
        .iter()
        .filter_map(|s| s.child("body", ns::CLIENT).map(|b| b.text()))
        .collect();
    assert_eq!(bodies, ["one", "three"]);
    let aside = w
        .writes
        .iter()
        .position(|x| matches!(x, Write::SetAsideOffline { seq: 2, .. }))
        .expect("set aside");
    let deleted = w
        .writes
        .iter()
        .position(|x| matches!(x, Write::DeleteOffline { upto: 3, .. }))
        .expect("the readable ones deleted once written");
    assert!(
        aside < deleted,
        "set aside before the deletion that would take it along"
    );
    assert_eq!(w.users["bob@localhost"].offline_len(), 0);
    // Applied to a store, the record is kept (and counted) while the others go.
    let mut s = starling_storage::MemoryStorage::new();
    let pushes: Vec<Write> = ["1", "2", "3"]
        .iter()
        .zip([1u64, 2, 3])
        .map(|(_, seq)| Write::PushOffline {
            user: "bob@localhost".into(),
            msg: msg(seq, "x"),
        })
        .collect();
    use starling_storage::Storage;
    s.apply(&pushes).unwrap();
    s.apply(&w.writes).unwrap();
    assert_eq!(s.offline_total(), 0);
    assert_eq!(s.unreadable_total(), 1);
    assert_eq!(s.unreadable().unwrap()[0].1.seq, 2);
}

#[test]
fn a_stored_subscription_request_keeps_its_extended_content() {
    // RFC 6121 §3.1.3: the complete stanza, e.g. a pre-authenticated subscription token.
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "a", 1);
    w.run(
        "alice@localhost",
        UserMsg::Outbound {
            session: ANY,
            resource: "a".into(),
            stanza: el(
                "<presence from='alice@localhost/a' to='bob@localhost' type='subscribe' xml:lang='en'>\
                 <status>it's me</status><preauth xmlns='urn:xmpp:pars:0' token='tok3n'/></presence>",
            ),
        },
    );
    let stored = w.users["bob@localhost"].roster["alice@localhost"].clone();
    assert!(stored.pending_in && stored.pending_stanza.is_some());
    // Bob's actor goes (idle) and comes back from storage: the stanza comes with the roster.
    let j: BareJid = "bob@localhost".parse().unwrap();
    let data = UserData {
        roster: vec![stored],
        ..Default::default()
    };
    w.users.insert(j.to_string(), UserActor::new(j, true, data, cfg()));
    w.online("bob", "b", 2);
    let got = w.take(2);
    let req = got
        .iter()
        .find(|s| s.attr("type") == Some("subscribe"))
        .expect("the pending request");
    assert_eq!(req.attr("from"), Some("alice@localhost"));
    assert_eq!(req.attr("to"), Some("bob@localhost"));
    assert_eq!(req.attr("xml:lang"), Some("en"));
    assert_eq!(req.child("status", ns::CLIENT).unwrap().text(), "it's me");
    assert_eq!(
        req.child("preauth", "urn:xmpp:pars:0").unwrap().attr("token"),
        Some("tok3n")
    );
    // Approved, the request is no longer kept.
    w.client_sends(
        "bob",
        "b",
        "<presence from='bob@localhost/b' to='alice@localhost' type='subscribed'/>",
    );
    let item = &w.users["bob@localhost"].roster["alice@localhost"];
    assert!(!item.pending_in && item.pending_stanza.is_none());
}

#[test]
fn disco_info_without_to_answers_as_the_account() {
    let mut w = World::new(&["alice"]);
    w.online("alice", "a", 1);
    w.take(1);
    w.client_sends(
        "alice",
        "a",
        "<iq from='alice@localhost/a' type='get' id='d1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
    );
    let got = w.take(1);
    let q = got[0].child("query", ns::DISCO_INFO).expect("disco#info result");
    let id = q.child("identity", ns::DISCO_INFO).unwrap();
    assert_eq!(
        (id.attr("category"), id.attr("type")),
        (Some("account"), Some("registered"))
    );
    assert!(q.elements().any(|f| f.attr("var") == Some(ns::DISCO_INFO)));
}

/// A user's actor moved (a new incarnation loaded from what the old one stored): the old
/// one's sessions register with it and their clients notice nothing but a refreshed view.
fn moved(w: &mut World, user: &str) {
    let old = &w.users[&format!("{user}@localhost")];
    let data = UserData {
        roster: old.roster.values().cloned().collect(),
        roster_ver: old.roster_ver,
        offline: old.offline.iter().cloned().collect(),
        ..UserData::default()
    };
    let j: BareJid = format!("{user}@localhost").parse().unwrap();
    w.users.insert(j.to_string(), UserActor::new(j, true, data, cfg()));
}

/// Alice, bob and carol online; alice and bob, alice and carol subscribed both ways.
fn alice_with_two_friends() -> World {
    let mut w = World::new(&["alice", "bob", "carol"]);
    w.online("alice", "alice", 1);
    w.online("bob", "bob", 2);
    w.online("carol", "carol", 3);
    befriend(&mut w, "alice", "bob");
    befriend(&mut w, "alice", "carol");
    w
}

fn befriend(w: &mut World, a: &str, b: &str) {
    for (x, y) in [(a, b), (b, a)] {
        w.client_sends(
            x,
            x,
            &format!("<presence from='{x}@localhost/{x}' to='{y}@localhost' type='subscribe'/>"),
        );
        w.client_sends(
            y,
            y,
            &format!("<presence from='{y}@localhost/{y}' to='{x}@localhost' type='subscribed'/>"),
        );
    }
}

#[test]
fn a_moved_session_registers_with_the_new_incarnation_and_its_view_is_refreshed() {
    let mut w = alice_with_two_friends();
    let ver = w.users["alice@localhost"].roster_ver.to_string();
    w.delivered.clear();
    moved(&mut w, "alice");
    // Meanwhile bob goes: his unavailable reaches an incarnation that knows no session, and
    // a message for alice is stored.
    w.run(
        "bob@localhost",
        UserMsg::Unbind {
            session: SessionAddr {
                node: 0,
                node_gen: 0,
                shard: 0,
                id: 2,
            },
            resource: "bob".into(),
        },
    );
    w.run(
        "alice@localhost",
        UserMsg::Inbound {
            stanza: el("<message from='carol@localhost/carol' to='alice@localhost' type='chat' id='m1'><body>hi</body></message>"),
        },
    );
    assert!(w.take(1).is_empty(), "no session known yet");
    let alice1 = SessionAddr {
        node: 0,
        node_gen: 0,
        shard: 0,
        id: 1,
    };
    w.run(
        "alice@localhost",
        UserMsg::Rebind {
            session: alice1,
            resource: "alice".into(),
            presence: Some(el(
                "<presence from='alice@localhost/alice'><show>away</show></presence>",
            )),
            roster_ver: Some(ver),
            directed: Vec::new(),
            offline_upto: 0,
        },
    );
    let got = w.take(1);
    // Bob's resources are gone (bare unavailable), carol's presence comes again, and the
    // message stored meanwhile is delivered; no echo of alice's own presence.
    assert!(
        got.iter()
            .any(|s| s.attr("type") == Some("unavailable") && s.attr("from") == Some("bob@localhost")),
        "{got:?}"
    );
    assert!(
        got.iter().any(|s| s.name == "presence"
            && s.attr("type").is_none()
            && s.attr("from") == Some("carol@localhost/carol")),
        "{got:?}"
    );
    assert!(got.iter().any(|s| s.attr("id") == Some("m1")), "{got:?}");
    assert!(
        !got.iter().any(|s| s.attr("from") == Some("alice@localhost/alice")),
        "{got:?}"
    );
    // Carol sees alice's presence again (repeated, harmless); the session is served as bound.
    assert!(w
        .take(3)
        .iter()
        .any(|s| s.attr("from") == Some("alice@localhost/alice") && s.child("show", ns::CLIENT).is_some()));
    w.client_sends(
        "alice",
        "alice",
        "<iq type='get' id='r1' from='alice@localhost/alice'><query xmlns='jabber:iq:roster'/></iq>",
    );
    assert!(w
        .take(1)
        .iter()
        .any(|s| s.attr("id") == Some("r1") && s.attr("type") == Some("result")));
    assert!(w.kicked.is_empty() && w.rebinds.is_empty());
    // Registering twice changes nothing.
    w.run(
        "alice@localhost",
        UserMsg::Rebind {
            session: alice1,
            resource: "alice".into(),
            presence: None,
            roster_ver: None,
            directed: Vec::new(),
            offline_upto: 0,
        },
    );
    assert!(w.take(1).is_empty() && w.kicked.is_empty());
}

#[test]
fn a_session_the_incarnation_does_not_know_is_asked_to_register_and_a_missed_roster_change_closes_it() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "alice", 1);
    w.online("bob", "bob", 2);
    befriend(&mut w, "alice", "bob");
    let ver = w.users["alice@localhost"].roster_ver.to_string();
    moved(&mut w, "alice");
    let iq = "<iq type='get' id='r1' from='alice@localhost/alice'><query xmlns='jabber:iq:roster'/></iq>";
    w.client_sends("alice", "alice", iq);
    assert_eq!(w.rebinds.len(), 1);
    let (id, again) = w.rebinds.pop().unwrap();
    assert_eq!((id, again.as_ref().and_then(|a| a.attr("id"))), (1, Some("r1")));
    // While it was on its way, the roster changed: a push cannot say what was removed, so
    // the session is closed (its client fetches the roster again).
    w.client_sends(
        "bob",
        "bob",
        "<presence from='bob@localhost/bob' to='alice@localhost' type='unsubscribe'/>",
    );
    assert_ne!(w.users["alice@localhost"].roster_ver.to_string(), ver);
    w.run(
        "alice@localhost",
        UserMsg::Rebind {
            session: SessionAddr {
                node: 0,
                node_gen: 0,
                shard: 0,
                id: 1,
            },
            resource: "alice".into(),
            presence: Some(el("<presence from='alice@localhost/alice'/>")),
            roster_ver: Some(ver),
            directed: Vec::new(),
            offline_upto: 0,
        },
    );
    assert_eq!(w.kicked, [1]);
    assert!(w.users["alice@localhost"].is_idle());
}

#[test]
fn a_handed_off_actor_forgets_its_sessions_without_a_word() {
    let mut w = World::new(&["alice", "bob"]);
    w.online("alice", "alice", 1);
    w.online("bob", "bob", 2);
    befriend(&mut w, "alice", "bob");
    w.delivered.clear();
    w.run("alice@localhost", UserMsg::Handoff);
    assert!(w.users["alice@localhost"].is_idle());
    assert!(
        w.delivered.is_empty() && w.kicked.is_empty(),
        "bob sees nothing: alice is still online"
    );
}

#[test]
fn a_resync_asks_the_contacts_whose_actors_moved_in_full() {
    let mut w = alice_with_two_friends();
    // Bob's actor moved; a probe reached it before his session registered: alice's client
    // was told he is offline.
    moved(&mut w, "bob");
    w.run(
        "alice@localhost",
        UserMsg::Inbound {
            stanza: el("<presence type='unavailable' from='bob@localhost' to='alice@localhost'/>"),
        },
    );
    w.run(
        "bob@localhost",
        UserMsg::Rebind {
            session: SessionAddr {
                node: 0,
                node_gen: 0,
                shard: 0,
                id: 2,
            },
            resource: "bob".into(),
            presence: Some(el("<presence from='bob@localhost/bob'/>")),
            roster_ver: None,
            directed: Vec::new(),
            offline_upto: 0,
        },
    );
    w.delivered.clear();
    let slots = 64;
    let bob_slot = crate::system::cluster::slot_of(b"bob@localhost", slots);
    w.run(
        "alice@localhost",
        UserMsg::Resync {
            moved: vec![bob_slot],
            slots,
        },
    );
    let got = w.take(1);
    assert!(
        got.iter()
            .any(|s| s.attr("from") == Some("bob@localhost/bob") && s.attr("type").is_none()),
        "{got:?}"
    );
    // Carol did not move, and alice sees her: she is asked about the resource seen only
    // (no unavailable from her bare JID).
    assert!(
        !got.iter().any(|s| s.attr("from") == Some("carol@localhost")),
        "{got:?}"
    );
    // Nothing moved: nothing asked again but the resources seen.
    w.delivered.clear();
    w.run(
        "alice@localhost",
        UserMsg::Resync {
            moved: Vec::new(),
            slots,
        },
    );
    assert!(w.take(1).iter().all(|s| s.attr("type") != Some("unavailable")));
}

/// A moved session names the offline messages an earlier incarnation sent it
/// (`offline_upto`): the next one does not send them again, even when it cannot delete
/// them yet — here the number is beyond what this incarnation knows was given out (the
/// other's writes are not applied here yet), so the confirmation waits for the next
/// incarnation.
#[test]
fn a_moved_session_does_not_get_again_the_offline_messages_it_had() {
    let bob: BareJid = "bob@localhost".parse().unwrap();
    let data = UserData {
        offline: vec![stored(5), stored(6)],
        version: 9,
        ..UserData::default()
    };
    let mut w = World::new(&[]);
    w.users.insert(bob.to_string(), UserActor::new(bob, true, data, cfg()));
    let session = SessionAddr {
        node: 1,
        node_gen: 1,
        shard: 0,
        id: 77,
    };
    let rebind = |upto| UserMsg::Rebind {
        session,
        resource: "b".into(),
        presence: Some(el("<presence from='bob@localhost/b'/>")),
        roster_ver: None,
        directed: Vec::new(),
        offline_upto: upto,
    };
    w.run("bob@localhost", rebind(12));
    let ids = |w: &mut World| -> Vec<String> {
        w.take(77)
            .iter()
            .filter(|s| s.name == "message")
            .filter_map(|s| s.attr("id").map(str::to_string))
            .collect()
    };
    assert!(ids(&mut w).is_empty(), "it had them all");
    assert!(
        !w.writes.iter().any(|wr| matches!(wr, Write::DeleteOffline { .. })),
        "not deleted by an incarnation that does not know them: {:?}",
        w.writes
    );
}
