//! Incremental XMPP stream parser.
//!
//! Bytes arrive in arbitrary pieces. A byte-level scanner (state kept across calls, so feeding
//! one byte at a time stays linear) finds tag boundaries and tracks depth; when a top-level
//! child of the stream (a stanza) is complete, its bytes are parsed into an [`Element`] with
//! quick-xml. Limits are enforced while scanning, before anything is allocated for the stanza:
//! stanza size, depth, attributes per element. Comments, processing instructions (other than
//! the XML declaration) and DTDs are refused as RFC 6120 §11.1 requires; quick-xml expands only
//! the predefined entities and character references, so there is no entity expansion to abuse.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::ns;
use crate::xml::{Element, Node};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_stanza_bytes: usize,
    pub max_depth: usize,
    pub max_attrs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attrs: 64,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// The opening `<stream:stream>` with its attributes (namespace checked).
    Header(Vec<(String, String)>),
    Stanza(Element),
    /// `</stream:stream>`.
    End,
}

/// Why the stream cannot go on; each maps to a stream error condition (RFC 6120 §4.9.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    NotWellFormed(String),
    PolicyViolation(String),
    RestrictedXml(String),
    InvalidNamespace(String),
    BadFormat(String),
}

impl ParseError {
    pub fn condition(&self) -> &'static str {
        match self {
            ParseError::NotWellFormed(_) => "not-well-formed",
            ParseError::PolicyViolation(_) => "policy-violation",
            ParseError::RestrictedXml(_) => "restricted-xml",
            ParseError::InvalidNamespace(_) => "invalid-namespace",
            ParseError::BadFormat(_) => "bad-format",
        }
    }
    pub fn text(&self) -> &str {
        match self {
            ParseError::NotWellFormed(t)
            | ParseError::PolicyViolation(t)
            | ParseError::RestrictedXml(t)
            | ParseError::InvalidNamespace(t)
            | ParseError::BadFormat(t) => t,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    Text,
    /// Just after `<`.
    Open,
    /// Inside `<...>`; `quote` is the open attribute quote, `attrs` the `=` seen so far.
    Tag {
        quote: u8,
        attrs: usize,
    },
    /// After `<!`, deciding between CDATA and things we refuse.
    Bang,
    Cdata,
    Pi,
}

pub struct StreamParser {
    buf: Vec<u8>,
    /// Next byte to scan.
    pos: usize,
    /// Everything before this is handled and may be dropped.
    consumed: usize,
    tok_start: usize,
    state: Scan,
    depth: usize,
    stanza_start: Option<usize>,
    /// Names of the open elements inside the stream (bounded by `max_depth`), so that a
    /// mismatched end tag fails at once instead of leaving the stanza open.
    open: Vec<Vec<u8>>,
    header_seen: bool,
    /// Prefix declarations of the stream header, inherited by every stanza.
    stream_scope: Vec<(String, String)>,
    limits: Limits,
    failed: bool,
}

impl StreamParser {
    pub fn new(limits: Limits) -> Self {
        StreamParser {
            buf: Vec::new(),
            pos: 0,
            consumed: 0,
            tok_start: 0,
            state: Scan::Text,
            depth: 0,
            stanza_start: None,
            open: Vec::new(),
            header_seen: false,
            stream_scope: Vec::new(),
            limits,
            failed: false,
        }
    }

    /// Forgets everything: used at stream restarts (after STARTTLS and SASL).
    pub fn reset(&mut self) {
        *self = StreamParser::new(self.limits);
    }

    /// Bytes buffered and not yet handed out (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// Feeds bytes; returns the events they complete. After an error the parser stays failed.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        if self.failed {
            return Err(ParseError::NotWellFormed("stream already failed".into()));
        }
        self.buf.extend_from_slice(data);
        let r = self.scan(out);
        if r.is_err() {
            self.failed = true;
            self.buf = Vec::new();
        }
        r
    }

    fn scan(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        while self.pos < self.buf.len() {
            let b = self.buf[self.pos];
            match self.state {
                Scan::Text => {
                    // Skip to the next '<'; text outside stanzas must be whitespace.
                    let rest = &self.buf[self.pos..];
                    let n = rest.iter().position(|&c| c == b'<').unwrap_or(rest.len());
                    if self.stanza_start.is_none() && !rest[..n].iter().all(|c| c.is_ascii_whitespace()) {
                        return Err(ParseError::NotWellFormed("character data outside of a stanza".into()));
                    }
                    self.pos += n;
                    if self.stanza_start.is_none() {
                        self.consumed = self.pos;
                    }
                    if self.pos < self.buf.len() {
                        self.tok_start = self.pos;
                        self.state = Scan::Open;
                        self.pos += 1;
                    }
                }
                Scan::Open => {
                    self.state = match b {
                        b'!' => Scan::Bang,
                        b'?' => Scan::Pi,
                        _ => Scan::Tag { quote: 0, attrs: 0 },
                    };
                    self.pos += 1;
                }
                Scan::Bang => {
                    // Need "<![CDATA[" to decide.
                    let have = &self.buf[self.tok_start..];
                    let want = b"<![CDATA[";
                    let n = have.len().min(want.len());
                    if have[..n] != want[..n] {
                        return Err(ParseError::RestrictedXml(
                            "comments and DTDs are not allowed in XMPP".into(),
                        ));
                    }
                    if n == want.len() {
                        if self.stanza_start.is_none() {
                            return Err(ParseError::NotWellFormed("CDATA outside of a stanza".into()));
                        }
                        self.state = Scan::Cdata;
                        self.pos = self.tok_start + want.len();
                    } else {
                        self.pos = self.buf.len();
                    }
                }
                Scan::Cdata => {
                    if b == b'>' && self.pos >= 2 && &self.buf[self.pos - 2..self.pos] == b"]]" {
                        self.state = Scan::Text;
                    }
                    self.pos += 1;
                }
                Scan::Pi => {
                    if b == b'>' && self.buf[self.pos - 1] == b'?' {
                        let tok = &self.buf[self.tok_start..=self.pos];
                        if self.header_seen || self.depth > 0 || !tok.starts_with(b"<?xml ") {
                            return Err(ParseError::RestrictedXml(
                                "processing instructions are not allowed in XMPP".into(),
                            ));
                        }
                        self.state = Scan::Text;
                        self.consumed = self.pos + 1;
                    }
                    self.pos += 1;
                }
                Scan::Tag { quote, attrs } => {
                    if quote != 0 {
                        if b == quote {
                            self.state = Scan::Tag { quote: 0, attrs };
                        }
                    } else if b == b'"' || b == b'\'' {
                        self.state = Scan::Tag { quote: b, attrs };
                    } else if b == b'=' {
                        if attrs + 1 > self.limits.max_attrs {
                            return Err(ParseError::PolicyViolation(format!(
                                "more than {} attributes on one element",
                                self.limits.max_attrs
                            )));
                        }
                        self.state = Scan::Tag {
                            quote: 0,
                            attrs: attrs + 1,
                        };
                    } else if b == b'<' {
                        return Err(ParseError::NotWellFormed("'<' inside a tag".into()));
                    } else if b == b'>' {
                        self.state = Scan::Text;
                        self.end_tag(self.pos + 1, out)?;
                    }
                    self.pos += 1;
                }
            }
            self.check_size()?;
        }
        self.check_size()?;
        self.compact();
        Ok(())
    }

    fn check_size(&self) -> Result<(), ParseError> {
        let start = self.stanza_start.unwrap_or(self.consumed);
        if self.pos - start > self.limits.max_stanza_bytes {
            return Err(ParseError::PolicyViolation(format!(
                "stanza larger than {} bytes",
                self.limits.max_stanza_bytes
            )));
        }
        Ok(())
    }

    fn compact(&mut self) {
        if self.consumed == 0 {
            return;
        }
        if self.consumed == self.buf.len() {
            self.buf.clear();
            if self.buf.capacity() > 16 * 1024 {
                self.buf.shrink_to(4096);
            }
        } else if self.consumed > 8192 || self.consumed * 2 > self.buf.len() {
            self.buf.drain(..self.consumed);
        } else {
            return;
        }
        let d = self.consumed;
        self.pos -= d;
        self.tok_start = self.tok_start.saturating_sub(d);
        self.stanza_start = self.stanza_start.map(|s| s - d);
        self.consumed = 0;
    }

    /// A complete `<...>` token ends at `end`.
    fn end_tag(&mut self, end: usize, out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        let tok = &self.buf[self.tok_start..end];
        if tok.starts_with(b"</") {
            match self.depth {
                0 => return Err(ParseError::NotWellFormed("unexpected end tag".into())),
                1 => {
                    self.depth = 0;
                    self.consumed = end;
                    out.push(StreamEvent::End);
                }
                _ => {
                    let name = tag_name(&tok[2..]);
                    if self.open.last().map(Vec::as_slice) != Some(name) {
                        return Err(ParseError::NotWellFormed(format!(
                            "end tag </{}> does not match the open element",
                            String::from_utf8_lossy(name)
                        )));
                    }
                    self.open.pop();
                    self.depth -= 1;
                    if self.depth == 1 {
                        self.emit_stanza(end, out)?;
                    }
                }
            }
        } else if tok.ends_with(b"/>") {
            match self.depth {
                0 => return Err(ParseError::NotWellFormed("empty stream element".into())),
                1 => {
                    self.stanza_start = Some(self.tok_start);
                    self.emit_stanza(end, out)?;
                }
                _ => {}
            }
        } else if self.depth == 0 {
            let header = self.parse_header(self.tok_start, end)?;
            self.header_seen = true;
            self.depth = 1;
            self.consumed = end;
            out.push(StreamEvent::Header(header));
        } else {
            let name = tag_name(&tok[1..]).to_vec();
            self.open.push(name);
            self.depth += 1;
            if self.depth == 2 {
                self.stanza_start = Some(self.tok_start);
            }
            if self.depth > self.limits.max_depth + 1 {
                return Err(ParseError::PolicyViolation(format!(
                    "XML nested deeper than {} levels",
                    self.limits.max_depth
                )));
            }
        }
        Ok(())
    }

    fn emit_stanza(&mut self, end: usize, out: &mut Vec<StreamEvent>) -> Result<(), ParseError> {
        let start = self.stanza_start.take().expect("stanza start tracked");
        let el = parse_element(&self.buf[start..end], &self.stream_scope, self.limits)?;
        self.consumed = end;
        out.push(StreamEvent::Stanza(el));
        Ok(())
    }

    fn parse_header(&mut self, start: usize, end: usize) -> Result<Vec<(String, String)>, ParseError> {
        // Parse the open tag as an empty element.
        let mut tag = self.buf[start..end - 1].to_vec();
        tag.extend_from_slice(b"/>");
        let text =
            std::str::from_utf8(&tag).map_err(|_| ParseError::NotWellFormed("stream header is not UTF-8".into()))?;
        let mut reader = Reader::from_str(text);
        let start = loop {
            match reader.read_event() {
                Ok(Event::Empty(e)) => break e.into_owned(),
                Ok(Event::Eof) => return Err(ParseError::NotWellFormed("no stream header".into())),
                Ok(_) => continue,
                Err(e) => return Err(ParseError::NotWellFormed(e.to_string())),
            }
        };
        let attrs = raw_attrs(&start)?;
        let mut scope = vec![("xml".to_string(), ns::XML.to_string())];
        for (k, v) in &attrs {
            if k == "xmlns" {
                scope.push((String::new(), v.clone()));
            } else if let Some(p) = k.strip_prefix("xmlns:") {
                scope.push((p.to_string(), v.clone()));
            }
        }
        let qname = String::from_utf8_lossy(start.name().as_ref()).into_owned();
        let (prefix, local) = split_qname(&qname);
        let stream_ns = lookup(&scope, prefix);
        if local != "stream" || stream_ns != Some(ns::STREAM) {
            return Err(ParseError::InvalidNamespace(
                "the stream element must be <stream> in http://etherx.jabber.org/streams".into(),
            ));
        }
        if lookup(&scope, "") != Some(ns::CLIENT) {
            return Err(ParseError::InvalidNamespace(
                "the default namespace of a client stream must be jabber:client".into(),
            ));
        }
        self.stream_scope = scope;
        Ok(attrs)
    }
}

