//! Stanza helpers: kinds, error replies (RFC 6120 §8.3), IQ results.

use crate::ns;
use crate::xml::Element;

/// Error types of RFC 6120 §8.3.2 for the conditions we use.
fn error_type(condition: &str) -> &'static str {
    match condition {
        "bad-request" | "jid-malformed" | "not-acceptable" | "policy-violation" => "modify",
        "forbidden" | "not-allowed" | "not-authorized" | "registration-required" => "auth",
        "resource-constraint" | "remote-server-timeout" => "wait",
        "internal-server-error" => "wait",
        _ => "cancel",
    }
}

/// Builds the `<error/>` child for `condition`, with optional human-readable text.
pub fn error_element(condition: &str, text: Option<&str>) -> Element {
    let mut err = Element::new("error", ns::CLIENT)
        .with_attr("type", error_type(condition))
        .with_child(Element::new(condition, ns::STANZAS_ERR));
    if let Some(t) = text {
        err.push_child(Element::new("text", ns::STANZAS_ERR).with_text(t));
    }
    err
}

/// May an error be sent in answer to this stanza? Never answer an error with an error
/// (RFC 6120 §8.3.1), nor a result IQ.
pub fn may_bounce(stanza: &Element) -> bool {
    let t = stanza.attr("type");
    t != Some("error") && !(stanza.name == "iq" && t == Some("result"))
}

/// A reply skeleton: same kind and id, `to`/`from` swapped, the given type.
fn reply(req: &Element, ty: &str) -> Element {
    let mut e = Element::new(&req.name, &req.ns).with_attr("type", ty);
    for (k, swapped) in [("id", "id"), ("from", "to"), ("to", "from")] {
        if let Some(v) = req.attr(k) {
            e.set_attr(swapped, v);
        }
    }
    e
}

/// The error reply to `stanza`: `to`/`from` swapped, type="error", original payload kept.
/// A request without `to` (for the server) gets a reply without `from`.
pub fn error_reply(stanza: &Element, condition: &str, text: Option<&str>) -> Element {
    let mut e = reply(stanza, "error");
    if stanza.name != "iq" {
        e.children = stanza.children.clone();
    } else if let Some(payload) = stanza.first_child() {
        e.push_child(payload.clone());
    }
    e.push_child(error_element(condition, text));
    e
}

/// An empty IQ result to `iq`.
pub fn iq_result(iq: &Element) -> Element {
    reply(iq, "result")
}

/// `<stream:error>` followed by the stream close tag.
pub fn stream_error(condition: &str, text: Option<&str>) -> String {
    let mut s = String::from("<stream:error><");
    s.push_str(condition);
    s.push_str(" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>");
    if let Some(t) = text {
        s.push_str("<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>");
        crate::xml::escape_text(&mut s, t);
        s.push_str("</text>");
    }
    s.push_str("</stream:error></stream:stream>");
    s
}
