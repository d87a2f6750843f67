use super::*;
use crate::address::SingleNode;
use crate::xml::Element;

fn jid(s: &str) -> BareJid {
    s.parse().unwrap()
}

fn addr(id: u64) -> SessionAddr {
    SessionAddr {
        node: 7,
        node_gen: 1,
        shard: 0,
        id,
    }
}

fn chat(id: &str, from: &str, to: &str) -> Element {
    let mut m = Element::new("message", "jabber:client");
    m.set_attr("id", id);
    m.set_attr("from", from);
    m.set_attr("to", to);
    m
}

fn one_shard() -> SingleNode {
    SingleNode {
        node: 7,
        shards: 1,
        slots: 64,
    }
}

fn outs(c: &mut ShardCore) -> Vec<Out> {
    std::iter::from_fn(|| c.pop_out()).collect()
}

fn inbound(to: &str, id: &str) -> Envelope {
    Envelope::to_user(
        jid(to),
        UserMsg::Inbound {
            stanza: chat(id, "a@x/r", to),
        },
    )
}

#[test]
fn first_message_activates_and_wakes() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    let r = c.route(inbound("bob@x", "m1"), 10, Origin::Actor, &one_shard());
    assert!(matches!(r, Routed::Done));
    let o = outs(&mut c);
    assert!(
        matches!(&o[..], [Out::Activate(ActorKey::User(j)), Out::Wake(MailboxKey::Actor(ActorKey::User(k)))] if j == &jid("bob@x") && k == j)
    );
    assert_eq!(c.user_queued(&jid("bob@x")), 1);
    // A second message only wakes.
    c.route(inbound("bob@x", "m2"), 11, Origin::Actor, &one_shard());
    assert!(matches!(&outs(&mut c)[..], [Out::Wake(_)]));
    assert_eq!(c.pop_user(&jid("bob@x")).map(|t| t.at), Some(10));
    assert!(!c.passivate(&jid("bob@x")), "one is still queued");
    c.pop_user(&jid("bob@x"));
    assert!(c.passivate(&jid("bob@x")));
    assert!(!c.has_user(&jid("bob@x")));
}

#[test]
fn elsewhere_goes_back_to_the_host() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    let four = SingleNode {
        node: 7,
        shards: 64,
        slots: 64,
    };
    let other = (0..100)
        .map(|i| format!("u{i}@x"))
        .find(|j| four.place_user(&jid(j)).1 != 0)
        .unwrap();
    match c.route(inbound(&other, "m1"), 5, Origin::Actor, &four) {
        Routed::Mesh { shard, env } => {
            assert_eq!(shard, four.place_user(&jid(&other)).1);
            assert_eq!(env.at, 5);
        }
        r => panic!("{r:?}"),
    }
    let remote = Envelope::to_session(
        SessionAddr { node: 9, ..addr(1) },
        SessionMsg::Stanza(chat("m", "a@x", "b@x")),
    );
    assert!(matches!(
        c.route(remote, 0, Origin::Actor, &four),
        Routed::Remote { node: 9, .. }
    ));
    assert!(outs(&mut c).is_empty());
}