/// The element name at the start of a tag's body (after `<` or `</`).
fn tag_name(body: &[u8]) -> &[u8] {
    let end = body
        .iter()
        .position(|&c| c.is_ascii_whitespace() || c == b'>' || c == b'/')
        .unwrap_or(body.len());
    &body[..end]
}

fn split_qname(q: &str) -> (&str, &str) {
    match q.split_once(':') {
        Some((p, l)) => (p, l),
        None => ("", q),
    }
}

/// The namespace bound to `prefix` in `scope`. `xml` is bound by definition (Namespaces in XML
/// §3), declared or not: a stored stanza parsed without its stream's header still knows it.
fn lookup<'a>(scope: &'a [(String, String)], prefix: &str) -> Option<&'a str> {
    if prefix == "xml" {
        return Some(ns::XML);
    }
    scope.iter().rev().find(|(p, _)| p == prefix).map(|(_, u)| u.as_str())
}

fn raw_attrs(e: &BytesStart<'_>) -> Result<Vec<(String, String)>, ParseError> {
    let mut out = Vec::new();
    for a in e.attributes().with_checks(true) {
        let a = a.map_err(|e| ParseError::NotWellFormed(e.to_string()))?;
        let k = std::str::from_utf8(a.key.as_ref())
            .map_err(|_| ParseError::NotWellFormed("attribute name is not UTF-8".into()))?
            .to_string();
        let v = a
            .unescape_value()
            .map_err(|e| ParseError::NotWellFormed(e.to_string()))?;
        check_chars(&v)?;
        out.push((k, v.into_owned()));
    }
    Ok(out)
}

