//! The c2s session driven directly: bytes in, bytes and actions out, no runtime.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};

use super::*;
use crate::address::Address;
use crate::scram;

const HEADER: &str = "<stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

/// The configuration the session tests run with (`localhost`, TLS offered).
pub(crate) fn cfg(require_tls: bool) -> Rc<C2sConfig> {
    Rc::new(C2sConfig {
        domains: vec!["localhost".into()],
        require_tls,
        tls_available: true,
        anonymous: false,
        registration_open: false,
        limits: Limits::default(),
        scram_iterations: 4096,
        max_pending: 8,
        version: "test".into(),
    })
}

struct Harness {
    s: C2sSession,
    throttle: AuthThrottle,
    now: u64,
}

impl Harness {
    fn new(require_tls: bool, tls: bool) -> Self {
        let addr = SessionAddr {
            node: 0,
            node_gen: 0,
            shard: 0,
            id: 7,
        };
        let s = C2sSession::new(addr, cfg(require_tls), 1, tls, ChaCha20Rng::seed_from_u64(1));
        Harness {
            s,
            throttle: AuthThrottle::new(5, 60_000, 100),
            now: 1_000,
        }
    }
    fn input(&mut self, i: Input<'_>) -> (String, Vec<Action>) {
        let mut ctx = Ctx {
            throttle: &mut self.throttle,
        };
        self.s.handle(i, self.now, &mut ctx);
        let o = self.s.take_output();
        (String::from_utf8(o.bytes).unwrap(), o.actions)
    }
    fn send(&mut self, xml: &str) -> (String, Vec<Action>) {
        self.input(Input::Bytes(xml.as_bytes()))
    }
}

fn hmac256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// A SCRAM-SHA-256 client, written from RFC 5802 independently of the server code.
fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> (String, Vec<u8>) {
    let attrs: Vec<(&str, &str)> = server_first.split(',').map(|a| a.split_at(2)).collect();
    let get = |k: &str| attrs.iter().find(|(p, _)| *p == k).unwrap().1;
    let salt = B64.decode(get("s=")).unwrap();
    let iters: u32 = get("i=").parse().unwrap();
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iters, &mut salted);
    let client_key = hmac256(&salted, b"Client Key");
    let stored = Sha256::digest(&client_key);
    let without_proof = format!("c=biws,r={}", get("r="));
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let sig = hmac256(&stored, auth_message.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
    let server_key = hmac256(&salted, b"Server Key");
    (
        format!("{without_proof},p={}", B64.encode(proof)),
        hmac256(&server_key, auth_message.as_bytes()),
    )
}

