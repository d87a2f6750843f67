//! Any stanza a client may send survives every place the server writes it out and reads it
//! back: the writer → parser path (offline storage, later archives) and the node-to-node wire.
//! Stanzas are generated as client text — prefixed elements and attributes, prefixes declared
//! on the stream header, on ancestors or in place, nested default namespaces, `xml:lang`,
//! markup and whitespace in text and attribute values — then parsed as a stream would parse
//! them. What the parser made must come back unchanged.

use proptest::prelude::*;
use starling_actors::ns;
use starling_actors::parser::{parse_element, Limits, StreamEvent, StreamParser};
use starling_actors::wire::{self, Frame, WireAddr, WireEnvelope};
use starling_actors::xml::{escape_attr, escape_text, Element};

/// The stream header declares one prefix of its own, as some clients do.
const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' xmlns:h='urn:example:header' \
    to='localhost' version='1.0'>";

const NAMES: [&str; 4] = ["x", "item", "body", "query"];

/// How an element names its namespace.
#[derive(Clone, Debug)]
enum NsMode {
    /// Its parent's default namespace.
    Inherit,
    /// `xmlns='urn:example:N'`.
    Default(u8),
    /// `pN:name` with `xmlns:pN` declared on the element.
    PrefixHere(u8),
    /// `h:name`, the prefix of the stream header.
    Header,
    /// A prefix in scope from an ancestor or the header, picked by index.
    InScope(u8),
}

#[derive(Clone, Debug)]
enum AttrMode {
    Plain,
    Lang,
    /// A prefix in scope (declared here, on an ancestor or on the header), by index.
    Prefixed(u8),
}

#[derive(Clone, Debug)]
struct GenEl {
    name: usize,
    ns: NsMode,
    /// An extra prefix declared here (`dN`) for descendants' use.
    declare: Option<u8>,
    attrs: Vec<(AttrMode, String)>,
    children: Vec<GenNode>,
}

#[derive(Clone, Debug)]
enum GenNode {
    El(GenEl),
    Text(String, bool),
}

/// Characters allowed in XML 1.0 documents, with the ones that need escaping over-represented.
fn xml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::char::range('a', 'z'),
        2 => prop::sample::select(vec!['<', '>', '&', '\'', '"', '\r', '\n', '\t', ' ', ']', '=']),
        1 => prop::char::range('\u{A0}', '\u{D7FF}'),
        1 => prop::char::range('\u{E000}', '\u{FFFD}'),
        1 => prop::char::range('\u{10000}', '\u{10FFFF}'),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(xml_char(), 1..12).prop_map(|v| v.into_iter().collect())
}

fn attr_value() -> impl Strategy<Value = String> {
    prop::collection::vec(xml_char(), 0..8).prop_map(|v| v.into_iter().collect())
}

fn ns_mode() -> impl Strategy<Value = NsMode> {
    prop_oneof![
        3 => Just(NsMode::Inherit),
        2 => (0u8..3).prop_map(NsMode::Default),
        1 => (0u8..3).prop_map(NsMode::PrefixHere),
        1 => Just(NsMode::Header),
        1 => any::<u8>().prop_map(NsMode::InScope),
    ]
}

fn attr_mode() -> impl Strategy<Value = AttrMode> {
    prop_oneof![
        2 => Just(AttrMode::Plain),
        1 => Just(AttrMode::Lang),
        2 => any::<u8>().prop_map(AttrMode::Prefixed),
    ]
}

fn leaf() -> impl Strategy<Value = GenEl> {
    (
        0..NAMES.len(),
        ns_mode(),
        prop::option::of(0u8..3),
        prop::collection::vec((attr_mode(), attr_value()), 0..3),
    )
        .prop_map(|(name, ns, declare, attrs)| GenEl {
            name,
            ns,
            declare,
            attrs,
            children: Vec::new(),
        })
}

fn element() -> impl Strategy<Value = GenEl> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        (
            leaf(),
            prop::collection::vec(
                prop_oneof![
                    2 => inner.prop_map(GenNode::El),
                    1 => (text(), any::<bool>()).prop_map(|(t, cdata)| GenNode::Text(t, cdata)),
                ],
                0..4,
            ),
        )
            .prop_map(|(mut e, children)| {
                e.children = children;
                e
            })
    })
}

