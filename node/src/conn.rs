//! One client connection: owns the socket (plain, STARTTLS-upgraded or Direct TLS) and the
//! sans-io `C2sSession`, and carries out the session's actions.

use std::collections::VecDeque;
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
use starling_actors::c2s::{Action, C2sSession, Ctx, Input};
use starling_actors::msg::SessionMsg;

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

/// Owned inputs queued while carrying out actions.
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
    let mut session = C2sSession::new(
        addr,
        shard.c2s_cfg.clone(),
        ip_key(peer.map(|p| p.ip())),
        direct_tls,
        shard.session_rng(),
    );
    let mut conn = conn;
    let mut buf = vec![0u8; 4096];
    // Until the session is bound, it must make progress before this deadline (slow-loris).
    let deadline = std::time::Instant::now() + shard.negotiation_timeout;
    let mut recorded = false;
    loop {
        // Recorded from the bind request on: a node that rejoins or a user that moves
        // closes sessions whose bind is still in flight too (found by the simulator: the
        // bind's answer was lost with a link, and the actor routed to a session that never
        // learned it was bound).
        if !recorded {
            if let Some(bare) = session.binding_user() {
                let bare = bare.clone();
                let (node, _) = shard.cluster.view.borrow().place_user(&bare);
                shard.session_users.borrow_mut().insert(id, (bare, node));
                recorded = true;
            }
        }
        let event = {
            let read = conn.read(&mut buf);
            let recv = shard.next_session_msg(id);
            // Bound sessions have no deadline: no clock read, no timer on the hot path.
            let left = session
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
        let Some(event) = event else {
            handle(&shard, &gauges, &mut session, Input::TimedOut);
            carry_out(&shard, &gauges, &mut session, &mut conn).await;
            break;
        };
        let open = match event {
            Either::Left(Ok(0)) | Either::Left(Err(_)) => {
                handle(&shard, &gauges, &mut session, Input::Closed);
                carry_out(&shard, &gauges, &mut session, &mut conn).await;
                false
            }
            Either::Left(Ok(n)) => {
                shard.metrics.bytes_in.increment(n as u64);
                tracing::trace!(session = ?session.addr, input = %String::from_utf8_lossy(&buf[..n]), "read");
                handle(&shard, &gauges, &mut session, Input::Bytes(&buf[..n]));
                carry_out(&shard, &gauges, &mut session, &mut conn).await
            }
            Either::Right(Some(t)) => {
                shard.metrics.route.record(crate::shard::since(t.at));
                let m = t.msg;
                tracing::trace!(session = ?session.addr, msg = ?m, "from router");
                if let SessionMsg::Stanza(st) | SessionMsg::Offline(st) = &m {
                    if let Some(k) = crate::metrics::kind_index(&st.name) {
                        shard.metrics.stanzas_out[k].increment(1);
                    }
                }
                handle(&shard, &gauges, &mut session, Input::Router(m));
                carry_out(&shard, &gauges, &mut session, &mut conn).await
            }
            Either::Right(None) => false,
        };
        if !open {
            break;
        }
    }
    let _ = conn.close().await;
    shard.session_users.borrow_mut().remove(&id);
    // Messages that raced with the close go back to the user actor (`msg::session_gone`).
    shard.close_session(addr);
    tracing::debug!(?addr, "connection closed");
}

/// Feeds one input; a panic in the session ends this session with a stream error.
fn handle(shard: &Rc<Shard>, gauges: &Gauges, session: &mut C2sSession, input: Input<'_>) {
    let before = session.stats();
    let was_bound = session.jid().is_some();
    handle_inner(shard, session, input);
    gauges.bound(session.jid().is_some());
    let after = session.stats();
    let m = &shard.metrics;
    // Only touch the (atomic) counters that moved.
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

fn handle_inner(shard: &Rc<Shard>, session: &mut C2sSession, input: Input<'_>) {
    let now = now_ms();
    let mut throttle = shard.throttle.borrow_mut();
    let mut ctx = Ctx {
        throttle: &mut throttle,
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle(input, now, &mut ctx)));
    if r.is_err() {
        tracing::error!(session = ?session.addr, "session panicked; closing it");
        session.stream_error("internal-server-error", None);
    }
}

/// Writes the session's output and carries out its actions until it has nothing left.
/// Returns false once the connection is to be closed.
async fn carry_out(shard: &Rc<Shard>, gauges: &Gauges, session: &mut C2sSession, conn: &mut Conn) -> bool {
    let mut open = true;
    let mut queue: VecDeque<Next> = VecDeque::new();
    loop {
        let out = session.take_output();
        if out.bytes.is_empty() && out.actions.is_empty() && queue.is_empty() {
            return open;
        }
        if !out.bytes.is_empty() {
            shard.metrics.bytes_out.increment(out.bytes.len() as u64);
            tracing::trace!(session = ?session.addr, output = %String::from_utf8_lossy(&out.bytes), "write");
            // A client that stops reading must not hold this task (and its mailbox) forever.
            let written = within(shard.write_timeout, async {
                conn.write_all(&out.bytes).await?;
                conn.flush().await
            })
            .await;
            match written {
                Some(Ok(())) => {}
                Some(Err(_)) => open = false,
                None => {
                    tracing::info!(session = ?session.addr, "write timed out; dropping the connection");
                    open = false;
                }
            }
        }
        for action in out.actions {
            match action {
                Action::Route(env) => shard.route_wait(env, Origin::Connection).await,
                Action::Close => open = false,
                Action::StartTls => {
                    let Conn::Plain(tcp) = std::mem::replace(conn, Conn::Gone) else {
                        open = false;
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
                            queue.push_back(Next::Tls);
                        }
                        Some(Err(e)) => {
                            tracing::info!(session = ?session.addr, error = %e, "STARTTLS handshake failed");
                            open = false;
                        }
                        None => {
                            tracing::info!(session = ?session.addr, "STARTTLS handshake timed out");
                            open = false;
                        }
                    }
                }
                Action::LoadAccount(user) => match shard.load_account(user).await {
                    Ok(a) => queue.push_back(Next::Account(a)),
                    Err(e) => {
                        tracing::error!(error = %e, "account lookup failed");
                        session.stream_error("internal-server-error", Some("storage unavailable"));
                    }
                },
                Action::CreateAccount { user, account } => match shard.create_account(user, account).await {
                    Ok(created) => queue.push_back(Next::Created(Some(created))),
                    Err(e) => {
                        tracing::error!(error = %e, "account creation failed");
                        queue.push_back(Next::Created(None));
                    }
                },
                Action::SetPassword { user, account } => {
                    let ok = shard.put_account(user, account).await.is_ok();
                    queue.push_back(Next::PasswordSet(ok));
                }
            }
        }
        if !open {
            handle(shard, gauges, session, Input::Closed);
            let rest = session.take_output();
            for a in rest.actions {
                if let Action::Route(env) = a {
                    shard.route(env);
                }
            }
            return false;
        }
        while let Some(n) = queue.pop_front() {
            let input = match n {
                Next::Tls => Input::TlsEstablished,
                Next::Account(a) => Input::Account(a),
                Next::Created(c) => Input::AccountCreated(c),
                Next::PasswordSet(ok) => Input::PasswordSet(ok),
            };
            handle(shard, gauges, session, input);
        }
    }
}