#[test]
fn a_full_mailbox_makes_a_connection_wait_and_bounces_an_actors_stanza() {
    let mut c = ShardCore::new(7, 0, 1, 2);
    for i in 0..2 {
        c.route(inbound("bob@x", &format!("m{i}")), 0, Origin::Actor, &one_shard());
    }
    outs(&mut c);
    let r = c.route(inbound("bob@x", "m2"), 0, Origin::Connection, &one_shard());
    assert!(matches!(r, Routed::Full(_)), "{r:?}");
    assert!(outs(&mut c).is_empty(), "waiting is the sender's: nothing else happens");
    let r = c.route(inbound("bob@x", "m3"), 0, Origin::Actor, &one_shard());
    assert!(matches!(r, Routed::Done));
    let o = outs(&mut c);
    assert!(
        matches!(
            &o[0],
            Out::Bounced {
                why: "user mailbox full",
                ..
            }
        ),
        "{o:?}"
    );
    match &o[1] {
        Out::Route(Envelope::User {
            to,
            msg: UserMsg::Inbound { stanza },
        }) => {
            assert_eq!(to, &jid("a@x"));
            assert_eq!(stanza.attr("type"), Some("error"));
            assert!(stanza
                .child("error", "jabber:client")
                .unwrap()
                .elements()
                .any(|c| c.name == "resource-constraint"));
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(c.user_queued(&jid("bob@x")), 2);
}

#[test]
fn control_messages_are_held_in_order_and_what_follows_waits_behind_them() {
    let mut c = ShardCore::new(7, 0, 1, 1);
    c.open_session(1);
    c.route(
        Envelope::to_session(addr(1), SessionMsg::Stanza(chat("m0", "a@x", "b@x/r"))),
        0,
        Origin::Actor,
        &one_shard(),
    );
    outs(&mut c);
    let bound = |r: &str| Envelope::to_session(addr(1), SessionMsg::Bound { resource: r.into() });
    c.route(bound("one"), 0, Origin::Actor, &one_shard());
    let o = outs(&mut c);
    assert!(
        matches!(
            &o[..],
            [Out::RetryHeld {
                key: MailboxKey::Session(1),
                after_ms: limits::RETRY_MS
            }]
        ),
        "{o:?}"
    );
    c.route(bound("two"), 0, Origin::Actor, &one_shard());
    // A stanza from an actor may not pass what is held: it bounces; from a connection, it
    // queues behind.
    c.route(
        Envelope::to_session(addr(1), SessionMsg::Stanza(chat("m1", "a@x", "b@x/r"))),
        0,
        Origin::Actor,
        &one_shard(),
    );
    assert!(matches!(
        &outs(&mut c)[0],
        Out::Bounced {
            why: "messages for it are held",
            ..
        }
    ));
    c.route(
        Envelope::to_session(addr(1), SessionMsg::Stanza(chat("m2", "a@x", "b@x/r"))),
        0,
        Origin::Connection,
        &one_shard(),
    );
    assert!(outs(&mut c).is_empty());
    // Still full: asks again.
    c.retry_held(&MailboxKey::Session(1));
    assert!(matches!(&outs(&mut c)[..], [Out::RetryHeld { .. }]));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(c.pop_session(1).unwrap().msg);
        c.retry_held(&MailboxKey::Session(1));
        outs(&mut c);
    }
    seen.push(c.pop_session(1).unwrap().msg);
    let names: Vec<String> = seen
        .iter()
        .map(|m| match m {
            SessionMsg::Bound { resource } => resource.clone(),
            SessionMsg::Stanza(st) => st.attr("id").unwrap().to_string(),
            m => format!("{m:?}"),
        })
        .collect();
    assert_eq!(names, ["m0", "one", "two", "m2"]);
    assert!(c.pop_session(1).is_none());
}

#[test]
fn a_message_for_a_vanished_session_goes_to_the_bare_jid_then_its_effects_come_first() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    // Session 3 was never opened here (or closed): a message for its full JID goes back to
    // the user actor with an unbind; the consequences of that route come before the next.
    c.route(
        Envelope::to_session(addr(3), SessionMsg::Stanza(chat("m1", "a@x/r", "b@x/res"))),
        0,
        Origin::Actor,
        &one_shard(),
    );
    let first = c.pop_out().unwrap();
    let Out::Route(env) = first else { panic!("{first:?}") };
    assert!(
        matches!(&env, Envelope::User { msg: UserMsg::Inbound { stanza }, .. } if stanza.attr("to") == Some("b@x"))
    );
    c.route(env, 0, Origin::Actor, &one_shard());
    let o = outs(&mut c);
    assert!(matches!(&o[0], Out::Activate(_)), "{o:?}");
    assert!(matches!(&o[1], Out::Wake(_)), "{o:?}");
    assert!(
        matches!(
            &o[2],
            Out::Route(Envelope::User {
                msg: UserMsg::Unbind { .. },
                ..
            })
        ),
        "{o:?}"
    );
    // A session of an earlier process of this node is gone too.
    c.open_session(4);
    c.route(
        Envelope::to_session(
            SessionAddr { node_gen: 0, ..addr(4) },
            SessionMsg::Stanza(chat("m2", "a@x/r", "b@x")),
        ),
        0,
        Origin::Actor,
        &one_shard(),
    );
    assert_eq!(c.session_queued(4), 0);
    assert!(
        matches!(&outs(&mut c)[0], Out::Route(Envelope::User { to, .. }) if to == &jid("a@x")),
        "bounced to the sender"
    );
}

#[test]
fn closing_a_session_sends_what_was_queued_for_it_back() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    c.open_session(1);
    c.route(
        Envelope::to_session(addr(1), SessionMsg::Stanza(chat("m1", "a@x/r", "b@x/res"))),
        0,
        Origin::Actor,
        &one_shard(),
    );
    outs(&mut c);
    c.close_session(addr(1));
    assert!(!c.has_session(1));
    assert!(matches!(
        &outs(&mut c)[0],
        Out::Route(Envelope::User {
            msg: UserMsg::Inbound { .. },
            ..
        })
    ));
}

