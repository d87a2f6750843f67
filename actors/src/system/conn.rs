//! A connection's effect loop, sans-io, for both hosts: what a c2s session asked for is
//! carried out in order — its bytes written before its later actions, one storage request at a
//! time with no input taken meanwhile, the answer fed back at once — and when the connection
//! ends, the session is told and what it still had to route goes (its unbind). The host moves
//! the bytes (socket, TLS) and carries out the [`ConnStep`]s.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

use starling_storage::Account;

use crate::c2s::{Action, C2sSession, Ctx, Input};
use crate::msg::Envelope;
use crate::system::runner::Panicked;

/// The host's next move for the connection.
#[derive(Debug, PartialEq)]
pub enum ConnStep {
    /// Write these bytes to the client (a failure: [`Conn::broken`]).
    Write(Vec<u8>),
    /// Route this as a connection's send: the host waits for room (`Origin::Connection`);
    /// if it cannot route it now, it gives it back with [`Conn::unroute`].
    Route(Envelope),
    /// Upgrade the socket to TLS, then [`Conn::input`] `TlsEstablished` (or `broken`).
    StartTls,
    /// Look the account up, then [`Conn::account`] (or [`Conn::storage_failed`]).
    LoadAccount(String),
    /// Create the account if absent, then `Input::AccountCreated`.
    CreateAccount { user: String, account: Account },
    /// Store the new password, then `Input::PasswordSet`.
    SetPassword { user: String, account: Account },
    /// The connection ends: write `bytes` if the socket still takes them, close it, route
    /// `routes` as an actor's sends (they must not wait: this connection reads no more), and
    /// close the session's mailbox (`ShardCore::close_session`).
    Close { bytes: Vec<u8>, routes: Vec<Envelope> },
    /// Nothing to do until the next input.
    Idle,
}

pub struct Conn {
    session: C2sSession,
    bytes: Vec<u8>,
    actions: VecDeque<Action>,
    /// A storage request or TLS handshake is in flight: no input until its answer.
    waiting: bool,
    /// The socket broke, or the session asked to close.
    closing: bool,
    closed: bool,
}

impl Conn {
    pub fn new(session: C2sSession) -> Self {
        Conn {
            session,
            bytes: Vec::new(),
            actions: VecDeque::new(),
            waiting: false,
            closing: false,
            closed: false,
        }
    }

    pub fn session(&self) -> &C2sSession {
        &self.session
    }

    /// Whether it takes input now (no answer awaited, not ended).
    pub fn ready(&self) -> bool {
        !self.waiting && !self.closed
    }

    /// Whether something is left to carry out before the next input.
    pub fn has_work(&self) -> bool {
        !self.bytes.is_empty() || !self.actions.is_empty() || self.closing
    }

    /// Whether the connection has ended (`ConnStep::Close` was handed out).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Feeds an input to the session. A panic in it is caught: the session ends with
    /// `internal-server-error`, and `Err` tells the host.
    pub fn input(&mut self, input: Input<'_>, now: u64, ctx: &mut Ctx<'_>) -> Result<(), Panicked> {
        if self.closed {
            return Ok(());
        }
        let s = &mut self.session;
        let r = catch_unwind(AssertUnwindSafe(|| s.handle(input, now, ctx)));
        if r.is_err() {
            self.session.stream_error("internal-server-error", None);
        }
        self.take_output();
        r.map_err(|_| Panicked)
    }

    /// Ends the session with a stream error of the host's (a failed account lookup).
    pub fn storage_failed(&mut self, condition: &str, text: &str) {
        self.waiting = false;
        self.session.stream_error(condition, Some(text));
        self.take_output();
    }

    /// The answer to `LoadAccount`.
    pub fn account(&mut self, a: Option<Account>, now: u64, ctx: &mut Ctx<'_>) -> Result<(), Panicked> {
        self.waiting = false;
        self.input(Input::Account(a), now, ctx)
    }

    /// The answer to `CreateAccount`, `SetPassword` or `StartTls`.
    pub fn answered(&mut self, input: Input<'_>, now: u64, ctx: &mut Ctx<'_>) -> Result<(), Panicked> {
        self.waiting = false;
        self.input(input, now, ctx)
    }

    /// The socket broke (a write failed or timed out, a TLS handshake failed).
    pub fn broken(&mut self) {
        self.waiting = false;
        self.closing = true;
    }

    /// A `Route` the host could not carry out now (a full mailbox): it comes again first.
    pub fn unroute(&mut self, env: Envelope) {
        self.actions.push_front(Action::Route(env));
    }

    /// What the session wrote, to write now (the simulator writes at once on input).
    pub fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    fn take_output(&mut self) {
        let out = self.session.take_output();
        self.bytes.extend(out.bytes);
        self.actions.extend(out.actions);
    }

