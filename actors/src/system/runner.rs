//! The life of a placed actor between its activation and its end, sans-io: one message at a
//! time, its effects carried out in order, a `Persist` waited for (durable) before the messages
//! that depend on it go, and after a failed write nothing built on it — the actor ends, its
//! memory being ahead of its storage. Both hosts drive a [`Runner`]: they take [`Step`]s and
//! carry them out (route, write, passivate, end), reporting each write's outcome.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

use starling_storage::Write;

use crate::address::SessionAddr;
use crate::msg::Envelope;

/// What an actor asks its host to do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    Send(Envelope),
    /// Make `writes` durable, then send `then` in order. When they cannot be made durable
    /// (a storage or cluster write failure), `failed` is sent instead and the host ends the
    /// actor, whose memory is then ahead of its storage: the sender of a message that could
    /// not be stored gets an error, a roster set an error result, and an inbound
    /// subscription stanza goes again to the actor's next incarnation (the transitions of
    /// RFC 6121 §3 are idempotent) — nothing accepted is dropped silently.
    Persist {
        writes: Vec<Write>,
        then: Vec<Envelope>,
        failed: Vec<Envelope>,
    },
}

/// What every placed actor kind is to the actor system: input plus `now` in, effects out.
pub trait Actor {
    type Msg: std::fmt::Debug;
    /// Handles one message (`now`: ms since the Unix epoch).
    fn handle(&mut self, msg: Self::Msg, now: u64) -> Vec<Effect>;
    /// No session depends on it: it may be let go once its mailbox is empty.
    fn is_idle(&self) -> bool;
    /// The sessions it serves, told when it ends early (`life::ended`).
    fn sessions(&self) -> Vec<(SessionAddr, String)>;
    /// What it kept for a later incarnation (it could not act on it with its state): sent
    /// on when it ends early, with what its failed writes asked to send instead.
    fn leftovers(&mut self) -> Vec<Envelope> {
        Vec::new()
    }
}

/// The host's next move for the actor.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Route this, as an actor's send (it may wait for room in the mesh or a link, never for
    /// a mailbox).
    Send(Envelope),
    /// Make `writes` durable on the actor's stored version `base` (the host adds the
    /// condition, `Write::NextVersion`, and replicates), then call [`Runner::persisted`].
    Persist { writes: Vec<Write>, base: u64 },
    /// A write is in flight: nothing to do until [`Runner::persisted`].
    Waiting,
    /// This turn is over: take the next message. `idle`: no session depends on the actor
    /// (the host then asks its core to passivate it, `ShardCore::passivate`).
    Done { idle: bool },
    /// A write failed, or the actor went stale: end it (`ShardCore::end_user` with `why`)
    /// with these sessions and what its failed writes asked to send instead.
    End {
        sessions: Vec<(SessionAddr, String)>,
        instead: Vec<Envelope>,
        why: crate::system::life::Ending,
    },
}

/// The actor panicked: the host ends it (`life::Ending::Panicked`).
#[derive(Debug, PartialEq, Eq)]
pub struct Panicked;

pub struct Runner<A: Actor> {
    actor: A,
    /// The version of its state in storage: its next batch is written on it.
    version: u64,
    effects: VecDeque<Effect>,
    /// The write in flight: what goes once it is durable, what goes if it fails.
    pending: Option<(Vec<Envelope>, Vec<Envelope>)>,
    /// A write failed: later ones would build on what is not stored.
    doomed: bool,
    /// Doomed only because it went stale ([`stale`](Self::stale)), no write of its failed.
    stale: bool,
    instead: Vec<Envelope>,
}

impl<A: Actor> Runner<A> {
    /// An actor whose state was loaded at `version`.
    pub fn new(actor: A, version: u64) -> Self {
        Runner {
            actor,
            version,
            effects: VecDeque::new(),
            pending: None,
            doomed: false,
            stale: false,
            instead: Vec::new(),
        }
    }

    pub fn actor(&self) -> &A {
        &self.actor
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Its state is older than its storage's (another incarnation's write was applied): it
    /// ends after its turn, as after a failed write, and the next incarnation reloads.
    pub fn stale(&mut self) {
        self.stale = !self.doomed || self.stale;
        self.doomed = true;
    }

    /// Between turns: ready for its next message.
    pub fn ready(&self) -> bool {
        self.effects.is_empty() && self.pending.is_none() && !self.doomed
    }

    /// Starts a turn (only when [`ready`](Self::ready)). A panic in the actor is caught.
    pub fn handle(&mut self, msg: A::Msg, now: u64) -> Result<(), Panicked> {
        let actor = &mut self.actor;
        let fx = catch_unwind(AssertUnwindSafe(|| actor.handle(msg, now))).map_err(|_| Panicked)?;
        // The actor's own buffer, not a copy (`ready` says `effects` is empty).
        self.effects = VecDeque::from(fx);
        Ok(())
    }

    pub fn step(&mut self) -> Step {
        if self.pending.is_some() {
            return Step::Waiting;
        }
        loop {
            match self.effects.pop_front() {
                Some(Effect::Send(env)) => return Step::Send(env),
                Some(Effect::Persist { failed, .. }) if self.doomed => self.instead.extend(failed),
                Some(Effect::Persist { writes, then, failed }) => {
                    self.pending = Some((then, failed));
                    return Step::Persist {
                        writes,
                        base: self.version,
                    };
                }
                None if self.doomed => {
                    self.effects = VecDeque::new();
                    let why = if self.stale {
                        crate::system::life::Ending::Stale
                    } else {
                        crate::system::life::Ending::WriteFailed
                    };
                    let mut instead = std::mem::take(&mut self.instead);
                    instead.extend(self.actor.leftovers());
                    return Step::End {
                        sessions: self.actor.sessions(),
                        instead,
                        why,
                    };
                }
                None => {
                    // The turn's buffer goes with it: an actor lives long, and a burst (a
                    // presence broadcast) must not keep its capacity.
                    self.effects = VecDeque::new();
                    return Step::Done {
                        idle: self.actor.is_idle(),
                    };
                }
            }
        }
    }

