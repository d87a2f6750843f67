//! IQs the server answers itself (addressed to the domain, or with no `to` where RFC 6120
//! says the server answers): session, ping (XEP-0199), version (XEP-0092), disco (XEP-0030).

use super::C2sSession;
use crate::ns;
use crate::stanza;
use crate::xml::Element;

/// Features the server advertises in disco#info.
pub const SERVER_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::PING,
    ns::VERSION,
    ns::ROSTER,
    ns::ROSTERVER,
    ns::PRE_APPROVAL,
    ns::REGISTER,
    "msgoffline",
    ns::DELAY,
];

impl C2sSession {
    /// `iq` has `from` stamped; `to` is the domain or absent.
    pub(super) fn server_iq(&mut self, iq: Element) {
        let ty = iq.attr("type").unwrap_or("");
        if ty == "result" || ty == "error" {
            return;
        }
        let Some(payload) = iq.first_child() else {
            return self.send_element(&stanza::error_reply(&iq, "bad-request", None));
        };
        let reply = match (ty, payload.name.as_str(), payload.ns.as_str()) {
            ("set", "session", ns::SESSION) | ("get", "ping", ns::PING) => stanza::iq_result(&iq),
            ("get", "query", ns::VERSION) => stanza::iq_result(&iq).with_child(
                Element::new("query", ns::VERSION)
                    .with_child(Element::new("name", ns::VERSION).with_text("Starling"))
                    .with_child(Element::new("version", ns::VERSION).with_text(self.cfg.version.clone())),
            ),
            ("get", "query", ns::DISCO_INFO) if payload.attr("node").is_none() => {
                let mut q = Element::new("query", ns::DISCO_INFO).with_child(
                    Element::new("identity", ns::DISCO_INFO)
                        .with_attr("category", "server")
                        .with_attr("type", "im")
                        .with_attr("name", "Starling"),
                );
                for f in SERVER_FEATURES {
                    q.push_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", *f));
                }
                stanza::iq_result(&iq).with_child(q)
            }
            ("get", "query", ns::DISCO_ITEMS) => {
                stanza::iq_result(&iq).with_child(Element::new("query", ns::DISCO_ITEMS))
            }
            ("get", "query", ns::DISCO_INFO) => stanza::error_reply(&iq, "item-not-found", None),
            ("set", "bind", ns::BIND) => stanza::error_reply(&iq, "not-allowed", Some("already bound")),
            (_, "query", ns::REGISTER) => return self.on_account_register_iq(iq),
            (_, _, ns::PING | ns::VERSION | ns::DISCO_INFO | ns::DISCO_ITEMS | ns::SESSION) => {
                stanza::error_reply(&iq, "bad-request", None)
            }
            _ => stanza::error_reply(&iq, "service-unavailable", None),
        };
        // Replies keep the request's addressing swapped: no `to` in, no `from` out.
        self.send_element(&reply);
    }
}
