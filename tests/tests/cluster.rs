//! Real `starling` processes on loopback, joined by SWIM gossip: users whose actors live on
//! other nodes than their connections subscribe, exchange presence and messages (one
//! offline), through tokio-xmpp; `starling cluster status` shows the members and the slots; a
//! node killed with SIGKILL is seen down within the stated bound and the others carry on,
//! sessions staying connected while their users' actors move; five nodes lose two, one after
//! the other, a sixth joins and another leaves (`starling cluster leave`), with nothing
//! acknowledged lost.

use std::time::{Duration, Instant};

use starling_gossip::Ring;
use starling_tests::raw::{Raw, HEADER};
use starling_tests::{expect_stanza, free_port, login, Client, Server};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::message::{Lang, Message};
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::{IqRequest, IqResponse, Stanza};

const ROSTER: &str = "jabber:iq:roster";

fn jid(s: &str) -> Jid {
    Jid::new(s).unwrap()
}

/// With `xml:lang` on the body, as many clients send it: it crosses the node-to-node wire
/// and offline storage on every member of the user's slot.
fn chat(to: &str, text: &str) -> Stanza {
    Stanza::Message(Message::chat(Some(jid(to))).with_body(Lang("en".into()), text.into()))
}

fn has_body(s: &Stanza, text: &str) -> bool {
    matches!(s, Stanza::Message(m) if m.bodies.values().any(|b| b == text))
}

/// Members the node reports alive on `/cluster`.
fn alive(node: &Server) -> Vec<String> {
    let (status, body) = node.http_get("/cluster");
    if !status.contains("200") {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).expect("cluster JSON");
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["state"] == "Alive")
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `node` sees exactly `names` alive; returns how long that took.
fn wait_alive(node: &Server, names: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let mut a = alive(node);
        a.sort();
        if a == names {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "node sees {a:?} alive, expected {names:?} within {within:?}\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node whose actors `user@localhost` has in `ring`, as the servers place it: the ring's
/// first node for the user's slot (`cluster.slots` 64, the default).
fn owner<'r>(ring: &'r Ring, user: &str) -> Option<&'r str> {
    use starling_actors::system::cluster::{slot_of, slot_voters};
    let k = format!("{user}@localhost");
    slot_voters(ring, slot_of(k.as_bytes(), 64), 1).first().copied()
}

/// The first `prefix{i}` owned by `owner` in `ring`, and by `later` in the ring after n3 died
/// and n4 joined.
fn user_owned_by(ring: &Ring, who: &str, later: &str, prefix: &str) -> String {
    let after = Ring::new(["n1".to_string(), "n2".into(), "n4".into()]);
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| owner(ring, u) == Some(who) && (later.is_empty() || owner(&after, u) == Some(later)))
        .expect("a user for every node")
}

/// In-band registration (XEP-0077) through `node`: the account is created on its owner.
async fn register(node: &Server, user: &str, password: &str) {
    let got = register_answer(node, user, password).await.0;
    assert!(
        got.contains("type=\"result\""),
        "registering {user} through port {}: {got}",
        node.port
    );
}

/// Sends an in-band registration through `node`: the answer up to its id, and the stream.
async fn register_answer(node: &Server, user: &str, password: &str) -> (String, Raw) {
    let mut r = Raw::connect(node.port).await;
    r.send(HEADER).await;
    r.until("</stream:features>").await;
    r.send(&format!(
        "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username><password>{password}</password></query></iq>"
    ))
    .await;
    (r.until("id=\"reg\"").await, r)
}

/// The message bodies a client receives until one reads `last` (included).
async fn bodies_until(c: &mut Client, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    expect_stanza(c, last, |s| {
        if let Stanza::Message(m) = s {
            if let Some(b) = m.bodies.values().next() {
                got.push(b.clone());
                return b == last;
            }
        }
        false
    })
    .await;
    got
}