/// Renders `e` as a client would write it. `scope`: prefixes usable here.
fn render(e: &GenEl, scope: &mut Vec<String>, out: &mut String) {
    let mark = scope.len();
    let mut decls = String::new();
    if let Some(d) = e.declare {
        let p = format!("d{d}");
        decls.push_str(&format!(" xmlns:{p}='urn:example:decl:{d}'"));
        scope.push(p);
    }
    let qname = match &e.ns {
        NsMode::Inherit => NAMES[e.name].to_string(),
        NsMode::Default(n) => {
            decls.push_str(&format!(" xmlns='urn:example:{n}'"));
            NAMES[e.name].to_string()
        }
        NsMode::PrefixHere(n) => {
            let p = format!("p{n}");
            if !scope.contains(&p) || e.declare.is_some() {
                decls.push_str(&format!(" xmlns:{p}='urn:example:prefix:{n}'"));
                scope.push(p.clone());
            }
            format!("{p}:{}", NAMES[e.name])
        }
        NsMode::Header => format!("h:{}", NAMES[e.name]),
        NsMode::InScope(i) => format!("{}:{}", scope[*i as usize % scope.len()], NAMES[e.name]),
    };
    out.push('<');
    out.push_str(&qname);
    out.push_str(&decls);
    let mut seen: Vec<String> = Vec::new();
    for (k, (mode, v)) in e.attrs.iter().enumerate() {
        let name = match mode {
            AttrMode::Plain => format!("a{k}"),
            AttrMode::Lang => "xml:lang".to_string(),
            AttrMode::Prefixed(i) => format!("{}:b{k}", scope[*i as usize % scope.len()]),
        };
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        out.push(' ');
        out.push_str(&name);
        out.push_str("=\"");
        escape_attr(out, v);
        out.push('"');
    }
    if e.children.is_empty() {
        out.push_str("/>");
    } else {
        out.push('>');
        for c in &e.children {
            match c {
                GenNode::El(c) => render(c, scope, out),
                GenNode::Text(t, true) if !t.contains("]]>") && !t.contains('\r') => {
                    out.push_str("<![CDATA[");
                    out.push_str(t);
                    out.push_str("]]>");
                }
                GenNode::Text(t, _) => escape_text(out, t),
            }
        }
        out.push_str("</");
        out.push_str(&qname);
        out.push('>');
    }
    scope.truncate(mark);
}

fn stanza() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["message", "presence", "iq"]),
        prop::option::of(prop::sample::select(vec!["en", "de-CH", ""])),
        prop::collection::vec(element(), 0..3),
        prop::option::of(text()),
    )
        .prop_map(|(kind, lang, children, body)| {
            let mut out = format!("<{kind} to='bob@localhost' id='i1'");
            if let Some(l) = lang {
                out.push_str(&format!(" xml:lang='{l}'"));
            }
            out.push('>');
            if let Some(b) = body {
                out.push_str("<body>");
                escape_text(&mut out, &b);
                out.push_str("</body>");
            }
            for c in &children {
                render(c, &mut vec!["h".to_string()], &mut out);
            }
            out.push_str(&format!("</{kind}>"));
            out
        })
}

/// The stanza as a client stream delivers it to the server.
fn from_stream(text: &str) -> Element {
    let mut p = StreamParser::new(Limits::default());
    let mut events = Vec::new();
    p.feed(HEADER.as_bytes(), &mut events).expect("header");
    p.feed(text.as_bytes(), &mut events)
        .unwrap_or_else(|e| panic!("generated stanza refused: {e:?}\n{text}"));
    match events.pop() {
        Some(StreamEvent::Stanza(el)) => el,
        other => panic!("no stanza: {other:?}\n{text}"),
    }
}

/// How offline storage reads a stanza back (user/offline.rs): no stream header.
fn stored(el: &Element) -> Element {
    let xml = el.to_client_xml();
    parse_element(
        xml.as_bytes(),
        &[(String::new(), ns::CLIENT.to_string())],
        Limits::default(),
    )
    .unwrap_or_else(|e| panic!("written stanza does not parse: {e:?}\n{xml}"))
}

/// Through a node-to-node frame and back.
fn over_the_wire(el: &Element) -> Element {
    let frame = Frame::Envelope(WireEnvelope {
        to: WireAddr::User("bob@localhost".into()),
        msg: wire::WireMsg::Inbound {
            stanza: wire::element_out(el),
        },
    });
    let mut buf = Vec::new();
    wire::encode(&frame, &mut buf).expect("encode");
    match wire::decode(&buf[4..]).expect("decode") {
        Frame::Envelope(WireEnvelope {
            msg: wire::WireMsg::Inbound { stanza },
            ..
        }) => wire::element_in(stanza).expect("element"),
        other => panic!("unexpected frame {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn stanzas_round_trip_through_storage_and_the_wire(text in stanza()) {
        let el = from_stream(&text);
        prop_assert_eq!(&stored(&el), &el, "writer → parser changed {}", text);
        prop_assert_eq!(&over_the_wire(&el), &el, "the wire changed {}", text);
        prop_assert_eq!(&stored(&over_the_wire(&el)), &el, "wire then storage changed {}", text);
    }
}

#[test]
fn xml_lang_and_header_prefixes_survive_storage() {
    let el = from_stream(
        "<message xml:lang='en' to='bob@localhost'><body>hi</body>\
         <x xmlns='urn:x' h:flag='1'><h:y/></x></message>",
    );
    let back = stored(&el);
    assert_eq!(back, el);
    assert_eq!(back.attr("xml:lang"), Some("en"));
    let x = back.child("x", "urn:x").expect("x");
    assert_eq!(x.attr("h:flag"), Some("1"));
    assert!(x.child("y", "urn:example:header").is_some());
}