#[test]
fn an_actor_that_cannot_start_or_ends_early() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    let bob = jid("bob@x");
    c.route(
        Envelope::to_user(
            bob.clone(),
            UserMsg::Bind {
                session: addr(1),
                resource: "r".into(),
            },
        ),
        0,
        Origin::Actor,
        &one_shard(),
    );
    c.route(inbound("bob@x", "m1"), 0, Origin::Actor, &one_shard());
    outs(&mut c);
    c.not_started(&bob);
    let o = outs(&mut c);
    assert!(
        matches!(
            &o[0],
            Out::Route(Envelope::Session {
                msg: SessionMsg::BindFailed { .. },
                ..
            })
        ),
        "{o:?}"
    );
    assert!(
        matches!(&o[1], Out::Route(Envelope::User { to, .. }) if to == &jid("a@x")),
        "{o:?}"
    );
    assert!(!c.has_user(&bob));

    c.route(inbound("bob@x", "m2"), 0, Origin::Actor, &one_shard());
    outs(&mut c);
    let again = Envelope::to_user(
        bob.clone(),
        UserMsg::Again {
            stanza: chat("m3", "a@x", "bob@x"),
            tries: 2,
        },
    );
    c.end_user(&bob, vec![(addr(1), "r".into())], Ending::WriteFailed, vec![again]);
    let o = outs(&mut c);
    assert!(
        matches!(
            &o[0],
            Out::Route(Envelope::Session {
                msg: SessionMsg::Kick { .. },
                ..
            })
        ),
        "{o:?}"
    );
    assert!(
        matches!(
            &o[1],
            Out::Route(Envelope::User {
                msg: UserMsg::Unbind { .. },
                ..
            })
        ),
        "{o:?}"
    );
    assert!(
        matches!(&o[2], Out::Later { after_ms, .. } if *after_ms == 2 * limits::AGAIN_AFTER_MS),
        "{o:?}"
    );
    assert!(
        matches!(
            &o[3],
            Out::Route(Envelope::User {
                msg: UserMsg::Inbound { .. },
                ..
            })
        ),
        "queued: to the next incarnation"
    );
    assert_eq!(o.len(), 4);
}

#[test]
fn what_the_host_could_not_send() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    c.unsent(
        Envelope::to_user(
            jid("b@x"),
            UserMsg::Unbind {
                session: addr(1),
                resource: "r".into(),
            },
        ),
        Unsent::MeshFull,
    );
    assert!(matches!(
        &outs(&mut c)[..],
        [Out::Later {
            after_ms: limits::RETRY_MS,
            ..
        }]
    ));
    c.unsent(inbound("b@x", "m1"), Unsent::LinkFull);
    assert!(matches!(&outs(&mut c)[..], [Out::Bounced { .. }, Out::Route(_)]));
    for (why, condition) in [
        (Unsent::NotMember, "remote-server-not-found"),
        (Unsent::LinkClosed, "remote-server-timeout"),
        (Unsent::MeshClosed, "internal-server-error"),
    ] {
        c.unsent(inbound("b@x", "m1"), why);
        match &outs(&mut c)[..] {
            [Out::Route(Envelope::User {
                msg: UserMsg::Inbound { stanza },
                ..
            })] => {
                let e = stanza.child("error", "jabber:client").unwrap();
                assert!(e.elements().any(|c| c.name == condition), "{why:?}: {stanza:?}");
            }
            o => panic!("{why:?}: {o:?}"),
        }
    }
}