fn roster_item(s: &Stanza) -> Option<Element> {
    match s {
        Stanza::Iq(Iq::Set { payload, .. }) if payload.is("query", ROSTER) => {
            payload.get_child("item", ROSTER).cloned()
        }
        _ => None,
    }
}

async fn roster_of(c: &mut Client) -> Element {
    match c
        .iq(None, IqRequest::Get(Element::builder("query", ROSTER).build()))
        .await
    {
        IqResponse::Result(Some(q)) => q,
        other => panic!("roster get: {other:?}"),
    }
}

fn presence(to: &str, t: PresenceType) -> Stanza {
    let mut p = Presence::new(t);
    p.to = Some(jid(to));
    Stanza::Presence(p)
}

/// `a` and `b` become mutual subscribers (RFC 6121 §3) and see each other online.
async fn befriend(a: &mut Client, a_jid: &str, b: &mut Client, b_jid: &str) {
    a.send_stanza(presence(b_jid, PresenceType::Subscribe)).await.unwrap();
    expect_stanza(
        b,
        "subscription request",
        |s| matches!(s, Stanza::Presence(p) if p.type_ == PresenceType::Subscribe),
    )
    .await;
    b.send_stanza(presence(a_jid, PresenceType::Subscribed)).await.unwrap();
    b.send_stanza(presence(a_jid, PresenceType::Subscribe)).await.unwrap();
    expect_stanza(
        a,
        "request back",
        |s| matches!(s, Stanza::Presence(p) if p.type_ == PresenceType::Subscribe),
    )
    .await;
    a.send_stanza(presence(b_jid, PresenceType::Subscribed)).await.unwrap();
    expect_stanza(a, "subscription=both", |s| {
        roster_item(s).is_some_and(|i| i.attr("subscription") == Some("both"))
    })
    .await;
    expect_stanza(b, "subscription=both", |s| {
        roster_item(s).is_some_and(|i| i.attr("subscription") == Some("both"))
    })
    .await;
}

/// `user` logs in through `node`, puts `contact` on the roster and logs out.
async fn add_contact_and_leave(node: &Server, user: &str, password: &str, contact: &str) {
    let mut r = Raw::login_plain(node.port, user, password, "r").await;
    r.send(&format!(
        "<iq type='set' id='add'><query xmlns='jabber:iq:roster'><item jid='{contact}'/></query></iq>"
    ))
    .await;
    r.until("id=\"add\"").await;
    r.send("</stream:stream>").await;
    r.until_closed().await;
}

