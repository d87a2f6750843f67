//! End-to-end tests driven by a second, independent client library: Python's slixmpp
//! (`tests/slixmpp/scenarios.py`, pinned in `tests/slixmpp/requirements.txt`, installed by
//! `.ci/run`). Each scenario logs in over STARTTLS with SCRAM, verifying the server's
//! certificate, and puts `xml:lang` on every stanza as slixmpp does.

use std::path::PathBuf;
use std::process::Command;

use starling_tests::{test_cert, Server};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slixmpp/scenarios.py")
}

/// Runs one scenario against `server`; panics with its output unless it passed.
fn scenario(server: &Server, name: &str) {
    let python = std::env::var("STARLING_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import slixmpp"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "slixmpp is not installed for {python}: pip install -r tests/slixmpp/requirements.txt \
         (.ci/run does)"
    );
    let (cert, _) = test_cert();
    let out = Command::new(&python)
        .arg(script())
        .args([name, "--port", &server.port.to_string(), "--ca"])
        .arg(cert)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "slixmpp scenario {name} failed:\n{}{}\n--- server log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
}

const USERS: &[(&str, &str)] = &[
    ("alice@localhost", "alice-pw"),
    ("bob@localhost", "bob-pw"),
    ("carol@localhost", "carol-pw"),
];

#[test]
fn slixmpp_logs_in_over_starttls_with_scram() {
    scenario(&Server::start(&[], USERS), "login");
}

#[test]
fn slixmpp_roster_subscriptions_and_presence() {
    scenario(&Server::start(&[], USERS), "roster");
}

#[test]
fn slixmpp_chats_to_full_and_bare_jids() {
    scenario(&Server::start(&[], USERS), "chat");
}

#[test]
fn slixmpp_offline_messages_with_xml_lang_survive_a_restart() {
    let mut server = Server::start(&[], USERS);
    scenario(&server, "offline-send");
    server.restart();
    scenario(&server, "offline-receive");
    assert!(!server.log_text().contains("does not parse"), "{}", server.log_text());
}

#[test]
fn slixmpp_registers_in_band() {
    scenario(&Server::start(&["registration.mode=open"], USERS), "register");
}