/// Parses one complete element (a stanza), resolving namespaces against `base` (the stream
/// header's declarations).
pub fn parse_element(bytes: &[u8], base: &[(String, String)], limits: Limits) -> Result<Element, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ParseError::NotWellFormed("stanza is not valid UTF-8".into()))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().trim_text(false);
    reader.config_mut().check_end_names = true;
    let mut scope: Vec<(String, String)> = base.to_vec();
    let mut marks: Vec<usize> = Vec::new();
    let mut stack: Vec<Element> = Vec::new();
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| ParseError::NotWellFormed(e.to_string()))?;
        match ev {
            Event::Start(e) => {
                marks.push(scope.len());
                let el = open_element(&e, &mut scope)?;
                stack.push(el);
                if stack.len() > limits.max_depth {
                    return Err(ParseError::PolicyViolation("XML nested too deep".into()));
                }
            }
            Event::Empty(e) => {
                let mark = scope.len();
                let el = open_element(&e, &mut scope)?;
                scope.truncate(mark);
                if let Some(done) = close(&mut stack, el) {
                    return Ok(done);
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| ParseError::NotWellFormed("unbalanced end tag".into()))?;
                scope.truncate(marks.pop().unwrap_or(base.len()));
                if let Some(done) = close(&mut stack, el) {
                    return Ok(done);
                }
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|e| ParseError::NotWellFormed(e.to_string()))?;
                push_text(&mut stack, &s)?;
            }
            Event::CData(c) => {
                let s = std::str::from_utf8(&c)
                    .map_err(|_| ParseError::NotWellFormed("CDATA is not UTF-8".into()))?
                    .to_string();
                push_text(&mut stack, &s)?;
            }
            Event::Comment(_) | Event::DocType(_) | Event::PI(_) | Event::Decl(_) => {
                return Err(ParseError::RestrictedXml("restricted XML in a stanza".into()))
            }
            Event::Eof => return Err(ParseError::NotWellFormed("incomplete stanza".into())),
        }
    }
}

