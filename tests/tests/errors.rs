//! Raw-XML tests for the error paths (RFC 6120 §4.9 stream errors, §8.3 stanza errors, SASL
//! failures), registration, Direct TLS, and the account CLI.

use std::sync::Arc;

use starling_tests::raw::{Raw, HEADER};
use starling_tests::Server;

/// Plain TCP with PLAIN allowed in clear, so raw clients need no TLS.
const CLEAR: &str = "c2s.require_tls=false";

#[tokio::test]
async fn malformed_xml_gets_not_well_formed_and_a_closed_stream() {
    let server = Server::start(&[CLEAR], &[]);
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    r.until("</stream:features>").await;
    r.send("<message><body>oops</message>").await;
    let got = r.until_closed().await;
    assert!(
        got.contains("<not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
        "{got}"
    );
    assert!(got.ends_with("</stream:stream>"), "{got}");
    assert!(server.log_text().contains("not-well-formed"), "no log line for bad XML");
}

/// alice sends `stanza`: her stream ends with `condition`, and bob, online, never sees
/// `marker` (the next thing he gets is a ping answer).
async fn refused_and_never_routed(stanza: &str, condition: &str, marker: &str) {
    let server = Server::start(&[CLEAR], &[("alice@localhost", "a"), ("bob@localhost", "b")]);
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<presence/>").await;
    bob.until("<presence").await;
    let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
    alice.send(stanza).await;
    let got = alice.until_closed().await;
    assert!(got.contains(&format!("<{condition}")), "{got}");
    bob.send("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let seen = bob.until("id=\"p1\"").await;
    assert!(!seen.contains(marker), "routed: {seen}");
}

#[tokio::test]
async fn characters_xml_does_not_allow_are_refused_not_forwarded() {
    // A control character (here as a reference) would end the recipient's stream in any
    // strict XML parser: the sender's stream fails instead.
    refused_and_never_routed(
        "<message to='bob@localhost/r' type='chat'><body>bell&#x7;</body></message>",
        "not-well-formed",
        "bell",
    )
    .await;
}

#[tokio::test]
async fn restricted_xml_and_wrong_namespace_are_refused() {
    let server = Server::start(&[CLEAR], &[]);
    let mut r = Raw::connect(server.port).await;
    r.send("<?xml version='1.0'?><!DOCTYPE lol [<!ENTITY lol 'lol'>]>")
        .await;
    let got = r.until_closed().await;
    assert!(got.contains("<restricted-xml"), "{got}");
    // The error is sent inside a stream header of our own (RFC 6120 §4.9.1.1).
    assert!(got.starts_with("<?xml version='1.0'?><stream:stream"), "{got}");

    let mut r = Raw::connect(server.port).await;
    r.send("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
        .await;
    let got = r.until_closed().await;
    assert!(got.contains("<invalid-namespace"), "{got}");

    let mut r = Raw::connect(server.port).await;
    r.send(&HEADER.replace("to='localhost'", "to='elsewhere.example'"))
        .await;
    let got = r.until_closed().await;
    assert!(got.contains("<host-unknown"), "{got}");
}

#[tokio::test]
async fn oversized_stanza_gets_policy_violation() {
    let server = Server::start(&[CLEAR, "c2s.max_stanza_bytes=4096"], &[("alice@localhost", "pw")]);
    let mut r = Raw::login_plain(server.port, "alice", "pw", "r").await;
    let big = format!(
        "<message to='alice@localhost'><body>{}</body></message>",
        "x".repeat(10_000)
    );
    r.send(&big).await;
    let got = r.until_closed().await;
    assert!(got.contains("<policy-violation"), "{got}");
    // The server is fine afterwards.
    let mut r = Raw::login_plain(server.port, "alice", "pw", "r2").await;
    r.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert!(r.until("id=\"p\"").await.contains("type=\"result\""));
}

#[tokio::test]
async fn bad_credentials_fail_and_are_throttled_per_ip() {
    let server = Server::start(
        &[CLEAR, "auth.max_failures_per_minute=3"],
        &[("alice@localhost", "right")],
    );
    let plain = |u: &str, p: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{u}\0{p}"))
    };
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    r.until("</stream:features>").await;
    for _ in 0..3 {
        r.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
            plain("alice", "wrong")
        ))
        .await;
        let got = r.until("</failure>").await;
        assert!(got.contains("<not-authorized/>"), "{got}");
    }
    // Unknown users look exactly like wrong passwords.
    // Fourth attempt from the same address, even with the right password: throttled.
    r.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        plain("alice", "right")
    ))
    .await;
    let got = r.until("</failure>").await;
    assert!(got.contains("<temporary-auth-failure/>"), "{got}");
    assert!(
        server.log_text().contains("authentication failed"),
        "no log line for failed auth"
    );

    // SCRAM with a wrong password fails with not-authorized too (separate server: fresh limit).
    let server = Server::start(&[CLEAR], &[("alice@localhost", "right")]);
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    r.until("</stream:features>").await;
    r.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biwsbj1hbGljZSxyPWZ5a28rZDJsYmJGZ09OUnY5cWt4ZGF3TA==</auth>").await;
    let ch = r.until("</challenge>").await;
    assert!(ch.contains("<challenge"), "{ch}");
    r.send("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>Yz1iaXdzLHI9ZnlrbytkMmxiYkZnT05Sdjlxa3hkYXdMLHA9djBYOHYzQnoyVDBDSkdiSlF5RjBYK0hJNFRzPQ==</response>").await;
    let got = r.until("</failure>").await;
    assert!(
        got.contains("<not-authorized/>") || got.contains("<malformed-request/>"),
        "{got}"
    );
    // Unauthenticated stanzas are refused with a stream error.
    r.send("<message to='alice@localhost'><body>x</body></message>").await;
    let got = r.until_closed().await;
    assert!(got.contains("<not-authorized"), "{got}");
}