/// `from` sends `text` to the offline `to`, then an IQ to `to`'s bare JID: its actor answers
/// that after handling the message, so once the answer is in, the message is stored (on the
/// members of its slot).
async fn message_stored(from: &mut Client, to: &str, text: &str) {
    from.send_stanza(chat(to, text)).await.unwrap();
    let ping = Element::builder("ping", "urn:xmpp:ping").build();
    let _ = from.iq(Some(jid(to)), IqRequest::Get(ping)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_route_across_the_cluster_and_survive_a_kill() {
    let (g1, g2, g3) = (free_port(), free_port(), free_port());
    let t1 = free_port();
    let n1 = Server::start_node("n1", g1, t1, &[g1], &[]);
    let n2 = Server::start_node("n2", g2, free_port(), &[g1], &[]);
    let mut n3 = Server::start_node("n3", g3, free_port(), &[g1], &[]);
    for n in [&n1, &n2, &n3] {
        wait_alive(n, &["n1", "n2", "n3"], Duration::from_secs(30));
    }
    let status = n2.cli(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "cluster status: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    for n in ["n1", "n2", "n3"] {
        assert!(
            text.lines().any(|l| l.starts_with(n) && l.contains("alive")),
            "{n} in:\n{text}"
        );
    }
    // With replication 3 every slot's group reaches all three nodes (learners first, then
    // voters); the status shows the slots n2 hosts, their leaders and members.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = n2.cli(&["cluster", "status"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let voter_of_all = ["n1", "n2", "n3"].iter().all(|n| {
            text.lines()
                .any(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == [*n, "64"])
        });
        let led: usize = text
            .lines()
            .filter(|l| l.starts_with('n') && l.split_whitespace().count() == 4)
            .filter_map(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
            .sum();
        if text.contains("slots hosted by n2: 64") && voter_of_all && led == 64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slots never reached all three nodes:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Each user's actor lives on another node than the one its client connects to.
    let ring = Ring::new(["n1".to_string(), "n2".into(), "n3".into()]);
    // alice and bob keep their owners when n4 joins; gina moves to n4.
    let alice = user_owned_by(&ring, "n2", "n2", "alice"); // connects to n1
    let bob = user_owned_by(&ring, "n1", "n1", "bob"); // connects to n2
    let carol = user_owned_by(&ring, "n2", "", "carol"); // offline at first; later on n1
    let dave = user_owned_by(&ring, "n1", "", "dave"); // connects to n3, which dies
    let erin = user_owned_by(&ring, "n3", "", "erin"); // owned by n3, connects to n1
                                                       // Frank is owned by n3, offline when it dies, and n3's again when it comes back.
    let all4 = Ring::new(["n1".to_string(), "n2".into(), "n3".into(), "n4".into()]);
    let frank = (0..10_000)
        .map(|i| format!("frank{i}"))
        .find(|u| owner(&ring, u) == Some("n3") && owner(&all4, u) == Some("n3"))
        .unwrap();
    let gina = user_owned_by(&ring, "n1", "n4", "gina"); // moves to n4 when it joins
    let hana = user_owned_by(&ring, "n2", "n4", "hana"); // online on n2 when she moves to n4
    register(&n3, &alice, "pa").await;
    register(&n3, &bob, "pb").await;
    register(&n1, &carol, "pc").await;
    register(&n2, &dave, "pd").await;
    register(&n1, &erin, "pe").await;
    register(&n2, &frank, "pf").await;
    register(&n2, &gina, "pg").await;
    register(&n1, &hana, "ph").await;
    let (aj, bj, cj, dj) = (
        format!("{alice}@localhost"),
        format!("{bob}@localhost"),
        format!("{carol}@localhost"),
        format!("{dave}@localhost"),
    );

    let (mut a, a_full) = login(&n1, &aj, "pa").await;
    let (mut b, b_full) = login(&n2, &bj, "pb").await;
    let (mut d, d_full) = login(&n3, &dj, "pd").await;
    let mut e = Raw::login_plain(n1.port, &erin, "pe", "r").await;
    e.send("<presence/>").await;
    for c in [&mut a, &mut b, &mut d] {
        roster_of(c).await;
        c.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    }
    befriend(&mut a, &aj, &mut b, &bj).await;
    befriend(&mut d, &dj, &mut b, &bj).await;

    // Presence changes cross nodes (bob on n2 → alice's actor on n2 → alice on n1).
    let mut away = Presence::available();
    away.statuses.insert(Lang(String::new()), "lunch".into());
    b.send_stanza(Stanza::Presence(away)).await.unwrap();
    expect_stanza(&mut a, "bob's status", |s| {
        matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&b_full) && p.statuses.values().any(|v| v == "lunch"))
    })
    .await;

    // Messages both ways, to bare and full JIDs.
    a.send_stanza(chat(&bj, "hello bob")).await.unwrap();
    expect_stanza(&mut b, "alice's message", |s| has_body(s, "hello bob")).await;
    b.send_stanza(chat(&a_full.to_string(), "hello alice")).await.unwrap();
    expect_stanza(&mut a, "bob's answer", |s| has_body(s, "hello alice")).await;

    // Carol is offline: her owner (n2) stores the message; she gets it on n1.
    a.send_stanza(chat(&cj, "while you were out")).await.unwrap();
    // A round trip through alice's own actor orders the check after the store.
    roster_of(&mut a).await;
    let (mut c, _) = login(&n1, &cj, "pc").await;
    c.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    expect_stanza(&mut c, "offline message", |s| has_body(s, "while you were out")).await;

    // Frank (owned by n3; his slot's log on all three) puts bob on his roster
    // and gets a message while offline.
    let fj = format!("{frank}@localhost");
    add_contact_and_leave(&n2, &frank, "pf", &bj).await;
    message_stored(&mut a, &fj, "for frank").await;

    // Garbage on the transport port, a frame announcing 4 GiB, and stray datagrams on the
    // gossip port: each link is dropped with a log line; nothing else changes.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0xff, 0xff, 0xff, 0xff, 0, 0][..],
        &[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8][..],
    ] {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", t1)).await.unwrap();
        s.write_all(junk).await.unwrap();
        let _ = s.shutdown().await;
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"\x00\x01not gossip", ("127.0.0.1", g1)).unwrap();
    a.send_stanza(chat(&bj, "after the junk")).await.unwrap();
    expect_stanza(&mut b, "message after the junk", |s| has_body(s, "after the junk")).await;
    let log = n1.log_text();
    assert!(log.contains("bad frame") && log.contains("corrupt frame"), "{log}");
    assert_eq!(alive(&n1).len(), 3);

    // kill -9 n3: the others see it down within the bound (ARCHITECTURE.md "Cluster").
    n3.kill9();
    for n in [&n1, &n2] {
        let took = wait_alive(n, &["n1", "n2"], Duration::from_secs(15));
        eprintln!("n3 seen down after {took:?}");
    }
    // Dave's actor (n1) unbinds the session n3 hosted: bob sees dave go offline.
    expect_stanza(&mut b, "dave unavailable", |s| {
        matches!(s, Stanza::Presence(p) if p.from.as_ref() == Some(&d_full) && p.type_ == PresenceType::Unavailable)
    })
    .await;
    // Erin's actor died with n3: her session on n1 registers with the actor's new
    // incarnation (on a survivor) and stays connected — a message to her arrives on it.
    let ej = format!("{erin}@localhost");
    a.send_stanza(chat(&ej, "erin, still there?")).await.unwrap();
    e.until("erin, still there?").await;
    // Frank's data outlived n3: he logs in through n1, gets his offline message, his roster.
    // His slot elects a new leader first (n3 led it): an attempt in that window may fail or,
    // once seen in a loaded CI run and not reproduced since, go unanswered; each is logged.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut f = loop {
        match tokio::time::timeout(Duration::from_secs(8), Raw::try_login_plain(n1.port, &frank, "pf", "r")).await {
            Ok(Ok(f)) => break f,
            Ok(Err(got)) => eprintln!("frank's login after n3 died refused (a new leader is being elected): {got}"),
            Err(_) => eprintln!(
                "frank's login after n3 died got no answer in 8 s; n1's log ends:\n{}",
                n1.log_text().lines().rev().take(40).collect::<Vec<_>>().join("\n")
            ),
        }
        assert!(
            Instant::now() < deadline,
            "frank cannot log in after n3 died\n{}",
            n1.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    f.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
        .await;
    let got = f.until("for frank").await;
    assert!(
        got.contains(&format!("jid=\"{bj}\"")),
        "frank's roster after n3 died: {got}"
    );
    // Dave logs in again through n1 with his roster; alice and bob still talk.
    drop(d);
    let (mut d, _) = login(&n1, &dj, "pd").await;
    let r = roster_of(&mut d).await;
    assert!(
        r.children()
            .any(|i| i.attr("jid") == Some(bj.as_str()) && i.attr("subscription") == Some("both")),
        "dave's roster after his node died: {r:?}"
    );
    a.send_stanza(chat(&bj, "still here")).await.unwrap();
    expect_stanza(&mut b, "message after the kill", |s| has_body(s, "still here")).await;

    // Gina (owned by n1) puts bob on her roster and gets a message while offline; then a
    // fourth node joins and owns her: it joins her slot from a snapshot and she logs in there.
    let gj = format!("{gina}@localhost");
    add_contact_and_leave(&n2, &gina, "pg", &bj).await;
    message_stored(&mut a, &gj, "for gina").await;

    // Hana, online on n2, is bob's contact; her actor moves to n4 when it joins. Her
    // client stays connected across the join, and what bob and she exchange meanwhile
    // arrives once.
    let hj = format!("{hana}@localhost");
    let (mut h, _) = login(&n2, &hj, "ph").await;
    roster_of(&mut h).await;
    h.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    befriend(&mut h, &hj, &mut b, &bj).await;
    let mut sent = 0;
    let chat_burst = async |b: &mut Client, h: &mut Client, sent: &mut usize| {
        for _ in 0..5 {
            *sent += 1;
            b.send_stanza(chat(&hj, &format!("to hana {sent}"))).await.unwrap();
            h.send_stanza(chat(&bj, &format!("to bob {sent}"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    chat_burst(&mut b, &mut h, &mut sent).await;

    let g4 = free_port();
    let n4 = Server::start_node("n4", g4, free_port(), &[g1], &[]);
    chat_burst(&mut b, &mut h, &mut sent).await;
    for n in [&n1, &n2, &n4] {
        wait_alive(n, &["n1", "n2", "n4"], Duration::from_secs(30));
    }
    // Once n2 has seen the move (hana's session registered with her actor on n4).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !n2.log_text().contains("their sessions register with the new actors") {
        chat_burst(&mut b, &mut h, &mut sent).await;
        assert!(
            Instant::now() < deadline,
            "hana's session never moved\n{}",
            n2.log_text()
        );
    }
    chat_burst(&mut b, &mut h, &mut sent).await;
    b.send_stanza(chat(&hj, "to hana end")).await.unwrap();
    h.send_stanza(chat(&bj, "to bob end")).await.unwrap();
    for (c, prefix) in [(&mut h, "to hana"), (&mut b, "to bob")] {
        let got = bodies_until(c, &format!("{prefix} end")).await;
        for i in 1..=sent {
            let n = got.iter().filter(|g| **g == format!("{prefix} {i}")).count();
            assert_eq!(n, 1, "{prefix} {i} arrived {n} times across the join: {got:?}");
        }
    }
    let v: serde_json::Value = serde_json::from_str(&n4.http_get("/cluster").1).unwrap();
    let share = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n4")
        .unwrap()["ring_share"]
        .as_f64()
        .unwrap();
    assert!((0.25..0.42).contains(&share), "n4 owns {share} of the keys");
    // The join runs in the background: her login succeeds once n4 has her slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut g = loop {
        if let Ok(r) = Raw::try_login_plain(n2.port, &gina, "pg", "r").await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "gina cannot log in after n4 joined\n{}",
            n4.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    g.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
        .await;
    let got = g.until("for gina").await;
    assert!(got.contains(&format!("jid=\"{bj}\"")), "gina's roster on n4: {got}");
    // And alice and bob, whose owners did not change, still talk.
    a.send_stanza(chat(&bj, "after the join")).await.unwrap();
    expect_stanza(&mut b, "message after the join", |s| has_body(s, "after the join")).await;

    // n3 comes back with its old data. Frank got a message while it was away (committed in
    // his slot without n3): n3 owns him again and must serve it — it catches up from the
    // log or a snapshot before it leads, never from its own stale copy.
    drop(f);
    message_stored(&mut a, &fj, "while n3 was down").await;
    n3.start_again();
    for n in [&n1, &n2, &n3, &n4] {
        wait_alive(n, &["n1", "n2", "n3", "n4"], Duration::from_secs(30));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut f) = Raw::try_login_plain(n1.port, &frank, "pf", "r").await {
            f.send("<presence/>").await;
            if tokio::time::timeout(Duration::from_secs(3), f.until("while n3 was down"))
                .await
                .is_ok()
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "frank's message from while n3 was down is not served after it came back\n{}",
            n3.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node that joins a cluster (its seeds name another node) makes no slot of its own: until
/// the cluster's first node is up and its leaders add it, it acknowledges nothing — an
/// account is refused. Then the first node (no seed but itself) makes every slot, the joiner
/// is added, and the same registration succeeds through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_acknowledges_nothing_before_the_cluster_has_it() {
    let (g1, g2) = (free_port(), free_port());
    let n2 = Server::start_node("n2", g2, free_port(), &[g1], &[]);
    let (got, mut r) = register_answer(&n2, "early", "pw").await;
    let got = got + &r.until("</iq>").await;
    assert!(
        got.contains("type=\"error\"") && got.contains("<internal-server-error"),
        "acknowledged with no cluster: {got}"
    );
    let n1 = Server::start_node("n1", g1, free_port(), &[g1], &[]);
    for n in [&n1, &n2] {
        wait_alive(n, &["n1", "n2"], Duration::from_secs(30));
    }
    // The slots' leaders add n2 (a learner from a snapshot, then a member): registration
    // through n2 succeeds once the user's slot has it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = register_answer(&n2, "early", "pw").await.0;
        if got.contains("type=\"result\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registration through n2 never succeeded: {got}\n{}",
            n2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Raw::login_plain(n1.port, "early", "pw", "r").await;
}

/// `starling cluster leave` where it cannot work: a node alone in its cluster refuses (its
/// slots would have nowhere to go) and keeps serving; a single node (no cluster) says it is
/// not a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leave_is_refused_by_a_node_alone_and_by_a_single_node() {
    let g = free_port();
    let mut solo = Server::start_node("solo", g, free_port(), &[g], &[]);
    wait_alive(&solo, &["solo"], Duration::from_secs(30));
    let out = solo.cli(&["cluster", "leave"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("409") && err.contains("no other member stays"),
        "cluster leave alone: {err}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    register(&solo, "still", "pw").await;
    assert!(solo.exited().is_none(), "the node refused and goes on");
    assert!(solo.http_get("/health").0.contains("200"));

    let single = Server::start(&[], &[]);
    let out = single.cli(&["cluster", "leave"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a cluster member"),
        "cluster leave on a single node: {err}"
    );
}

/// Whether every slot has a leader, its voters are the ring's `r` members for it among
/// `alive` (`cluster::slot_voters`), and no learner or change is under way, as the nodes'
/// `/cluster/slots` show (each node lists the slots it hosts).
fn settled(nodes: &[&Server], alive: &[&str], r: usize) -> Result<(), String> {
    let ring = Ring::new(alive.iter().map(|n| n.to_string()));
    let mut seen = std::collections::BTreeSet::new();
    for n in nodes {
        let (code, body) = n.http_get("/cluster/slots");
        if !code.contains("200") {
            return Err(format!("/cluster/slots answered {code}"));
        }
        let rows: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        for row in rows.as_array().ok_or("not a list")? {
            let slot = row["slot"].as_u64().ok_or("no slot")?;
            let mut voters: Vec<&str> = row["voters"]
                .as_array()
                .ok_or("no voters")?
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            voters.sort_unstable();
            let mut want = starling_actors::system::cluster::slot_voters(&ring, slot as u32, r);
            want.sort_unstable();
            let ok = row["leader"].as_str().is_some()
                && voters == want
                && row["learners"].as_array().is_some_and(|l| l.is_empty())
                && row["changing"] == false;
            if !ok {
                return Err(format!("slot {slot}: {row}"));
            }
            seen.insert(slot);
        }
    }
    if seen.len() != 64 {
        return Err(format!("{} of 64 slots seen", seen.len()));
    }
    Ok(())
}

fn wait_settled(nodes: &[&Server], alive: &[&str], r: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match settled(nodes, alive, r) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("the slots did not settle on {alive:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Five nodes with replication 3: users with rosters and offline messages spread over them;
/// `kill -9` of one node, then, once its slots have three members again, of a second: every
/// account, roster item and offline message is served by the survivors. A sixth node joins
/// and takes a share of the slots; then `starling cluster leave` decommissions n3: its slots
/// move, it stops by itself, and every account, roster item and offline message is served by
/// the three left. Two clients connected to surviving nodes stay connected throughout (one's
/// actor moves to the newcomer), and every message they exchange meanwhile arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_lose_two_one_after_the_other_and_a_sixth_joins() {
    let g1 = free_port();
    let start = |name: &str, g: u16| Server::start_node(name, g, free_port(), &[g1], &["cluster.replication=3"]);
    let n1 = start("n1", g1);
    let n2 = start("n2", free_port());
    let mut n3 = start("n3", free_port());
    let mut n4 = start("n4", free_port());
    let mut n5 = start("n5", free_port());
    let five = ["n1", "n2", "n3", "n4", "n5"];
    for n in [&n1, &n2, &n3, &n4, &n5] {
        wait_alive(n, &five, Duration::from_secs(30));
    }
    wait_settled(&[&n1, &n2, &n3, &n4, &n5], &five, 3, Duration::from_secs(60));

    // Ten users, registered through every node, each with bob on the roster and a message
    // stored while offline.
    // Alice and bob's actors never live on the nodes that die (a message on its way to a node
    // killed with SIGKILL is lost with it, logged); alice's moves to n6 when it joins.
    let ring5 = Ring::new(five.iter().map(|n| n.to_string()));
    let with6 = Ring::new(["n1", "n2", "n3", "n6"].iter().map(|n| n.to_string()));
    let survivor = |u: &str| matches!(owner(&ring5, u), Some("n1" | "n2" | "n3"));
    let alice = (0..10_000)
        .map(|i| format!("alice{i}"))
        .find(|u| survivor(u) && owner(&with6, u) == Some("n6"))
        .unwrap();
    let bob = (0..10_000).map(|i| format!("bob{i}")).find(|u| survivor(u)).unwrap();
    register(&n1, &alice, "pa").await;
    register(&n2, &bob, "pb").await;
    let (aj, bj) = (format!("{alice}@localhost"), format!("{bob}@localhost"));
    let (mut a, _) = login(&n1, &aj, "pa").await;
    let (mut b, _) = login(&n2, &bj, "pb").await;
    for c in [&mut a, &mut b] {
        roster_of(c).await;
        c.send_stanza(Stanza::Presence(Presence::available())).await.unwrap();
    }
    befriend(&mut a, &aj, &mut b, &bj).await;
    let nodes = [&n1, &n2, &n3, &n4, &n5];
    let users: Vec<String> = (0..10).map(|i| format!("spread{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        register(nodes[i % 5], u, "pw").await;
        add_contact_and_leave(nodes[(i + 1) % 5], u, "pw", &bj).await;
        message_stored(&mut a, &format!("{u}@localhost"), &format!("for {u}")).await;
    }
    let mut sent = 0;
    let talk = async |a: &mut Client, b: &mut Client, sent: &mut usize| {
        for _ in 0..3 {
            *sent += 1;
            a.send_stanza(chat(&bj, &format!("a2b {sent}"))).await.unwrap();
            b.send_stanza(chat(&aj, &format!("b2a {sent}"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // kill -9 n4; its slots get a third member among the four left; then kill -9 n5.
    n4.kill9();
    talk(&mut a, &mut b, &mut sent).await;
    let four = ["n1", "n2", "n3", "n5"];
    for n in [&n1, &n2, &n3, &n5] {
        wait_alive(n, &four, Duration::from_secs(15));
    }
    wait_settled(&[&n1, &n2, &n3, &n5], &four, 3, Duration::from_secs(60));
    talk(&mut a, &mut b, &mut sent).await;
    n5.kill9();
    let three = ["n1", "n2", "n3"];
    for n in [&n1, &n2, &n3] {
        wait_alive(n, &three, Duration::from_secs(15));
    }
    wait_settled(&[&n1, &n2, &n3], &three, 3, Duration::from_secs(60));
    talk(&mut a, &mut b, &mut sent).await;

    // Every account, roster item and offline message is there, served by the survivors.
    for (i, u) in users.iter().enumerate() {
        let via = [&n1, &n2, &n3][i % 3];
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut r = loop {
            match Raw::try_login_plain(via.port, u, "pw", "r").await {
                Ok(r) => break r,
                Err(got) => assert!(
                    Instant::now() < deadline,
                    "{u} cannot log in after two nodes died: {got}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        r.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
            .await;
        let got = r.until(&format!("for {u}")).await;
        assert!(
            got.contains(&format!("jid=\"{bj}\"")),
            "{u}'s roster after two nodes died: {got}"
        );
    }

    // A sixth node joins and takes its share of the slots.
    let n6 = start("n6", free_port());
    talk(&mut a, &mut b, &mut sent).await;
    let four = ["n1", "n2", "n3", "n6"];
    for n in [&n1, &n2, &n3, &n6] {
        wait_alive(n, &four, Duration::from_secs(30));
    }
    wait_settled(&[&n1, &n2, &n3, &n6], &four, 3, Duration::from_secs(60));
    let hosted = serde_json::from_str::<serde_json::Value>(&n6.http_get("/cluster/slots").1).unwrap();
    let share = hosted.as_array().unwrap().len();
    assert!((16..64).contains(&share), "n6 hosts {share} of 64 slots");
    talk(&mut a, &mut b, &mut sent).await;

    // `starling cluster leave` on n3, with a message stored for every user first: n3's
    // slots move to the three others (replication 3: all of them), then it stops by itself.
    for u in &users {
        message_stored(&mut a, &format!("{u}@localhost"), &format!("again for {u}")).await;
    }
    let leave = n3.cli_spawn(&["cluster", "leave"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let exit = loop {
        talk(&mut a, &mut b, &mut sent).await;
        if let Some(st) = n3.exited() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "n3 did not leave within 90 s\n{}",
            n3.log_text()
        );
    };
    assert!(exit.success(), "n3 left with {exit}\n{}", n3.log_text());
    let out = tokio::task::spawn_blocking(move || leave.wait_with_output().expect("cluster leave"))
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && said.contains("leaving") && said.contains("has left the cluster and stopped"),
        "cluster leave: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(n3.log_text().contains("cluster leave finished"), "{}", n3.log_text());
    let left3 = ["n1", "n2", "n6"];
    for n in [&n1, &n2, &n6] {
        wait_alive(n, &left3, Duration::from_secs(15));
    }
    wait_settled(&[&n1, &n2, &n6], &left3, 3, Duration::from_secs(60));
    talk(&mut a, &mut b, &mut sent).await;
    for (i, u) in users.iter().enumerate() {
        let via = [&n1, &n2, &n6][i % 3];
        let mut r = Raw::try_login_plain(via.port, u, "pw", "r2")
            .await
            .unwrap_or_else(|got| panic!("{u} cannot log in after n3 left: {got}"));
        r.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>")
            .await;
        let got = r.until(&format!("again for {u}")).await;
        assert!(
            got.contains(&format!("jid=\"{bj}\"")),
            "{u}'s roster after n3 left: {got}"
        );
    }

    // alice and bob stayed connected (a disconnect fails any read) and got everything once.
    a.send_stanza(chat(&bj, "a2b end")).await.unwrap();
    b.send_stanza(chat(&aj, "b2a end")).await.unwrap();
    for (c, prefix) in [(&mut b, "a2b"), (&mut a, "b2a")] {
        let got = bodies_until(c, &format!("{prefix} end")).await;
        for i in 1..=sent {
            let n = got.iter().filter(|g| **g == format!("{prefix} {i}")).count();
            assert_eq!(n, 1, "{prefix} {i} arrived {n} times: {got:?}");
        }
    }
}