    /// The write in flight is durable (`ok`) or failed. Returns what to route now, in order,
    /// before the next step: what depended on it (nothing if it failed).
    pub fn persisted(&mut self, ok: bool) -> Vec<Envelope> {
        let Some((then, failed)) = self.pending.take() else {
            return Vec::new();
        };
        if ok {
            self.version += 1;
            return then;
        }
        self.doomed = true;
        self.stale = false;
        self.instead.extend(failed);
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::UserMsg;
    use jid::BareJid;

    /// An actor that answers every message with the effects it is given.
    struct Scripted(VecDeque<Vec<Effect>>, bool);

    impl Actor for Scripted {
        type Msg = ();
        fn handle(&mut self, _: (), _: u64) -> Vec<Effect> {
            match self.0.pop_front() {
                Some(fx) => fx,
                None => panic!("no more script"),
            }
        }
        fn is_idle(&self) -> bool {
            self.1
        }
        fn sessions(&self) -> Vec<(SessionAddr, String)> {
            vec![(
                SessionAddr {
                    node: 0,
                    node_gen: 0,
                    shard: 0,
                    id: 1,
                },
                "r".into(),
            )]
        }
    }

    fn env(n: u64) -> Envelope {
        let j: BareJid = "a@x".parse().unwrap();
        Envelope::to_user(
            j,
            UserMsg::OfflineDelivered {
                session: SessionAddr {
                    node: 0,
                    node_gen: 0,
                    shard: 0,
                    id: 1,
                },
                upto: n,
            },
        )
    }

    fn write(n: u64) -> Write {
        Write::DeleteOffline {
            user: "a@x".into(),
            upto: n,
        }
    }

    #[test]
    fn effects_in_order_and_a_write_awaited_before_what_depends_on_it() {
        let script = vec![
            Effect::Send(env(1)),
            Effect::Persist {
                writes: vec![write(1)],
                then: vec![env(2), env(3)],
                failed: vec![env(9)],
            },
            Effect::Send(env(4)),
        ];
        let mut r = Runner::new(Scripted(VecDeque::from([script]), true), 5);
        assert!(r.ready());
        r.handle((), 0).unwrap();
        assert!(!r.ready());
        assert_eq!(r.step(), Step::Send(env(1)));
        assert_eq!(
            r.step(),
            Step::Persist {
                writes: vec![write(1)],
                base: 5
            }
        );
        assert_eq!(r.step(), Step::Waiting);
        assert_eq!(r.persisted(true), vec![env(2), env(3)]);
        assert_eq!(r.version(), 6);
        assert_eq!(r.step(), Step::Send(env(4)));
        assert_eq!(r.step(), Step::Done { idle: true });
        assert!(r.ready());
    }

    #[test]
    fn after_a_failed_write_nothing_builds_on_it_and_the_actor_ends() {
        let script = vec![
            Effect::Persist {
                writes: vec![write(1)],
                then: vec![env(2)],
                failed: vec![env(8)],
            },
            Effect::Send(env(3)),
            Effect::Persist {
                writes: vec![write(2)],
                then: vec![env(4)],
                failed: vec![env(9)],
            },
        ];
        let mut r = Runner::new(Scripted(VecDeque::from([script]), false), 0);
        r.handle((), 0).unwrap();
        assert!(matches!(r.step(), Step::Persist { base: 0, .. }));
        assert_eq!(r.persisted(false), Vec::<Envelope>::new());
        assert_eq!(r.version(), 0);
        assert!(!r.ready(), "a doomed actor takes no more messages");
        // Sends that do not depend on the write still go; the later write does not.
        assert_eq!(r.step(), Step::Send(env(3)));
        match r.step() {
            Step::End { sessions, instead, why } => {
                assert_eq!(sessions.len(), 1);
                assert_eq!(instead, vec![env(8), env(9)]);
                assert_eq!(why, crate::system::life::Ending::WriteFailed);
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn a_stale_actor_ends_after_its_turn_as_stale_unless_a_write_failed() {
        let mut r = Runner::new(Scripted(VecDeque::from([vec![Effect::Send(env(1))]]), false), 0);
        r.handle((), 0).unwrap();
        r.stale();
        assert!(!r.ready());
        assert_eq!(r.step(), Step::Send(env(1)));
        assert!(matches!(
            r.step(),
            Step::End {
                why: crate::system::life::Ending::Stale,
                ..
            }
        ));
        let script = vec![Effect::Persist {
            writes: Vec::new(),
            then: vec![env(2)],
            failed: vec![env(3)],
        }];
        let mut r = Runner::new(Scripted(VecDeque::from([script]), false), 0);
        r.handle((), 0).unwrap();
        assert!(matches!(r.step(), Step::Persist { .. }));
        r.stale();
        assert_eq!(r.persisted(false), Vec::<Envelope>::new());
        match r.step() {
            Step::End { instead, why, .. } => {
                assert_eq!(instead, vec![env(3)]);
                assert_eq!(why, crate::system::life::Ending::WriteFailed);
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn a_panic_is_caught() {
        let mut r = Runner::new(Scripted(VecDeque::new(), true), 0);
        assert_eq!(r.handle((), 0), Err(Panicked));
    }
}
