//! SASL negotiation (RFC 6120 §6): SCRAM-SHA-256, SCRAM-SHA-1, PLAIN (over TLS unless allowed
//! in clear), ANONYMOUS (when enabled). Failures are throttled per IP.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use jid::BareJid;
use rand_core::RngCore;
use starling_storage::Account;

use super::{Action, C2sConfig, C2sSession, Ctx, State};
use crate::ns;
use crate::scram::{self, Hash, SaslError, ScramExchange};
use crate::xml::Element;

#[derive(Debug)]
pub(super) enum SaslState {
    /// SCRAM: waiting for the account lookup.
    ScramLookup(Hash, Box<scram::ClientFirst>),
    /// SCRAM: challenge sent, waiting for the client-final-message.
    ScramChallenge(Box<ScramExchangeDbg>),
    /// PLAIN: waiting for the account lookup.
    Plain { username: String, password: String },
}

/// `ScramExchange` holds key material; keep it out of Debug output.
pub(super) struct ScramExchangeDbg(ScramExchange);
impl std::fmt::Debug for ScramExchangeDbg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramExchange")
    }
}

pub(super) fn mechanisms(cfg: &C2sConfig, tls: bool) -> Vec<&'static str> {
    let mut m = vec!["SCRAM-SHA-256", "SCRAM-SHA-1"];
    if tls || !cfg.require_tls {
        m.push("PLAIN");
    }
    if cfg.anonymous {
        m.push("ANONYMOUS");
    }
    m
}

fn decode_payload(el: &Element) -> Result<Vec<u8>, SaslError> {
    let t = el.text();
    let t = t.trim();
    if t.is_empty() || t == "=" {
        return Ok(Vec::new());
    }
    B64.decode(t).map_err(|_| SaslError::Malformed("payload is not base64"))
}

impl C2sSession {
    pub(super) fn on_auth(&mut self, el: Element, now: u64, ctx: &mut Ctx<'_>) {
        if !self.tls && self.cfg.require_tls {
            return self.sasl_fail("encryption-required", None, None);
        }
        if !ctx.throttle.allowed(self.ip, now) {
            tracing::warn!(session = ?self.addr, "authentication throttled for this address");
            return self.sasl_fail(
                "temporary-auth-failure",
                Some("too many failed attempts; try later"),
                None,
            );
        }
        let mech = el.attr("mechanism").unwrap_or("");
        if !mechanisms(&self.cfg, self.tls).contains(&mech) {
            return self.sasl_fail("invalid-mechanism", None, None);
        }
        let payload = match decode_payload(&el) {
            Ok(p) => p,
            Err(e) => return self.sasl_fail(e.condition(), None, None),
        };
        match mech {
            "SCRAM-SHA-256" | "SCRAM-SHA-1" => {
                let hash = if mech == "SCRAM-SHA-1" {
                    Hash::Sha1
                } else {
                    Hash::Sha256
                };
                let first = match scram::parse_client_first(&payload) {
                    Ok(f) => f,
                    Err(e) => return self.sasl_fail(e.condition(), None, Some((ctx, now))),
                };
                let Some(user) = self.user_jid(&first.username) else {
                    return self.sasl_fail("not-authorized", None, Some((ctx, now)));
                };
                self.state = State::Sasl(SaslState::ScramLookup(hash, Box::new(first)));
                self.out.actions.push(Action::LoadAccount(user.to_string()));
            }
            "PLAIN" => match scram::parse_plain(&payload) {
                Ok((authzid, username, password)) => {
                    let Some(user) = self.user_jid(&username) else {
                        return self.sasl_fail("not-authorized", None, Some((ctx, now)));
                    };
                    if authzid.is_some_and(|z| z != user.as_str() && z != username) {
                        return self.sasl_fail("invalid-authzid", None, Some((ctx, now)));
                    }
                    self.state = State::Sasl(SaslState::Plain { username, password });
                    self.out.actions.push(Action::LoadAccount(user.to_string()));
                }
                Err(e) => self.sasl_fail(e.condition(), None, Some((ctx, now))),
            },
            "ANONYMOUS" => {
                let name = self.random_hex(8);
                let user = self.user_jid(&name).expect("hex is a valid localpart");
                self.anonymous = true;
                self.succeed(user, None);
            }
            _ => self.sasl_fail("invalid-mechanism", None, None),
        }
    }