    /// The next move (`now` and `ctx` for the session's close, if this is it).
    pub fn step(&mut self, now: u64, ctx: &mut Ctx<'_>) -> ConnStep {
        if self.closed || self.waiting {
            return ConnStep::Idle;
        }
        if self.closing {
            return self.close(now, ctx);
        }
        if !self.bytes.is_empty() {
            return ConnStep::Write(self.take_bytes());
        }
        let Some(a) = self.actions.pop_front() else {
            if self.session.is_closed() {
                return self.close(now, ctx);
            }
            return ConnStep::Idle;
        };
        match a {
            Action::Route(env) => ConnStep::Route(env),
            Action::Close => self.close(now, ctx),
            Action::StartTls => {
                self.waiting = true;
                ConnStep::StartTls
            }
            Action::LoadAccount(user) => {
                self.waiting = true;
                ConnStep::LoadAccount(user)
            }
            Action::CreateAccount { user, account } => {
                self.waiting = true;
                ConnStep::CreateAccount { user, account }
            }
            Action::SetPassword { user, account } => {
                self.waiting = true;
                ConnStep::SetPassword { user, account }
            }
        }
    }

    /// The session learns the connection is gone; what it still had to route goes (in
    /// order: what was queued, then what closing it produced).
    fn close(&mut self, now: u64, ctx: &mut Ctx<'_>) -> ConnStep {
        // A panic here changes nothing more: the session is gone either way.
        let _ = self.input(Input::Closed, now, ctx);
        self.closed = true;
        let routes = std::mem::take(&mut self.actions)
            .into_iter()
            .filter_map(|a| match a {
                Action::Route(env) => Some(env),
                _ => None,
            })
            .collect();
        ConnStep::Close {
            bytes: self.take_bytes(),
            routes,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand_core::SeedableRng;

    use super::*;
    use crate::address::SessionAddr;
    use crate::throttle::AuthThrottle;

    const HEADER: &str = "<stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

    fn conn(require_tls: bool) -> Conn {
        let cfg = crate::c2s::tests::cfg(require_tls);
        let addr = SessionAddr {
            node: 0,
            node_gen: 0,
            shard: 0,
            id: 1,
        };
        Conn::new(C2sSession::new(
            addr,
            cfg,
            1,
            false,
            rand_chacha::ChaCha20Rng::seed_from_u64(1),
        ))
    }

    fn step(c: &mut Conn, t: &mut AuthThrottle) -> ConnStep {
        c.step(0, &mut Ctx { throttle: t })
    }

    #[test]
    fn bytes_go_before_later_actions_and_a_handshake_is_waited_for() {
        let mut t = AuthThrottle::new(5, 60_000, 100);
        let mut c = conn(true);
        c.input(Input::Bytes(HEADER.as_bytes()), 0, &mut Ctx { throttle: &mut t })
            .unwrap();
        assert!(matches!(step(&mut c, &mut t), ConnStep::Write(b) if String::from_utf8_lossy(&b).contains("starttls")));
        assert_eq!(step(&mut c, &mut t), ConnStep::Idle);
        let starttls = "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>";
        c.input(Input::Bytes(starttls.as_bytes()), 0, &mut Ctx { throttle: &mut t })
            .unwrap();
        assert!(matches!(step(&mut c, &mut t), ConnStep::Write(b) if String::from_utf8_lossy(&b).contains("proceed")));
        assert_eq!(step(&mut c, &mut t), ConnStep::StartTls);
        assert!(!c.ready(), "no input while the handshake runs");
        assert_eq!(step(&mut c, &mut t), ConnStep::Idle);
        c.answered(Input::TlsEstablished, 0, &mut Ctx { throttle: &mut t })
            .unwrap();
        assert!(c.ready());
    }

    #[test]
    fn a_broken_socket_ends_the_session_once() {
        let mut t = AuthThrottle::new(5, 60_000, 100);
        let mut c = conn(false);
        c.input(Input::Bytes(HEADER.as_bytes()), 0, &mut Ctx { throttle: &mut t })
            .unwrap();
        c.broken();
        assert!(matches!(step(&mut c, &mut t), ConnStep::Close { .. }));
        assert!(c.is_closed() && !c.ready());
        assert_eq!(step(&mut c, &mut t), ConnStep::Idle);
        // A stream error from the host closes it too, after its bytes.
        let mut c = conn(false);
        c.input(Input::Bytes(HEADER.as_bytes()), 0, &mut Ctx { throttle: &mut t })
            .unwrap();
        let _ = step(&mut c, &mut t);
        c.storage_failed("internal-server-error", "storage unavailable");
        assert!(
            matches!(step(&mut c, &mut t), ConnStep::Write(b) if String::from_utf8_lossy(&b).contains("internal-server-error"))
        );
        assert!(matches!(step(&mut c, &mut t), ConnStep::Close { .. }));
    }
}