#[test]
fn membership_changes_reach_the_actors_and_move_the_sessions() {
    let mut c = ShardCore::new(7, 0, 1, 4);
    let (bob, eve) = (jid("bob@x"), jid("eve@x"));
    c.binding(1, bob.clone(), 7);
    assert!(!c.is_binding(1), "no such session here");
    c.open_session(1);
    c.open_session(2);
    c.binding(1, bob.clone(), 7);
    c.binding(1, bob.clone(), 9);
    c.binding(2, eve.clone(), 8);
    assert!(c.is_binding(1) && c.is_binding(2));
    // bob's actor stays on 7; eve's lived on 8, which went, and lives on 7 now.
    let gone = [(8, 3)];
    let moved = c.membership_changed(1, false, &gone, |_| 7, 0);
    assert_eq!(
        moved.rebound,
        [2],
        "the first record holds: bob bound while his actor was on 7"
    );
    assert!(moved.kicked.is_empty());
    let told = |c: &mut ShardCore, id| c.pop_session(id).map(|t| t.msg);
    assert_eq!(told(&mut c, 2), Some(SessionMsg::Rebind { again: None }));
    assert_eq!(told(&mut c, 1), None);
    assert!(matches!(&outs(&mut c)[..], [Out::Wake(MailboxKey::Session(2))]));
    // The record follows the move: the same view again moves nothing.
    assert_eq!(c.membership_changed(1, false, &[], |_| 7, 0), Moved::default());
    // eve's actor goes to 9: her session moves again.
    let moved = c.membership_changed(1, false, &[], |u| if *u == eve { 9 } else { 7 }, 0);
    assert_eq!(moved.rebound, [2]);
    assert_eq!(told(&mut c, 2), Some(SessionMsg::Rebind { again: None }));
    outs(&mut c);
    let moved = c.membership_changed(1, true, &[], |_| 7, 0);
    assert_eq!(moved.kicked, [1, 2], "a rejoin closes all");
    for id in [1, 2] {
        assert!(matches!(
            told(&mut c, id),
            Some(SessionMsg::Kick {
                condition: "undefined-condition",
                ..
            })
        ));
    }
    outs(&mut c);
    c.close_session(addr(2));
    assert!(!c.is_binding(2));

    // An actor here whose user is placed elsewhere now forgets its sessions.
    c.route(inbound("bob@x", "m"), 0, Origin::Actor, &one_shard());
    c.pop_user(&bob);
    outs(&mut c);
    let moved = c.membership_changed(1, false, &[], |_| 9, 0);
    assert_eq!(moved.handed_off, 1);
    assert!(matches!(c.pop_user(&bob).map(|t| t.msg), Some(UserMsg::Handoff)));
    outs(&mut c);
    // A handoff the membership undid before the actor took it (the key came back here) ends
    // the actor as stale: sessions may have registered here since.
    c.route(inbound("bob@x", "m"), 0, Origin::Actor, &one_shard());
    c.pop_user(&bob);
    c.membership_changed(1, false, &[], |_| 9, 0);
    c.membership_changed(1, false, &[], |_| 7, 0);
    c.route(inbound("bob@x", "after"), 0, Origin::Actor, &one_shard());
    assert!(matches!(c.pop_user(&bob).map(|t| t.msg), Some(UserMsg::Handoff)));
    assert!(c.take_stale(&bob), "the actor ends as stale instead of taking it");
    assert!(!c.take_stale(&bob), "once");
    assert!(matches!(c.pop_user(&bob).map(|t| t.msg), Some(UserMsg::Inbound { .. })));
    assert!(!c.take_stale(&bob), "the next message is not affected");
    assert!(c.pop_user(&bob).is_none());
    outs(&mut c);
    // An actor that ends with a handoff queued does not pass it on: it was for its sessions.
    c.membership_changed(1, false, &[], |_| 9, 0);
    c.route(inbound("bob@x", "kept"), 0, Origin::Actor, &one_shard());
    outs(&mut c);
    c.end_user(&bob, Vec::new(), Ending::Stale, Vec::new());
    let passed: Vec<Out> = outs(&mut c);
    assert!(
        passed.iter().all(|o| !matches!(
            o,
            Out::Route(Envelope::User {
                msg: UserMsg::Handoff,
                ..
            })
        )),
        "{passed:?}"
    );
    assert!(
        passed.iter().any(|o| matches!(
            o,
            Out::Route(Envelope::User {
                msg: UserMsg::Inbound { .. },
                ..
            })
        )),
        "{passed:?}"
    );

    for u in ["bob@x", "eve@x"] {
        c.route(inbound(u, "m"), 0, Origin::Actor, &one_shard());
        c.pop_user(&jid(u));
    }
    outs(&mut c);
    c.node_down(&gone, 5);
    c.resync(&[2], 64, 6);
    for u in [&bob, &eve] {
        assert!(matches!(
            c.pop_user(u).map(|t| t.msg),
            Some(UserMsg::NodeDown { node: 8, gen: 3 })
        ));
        assert!(matches!(c.pop_user(u).map(|t| t.msg), Some(UserMsg::Resync { .. })));
    }
    assert!(outs(&mut c).iter().all(|o| matches!(o, Out::Wake(_))));
}
