//! A raw-XML client over plain TCP or TLS, for the error paths no polite client produces.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER: &str = "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Raw {
    io: Box<dyn Io>,
    /// The socket, for plain TCP connections: `cut` resets it.
    fd: Option<std::os::fd::RawFd>,
    /// Everything received and not yet consumed by `until`.
    pub buf: String,
    pub closed: bool,
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
        Raw {
            io: Box::new(s),
            fd: Some(fd),
            buf: String::new(),
            closed: false,
        }
    }

    pub fn from_io(io: Box<dyn Io>) -> Raw {
        Raw {
            io,
            fd: None,
            buf: String::new(),
            closed: false,
        }
    }

    /// Cuts the connection as a network failure would: no stream close, and a TCP reset
    /// (zero linger) instead of a FIN. Plain TCP connections only.
    pub fn cut(self) {
        let fd = self.fd.expect("cut needs a plain TCP connection");
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on our own open socket with a correctly sized struct.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER");
        drop(self);
    }

    pub async fn send(&mut self, s: &str) {
        let _ = self.io.write_all(s.as_bytes()).await;
    }

    /// Reads until `needle` was received; returns everything up to and including it.
    pub async fn until(&mut self, needle: &str) -> String {
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(i) = self.buf.find(needle) {
                    let rest = self.buf.split_off(i + needle.len());
                    return std::mem::replace(&mut self.buf, rest);
                }
                let mut b = [0u8; 8192];
                match self.io.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        self.closed = true;
                        panic!("connection closed before {needle:?}; got {:?}", self.buf);
                    }
                    Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&b[..n])),
                }
            }
        })
        .await;
        r.unwrap_or_else(|_| panic!("timed out waiting for {needle:?}; got {:?}", self.buf))
    }

    /// Waits until the server closes the connection; returns what it sent before.
    pub async fn until_closed(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let mut b = [0u8; 8192];
                match self.io.read(&mut b).await {
                    Ok(0) | Err(_) => {
                        self.closed = true;
                        return std::mem::take(&mut self.buf);
                    }
                    Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&b[..n])),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("server did not close the stream; got {:?}", self.buf))
    }

    /// Stream header, then SASL PLAIN (the server must allow it in clear), restart, bind.
    pub async fn login_plain(port: u16, user: &str, password: &str, resource: &str) -> Raw {
        match Self::try_login_plain(port, user, password, resource).await {
            Ok(r) => r,
            Err(got) => panic!("login of {user} failed: {got}"),
        }
    }

    /// Like `login_plain`; a refused authentication is the server's answer as an error.
    pub async fn try_login_plain(port: u16, user: &str, password: &str, resource: &str) -> Result<Raw, String> {
        let mut r = Raw::connect(port).await;
        r.send(HEADER).await;
        r.until("</stream:features>").await;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        r.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
        ))
        .await;
        let got = r.until("/>").await;
        if !got.contains("<success") {
            return Err(got);
        }
        r.send(HEADER).await;
        r.until("</stream:features>").await;
        r.send(&format!("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await;
        r.until("</iq>").await;
        Ok(r)
    }
}