/// Refuses characters XML 1.0 does not allow (§2.2 `Char`), written raw or as character
/// references: forwarded, they would make the recipient's parser end its stream. In UTF-8,
/// what is left to check is the C0 controls but TAB, LF and CR, and U+FFFE and U+FFFF.
fn check_chars(s: &str) -> Result<(), ParseError> {
    let b = s.as_bytes();
    let bad = b.iter().enumerate().any(|(i, &c)| {
        (c < 0x20 && !matches!(c, b'\t' | b'\n' | b'\r'))
            || (c == 0xEF && b.get(i + 1) == Some(&0xBF) && matches!(b.get(i + 2), Some(0xBE | 0xBF)))
    });
    if bad {
        return Err(ParseError::NotWellFormed("a character XML does not allow".into()));
    }
    Ok(())
}

fn push_text(stack: &mut [Element], s: &str) -> Result<(), ParseError> {
    check_chars(s)?;
    match stack.last_mut() {
        Some(top) => {
            if let Some(Node::Text(prev)) = top.children.last_mut() {
                prev.push_str(s);
            } else {
                top.children.push(Node::Text(s.to_string()));
            }
            Ok(())
        }
        None if s.trim().is_empty() => Ok(()),
        None => Err(ParseError::NotWellFormed("text outside an element".into())),
    }
}