#[test]
fn scram_login_bind_and_routing() {
    let mut h = Harness::new(true, true);
    let (out, _) = h.send(HEADER);
    assert!(
        out.contains("<mechanism>SCRAM-SHA-256</mechanism>") && out.contains("<mechanism>PLAIN</mechanism>"),
        "{out}"
    );
    let first_bare = "n=alice,r=clientnonce";
    let (_, acts) = h.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
        B64.encode(format!("n,,{first_bare}"))
    ));
    assert_eq!(acts, vec![Action::LoadAccount("alice@localhost".into())]);
    let account = scram::new_account("secret", [3; 16], [4; 16], 4096);
    let (out, _) = h.input(Input::Account(Some(account)));
    let ch = out.split('>').nth(1).unwrap().split('<').next().unwrap();
    let server_first = String::from_utf8(B64.decode(ch).unwrap()).unwrap();
    assert!(server_first.starts_with("r=clientnonce"), "{server_first}");
    let (fin, server_sig) = client_final("secret", first_bare, &server_first);
    let (out, _) = h.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        B64.encode(fin)
    ));
    let expected = B64.encode(format!("v={}", B64.encode(server_sig)));
    assert!(
        out.contains(&format!(">{expected}</success>")),
        "server signature must verify: {out}"
    );

    let (out, _) = h.send(HEADER);
    assert!(
        out.contains("<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"),
        "{out}"
    );
    let (_, acts) = h.send(
        "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone</resource></bind></iq>",
    );
    let [Action::Route(env)] = acts.as_slice() else {
        panic!("{acts:?}")
    };
    assert!(matches!(env, Envelope::User { msg: UserMsg::Bind { resource, .. }, .. } if resource == "phone"));
    // A stanza pipelined before the bind answer waits for it.
    let (_, acts) = h.send("<message to='bob@localhost'><body>early</body></message>");
    assert!(acts.is_empty());
    // A message routed here before the bind answer arrived (that answer lost on a link)
    // goes back to the bare JID rather than vanishing.
    let msg = crate::parser::parse_element(
        b"<message to='alice@localhost/phone' from='bob@localhost/x' id='m1'><body>hi</body></message>",
        &[("".into(), ns::CLIENT.into())],
        crate::parser::Limits::default(),
    )
    .unwrap();
    let (out, acts) = h.input(Input::Router(SessionMsg::Stanza(msg)));
    assert!(out.is_empty(), "{out}");
    let [Action::Route(env)] = acts.as_slice() else {
        panic!("{acts:?}")
    };
    assert_eq!(env.address(), Address::User("alice@localhost".parse().unwrap()));
    assert!(
        matches!(env, Envelope::User { msg: UserMsg::Inbound { stanza }, .. } if stanza.attr("to") == Some("alice@localhost"))
    );
    let (out, acts) = h.input(Input::Router(SessionMsg::Bound {
        resource: "phone".into(),
    }));
    assert!(out.contains("<jid>alice@localhost/phone</jid>"), "{out}");
    let [Action::Route(env)] = acts.as_slice() else {
        panic!("{acts:?}")
    };
    assert_eq!(env.address(), Address::User("bob@localhost".parse().unwrap()));
    let Envelope::User {
        msg: UserMsg::Inbound { stanza },
        ..
    } = env
    else {
        panic!()
    };
    assert_eq!(stanza.attr("from"), Some("alice@localhost/phone"), "from is stamped");

    // Spoofing another sender ends the stream and unbinds.
    let (out, acts) = h.send("<message from='bob@localhost' to='carol@localhost'/>");
    assert!(out.contains("<invalid-from"), "{out}");
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Route(Envelope::User {
            msg: UserMsg::Unbind { .. },
            ..
        })
    )));
    assert!(acts.contains(&Action::Close));
}

#[test]
fn tls_is_offered_and_required_before_auth() {
    let mut h = Harness::new(true, false);
    let (out, _) = h.send(HEADER);
    assert!(out.contains("<required/>") && !out.contains("<mechanisms"), "{out}");
    let (out, _) = h.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>");
    assert!(out.contains("<encryption-required/>"), "{out}");
    let (out, acts) = h.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    assert!(out.contains("<proceed"));
    assert_eq!(acts, vec![Action::StartTls]);
    h.input(Input::TlsEstablished);
    let (out, _) = h.send(HEADER);
    assert!(out.contains("PLAIN") && !out.contains("starttls"), "{out}");
}

#[test]
fn wrong_password_fails_then_throttles_and_stanzas_before_auth_close() {
    let mut h = Harness::new(false, false);
    h.send(HEADER);
    for i in 0..6 {
        let (_, acts) =
            h.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHdyb25n</auth>");
        if i < 5 {
            assert_eq!(acts, vec![Action::LoadAccount("alice@localhost".into())]);
            let (out, _) = h.input(Input::Account(Some(scram::new_account(
                "right", [1; 16], [2; 16], 4096,
            ))));
            assert!(out.contains("<not-authorized/>"), "{out}");
        } else {
            assert!(acts.is_empty(), "throttled attempts do not reach storage");
        }
    }
    let (out, _) = h.send("<message to='x@localhost'/>");
    assert!(out.contains("<not-authorized"), "{out}");
    assert!(h.s.is_closed());
}

