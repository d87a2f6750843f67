//! Stanzas from a bound client (RFC 6120 §8, RFC 6121 §8): `from` is stamped, `to` checked,
//! then each stanza goes where it is processed: to the server itself, to the user's own actor
//! (presence, roster, IQs to the account), or straight to the addressee's user actor.

use jid::Jid;

use super::C2sSession;
use crate::msg::{Envelope, UserMsg};
use crate::ns;
use crate::stanza;
use crate::xml::Element;

impl C2sSession {
    pub(super) fn on_bound_stanza(&mut self, mut el: Element) {
        if el.ns != ns::CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            return self.stream_error(
                "unsupported-stanza-type",
                Some("only message, presence and iq are accepted"),
            );
        }
        let kind = match el.name.as_str() {
            "message" => 0,
            "presence" => 1,
            _ => 2,
        };
        self.stats.stanzas_in[kind] += 1;
        let full = self.jid.clone().expect("bound");
        let user = self.user.clone().expect("authenticated");
        if let Some(from) = el.attr("from") {
            // RFC 6120 §8.1.2.1: a client may only name itself.
            let ok = Jid::new(from).is_ok_and(|j| j == full || j == user);
            if !ok {
                tracing::info!(session = ?self.addr, from, "spoofed from address");
                return self.stream_error("invalid-from", Some("the from address is not yours"));
            }
        }
        el.set_attr("from", full.to_string());
        let to = match el.attr("to").map(Jid::new) {
            None => None,
            Some(Ok(j)) => Some(j),
            Some(Err(_)) => {
                if stanza::may_bounce(&el) {
                    let mut e = stanza::error_reply(&el, "jid-malformed", None);
                    e.remove_attr("from");
                    self.send_element(&e);
                }
                return;
            }
        };
        if let Some(t) = &to {
            // Normalised form, so that routing compares like with like.
            el.set_attr("to", t.to_string());
        }
        if el.name == "iq" && !self.valid_iq(&el) {
            return;
        }
        let resource = full.resource().to_string();
        let to_server = to
            .as_ref()
            .is_some_and(|t| t.node().is_none() && t.resource().is_none() && self.serves(t.domain().as_str()));
        let local_user = to
            .as_ref()
            .filter(|t| t.node().is_some() && self.serves(t.domain().as_str()))
            .map(|t| t.to_bare());
        let remote = to.as_ref().is_some_and(|t| !self.serves(t.domain().as_str()));
        match el.name.as_str() {
            "presence" => {
                if remote {
                    if el
                        .attr("type")
                        .is_some_and(|t| t.starts_with("sub") || t.starts_with("unsub"))
                    {
                        self.bounce(&el, "remote-server-not-found");
                    }
                    return;
                }
                // The user's own server processes all presence (broadcast, subscriptions,
                // directed presence bookkeeping).
                self.route_own(user, resource, el);
            }
            "iq" => match (&to, to_server, local_user) {
                // RFC 6120 §10.3.3: no `to` is the account itself; the roster and service
                // discovery of the account are the user actor's (server_iq answers the rest,
                // ping and version, as the account's server would).
                (None, _, _)
                    if el
                        .first_child()
                        .is_some_and(|p| matches!(p.ns.as_str(), ns::ROSTER | ns::DISCO_INFO | ns::DISCO_ITEMS)) =>
                {
                    self.route_own(user, resource, el)
                }
                (None, _, _) | (_, true, _) => self.server_iq(el),
                (_, _, Some(bare)) if bare == user && to.as_ref().is_some_and(|t| t.resource().is_none()) => {
                    self.route_own(user, resource, el)
                }
                (_, _, Some(bare)) => self.route(Envelope::to_user(bare, UserMsg::Inbound { stanza: el })),
                _ if remote => self.bounce(&el, "remote-server-not-found"),
                _ => self.bounce(&el, "service-unavailable"),
            },
            _ => match (to_server, local_user) {
                // RFC 6121 §8.5: no `to` means the user's own bare JID.
                _ if to.is_none() => {
                    el.set_attr("to", user.to_string());
                    self.route(Envelope::to_user(user, UserMsg::Inbound { stanza: el }))
                }
                (_, Some(bare)) => self.route(Envelope::to_user(bare, UserMsg::Inbound { stanza: el })),
                _ if remote => self.bounce(&el, "remote-server-not-found"),
                _ => {
                    if !matches!(el.attr("type"), Some("error" | "headline")) {
                        self.bounce(&el, "service-unavailable");
                    }
                }
            },
        }
    }

    /// A stanza the user's own actor processes for the user (`UserMsg::Outbound`).
    pub(super) fn route_own(&mut self, user: jid::BareJid, resource: String, stanza: Element) {
        self.me.note(&stanza);
        self.route(Envelope::to_user(
            user,
            UserMsg::Outbound {
                session: self.addr,
                resource,
                stanza,
            },
        ));
    }

    fn serves(&self, domain: &str) -> bool {
        self.cfg.domains.iter().any(|d| d == domain)
    }

    /// Answers the client with an error for its own stanza.
    fn bounce(&mut self, el: &Element, condition: &str) {
        if stanza::may_bounce(el) {
            let e = stanza::error_reply(el, condition, None);
            self.send_element(&e);
        }
    }

    /// RFC 6120 §8.2.3: an IQ has an id and a type; get/set carry exactly one payload.
    fn valid_iq(&mut self, el: &Element) -> bool {
        let ty = el.attr("type");
        let payloads = el.elements().count();
        let ok = el.attr("id").is_some()
            && match ty {
                Some("get" | "set") => payloads == 1,
                Some("result") => payloads <= 1,
                Some("error") => true,
                _ => false,
            };
        if !ok && ty != Some("error") && ty != Some("result") {
            let mut e = stanza::error_reply(el, "bad-request", Some("an IQ needs an id, a type and one payload"));
            e.remove_attr("from");
            self.send_element(&e);
        }
        ok
    }
}
