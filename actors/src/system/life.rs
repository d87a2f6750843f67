//! What happens around a user actor's life that is not the actor's own logic: what its
//! mailbox's messages become when it cannot start, what its sessions are told when it ends
//! early, and when what it asked to send instead goes. Both hosts carry these out.

use jid::BareJid;

use crate::address::SessionAddr;
use crate::msg::{Envelope, SessionMsg, UserMsg};

/// Whether an idle actor (no sessions, nothing queued) is let go now rather than kept in
/// memory for `passivate_after_ms` (`actors.passivate_after_ms`): at once when that is 0, or
/// when the membership changed since it started (`born`, `changes`: the host's count of
/// membership changes) — another node may have served its user meanwhile, so its state may
/// be stale. A host keeping it also lets it go at the next membership change.
pub fn passivate_now(passivate_after_ms: u64, born: u64, changes: u64) -> bool {
    passivate_after_ms == 0 || born != changes
}

/// Why an actor ended before its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It panicked.
    Panicked,
    /// A write failed: its memory is ahead of its storage.
    WriteFailed,
    /// Another incarnation's write of its key was applied under it (`consensus::Act::Stale`):
    /// its state is behind. Its sessions register with the next incarnation
    /// (`SessionMsg::Rebind`), which loads what is stored; their clients notice nothing.
    Stale,
}

/// What an actor that ended early sends for each of its sessions, in order: the session is
/// closed (its client reconnects), and the next incarnation learns it is gone — what was
/// queued for the dead one (an unbind among it) may be lost, and contacts would otherwise
/// keep seeing it online (found by the simulator).
pub fn ended(jid: &BareJid, sessions: Vec<(SessionAddr, String)>, why: Ending) -> Vec<Envelope> {
    let text = match why {
        Ending::Panicked => "internal error",
        Ending::WriteFailed => "storage failure",
        Ending::Stale => {
            return sessions
                .into_iter()
                .map(|(s, _)| Envelope::to_session(s, SessionMsg::Rebind { again: None }))
                .collect()
        }
    };
    let mut out = Vec::with_capacity(sessions.len() * 2);
    for (session, resource) in sessions {
        out.push(Envelope::to_session(
            session,
            SessionMsg::Kick {
                condition: "internal-server-error",
                text: text.into(),
            },
        ));
        out.push(Envelope::to_user(jid.clone(), UserMsg::Unbind { session, resource }));
    }
    out
}

/// What the message just popped becomes when the actor ends as stale before handling it
/// (`Ending::Stale`): it goes to the next incarnation — but a handoff, which was for the
/// ended one's sessions, goes nowhere.
pub fn stale_again(jid: &BareJid, popped: UserMsg) -> Vec<Envelope> {
    match popped {
        UserMsg::Handoff => Vec::new(),
        m => vec![Envelope::to_user(jid.clone(), m)],
    }
}

/// What a message for an actor that cannot start (its state cannot be read) becomes.
#[derive(Debug, PartialEq)]
pub enum NotStarted {
    /// Route this (a bind's failure to its session).
    Send(Envelope),
    /// Answer the stanza's sender with `internal-server-error` (`msg::undeliverable`).
    Bounce(Envelope),
    Nothing,
}

pub fn not_started(jid: &BareJid, m: UserMsg) -> NotStarted {
    match m {
        UserMsg::Bind { session, .. } => NotStarted::Send(Envelope::to_session(
            session,
            SessionMsg::BindFailed {
                condition: "internal-server-error",
            },
        )),
        UserMsg::Inbound { stanza } | UserMsg::Outbound { stanza, .. } | UserMsg::Again { stanza, .. } => {
            NotStarted::Bounce(Envelope::to_user(jid.clone(), UserMsg::Inbound { stanza }))
        }
        // The moved session cannot be served: it closes, and its client tries again.
        UserMsg::Rebind { session, .. } => NotStarted::Send(Envelope::to_session(
            session,
            SessionMsg::Kick {
                condition: "internal-server-error",
                text: "the account's state cannot be read".into(),
            },
        )),
        // The confirmation would be lost, and the messages come again: the session is asked
        // to register again, naming what it confirmed, and so tries another activation.
        UserMsg::OfflineDelivered { session, .. } => {
            NotStarted::Send(Envelope::to_session(session, SessionMsg::Rebind { again: None }))
        }
        UserMsg::Unbind { .. } | UserMsg::NodeDown { .. } | UserMsg::Resync { .. } | UserMsg::Handoff => {
            NotStarted::Nothing
        }
    }
}

/// How long to wait before routing `env`, one of an ended actor's `instead` envelopes: a
/// stanza for the next incarnation after failed writes waits `tries` ×
/// [`AGAIN_AFTER_MS`](super::limits::AGAIN_AFTER_MS) (the condition that failed the write —
/// views that disagree during a join or heal — usually passes within it); the rest go at once.
pub fn delay_ms(env: &Envelope) -> u64 {
    match env {
        Envelope::User {
            msg: UserMsg::Again { tries, .. },
            ..
        } => super::limits::AGAIN_AFTER_MS * u64::from(*tries),
        _ => 0,
    }
}