#[test]
fn a_bound_session_registers_with_a_moved_actor_with_what_it_told_the_old_one() {
    let mut h = Harness::new(true, true);
    h.send(HEADER);
    let (_, acts) = h.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        B64.encode("\0alice\0secret")
    ));
    assert_eq!(acts, vec![Action::LoadAccount("alice@localhost".into())]);
    let (out, _) = h.input(Input::Account(Some(scram::new_account(
        "secret", [3; 16], [4; 16], 4096,
    ))));
    assert!(out.contains("<success"), "{out}");
    h.send(HEADER);
    h.send(
        "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>phone</resource></bind></iq>",
    );
    // Moved while the bind is in flight: it asks again.
    let (_, acts) = h.input(Input::Router(SessionMsg::Rebind { again: None }));
    assert!(
        matches!(acts.as_slice(), [Action::Route(Envelope::User { msg: UserMsg::Bind { resource, .. }, .. })] if resource == "phone"),
        "{acts:?}"
    );
    h.input(Input::Router(SessionMsg::Bound {
        resource: "phone".into(),
    }));
    // A second answer (the old incarnation's and the new one's) changes nothing.
    let (out, acts) = h.input(Input::Router(SessionMsg::Bound {
        resource: "phone".into(),
    }));
    assert!(out.is_empty() && acts.is_empty(), "{out} {acts:?}");
    h.send("<presence><show>away</show></presence>");
    h.send("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>");
    h.send("<presence to='carol@example.org/x'/>");
    h.send("<presence to='dave@localhost/y'/>");
    h.send("<presence to='dave@localhost/y' type='unavailable'/>");
    let el = |xml: &str| {
        crate::parser::parse_element(
            xml.as_bytes(),
            &[("".into(), ns::CLIENT.into())],
            crate::parser::Limits::default(),
        )
        .unwrap()
    };
    h.input(Input::Router(SessionMsg::Stanza(el(
        "<iq type='result' id='r1' to='alice@localhost/phone'><query xmlns='jabber:iq:roster' ver='4'/></iq>",
    ))));
    h.input(Input::Router(SessionMsg::Stanza(el(
        "<iq type='set' id='p5' to='alice@localhost/phone'><query xmlns='jabber:iq:roster' ver='5'><item jid='bob@localhost'/></query></iq>",
    ))));
    h.input(Input::Router(SessionMsg::OfflineSent { upto: 3 }));
    let again = el("<iq type='get' id='r2' from='alice@localhost/phone'><query xmlns='jabber:iq:roster'/></iq>");
    let (out, acts) = h.input(Input::Router(SessionMsg::Rebind {
        again: Some(again.clone()),
    }));
    assert!(out.is_empty(), "the client notices nothing: {out}");
    match acts.as_slice() {
        [Action::Route(Envelope::User {
            msg:
                UserMsg::Rebind {
                    resource,
                    presence,
                    roster_ver,
                    directed,
                    offline_upto,
                    ..
                },
            ..
        }), Action::Route(Envelope::User {
            msg: UserMsg::Outbound { stanza, .. },
            ..
        })] => {
            assert_eq!(resource, "phone");
            let p = presence.as_ref().expect("available");
            assert_eq!(p.attr("from"), Some("alice@localhost/phone"));
            assert!(p.child("show", ns::CLIENT).is_some());
            assert_eq!(roster_ver.as_deref(), Some("5"));
            // A remote recipient is not routed (no federation yet); dave got unavailable since.
            assert!(directed.is_empty(), "{directed:?}");
            assert_eq!(*offline_upto, 3);
            assert_eq!(stanza, &again);
        }
        a => panic!("{a:?}"),
    }
    h.send("<presence type='unavailable'/>");
    let (_, acts) = h.input(Input::Router(SessionMsg::Rebind { again: None }));
    assert!(
        matches!(
            acts.as_slice(),
            [Action::Route(Envelope::User {
                msg: UserMsg::Rebind { presence: None, .. },
                ..
            })]
        ),
        "{acts:?}"
    );
}