    /// The bare JID for a SASL username on this stream's domain (nodeprep applied).
    fn user_jid(&self, username: &str) -> Option<BareJid> {
        BareJid::new(&format!("{username}@{}", self.domain))
            .ok()
            .filter(|j| j.node().is_some())
    }

    pub(super) fn on_account(&mut self, account: Option<Account>, now: u64, ctx: &mut Ctx<'_>) {
        let State::Sasl(st) = std::mem::replace(&mut self.state, State::Negotiating) else {
            return;
        };
        match st {
            SaslState::ScramLookup(hash, first) => {
                let mut nonce = [0u8; 18];
                self.rng.fill_bytes(&mut nonce);
                let mut salt = [0u8; 16];
                self.rng.fill_bytes(&mut salt);
                let ex = ScramExchange::new(hash, *first, account.as_ref(), &B64.encode(nonce), salt);
                let challenge = B64.encode(ex.server_first());
                self.write(&format!(
                    "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{challenge}</challenge>"
                ));
                self.state = State::Sasl(SaslState::ScramChallenge(Box::new(ScramExchangeDbg(ex))));
            }
            SaslState::Plain { username, password } => {
                let ok = account.as_ref().is_some_and(|a| scram::verify_password(a, &password));
                match (ok, self.user_jid(&username)) {
                    (true, Some(user)) => self.succeed(user, None),
                    _ => self.sasl_fail("not-authorized", None, Some((ctx, now))),
                }
            }
            SaslState::ScramChallenge(_) => {}
        }
    }

    pub(super) fn on_sasl_element(&mut self, el: Element, now: u64, ctx: &mut Ctx<'_>) {
        if el.is("abort", ns::SASL) {
            self.state = State::Negotiating;
            return self.sasl_fail("aborted", None, None);
        }
        if !el.is("response", ns::SASL) {
            return self.stream_error("not-authorized", Some("SASL negotiation in progress"));
        }
        let State::Sasl(SaslState::ScramChallenge(ex)) = std::mem::replace(&mut self.state, State::Negotiating) else {
            return self.sasl_fail("malformed-request", Some("unexpected response"), None);
        };
        let payload = match decode_payload(&el) {
            Ok(p) => p,
            Err(e) => return self.sasl_fail(e.condition(), None, Some((ctx, now))),
        };
        match ex.0.finish(&payload) {
            Ok(server_final) => {
                let user = self.user_jid(ex.0.username()).expect("checked at auth");
                if ex
                    .0
                    .authzid()
                    .is_some_and(|z| z != user.as_str() && z != ex.0.username())
                {
                    return self.sasl_fail("invalid-authzid", None, Some((ctx, now)));
                }
                self.succeed(user, Some(server_final));
            }
            Err(e) => self.sasl_fail(e.condition(), None, Some((ctx, now))),
        }
    }

    fn succeed(&mut self, user: BareJid, additional: Option<String>) {
        tracing::info!(session = ?self.addr, user = %user, "authenticated");
        match additional {
            Some(a) => self.write(&format!(
                "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</success>",
                B64.encode(a)
            )),
            None => self.write("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"),
        }
        self.user = Some(user);
        // RFC 6120 §6.4.6: the client restarts the stream.
        self.parser.reset();
        self.header_sent = false;
        self.state = State::Header;
    }

    /// Answers `<failure/>`; counts it against the IP when `count` is given (a real attempt).
    fn sasl_fail(&mut self, condition: &str, text: Option<&str>, count: Option<(&mut Ctx<'_>, u64)>) {
        if let Some((ctx, now)) = count {
            self.stats.auth_failures += 1;
            ctx.throttle.record_failure(self.ip, now);
            tracing::info!(session = ?self.addr, condition, "authentication failed");
        }
        let mut s = format!("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{condition}/>");
        if let Some(t) = text {
            s.push_str("<text>");
            crate::xml::escape_text(&mut s, t);
            s.push_str("</text>");
        }
        s.push_str("</failure>");
        self.write(&s);
        self.state = State::Negotiating;
    }
}