/// Attaches a finished element to its parent, or returns it when it is the root.
fn close(stack: &mut [Element], el: Element) -> Option<Element> {
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(Node::Element(el));
            None
        }
        None => Some(el),
    }
}

/// Opens an element: its namespace declarations go on `scope`, its name is resolved. A
/// prefixed attribute whose prefix was declared outside this element (on an ancestor or on the
/// stream header) gets the declaration copied onto the element, so that the element is
/// self-contained: written out alone (offline storage, the wire, a forwarded payload) it
/// still parses to the same thing. Redundant declarations are legal XML.
fn open_element(e: &BytesStart<'_>, scope: &mut Vec<(String, String)>) -> Result<Element, ParseError> {
    let raw = raw_attrs(e)?;
    let own = scope.len();
    let mut attrs = Vec::with_capacity(raw.len());
    // Declarations first: they apply to the whole element, whatever the attribute order.
    for (k, v) in &raw {
        if k == "xmlns" {
            scope.push((String::new(), v.clone()));
        } else if let Some(p) = k.strip_prefix("xmlns:") {
            if p == "xmlns" || (p == "xml") != (v == ns::XML) || (v.is_empty()) {
                return Err(ParseError::NotWellFormed(format!(
                    "invalid namespace declaration {k:?}"
                )));
            }
            scope.push((p.to_string(), v.clone()));
        }
    }
    let mut inherited: Vec<(String, String)> = Vec::new();
    for (k, v) in raw {
        if k == "xmlns" || k == "xmlns:xml" {
            continue;
        }
        let (p, _) = split_qname(&k);
        if p == "xmlns" {
            attrs.push((k, v));
            continue;
        }
        if !p.is_empty() && p != "xml" {
            let Some(uri) = lookup(scope, p) else {
                return Err(ParseError::NotWellFormed(format!("undeclared prefix {p:?}")));
            };
            let declared_here = scope[own..].iter().any(|(q, _)| q == p);
            if !declared_here && !inherited.iter().any(|(q, _)| q == p) {
                inherited.push((p.to_string(), uri.to_string()));
            }
        }
        attrs.push((k, v));
    }
    for (p, uri) in inherited {
        attrs.push((format!("xmlns:{p}"), uri));
    }
    let qname = std::str::from_utf8(e.name().as_ref())
        .map_err(|_| ParseError::NotWellFormed("element name is not UTF-8".into()))?
        .to_string();
    let (prefix, local) = split_qname(&qname);
    if prefix == "xmlns" {
        return Err(ParseError::NotWellFormed("the xmlns prefix names no element".into()));
    }
    let ns = lookup(scope, prefix)
        .ok_or_else(|| ParseError::NotWellFormed(format!("undeclared prefix {prefix:?}")))?
        .to_string();
    Ok(Element {
        name: local.to_string(),
        ns,
        attrs,
        children: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    fn feed_all(p: &mut StreamParser, s: &str) -> Result<Vec<StreamEvent>, ParseError> {
        let mut out = Vec::new();
        p.feed(s.as_bytes(), &mut out)?;
        Ok(out)
    }

    #[test]
    fn stanzas_split_at_every_byte_parse_the_same() {
        let doc = format!(
            "{HEADER} <message to='a@b' id='1'><body>a &amp; b &lt; c&#x41;<![CDATA[<x>]]></body>\
             <x xmlns='urn:x'><y a=\"q'>\"/></x></message><presence/> </stream:stream>"
        );
        let whole = feed_all(&mut StreamParser::new(Limits::default()), &doc).unwrap();
        let mut p = StreamParser::new(Limits::default());
        let mut bytewise = Vec::new();
        for b in doc.as_bytes() {
            p.feed(std::slice::from_ref(b), &mut bytewise).unwrap();
        }
        assert_eq!(whole, bytewise);
        assert_eq!(whole.len(), 4);
        let StreamEvent::Stanza(m) = &whole[1] else {
            panic!("{whole:?}")
        };
        assert!(m.is("message", ns::CLIENT));
        assert_eq!(m.child("body", ns::CLIENT).unwrap().text(), "a & b < cA<x>");
        let x = m.child("x", "urn:x").unwrap();
        assert_eq!(x.child("y", "urn:x").unwrap().attr("a"), Some("q'>"));
        assert_eq!(whole[3], StreamEvent::End);
    }

    #[test]
    fn refuses_oversized_deep_wide_and_restricted_input() {
        let lim = Limits {
            max_stanza_bytes: 300,
            max_depth: 4,
            max_attrs: 4,
        };
        let big = format!("{HEADER}<message><body>{}</body></message>", "x".repeat(600));
        let e = feed_all(&mut StreamParser::new(lim), &big).unwrap_err();
        assert_eq!(e.condition(), "policy-violation");
        let deep = format!("{HEADER}<a><b><c><d><e><f>");
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), &deep).unwrap_err().condition(),
            "policy-violation"
        );
        let wide = format!("{HEADER}<a b='1' c='2' d='3' e='4' f='5'/>");
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), &wide).unwrap_err().condition(),
            "policy-violation"
        );
        let dtd = "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]>";
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), dtd).unwrap_err().condition(),
            "restricted-xml"
        );
        let comment = format!("{HEADER}<!-- hi -->");
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), &comment).unwrap_err().condition(),
            "restricted-xml"
        );
        let entity = format!("{HEADER}<message>&foo;</message>");
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), &entity).unwrap_err().condition(),
            "not-well-formed"
        );
        let bad = format!("{HEADER}<message><body>x</message>");
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), &bad).unwrap_err().condition(),
            "not-well-formed"
        );
        let wrong_ns = "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>";
        assert_eq!(
            feed_all(&mut StreamParser::new(lim), wrong_ns).unwrap_err().condition(),
            "invalid-namespace"
        );
    }

    #[test]
    fn characters_xml_does_not_allow_are_refused() {
        // Raw or as references: forwarded, they would end the recipient's stream.
        for bad in [
            "<message><body>a&#x1;b</body></message>",
            "<message><body>a\u{1}b</body></message>",
            "<message a='\u{1b}'/>",
            "<message a='&#x8;'/>",
            "<message><body>&#xFFFE;</body></message>",
            "<message><body>\u{FFFF}</body></message>",
        ] {
            let e = feed_all(&mut StreamParser::new(Limits::default()), &format!("{HEADER}{bad}")).unwrap_err();
            assert_eq!(e.condition(), "not-well-formed", "{bad:?}");
        }
        let ok = format!("{HEADER}<message a='&#9;'><body>tab\t&#xA;\r\u{FFFD}\u{10FFFF}\u{EFBF}</body></message>");
        assert_eq!(
            feed_all(&mut StreamParser::new(Limits::default()), &ok).unwrap().len(),
            2
        );
    }

    #[test]
    fn whitespace_keepalives_do_not_grow_the_buffer() {
        let mut p = StreamParser::new(Limits {
            max_stanza_bytes: 300,
            ..Limits::default()
        });
        feed_all(&mut p, HEADER).unwrap();
        for _ in 0..1000 {
            feed_all(&mut p, " \n").unwrap();
        }
        assert!(p.buffered() < 16);
    }
}
