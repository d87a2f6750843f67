//! In-band registration (XEP-0077): account creation before authentication when
//! `registration.mode = "open"`, and password change for an authenticated user.

use jid::BareJid;
use rand_core::RngCore;

use super::{Action, C2sSession, State};
use crate::ns;
use crate::scram;
use crate::stanza;
use crate::xml::Element;

impl C2sSession {
    fn reply_error(&mut self, iq: &Element, condition: &str, text: Option<&str>) {
        let mut e = stanza::error_reply(iq, condition, text);
        e.remove_attr("from");
        self.send_element(&e);
    }

    fn new_credentials(&mut self, password: &str) -> starling_storage::Account {
        let mut s1 = [0u8; 16];
        let mut s2 = [0u8; 16];
        self.rng.fill_bytes(&mut s1);
        self.rng.fill_bytes(&mut s2);
        scram::new_account(password, s1, s2, self.cfg.scram_iterations)
    }

    /// Registration before authentication.
    pub(super) fn on_register_iq(&mut self, iq: Element) {
        if !self.cfg.registration_open {
            return self.reply_error(&iq, "service-unavailable", Some("registration is closed"));
        }
        if !self.tls && self.cfg.require_tls {
            return self.reply_error(&iq, "not-authorized", Some("use TLS first"));
        }
        let query = iq.child("query", ns::REGISTER).expect("checked by caller");
        match iq.attr("type") {
            Some("get") => {
                let mut res = stanza::iq_result(&iq);
                res.remove_attr("from");
                res.push_child(
                    Element::new("query", ns::REGISTER)
                        .with_child(
                            Element::new("instructions", ns::REGISTER).with_text("Choose a username and password."),
                        )
                        .with_child(Element::new("username", ns::REGISTER))
                        .with_child(Element::new("password", ns::REGISTER)),
                );
                self.send_element(&res);
            }
            Some("set") => {
                let username = query.child("username", ns::REGISTER).map(|u| u.text());
                let password = query.child("password", ns::REGISTER).map(|p| p.text());
                let (Some(username), Some(password)) = (username, password) else {
                    return self.reply_error(&iq, "bad-request", Some("username and password are required"));
                };
                let user = BareJid::new(&format!("{username}@{}", self.domain))
                    .ok()
                    .filter(|j| j.node().is_some());
                let Some(user) = user else {
                    return self.reply_error(&iq, "jid-malformed", Some("invalid username"));
                };
                if password.is_empty() {
                    return self.reply_error(&iq, "not-acceptable", Some("empty password"));
                }
                let account = self.new_credentials(&password);
                self.state = State::Registering(iq);
                self.out.actions.push(Action::CreateAccount {
                    user: user.to_string(),
                    account,
                });
            }
            _ => self.reply_error(&iq, "bad-request", None),
        }
    }

    pub(super) fn on_account_created(&mut self, created: Option<bool>) {
        let State::Registering(iq) = std::mem::replace(&mut self.state, State::Negotiating) else {
            return;
        };
        match created {
            Some(true) => {
                tracing::info!(session = ?self.addr, "account registered in band");
                let mut res = stanza::iq_result(&iq);
                res.remove_attr("from");
                self.send_element(&res);
            }
            Some(false) => self.reply_error(&iq, "conflict", Some("that username is taken")),
            // Not a stream error: the client may try again later (the error type is `wait`).
            None => self.reply_error(&iq, "internal-server-error", Some("the account could not be stored")),
        }
        self.drain_pending_negotiation();
    }

    /// Registration IQs of an authenticated user: password change.
    pub(super) fn on_account_register_iq(&mut self, iq: Element) {
        let user = self.user.clone().expect("authenticated");
        let query = iq.child("query", ns::REGISTER).expect("checked by caller");
        match iq.attr("type") {
            Some("get") => {
                let mut res = stanza::iq_result(&iq);
                res.push_child(
                    Element::new("query", ns::REGISTER)
                        .with_child(Element::new("registered", ns::REGISTER))
                        .with_child(
                            Element::new("username", ns::REGISTER)
                                .with_text(user.node().map(|n| n.to_string()).unwrap_or_default()),
                        )
                        .with_child(Element::new("password", ns::REGISTER)),
                );
                self.send_element(&res);
            }
            Some("set") if query.child("remove", ns::REGISTER).is_some() => {
                self.send_element(&stanza::error_reply(
                    &iq,
                    "not-allowed",
                    Some("account removal in band is not supported; ask an operator"),
                ));
            }
            Some("set") => {
                let username = query.child("username", ns::REGISTER).map(|u| u.text());
                let password = query
                    .child("password", ns::REGISTER)
                    .map(|p| p.text())
                    .filter(|p| !p.is_empty());
                if self.anonymous {
                    return self.send_element(&stanza::error_reply(&iq, "not-allowed", None));
                }
                match (username, password) {
                    (Some(u), Some(p)) if user.node().is_some_and(|n| n.as_str() == u) => {
                        let account = self.new_credentials(&p);
                        self.state = State::ChangingPassword(iq);
                        self.out.actions.push(Action::SetPassword {
                            user: user.to_string(),
                            account,
                        });
                    }
                    _ => self.send_element(&stanza::error_reply(
                        &iq,
                        "bad-request",
                        Some("username must be yours, password non-empty"),
                    )),
                }
            }
            _ => self.send_element(&stanza::error_reply(&iq, "bad-request", None)),
        }
    }

    pub(super) fn on_password_set(&mut self, ok: bool) {
        let State::ChangingPassword(iq) = std::mem::replace(&mut self.state, State::Bound) else {
            return;
        };
        if ok {
            self.send_element(&stanza::iq_result(&iq));
        } else {
            self.send_element(&stanza::error_reply(&iq, "internal-server-error", None));
        }
        while let Some(el) = self.pending.pop_front() {
            if !matches!(self.state, State::Bound) {
                self.pending.push_front(el);
                break;
            }
            self.on_bound_stanza(el);
        }
    }

    fn drain_pending_negotiation(&mut self) {
        // Stanzas that arrived while we waited are handled now, in order. Only registration
        // and auth elements are valid here; anything else closes the stream as usual.
        let pending: Vec<Element> = self.pending.drain(..).collect();
        for el in pending {
            if self.is_closed() || !matches!(self.state, State::Negotiating) {
                break;
            }
            if el.is("iq", ns::CLIENT) && el.child("query", ns::REGISTER).is_some() {
                self.on_register_iq(el);
            } else {
                self.stream_error("not-authorized", Some("authenticate first"));
            }
        }
    }
}