#[tokio::test]
async fn spoofed_from_is_a_stream_error_and_never_routed() {
    refused_and_never_routed(
        "<message from='carol@localhost/x' to='bob@localhost'><body>spoofed</body></message>",
        "invalid-from",
        "spoofed",
    )
    .await;
}

#[tokio::test]
async fn full_offline_queue_bounces_resource_constraint() {
    let server = Server::start(
        &[CLEAR, "offline.max_per_user=2"],
        &[("alice@localhost", "a"), ("bob@localhost", "b")],
    );
    let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
    for i in 0..3 {
        alice
            .send(&format!(
                "<message to='bob@localhost' id='m{i}' type='chat'><body>n{i}</body></message>"
            ))
            .await;
    }
    let got = alice.until("</message>").await;
    assert!(got.contains("id=\"m2\"") && got.contains("type=\"error\""), "{got}");
    assert!(
        got.contains("<resource-constraint xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\"/>"),
        "{got}"
    );
    // The two that fit are kept and delivered.
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<presence/>").await;
    let first = bob.until("n1</body>").await;
    assert!(first.contains("n0</body>"), "{first}");
}

#[tokio::test]
async fn unknown_users_iqs_and_stanza_kinds_get_errors() {
    let server = Server::start(&[CLEAR], &[("alice@localhost", "a")]);
    let mut r = Raw::login_plain(server.port, "alice", "a", "r").await;
    r.send("<message to='nobody@localhost' id='u1' type='chat'><body>x</body></message>")
        .await;
    let got = r.until("</message>").await;
    assert!(
        got.contains("type=\"error\"") && got.contains("<service-unavailable"),
        "{got}"
    );
    r.send("<iq type='get' id='q1' to='localhost'><query xmlns='urn:example:unknown'/></iq>")
        .await;
    let got = r.until("</iq>").await;
    assert!(
        got.contains("id=\"q1\"") && got.contains("<service-unavailable"),
        "{got}"
    );
    r.send("<iq type='get' id='q2'/>").await;
    let got = r.until("</iq>").await;
    assert!(got.contains("id=\"q2\"") && got.contains("<bad-request"), "{got}");
    r.send("<message to='someone@remote.example' id='rm'><body>x</body></message>")
        .await;
    let got = r.until("</message>").await;
    assert!(got.contains("<remote-server-not-found"), "{got}");
    // disco#info of the server, version, legacy session.
    r.send("<iq type='get' id='d' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await;
    let got = r.until("</iq>").await;
    assert!(
        got.contains("category=\"server\"") && got.contains("urn:xmpp:ping"),
        "{got}"
    );
    r.send("<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        .await;
    let got = r.until("id=\"s\"").await;
    assert!(got.contains("type=\"result\""), "{got}");
    r.send("<foo xmlns='jabber:client'/>").await;
    let got = r.until_closed().await;
    assert!(got.contains("<unsupported-stanza-type"), "{got}");
}

#[tokio::test]
async fn in_band_registration_when_open() {
    let server = Server::start(&[CLEAR, "registration.mode=\"open\""], &[("taken@localhost", "x")]);
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    let f = r.until("</stream:features>").await;
    assert!(f.contains("http://jabber.org/features/iq-register"), "{f}");
    r.send("<iq type='get' id='g'><query xmlns='jabber:iq:register'/></iq>")
        .await;
    let got = r.until("</iq>").await;
    assert!(got.contains("<username/>") && got.contains("<password/>"), "{got}");
    r.send("<iq type='set' id='t'><query xmlns='jabber:iq:register'><username>taken</username><password>p</password></query></iq>").await;
    let got = r.until("</iq>").await;
    assert!(got.contains("<conflict"), "{got}");
    r.send("<iq type='set' id='n'><query xmlns='jabber:iq:register'><username>newbie</username><password>secret</password></query></iq>").await;
    let got = r.until("id=\"n\"").await;
    assert!(got.contains("type=\"result\""), "{got}");
    // The new account logs in and changes its password (XEP-0077 §3.3).
    let mut n = Raw::login_plain(server.port, "newbie", "secret", "r").await;
    n.send("<iq type='set' id='pw'><query xmlns='jabber:iq:register'><username>newbie</username><password>better</password></query></iq>").await;
    let got = n.until("id=\"pw\"").await;
    assert!(got.contains("type=\"result\""), "{got}");
    n.send("<iq type='set' id='pw2'><query xmlns='jabber:iq:register'><username>taken</username><password>x</password></query></iq>").await;
    let got = n.until("</iq>").await;
    assert!(
        got.contains("id=\"pw2\"") && got.contains("<bad-request"),
        "only one's own password: {got}"
    );
    let mut n = Raw::login_plain(server.port, "newbie", "better", "r2").await;
    n.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    n.until("id=\"p\"").await;

    // Closed (the default): no feature, and the IQ is refused.
    let closed = Server::start(&[CLEAR], &[]);
    let mut r = Raw::connect(closed.port).await;
    r.send(HEADER).await;
    let f = r.until("</stream:features>").await;
    assert!(!f.contains("iq-register"), "{f}");
    r.send("<iq type='set' id='n'><query xmlns='jabber:iq:register'><username>x</username><password>y</password></query></iq>").await;
    let got = r.until("</iq>").await;
    assert!(got.contains("<service-unavailable"), "{got}");
}

#[tokio::test]
async fn tls_is_required_by_default_and_direct_tls_uses_the_generated_certificate() {
    // No tls.cert configured: the server makes a self-signed certificate on first start.
    let server = Server::start_with(&[], &[("alice@localhost", "a")], false);
    let cert_path = server.dir.path().join("data/tls/cert.pem");
    assert!(cert_path.exists(), "no self-signed certificate generated");

    // Plain connection: STARTTLS required, no PLAIN before TLS.
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    let f = r.until("</stream:features>").await;
    assert!(
        f.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"),
        "{f}"
    );
    assert!(!f.contains("PLAIN"), "{f}");
    r.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGE=</auth>")
        .await;
    let got = r.until("</failure>").await;
    assert!(got.contains("<encryption-required/>"), "{got}");

    // Direct TLS (XEP-0368), verifying against the generated certificate.
    let pem = std::fs::read(&cert_path).unwrap();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&pem) {
        roots.add(c).unwrap();
    }
    let cfg = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.tls_port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("direct TLS handshake with the generated certificate");
    let mut r = Raw::from_io(Box::new(tls));
    r.send(HEADER).await;
    let f = r.until("</stream:features>").await;
    assert!(
        f.contains("<mechanism>PLAIN</mechanism>") && !f.contains("starttls"),
        "{f}"
    );
    r.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGE=</auth>")
        .await;
    assert!(r.until("/>").await.contains("<success"));

    // The certificate names the served domain (CN) and it and its services (SAN), so
    // clients that show or pin it show the right name.
    let der = rustls_pemfile_certs(&pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    let cn: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .filter_map(|c| c.as_str().ok())
        .collect();
    assert_eq!(cn, ["localhost"], "subject {}", cert.subject());
    let san = cert.subject_alternative_name().expect("SAN").expect("a SAN extension");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["localhost", "*.localhost"]);
}

#[tokio::test]
async fn the_generated_certificate_follows_the_served_domains() {
    let mut server = Server::start_with(&["server.domains=[\"example.org\", \"chat.example\"]"], &[], false);
    let cert_path = server.dir.path().join("data/tls/cert.pem");
    let names = |path: &std::path::Path| {
        let der = rustls_pemfile_certs(&std::fs::read(path).unwrap()).remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<String> = san.value.general_names.iter().map(|n| format!("{n:?}")).collect();
        (cn, dns)
    };
    let (cn, dns) = names(&cert_path);
    assert_eq!(cn, "example.org");
    assert_eq!(
        dns,
        [
            "DNSName(\"example.org\")",
            "DNSName(\"*.example.org\")",
            "DNSName(\"chat.example\")",
            "DNSName(\"*.chat.example\")",
        ]
    );
    // Kept across a restart…
    let before = std::fs::read(&cert_path).unwrap();
    server.restart();
    assert_eq!(
        std::fs::read(&cert_path).unwrap(),
        before,
        "regenerated for the same domains"
    );
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect()
}

#[test]
fn user_cli_manages_accounts_and_refuses_a_running_servers_data() {
    let mut server = Server::start(&[CLEAR], &[("alice@localhost", "a")]);
    let out = server.cli(&["user", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    let st = server.stop();
    assert!(st.success(), "SIGTERM did not stop cleanly: {st}");
    assert!(server.log_text().contains("stopped cleanly"), "{}", server.log_text());

    let ok = |args: &[&str]| {
        let o = server.cli(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ok(&["user", "add", "bob@localhost", "b"]);
    assert_eq!(ok(&["user", "list"]), "alice@localhost\nbob@localhost\n");
    let dup = server.cli(&["user", "add", "bob@localhost", "x"]);
    assert!(!dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    ok(&["user", "passwd", "bob@localhost", "new"]);
    ok(&["user", "del", "alice@localhost"]);
    assert_eq!(ok(&["user", "list"]), "bob@localhost\n");
    let bad = server.cli(&["--set", "c2s.nonsense=1", "user", "list"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("nonsense"));
}

#[tokio::test]
async fn sigterm_tells_clients_system_shutdown() {
    let mut server = Server::start(&[CLEAR], &[("alice@localhost", "a")]);
    let mut r = Raw::login_plain(server.port, "alice", "a", "r").await;
    let stop = std::thread::spawn(move || {
        let st = server.stop();
        (st, server)
    });
    let got = r.until_closed().await;
    assert!(got.contains("<system-shutdown"), "{got}");
    let (st, _server) = stop.join().unwrap();
    assert!(st.success());
}

#[tokio::test]
async fn anonymous_login_when_enabled() {
    let server = Server::start(&[CLEAR, "auth.anonymous=true"], &[]);
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    let f = r.until("</stream:features>").await;
    assert!(f.contains("<mechanism>ANONYMOUS</mechanism>"), "{f}");
    r.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>")
        .await;
    assert!(r.until("/>").await.contains("<success"));
    r.send(HEADER).await;
    r.until("</stream:features>").await;
    r.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        .await;
    let got = r.until("</iq>").await;
    assert!(
        got.contains("@localhost/"),
        "a server-generated resource on a random user: {got}"
    );
    // Off by default.
    let server = Server::start(&[CLEAR], &[]);
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    assert!(!r.until("</stream:features>").await.contains("ANONYMOUS"));
}

#[tokio::test]
async fn a_client_that_never_negotiates_is_timed_out() {
    let server = Server::start(&[CLEAR, "c2s.negotiation_timeout_secs=1"], &[]);
    let mut r = Raw::connect(server.port).await;
    r.send(HEADER).await;
    r.until("</stream:features>").await;
    let got = r.until_closed().await;
    assert!(got.contains("<connection-timeout"), "{got}");
}

/// Sum of a metric's samples (all label sets) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_are_scraped_and_health_answers() {
    let server = Server::start(
        &[CLEAR],
        &[
            ("alice@localhost", "a"),
            ("bob@localhost", "b"),
            ("carol@localhost", "c"),
        ],
    );
    let (status, body) = server.http_get("/health");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");

    let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<presence/>").await;
    bob.until("<presence").await;
    alice
        .send("<message to='bob@localhost' type='chat'><body>counted</body></message>")
        .await;
    bob.until("counted").await;
    let mut bad = Raw::connect(server.port).await;
    bad.send(HEADER).await;
    bad.until("</stream:features>").await;
    bad.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHdyb25n</auth>")
        .await;
    bad.until("</failure>").await;

    let (status, text) = server.http_get("/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric_sum(&text, "starling_logins_total"), 2.0, "{text}");
    assert_eq!(metric_sum(&text, "starling_sessions"), 2.0, "{text}");
    assert_eq!(metric_sum(&text, "starling_auth_failures_total"), 1.0, "{text}");
    assert!(
        text.contains("starling_stanzas_in_total{shard=") && text.contains("kind=\"message\""),
        "{text}"
    );
    assert!(metric_sum(&text, "starling_stanzas_out_total") >= 2.0, "{text}");
    assert!(metric_sum(&text, "starling_bytes_in_total") > 0.0);
    assert!(metric_sum(&text, "process_resident_memory_bytes") > 1e6, "{text}");
    assert!(
        text.contains("starling_storage_write_seconds") || text.contains("starling_user_handle_seconds"),
        "{text}"
    );
    // Routing latency: every stanza above went through a mailbox.
    assert!(metric_sum(&text, "starling_route_seconds_count") >= 2.0, "{text}");
    assert!(text.contains("starling_route_seconds_bucket{shard="), "{text}");
    // Mailbox depths are sampled each second, per shard and kind.
    let text = scrape_until(&server, |t| t.contains("starling_mailbox_depth{shard="));
    assert!(
        text.contains("kind=\"user\"") && text.contains("kind=\"session\""),
        "{text}"
    );
    assert!(text.contains("starling_mailbox_depth_max{shard="), "{text}");

    // Offline queue: a message for carol (offline) is counted while stored, and when she comes
    // online its queue length is observed and the count drops back.
    alice
        .send("<message to='carol@localhost' type='chat'><body>kept</body></message>")
        .await;
    scrape_until(&server, |t| metric_sum(t, "starling_offline_messages") == 1.0);
    let mut carol = Raw::login_plain(server.port, "carol", "c", "r").await;
    carol.send("<presence/>").await;
    carol.until("kept").await;
    let text = scrape_until(&server, |t| metric_sum(t, "starling_offline_messages") == 0.0);
    assert_eq!(metric_sum(&text, "starling_offline_queue_length_count"), 1.0, "{text}");
    assert_eq!(metric_sum(&text, "starling_offline_queue_length_sum"), 1.0, "{text}");

    let (status, _) = server.http_get("/nope");
    assert!(status.contains("404"), "{status}");
}

/// Scrapes `/metrics` until `ok` holds (a bounded wait), and returns that scrape.
fn scrape_until(server: &Server, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, text) = server.http_get("/metrics");
        if ok(&text) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "metrics never got there:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test]
async fn disco_info_without_to_is_answered_by_the_account() {
    // RFC 6120 §10.3.3: an IQ without `to` is for the sender's own account.
    let server = Server::start(&[CLEAR], &[("alice@localhost", "a")]);
    let mut r = Raw::login_plain(server.port, "alice", "a", "r").await;
    r.send("<iq type='get' id='d1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await;
    let got = r.until("</iq>").await;
    assert!(
        got.contains("type='result'") || got.contains("type=\"result\""),
        "{got}"
    );
    assert!(
        got.contains("category=\"account\"") && got.contains("type=\"registered\""),
        "{got}"
    );
    assert!(!got.contains("category=\"server\""), "answered as the server: {got}");
    // Addressed to the domain, it is still the server's.
    r.send("<iq type='get' id='d2' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await;
    let got = r.until("</iq>").await;
    assert!(
        got.contains("category=\"server\"") && got.contains("type=\"im\""),
        "{got}"
    );
}

#[tokio::test]
async fn a_subscription_request_for_an_offline_user_is_kept_whole() {
    // RFC 6121 §3.1.3: the complete stanza is delivered when the contact comes online —
    // here a pre-authenticated subscription token (XEP-0379), across a restart.
    let mut server = Server::start(&[CLEAR], &[("alice@localhost", "a"), ("bob@localhost", "b")]);
    {
        let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
        alice
            .send(
                "<presence to='bob@localhost' type='subscribe' xml:lang='en'><status>alice here</status>\
                   <preauth xmlns='urn:xmpp:pars:0' token='t0k3n'/></presence>",
            )
            .await;
        alice
            .send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
            .await;
        alice.until("id=\"p\"").await;
        alice.send("</stream:stream>").await;
        alice.until_closed().await;
    }
    server.restart();
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<presence/>").await;
    let got = bob.until("</presence>").await;
    let got = if got.contains("subscribe") {
        got
    } else {
        bob.until("</presence>").await
    };
    assert!(got.contains("type=\"subscribe\""), "{got}");
    assert!(got.contains("from=\"alice@localhost\""), "{got}");
    assert!(
        got.contains("<preauth xmlns=\"urn:xmpp:pars:0\" token=\"t0k3n\"/>"),
        "{got}"
    );
    assert!(got.contains("alice here") && got.contains("xml:lang=\"en\""), "{got}");
}

#[tokio::test]
async fn gauges_return_to_idle_after_logouts_cuts_and_write_timeouts() {
    let server = Server::start(
        &[CLEAR, "c2s.write_timeout_secs=1", "offline.max_per_user=1000"],
        &[
            ("alice@localhost", "a"),
            ("bob@localhost", "b"),
            ("carol@localhost", "c"),
            ("dave@localhost", "d"),
        ],
    );
    // A clean logout.
    let mut dave = Raw::login_plain(server.port, "dave", "d", "r").await;
    dave.send("<presence/>").await;
    dave.until("<presence").await;
    dave.send("</stream:stream>").await;
    dave.until_closed().await;
    // A cut socket (TCP reset, no stream close), and one cut before it authenticated.
    let mut carol = Raw::login_plain(server.port, "carol", "c", "r").await;
    carol.send("<presence/>").await;
    carol.until("<presence").await;
    carol.cut();
    let mut early = Raw::connect(server.port).await;
    early.send(HEADER).await;
    early.until("</stream:features>").await;
    early.cut();
    // A client that stops reading: its server-side writes time out.
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<presence/>").await;
    bob.until("<presence").await;
    let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
    let big = "x".repeat(200_000);
    for i in 0..80 {
        alice
            .send(&format!(
                "<message to='bob@localhost/r' id='m{i}'><body>{big}</body></message>"
            ))
            .await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.log_text().contains("write timed out") {
        assert!(
            std::time::Instant::now() < deadline,
            "no write timeout\n{}",
            server.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(bob);
    alice.send("</stream:stream>").await;
    drop(alice);
    let text = scrape_until(&server, |t| {
        metric_sum(t, "starling_connections") == 0.0
            && metric_sum(t, "starling_sessions") == 0.0
            && metric_sum(t, "starling_user_actors") == 0.0
            && metric_sum(t, "starling_mailbox_depth") == 0.0
            && metric_sum(t, "starling_mailbox_depth_max") == 0.0
    });
    assert_eq!(metric_sum(&text, "starling_logins_total"), 4.0, "{text}");
}

#[tokio::test]
async fn an_unreadable_stored_message_is_set_aside_counted_and_listed() {
    let mut server = Server::start(&[CLEAR], &[("alice@localhost", "a"), ("bob@localhost", "b")]);
    let send = |body: &'static str, port: u16| async move {
        let mut alice = Raw::login_plain(port, "alice", "a", "r").await;
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat'><body>{body}</body></message>"
            ))
            .await;
        alice
            .send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
            .await;
        alice.until("id=\"p\"").await;
    };
    send("before", server.port).await;
    scrape_until(&server, |t| metric_sum(t, "starling_offline_messages") == 1.0);
    assert!(server.stop().success());
    // A record that cannot be parsed back, after the first (as a bug or a disk could leave).
    {
        use starling_storage::{OfflineMessage, SledStorage, Storage, Write};
        let mut s = SledStorage::open(&server.dir.path().join("data/db")).unwrap();
        let last = s
            .load_user("bob@localhost")
            .unwrap()
            .offline
            .iter()
            .map(|m| m.seq)
            .max()
            .unwrap();
        s.apply(&[Write::PushOffline {
            user: "bob@localhost".into(),
            msg: OfflineMessage {
                seq: last + 1,
                stamp_unix_ms: 1,
                xml: "<message><body>cut in half".into(),
            },
        }])
        .unwrap();
        s.flush().unwrap();
    }
    server.start_again();
    send("after", server.port).await;
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<presence/>").await;
    bob.until("before").await;
    bob.until("after").await;
    // Counted as unreadable; the two delivered are deleted (once bob's session confirms).
    scrape_until(&server, |t| {
        metric_sum(t, "starling_offline_unreadable") == 1.0 && metric_sum(t, "starling_offline_messages") == 0.0
    });
    assert!(
        server.log_text().contains("set aside as unreadable") && server.log_text().contains("bob@localhost"),
        "{}",
        server.log_text()
    );
    drop(bob);
    assert!(server.stop().success());
    // Kept for the operator, not deleted with the two delivered around it.
    let out = server.cli(&["user", "unreadable", "bob@localhost"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        listed.starts_with("bob@localhost\t") && listed.contains("cut in half"),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

/// `actors.passivate_after_ms`: an idle user actor (no sessions) stays in memory that long,
/// serving what comes for its user meanwhile, then goes; its state reloads at the next login.
#[tokio::test]
async fn an_idle_user_actor_is_kept_for_passivate_after_ms_then_let_go() {
    use std::time::{Duration, Instant};
    let server = Server::start(
        &[CLEAR, "actors.passivate_after_ms=3000"],
        &[("alice@localhost", "a"), ("bob@localhost", "b")],
    );
    let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
    alice.send("<presence/>").await;
    alice.until("<presence").await;
    let sent = Instant::now();
    alice.send("</stream:stream>").await;
    alice.until_closed().await;
    let text = scrape_until(&server, |t| metric_sum(t, "starling_sessions") == 0.0);
    if sent.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            metric_sum(&text, "starling_user_actors"),
            1.0,
            "kept while idle:\n{text}"
        );
    }
    // While it is kept, a message for alice is stored offline by it.
    let mut bob = Raw::login_plain(server.port, "bob", "b", "r").await;
    bob.send("<message to='alice@localhost' type='chat' id='k1'><body>kept</body></message>")
        .await;
    bob.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    bob.until("id=\"p\"").await;
    bob.send("</stream:stream>").await;
    bob.until_closed().await;
    // Then both go, not before the delay.
    scrape_until(&server, |t| {
        metric_sum(t, "starling_user_actors") == 0.0 && metric_sum(t, "starling_offline_messages") == 1.0
    });
    assert!(sent.elapsed() >= Duration::from_secs(3), "let go before the delay");
    let mut alice = Raw::login_plain(server.port, "alice", "a", "r").await;
    alice.send("<presence/>").await;
    alice.until("kept").await;
}
