//! One client connection: owns the socket (plain, STARTTLS-upgraded or Direct TLS) and the
//! sans-io `C2sSession`, and carries out the session's actions.

use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::server::TlsStream;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use starling_actors::address::SessionAddr;
use starling_actors::c2s::{C2sSession, Ctx, Input, SessionStats};
use starling_actors::msg::SessionMsg;
use starling_actors::system::conn::{Conn as Runner, ConnStep};

use crate::shard::{Origin, Shard};
use crate::user_host::now_ms;

enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Ok(0)),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_close(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

fn ip_key(ip: Option<IpAddr>) -> u128 {
    match ip {
        Some(IpAddr::V4(v4)) => u128::from(v4.to_ipv6_mapped()),
        Some(IpAddr::V6(v6)) => u128::from(v6),
        None => 0,
    }
}

/// The connection's part of the `starling_connections` and `starling_sessions` gauges,
/// given back however the connection task ends (a clean close, a cut socket, a write error
/// or timeout, a panic): every gauge returns to its idle value once the clients are gone.
struct Gauges {
    shard: Rc<Shard>,
    /// Counted in `starling_sessions` (bound).
    session: std::cell::Cell<bool>,
}

impl Gauges {
    fn new(shard: &Rc<Shard>) -> Self {
        shard.metrics.connections.increment(1.0);
        Gauges {
            shard: shard.clone(),
            session: std::cell::Cell::new(false),
        }
    }

    /// Follows the session's bound state.
    fn bound(&self, bound: bool) {
        if bound != self.session.replace(bound) {
            if bound {
                self.shard.metrics.sessions.increment(1.0);
            } else {
                self.shard.metrics.sessions.decrement(1.0);
            }
        }
    }
}

impl Drop for Gauges {
    fn drop(&mut self) {
        self.bound(false);
        self.shard.metrics.connections.decrement(1.0);
    }
}

/// The answer to a storage request or TLS handshake, fed back to the session.
enum Next {
    Tls,
    Account(Option<starling_storage::Account>),
    Created(Option<bool>),
    PasswordSet(bool),
}

/// Runs `fut`, giving up after `limit`.
async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let sleep = glommio::timer::sleep(limit);
    futures::pin_mut!(fut, sleep);
    match futures::future::select(fut, sleep).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

pub async fn serve(shard: Rc<Shard>, stream: TcpStream, direct_tls: bool) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let id = shard.next_session_id();
    let addr = SessionAddr {
        node: shard.node,
        node_gen: shard.cluster.generation.get(),
        shard: shard.id,
        id,
    };
    shard.open_session(id);
    let gauges = Gauges::new(&shard);
    tracing::debug!(?addr, ?peer, direct_tls, "connection accepted");
    let conn = if direct_tls {
        match within(
            shard.negotiation_timeout,
            TlsAcceptor::from(shard.tls.clone()).accept(stream),
        )
        .await
        {
            Some(Ok(s)) => Conn::Tls(Box::new(s)),
            Some(Err(e)) => {
                tracing::info!(?peer, error = %e, "TLS handshake failed");
                shard.close_session(addr);
                return;
            }
            None => {
                tracing::info!(?peer, "TLS handshake timed out");
                shard.close_session(addr);
                return;
            }
        }
    } else {
        Conn::Plain(stream)
    };
    let session = C2sSession::new(
        addr,
        shard.c2s_cfg.clone(),
        ip_key(peer.map(|p| p.ip())),
        direct_tls,
        shard.session_rng(),
    );
    let mut runner = Runner::new(session);
    let mut conn = conn;
    let mut buf = vec![0u8; 4096];
    // Until the session is bound, it must make progress before this deadline (slow-loris).
    let deadline = std::time::Instant::now() + shard.negotiation_timeout;
    let mut recorded = false;
    loop {
        // From the bind request on (`ShardCore::binding`).
        if !recorded {
            if let Some(bare) = runner.session().binding_user() {
                shard.binding(id, bare);
                recorded = true;
            }
        }
        let event = {
            let read = conn.read(&mut buf);
            let recv = shard.next_session_msg(id);
            // Bound sessions have no deadline: no clock read, no timer on the hot path.
            let left = runner
                .session()
                .jid()
                .is_none()
                .then(|| deadline.saturating_duration_since(std::time::Instant::now()));
            let timer = async move {
                match left {
                    Some(left) => glommio::timer::sleep(left).await,
                    None => futures::future::pending::<()>().await,
                }
            };
            futures::pin_mut!(read, recv, timer);
            match futures::future::select(futures::future::select(read, recv), timer).await {
                Either::Left((Either::Left((r, _)), _)) => Some(Either::Left(r)),
                Either::Left((Either::Right((m, _)), _)) => Some(Either::Right(m)),
                Either::Right(_) => None,
            }
        };
        let input = match event {
            None => Input::TimedOut,
            Some(Either::Left(Ok(0)) | Either::Left(Err(_))) => Input::Closed,
            Some(Either::Left(Ok(n))) => {
                shard.metrics.bytes_in.increment(n as u64);
                tracing::trace!(session = ?addr, input = %String::from_utf8_lossy(&buf[..n]), "read");
                Input::Bytes(&buf[..n])
            }
            Some(Either::Right(Some(t))) => {
                shard.metrics.route.record(crate::shard::since(t.at));
                tracing::trace!(session = ?addr, msg = ?t.msg, "from router");
                if let SessionMsg::Stanza(st) | SessionMsg::Offline(st) = &t.msg {
                    if let Some(k) = crate::metrics::kind_index(&st.name) {
                        shard.metrics.stanzas_out[k].increment(1);
                    }
                }
                Input::Router(t.msg)
            }
            // The mailbox is gone (cannot happen while this task lives): end.
            Some(Either::Right(None)) => break,
        };
        let ends = matches!(input, Input::TimedOut | Input::Closed);
        handle(&shard, &gauges, &mut runner, input);
        if !carry_out(&shard, &gauges, &mut runner, &mut conn).await || runner.is_closed() {
            break;
        }
        if ends {
            // Timed out or cut: nothing more comes from this client.
            runner.broken();
            carry_out(&shard, &gauges, &mut runner, &mut conn).await;
            break;
        }
    }
    let _ = conn.close().await;
    // Messages that raced with the close go back to the user actor (`msg::session_gone`).
    shard.close_session(addr);
    tracing::debug!(?addr, "connection closed");
}

