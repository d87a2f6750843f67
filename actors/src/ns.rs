//! XML namespaces used by the server.
pub const CLIENT: &str = "jabber:client";
pub const STREAM: &str = "http://etherx.jabber.org/streams";
pub const STREAMS_ERR: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const STANZAS_ERR: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const ROSTER: &str = "jabber:iq:roster";
pub const ROSTERVER: &str = "urn:xmpp:features:rosterver";
pub const PRE_APPROVAL: &str = "urn:xmpp:features:pre-approval";
pub const REGISTER: &str = "jabber:iq:register";
pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const PING: &str = "urn:xmpp:ping";
pub const VERSION: &str = "jabber:iq:version";
pub const DELAY: &str = "urn:xmpp:delay";
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
/// Starling's own, between user actors: a presence probe that lists the prober's resources
/// believed available, so that the answer names those gone too (`UserMsg::Resync`).
pub const RESYNC: &str = "urn:starling:presence-resync:0";
