//! A lean XMPP client for load generation: one per simulated user, on a single-threaded
//! tokio runtime. It speaks just enough XMPP to log in (optionally STARTTLS, SASL PLAIN or
//! SCRAM through the `sasl` crate, bind) and to exchange stanzas, and parses with the same
//! incremental parser as the server.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use sasl::client::mechanisms::{Plain, Scram};
use sasl::client::Mechanism;
use sasl::common::scram::{Sha1, Sha256};
use sasl::common::ChannelBinding;
use starling_actors::parser::{Limits, StreamEvent, StreamParser};
use starling_actors::xml::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";

/// Why a connection failed; the report counts them by `kind()`.
#[derive(Debug)]
pub enum ClientError {
    Connect(std::io::Error),
    Io(std::io::Error),
    Closed,
    Tls(String),
    Auth(String),
    Stream(String),
    Protocol(String),
}

impl ClientError {
    pub fn kind(&self) -> String {
        match self {
            ClientError::Connect(e) => format!("connect: {}", e.kind()),
            ClientError::Io(e) => format!("io: {}", e.kind()),
            ClientError::Closed => "closed by server".into(),
            ClientError::Tls(_) => "tls".into(),
            ClientError::Auth(c) => format!("sasl failure: {c}"),
            ClientError::Stream(c) => format!("stream error: {c}"),
            ClientError::Protocol(_) => "protocol".into(),
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(e) | ClientError::Io(e) => write!(f, "{}: {e}", self.kind()),
            ClientError::Tls(e) | ClientError::Protocol(e) => write!(f, "{}: {e}", self.kind()),
            _ => f.write_str(&self.kind()),
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

pub struct Connection {
    io: Io,
    parser: StreamParser,
    events: VecDeque<StreamEvent>,
    buf: Vec<u8>,
    out: String,
    domain: String,
}

/// What to log in as.
pub struct Login<'a> {
    pub target: SocketAddr,
    pub source: std::net::IpAddr,
    pub domain: &'a str,
    pub user: &'a str,
    pub password: &'a str,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub mechanism: &'a str,
}

fn limits() -> Limits {
    Limits {
        max_stanza_bytes: 1 << 20,
        ..Limits::default()
    }
}

impl Connection {
    /// Connects from `source` (a loopback address: many of them lift the ephemeral-port cap).
    pub async fn connect(target: SocketAddr, source: std::net::IpAddr, domain: &str) -> Result<Self, ClientError> {
        let sock = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(ClientError::Connect)?;
        if source.is_ipv4() == target.is_ipv4() {
            sock.bind(SocketAddr::new(source, 0)).map_err(ClientError::Connect)?;
        }
        let tcp = sock.connect(target).await.map_err(ClientError::Connect)?;
        let _ = tcp.set_nodelay(true);
        Ok(Connection {
            io: Io::Plain(tcp),
            parser: StreamParser::new(limits()),
            events: VecDeque::new(),
            buf: vec![0; 8192],
            out: String::new(),
            domain: domain.to_string(),
        })
    }

    /// Queues raw XML; `flush` writes it.
    pub fn queue(&mut self, xml: &str) {
        self.out.push_str(xml);
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = match &mut self.io {
            Io::Plain(s) => s.write_all(self.out.as_bytes()).await,
            Io::Tls(s) => match s.write_all(self.out.as_bytes()).await {
                Ok(()) => s.flush().await,
                Err(e) => Err(e),
            },
            Io::Gone => return Err(ClientError::Closed),
        };
        self.out.clear();
        r.map_err(ClientError::Io)
    }

    pub async fn send(&mut self, xml: &str) -> Result<(), ClientError> {
        self.queue(xml);
        self.flush().await
    }

    /// Reads once from the socket and parses what came. Cancel-safe: the bytes are only
    /// taken from the socket when the read completes.
    pub async fn read_more(&mut self) -> Result<(), ClientError> {
        let n = match &mut self.io {
            Io::Plain(s) => s.read(&mut self.buf).await,
            Io::Tls(s) => s.read(&mut self.buf).await,
            Io::Gone => return Err(ClientError::Closed),
        }
        .map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        let mut evs = Vec::new();
        let r = self.parser.feed(&self.buf[..n], &mut evs);
        self.events.extend(evs);
        r.map_err(|e| ClientError::Protocol(format!("server sent bad XML: {}", e.text())))
    }

    /// The next parsed event, reading as needed.
    pub async fn next_event(&mut self) -> Result<StreamEvent, ClientError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(e);
            }
            self.read_more().await?;
        }
    }

    /// An event already parsed, without reading.
    pub fn take_event(&mut self) -> Option<StreamEvent> {
        self.events.pop_front()
    }

    /// The next top-level element; a stream error or the stream's end is an error.
    pub async fn next_element(&mut self) -> Result<Element, ClientError> {
        loop {
            match self.next_event().await? {
                StreamEvent::Stanza(e) if e.name == "error" && e.ns == starling_actors::ns::STREAM => {
                    let cond = e.first_child().map(|c| c.name.clone()).unwrap_or_default();
                    return Err(ClientError::Stream(cond));
                }
                StreamEvent::Stanza(e) => return Ok(e),
                StreamEvent::Header(_) => {}
                StreamEvent::End => return Err(ClientError::Closed),
            }
        }
    }

    /// Opens a (new) stream and returns the server's features.
    async fn open_stream(&mut self) -> Result<Element, ClientError> {
        self.parser = StreamParser::new(limits());
        self.events.clear();
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
            self.domain
        );
        self.send(&header).await?;
        let f = self.next_element().await?;
        if f.name != "features" {
            return Err(ClientError::Protocol(format!(
                "expected stream features, got <{}>",
                f.name
            )));
        }
        Ok(f)
    }

    async fn starttls(&mut self, cfg: Arc<rustls::ClientConfig>) -> Result<(), ClientError> {
        self.send(&format!("<starttls xmlns='{TLS}'/>")).await?;
        let p = self.next_element().await?;
        if p.name != "proceed" {
            return Err(ClientError::Tls(format!("STARTTLS refused: <{}>", p.name)));
        }
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Err(ClientError::Tls("already encrypted".into()));
        };
        let name = rustls::pki_types::ServerName::try_from(self.domain.clone())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        self.io = Io::Tls(Box::new(tls));
        Ok(())
    }

    /// Registers an account in band (XEP-0077) on a fresh stream. `Ok(false)`: it existed.
    pub async fn register(login: &Login<'_>) -> Result<bool, ClientError> {
        let mut c = Connection::connect(login.target, login.source, login.domain).await?;
        let mut features = c.open_stream().await?;
        if let Some(cfg) = &login.tls {
            c.starttls(cfg.clone()).await?;
            features = c.open_stream().await?;
        }
        let _ = features;
        let q = format!(
            "<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>{}</username>\
             <password>{}</password></query></iq>",
            starling_actors::xml::attr_escaped(login.user),
            starling_actors::xml::attr_escaped(login.password)
        );
        c.send(&q).await?;
        loop {
            let e = c.next_element().await?;
            if e.name == "iq" && e.attr("id") == Some("reg1") {
                let _ = c.send("</stream:stream>").await;
                return match e.attr("type") {
                    Some("result") => Ok(true),
                    _ => {
                        let err = e.child("error", starling_actors::ns::CLIENT);
                        let ty = err.and_then(|x| x.attr("type")).unwrap_or("?").to_string();
                        let cond = err
                            .and_then(|x| x.first_child())
                            .map(|c| c.name.clone())
                            .unwrap_or_else(|| "unknown".into());
                        if cond == "conflict" {
                            Ok(false)
                        } else {
                            Err(ClientError::Protocol(format!(
                                "registration refused: {cond} (type {ty})"
                            )))
                        }
                    }
                };
            }
        }
    }

    /// Connects and logs in; returns the bound full JID.
    pub async fn login(login: &Login<'_>) -> Result<(Connection, String), ClientError> {
        let mut c = Connection::connect(login.target, login.source, login.domain).await?;
        let mut features = c.open_stream().await?;
        if let Some(cfg) = &login.tls {
            if features.child("starttls", TLS).is_none() {
                return Err(ClientError::Tls("server offers no STARTTLS".into()));
            }
            c.starttls(cfg.clone()).await?;
            features = c.open_stream().await?;
        }
        let offered = features
            .child("mechanisms", SASL)
            .map(|m| m.elements().any(|x| x.text() == login.mechanism))
            .unwrap_or(false);
        if !offered {
            return Err(ClientError::Auth(format!("{} not offered", login.mechanism)));
        }
        let mut mech: Box<dyn Mechanism> = match login.mechanism {
            "PLAIN" => Box::new(Plain::new(login.user, login.password)),
            "SCRAM-SHA-1" => Box::new(
                Scram::<Sha1>::new(login.user, login.password, ChannelBinding::Unsupported)
                    .map_err(|e| ClientError::Auth(format!("{e:?}")))?,
            ),
            _ => Box::new(
                Scram::<Sha256>::new(login.user, login.password, ChannelBinding::Unsupported)
                    .map_err(|e| ClientError::Auth(format!("{e:?}")))?,
            ),
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let initial = mech.initial();
        c.send(&format!(
            "<auth xmlns='{SASL}' mechanism='{}'>{}</auth>",
            login.mechanism,
            if initial.is_empty() {
                "=".to_string()
            } else {
                b64.encode(initial)
            }
        ))
        .await?;
        loop {
            let e = c.next_element().await?;
            match e.name.as_str() {
                "challenge" => {
                    let data = b64
                        .decode(e.text().trim())
                        .map_err(|_| ClientError::Auth("bad challenge".into()))?;
                    let resp = mech.response(&data).map_err(|e| ClientError::Auth(format!("{e:?}")))?;
                    c.send(&format!("<response xmlns='{SASL}'>{}</response>", b64.encode(resp)))
                        .await?;
                }
                "success" => {
                    let data = b64.decode(e.text().trim()).unwrap_or_default();
                    if !data.is_empty() {
                        mech.success(&data)
                            .map_err(|e| ClientError::Auth(format!("server signature: {e:?}")))?;
                    }
                    break;
                }
                "failure" => {
                    let cond = e.first_child().map(|c| c.name.clone()).unwrap_or_default();
                    return Err(ClientError::Auth(cond));
                }
                other => return Err(ClientError::Protocol(format!("unexpected <{other}> during SASL"))),
            }
        }
        let features = c.open_stream().await?;
        if features.child("bind", BIND).is_none() {
            return Err(ClientError::Protocol("no resource binding offered".into()));
        }
        c.send(&format!("<iq type='set' id='bind1'><bind xmlns='{BIND}'/></iq>"))
            .await?;
        let jid = loop {
            let e = c.next_element().await?;
            if e.name == "iq" && e.attr("id") == Some("bind1") {
                if e.attr("type") != Some("result") {
                    return Err(ClientError::Protocol("bind refused".into()));
                }
                break e
                    .child("bind", BIND)
                    .and_then(|b| b.elements().find(|x| x.name == "jid"))
                    .map(|j| j.text())
                    .ok_or_else(|| ClientError::Protocol("bind result without jid".into()))?;
            }
        };
        // Old servers want the RFC 3921 session; modern ones mark it optional.
        if let Some(s) = features.child("session", SESSION) {
            if s.elements().all(|x| x.name != "optional") {
                c.send(&format!("<iq type='set' id='sess1'><session xmlns='{SESSION}'/></iq>"))
                    .await?;
                loop {
                    let e = c.next_element().await?;
                    if e.name == "iq" && e.attr("id") == Some("sess1") {
                        break;
                    }
                }
            }
        }
        Ok((c, jid))
    }

    pub async fn close(mut self) {
        let _ = self.send("</stream:stream>").await;
        // Give the server a moment to answer with its own close; never wait long.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), async {
            while let Ok(e) = self.next_event().await {
                if matches!(e, StreamEvent::End) {
                    break;
                }
            }
        })
        .await;
        match &mut self.io {
            Io::Plain(s) => {
                let _ = s.shutdown().await;
            }
            Io::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Io::Gone => {}
        }
    }
}

/// TLS for the load generator: it benchmarks, it does not verify (servers under test use
/// self-signed certificates).
pub fn insecure_tls() -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AcceptAll(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAll {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAll(provider)))
        .with_no_client_auth();
    Arc::new(cfg)
}