/// Feeds one input; a panic in the session ends this session with a stream error.
fn handle(shard: &Rc<Shard>, gauges: &Gauges, runner: &mut Runner, input: Input<'_>) {
    let before = runner.session().stats();
    let was_bound = runner.session().jid().is_some();
    let now = now_ms();
    let r = {
        let mut throttle = shard.throttle.borrow_mut();
        runner.answered(
            input,
            now,
            &mut Ctx {
                throttle: &mut throttle,
            },
        )
    };
    if r.is_err() {
        tracing::error!(session = ?runner.session().addr, "session panicked; closing it");
    }
    observe(shard, gauges, runner, before, was_bound);
}

/// The metrics a session input moved (only the (atomic) counters that moved are touched).
fn observe(shard: &Rc<Shard>, gauges: &Gauges, runner: &Runner, before: SessionStats, was_bound: bool) {
    let session = runner.session();
    gauges.bound(session.jid().is_some());
    let after = session.stats();
    let m = &shard.metrics;
    let bump = |c: &metrics::Counter, n: u64| {
        if n > 0 {
            c.increment(n)
        }
    };
    for k in 0..3 {
        bump(&m.stanzas_in[k], after.stanzas_in[k] - before.stanzas_in[k]);
    }
    bump(&m.auth_failures, after.auth_failures - before.auth_failures);
    bump(&m.stream_errors, after.stream_errors - before.stream_errors);
    if !was_bound && session.jid().is_some() {
        m.logins.increment(1);
    }
}

/// Writes `bytes`, giving up after the write timeout. `false`: the socket is broken.
async fn write(shard: &Rc<Shard>, addr: SessionAddr, conn: &mut Conn, bytes: &[u8]) -> bool {
    shard.metrics.bytes_out.increment(bytes.len() as u64);
    tracing::trace!(session = ?addr, output = %String::from_utf8_lossy(bytes), "write");
    // A client that stops reading must not hold this task (and its mailbox) forever.
    let written = within(shard.write_timeout, async {
        conn.write_all(bytes).await?;
        conn.flush().await
    })
    .await;
    match written {
        Some(Ok(())) => true,
        Some(Err(_)) => false,
        None => {
            tracing::info!(session = ?addr, "write timed out; dropping the connection");
            false
        }
    }
}

/// Carries out the session's steps (`system::conn`) until it waits for input. Returns false
/// once the connection has ended.
async fn carry_out(shard: &Rc<Shard>, gauges: &Gauges, runner: &mut Runner, conn: &mut Conn) -> bool {
    let addr = runner.session().addr;
    loop {
        let step = {
            let mut throttle = shard.throttle.borrow_mut();
            runner.step(
                now_ms(),
                &mut Ctx {
                    throttle: &mut throttle,
                },
            )
        };
        let answer = match step {
            ConnStep::Idle => return true,
            ConnStep::Write(bytes) => {
                if !write(shard, addr, conn, &bytes).await {
                    runner.broken();
                }
                continue;
            }
            ConnStep::Route(env) => {
                shard.route_wait(env, Origin::Connection).await;
                continue;
            }
            ConnStep::Close { bytes, routes } => {
                if !bytes.is_empty() {
                    write(shard, addr, conn, &bytes).await;
                }
                for env in routes {
                    shard.route(env);
                }
                return false;
            }
            ConnStep::StartTls => {
                let Conn::Plain(tcp) = std::mem::replace(conn, Conn::Gone) else {
                    runner.broken();
                    continue;
                };
                match within(
                    shard.negotiation_timeout,
                    TlsAcceptor::from(shard.tls.clone()).accept(tcp),
                )
                .await
                {
                    Some(Ok(s)) => {
                        *conn = Conn::Tls(Box::new(s));
                        Next::Tls
                    }
                    Some(Err(e)) => {
                        tracing::info!(session = ?addr, error = %e, "STARTTLS handshake failed");
                        runner.broken();
                        continue;
                    }
                    None => {
                        tracing::info!(session = ?addr, "STARTTLS handshake timed out");
                        runner.broken();
                        continue;
                    }
                }
            }
            ConnStep::LoadAccount(user) => match shard.load_account(user).await {
                Ok(a) => Next::Account(a),
                Err(e) => {
                    tracing::error!(error = %e, "account lookup failed");
                    runner.storage_failed("internal-server-error", "storage unavailable");
                    continue;
                }
            },
            ConnStep::CreateAccount { user, account } => match shard.create_account(user, account).await {
                Ok(created) => Next::Created(Some(created)),
                Err(e) => {
                    tracing::error!(error = %e, "account creation failed");
                    Next::Created(None)
                }
            },
            ConnStep::SetPassword { user, account } => {
                Next::PasswordSet(shard.put_account(user, account).await.is_ok())
            }
        };
        let input = match answer {
            Next::Tls => Input::TlsEstablished,
            Next::Account(a) => Input::Account(a),
            Next::Created(c) => Input::AccountCreated(c),
            Next::PasswordSet(ok) => Input::PasswordSet(ok),
        };
        handle(shard, gauges, runner, input);
    }
}
