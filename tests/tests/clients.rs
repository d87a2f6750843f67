//! End-to-end: the real binary driven by a third-party client library (tokio-xmpp / xmpp-rs),
//! logging in with SCRAM-SHA-256 over STARTTLS.

use starling_tests::{expect_stanza, login, Server};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::message::{Lang, Message, MessageType};
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::{IqRequest, IqResponse, Stanza};

const ROSTER: &str = "jabber:iq:roster";

fn jid(s: &str) -> Jid {
    Jid::new(s).unwrap()
}

fn body(m: &Message) -> Option<String> {
    m.bodies.values().next().cloned()
}

fn chat(to: &str, text: &str) -> Stanza {
    Stanza::Message(Message::chat(Some(jid(to))).with_body(Lang(String::new()), text.into()))
}

fn roster_push_item(s: &Stanza) -> Option<Element> {
    match s {
        Stanza::Iq(Iq::Set { payload, .. }) if payload.is("query", ROSTER) => {
            payload.get_child("item", ROSTER).cloned()
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roster_push_subscription_handshake_and_presence() {
    let server = Server::start(&[], &[("alice@localhost", "alice pw"), ("bob@localhost", "bob pw")]);
    let (mut alice, _) = login(&server, "alice@localhost", "alice pw").await;
    let (mut bob, bob_full) = login(&server, "bob@localhost", "bob pw").await;

    // Roster get: empty, versioned.
    let res = alice
        .iq(None, IqRequest::Get(Element::builder("query", ROSTER).build()))
        .await;
    let IqResponse::Result(Some(q)) = res else {
        panic!("roster get: {res:?}")
    };
    assert_eq!(q.attr("ver"), Some("0"));
    assert_eq!(q.children().count(), 0);

    // Roster set → result and push.
    let item: Element = "<item xmlns='jabber:iq:roster' jid='bob@localhost' name='Bob'><group>Friends</group></item>"
        .parse()
        .unwrap();
    let set = alice
        .iq(
            None,
            IqRequest::Set(Element::builder("query", ROSTER).append(item).build()),
        )
        .await;
    assert!(matches!(set, IqResponse::Result(_)), "{set:?}");
    let push = expect_stanza(&mut alice, "roster push", |s| roster_push_item(s).is_some()).await;
    let item = roster_push_item(&push).unwrap();
    assert_eq!(item.attr("jid"), Some("bob@localhost"));
    assert_eq!(item.attr("subscription"), Some("none"));

    // Both go online; alice asks bob for a subscription.
    alice
        .send_stanza(Stanza::Presence(Presence::available()))
        .await
        .unwrap();
    bob.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    let mut sub = Presence::new(PresenceType::Subscribe);
    sub.to = Some(jid("bob@localhost"));
    alice.send_stanza(Stanza::Presence(sub)).await.unwrap();
    let push = expect_stanza(&mut alice, "push with ask=subscribe", |s| {
        roster_push_item(s).is_some_and(|i| i.attr("ask") == Some("subscribe"))
    })
    .await;
    assert_eq!(roster_push_item(&push).unwrap().attr("subscription"), Some("none"));
    let req = expect_stanza(
        &mut bob,
        "subscription request",
        |s| matches!(s, Stanza::Presence(p) if p.type_ == PresenceType::Subscribe),
    )
    .await;
    let Stanza::Presence(req) = req else { unreachable!() };
    assert_eq!(
        req.from,
        Some(jid("alice@localhost")),
        "subscription requests carry the bare JID"
    );

    // Bob approves: alice's item becomes "to", and she receives bob's presence.
    let mut ok = Presence::new(PresenceType::Subscribed);
    ok.to = Some(jid("alice@localhost"));
    bob.send_stanza(Stanza::Presence(ok)).await.unwrap();
    expect_stanza(&mut alice, "push with subscription=to", |s| {
        roster_push_item(s).is_some_and(|i| i.attr("subscription") == Some("to") && i.attr("ask").is_none())
    })
    .await;
    expect_stanza(
        &mut alice,
        "bob's presence",
        |s| matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&bob_full) && p.type_ == PresenceType::None),
    )
    .await;

    // Bob's later presence changes reach alice (broadcast to subscribers).
    let mut away = Presence::available();
    away.statuses.insert(Lang(String::new()), "lunch".into());
    bob.send_stanza(Stanza::Presence(away)).await.unwrap();
    expect_stanza(&mut alice, "bob's status", |s| {
        matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&bob_full) && p.statuses.values().any(|v| v == "lunch"))
    })
    .await;

    // Bob going offline is broadcast as unavailable.
    bob.send_end().await.unwrap();
    expect_stanza(&mut alice, "bob unavailable", |s| {
        matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&bob_full) && p.type_ == PresenceType::Unavailable)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_to_full_and_bare_jids_with_server_stamped_from() {
    let server = Server::start(&[], &[("alice@localhost", "a"), ("bob@localhost", "b")]);
    let (mut alice, alice_full) = login(&server, "alice@localhost", "a").await;
    let (mut bob, bob_full) = login(&server, "bob@localhost", "b").await;
    bob.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    alice
        .send_stanza(Stanza::Presence(Presence::available()))
        .await
        .unwrap();

    alice.send_stanza(chat("bob@localhost", "to bare")).await.unwrap();
    let m = expect_stanza(
        &mut bob,
        "message to bare JID",
        |s| matches!(s, Stanza::Message(m) if body(m).as_deref() == Some("to bare")),
    )
    .await;
    let Stanza::Message(m) = m else { unreachable!() };
    assert_eq!(
        m.from,
        Some(alice_full.clone()),
        "the server stamps the sender's full JID"
    );
    assert_eq!(m.type_, MessageType::Chat);

    alice.send_stanza(chat(&bob_full.to_string(), "to full")).await.unwrap();
    expect_stanza(
        &mut bob,
        "message to full JID",
        |s| matches!(s, Stanza::Message(m) if body(m).as_deref() == Some("to full")),
    )
    .await;

    // A second resource of bob with higher priority gets messages to the bare JID.
    let (mut bob2, bob2_full) = login(&server, "bob@localhost", "b").await;
    assert_ne!(bob2_full, bob_full);
    bob2.send_stanza(Stanza::Presence(Presence::available().with_priority(10)))
        .await
        .unwrap();
    // bob's first resource sees bob2 come online: the server has processed the presence.
    expect_stanza(
        &mut bob,
        "own other resource online",
        |s| matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&bob2_full)),
    )
    .await;
    alice.send_stanza(chat("bob@localhost", "to highest")).await.unwrap();
    expect_stanza(
        &mut bob2,
        "message to highest priority",
        |s| matches!(s, Stanza::Message(m) if body(m).as_deref() == Some("to highest")),
    )
    .await;

    // A reply the other way round.
    bob.send_stanza(chat(&alice_full.to_string(), "pong")).await.unwrap();
    let m = expect_stanza(
        &mut alice,
        "reply",
        |s| matches!(s, Stanza::Message(m) if body(m).as_deref() == Some("pong")),
    )
    .await;
    let Stanza::Message(m) = m else { unreachable!() };
    assert_eq!(m.from, Some(bob_full));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_and_roster_survive_a_restart() {
    let mut server = Server::start(&[], &[("alice@localhost", "a"), ("bob@localhost", "b")]);
    {
        let (mut alice, _) = login(&server, "alice@localhost", "a").await;
        let item: Element = "<item xmlns='jabber:iq:roster' jid='bob@localhost'/>".parse().unwrap();
        let r = alice
            .iq(
                None,
                IqRequest::Set(Element::builder("query", ROSTER).append(item).build()),
            )
            .await;
        assert!(matches!(r, IqResponse::Result(_)), "{r:?}");
        for i in 0..3 {
            // With xml:lang, as many clients send every stanza: stored offline, it must
            // parse back (the `xml` prefix is bound by definition).
            let mut m = Message::chat(Some(jid("bob@localhost")));
            m.bodies.insert(Lang("en".into()), format!("offline {i}"));
            alice.send_stanza(Stanza::Message(m)).await.unwrap();
        }
        // A ping round trip after the messages: they have been handled by the server.
        let ping = Element::builder("ping", "urn:xmpp:ping").build();
        let pong = alice.iq(Some(jid("localhost")), IqRequest::Get(ping)).await;
        assert!(matches!(pong, IqResponse::Result(_)), "{pong:?}");
        alice.send_end().await.unwrap();
    }
    server.restart();
    let (mut alice, _) = login(&server, "alice@localhost", "a").await;
    let r = alice
        .iq(None, IqRequest::Get(Element::builder("query", ROSTER).build()))
        .await;
    let IqResponse::Result(Some(q)) = r else {
        panic!("{r:?}")
    };
    assert!(
        q.children().any(|i| i.attr("jid") == Some("bob@localhost")),
        "roster lost in restart: {q:?}"
    );

    let (mut bob, _) = login(&server, "bob@localhost", "b").await;
    bob.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    for i in 0..3 {
        let want = format!("offline {i}");
        let m = expect_stanza(
            &mut bob,
            "offline message",
            |s| matches!(s, Stanza::Message(m) if body(m).as_deref() == Some(want.as_str())),
        )
        .await;
        let Stanza::Message(m) = m else { unreachable!() };
        assert!(
            m.payloads
                .iter()
                .any(|p| p.is("delay", "urn:xmpp:delay") && p.attr("stamp").is_some()),
            "offline messages carry a XEP-0203 delay stamp"
        );
    }
    // Delivered once: a reconnect does not bring them again.
    bob.send_end().await.unwrap();
    let (mut bob, _) = login(&server, "bob@localhost", "b").await;
    bob.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    alice.send_stanza(chat("bob@localhost", "fresh")).await.unwrap();
    let m = expect_stanza(&mut bob, "next message", |s| matches!(s, Stanza::Message(_))).await;
    let Stanza::Message(m) = m else { unreachable!() };
    assert_eq!(
        body(&m).as_deref(),
        Some("fresh"),
        "offline messages were delivered twice"
    );
}
