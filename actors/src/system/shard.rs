//! One shard's share of the actor system, sans-io: the mailboxes of the sessions and placed
//! actors on it, where an envelope goes (this shard, another core, another node), what happens
//! when a mailbox is full (the one backpressure rule), the control messages held for a full
//! mailbox, what becomes of a message for a session that is gone or that cannot be delivered,
//! and when a placed actor is activated and let go. Both hosts — the node's glommio shards and
//! the simulator — drive this same state machine; they move the bytes (the mesh, links,
//! sockets), run the actors' tasks and keep the time.
//!
//! The host calls a method, then takes the effects it produced with [`ShardCore::pop_out`]
//! until none is left, and carries them out in order (an [`Out::Route`] is routed again, as an
//! actor's send that does not wait). The effects of a call come before those still waiting
//! from an earlier one, so an envelope's consequences are carried out before the next
//! envelope's, as if the host had routed them recursively.
//!
//! The backpressure rule, the same for every target, local or not: a sender that may wait (a
//! connection task: its client is not read meanwhile) waits for room — in the target's mailbox
//! here (`Routed::Full`), in the mesh channel or in the link; an actor never waits for another
//! actor's mailbox (two waiting on each other would deadlock): for it a full mailbox bounces a
//! stanza with `resource-constraint` and holds a control message (never dropped), in order,
//! until there is room. An actor may wait for room in the mesh or a link, whose receivers
//! never wait for a mailbox, so no cycle can form.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use jid::BareJid;

use crate::address::{ActorKey, MailboxKey, NodeId, Placement, SessionAddr, ShardId};
use crate::msg::{self, Envelope, SessionMsg, To, UserMsg};
use crate::planted::{self, Bug};
use crate::system::life::{self, Ending, NotStarted};
use crate::system::limits;
use crate::system::queues::{Queue, Slab};

/// A message in a mailbox or on its way to one, with the host's clock reading (µs) when it
/// was first routed: the receiver records how long it travelled (`starling_route_seconds`).
#[derive(Debug)]
pub struct Queued<T> {
    pub at: u64,
    pub msg: T,
}

/// Who routes an envelope: decides whether the sender may wait for room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A connection task: waits for room anywhere.
    Connection,
    /// An actor, a link's reader, the host: never waits for a mailbox.
    Actor,
}

/// What became of an envelope handed to [`ShardCore::route`].
#[derive(Debug)]
pub enum Routed {
    /// Queued, held, answered or bounced here: nothing left for the sender to do.
    Done,
    /// For another shard of this node: the host sends it on the mesh (a sender that may wait
    /// waits for room; one that may not reports a full channel with [`ShardCore::unsent`]) and
    /// the receiving shard calls [`ShardCore::deliver`].
    Mesh { shard: ShardId, env: Queued<Envelope> },
    /// For another node: the host sends it on the link (or reports why not, `unsent`).
    Remote { node: NodeId, env: Envelope },
    /// The target's mailbox is full and the sender is a connection: it waits for room and
    /// routes it again (or, if it cannot wait, hands it to [`ShardCore::overflow`]).
    Full(Envelope),
}

/// Why the host could not send an envelope on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsent {
    /// The mesh channel to the target shard is full and the sender does not wait.
    MeshFull,
    /// The mesh channel is gone (the node is stopping) or there is none.
    MeshClosed,
    /// The link to the target node is full and the sender does not wait.
    LinkFull,
    /// The target node is not a member.
    NotMember,
    /// The link to the target node broke.
    LinkClosed,
}

/// An effect for the host.
#[derive(Debug)]
pub enum Out {
    /// Route this, as an actor's send that does not wait (an error answering a bounce, a
    /// message going back to the bare JID, what an ended actor's sessions are told…).
    Route(Envelope),
    /// A message was queued in this mailbox: the task that drains it has work.
    Wake(MailboxKey),
    /// A placed actor's mailbox was created by its first message: load its state and start
    /// it (for a user: then [`ShardCore::pop_user`] until [`ShardCore::passivate`], or
    /// [`ShardCore::not_started`] / [`ShardCore::end_user`]).
    Activate(ActorKey),
    /// Call [`ShardCore::retry_held`] for this mailbox after `after_ms`.
    RetryHeld { key: MailboxKey, after_ms: u64 },
    /// Route `env` after `after_ms` (a control message that met a full channel, a stanza for
    /// an actor's next incarnation).
    Later { env: Envelope, after_ms: u64 },
    /// A stanza was bounced for lack of room (`why`): for the host's log and metrics (the
    /// error answering it follows as a `Route`).
    Bounced { env: Envelope, why: &'static str },
}

/// The mailboxes of one shard and the rules around them.
/// What a membership change did to a shard's sessions and actors
/// ([`ShardCore::membership_changed`]), for the host's log and counters.
#[derive(Debug, Default, PartialEq)]
pub struct Moved {
    /// Sessions told to register with their user's new actor.
    pub rebound: Vec<u64>,
    /// Sessions closed (this node rejoined).
    pub kicked: Vec<u64>,
    /// User actors here whose key went to another node.
    pub handed_off: usize,
}

pub struct ShardCore {
    node: NodeId,
    shard: ShardId,
    /// The generation this node's process started with: sessions addressed with an older one
    /// belonged to an earlier process (session ids restart with it) and are gone.
    started: u64,
    /// Messages one mailbox holds (`c2s.mailbox`).
    cap: usize,
    sessions: BTreeMap<u64, Queue>,
    /// Sessions from their bind request on: their user, and the node its actor was on then
    /// (a session whose user's actor moves or dies must reconnect).
    bound: BTreeMap<u64, (BareJid, NodeId)>,
    users: BTreeMap<BareJid, Queue>,
    /// The users with a mailbox here whose key the latest membership change placed on
    /// another node: a `UserMsg::Handoff` popped for a user not in it is stale (the key came
    /// back since).
    away: BTreeSet<BareJid>,
    /// Users whose actor must end as stale before its next message ([`ShardCore::take_stale`]).
    stale: BTreeSet<BareJid>,
    /// The messages of every session mailbox here, and of every user mailbox.
    session_mail: Slab<Queued<SessionMsg>>,
    user_mail: Slab<Queued<UserMsg>>,
    /// Control messages waiting for room in a full mailbox, in order; while a mailbox has
    /// some, later envelopes for it queue behind them (or bounce, stanzas from actors), so a
    /// full mailbox never reorders one sender's messages.
    held: BTreeMap<MailboxKey, VecDeque<Queued<Envelope>>>,
    out: VecDeque<Out>,
    /// The effects of the call in progress, put before `out` when it returns.
    fresh: Vec<Out>,
}

impl ShardCore {
    pub fn new(node: NodeId, shard: ShardId, started: u64, mailbox: usize) -> Self {
        ShardCore {
            node,
            shard,
            started,
            cap: mailbox.max(1),
            sessions: BTreeMap::new(),
            bound: BTreeMap::new(),
            users: BTreeMap::new(),
            away: BTreeSet::new(),
            stale: BTreeSet::new(),
            session_mail: Slab::default(),
            user_mail: Slab::default(),
            held: BTreeMap::new(),
            out: VecDeque::new(),
            fresh: Vec::new(),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The next effect to carry out.
    pub fn pop_out(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    fn emit(&mut self, o: Out) {
        self.fresh.push(o);
    }

    /// Puts this call's effects before those left from earlier calls.
    fn done(&mut self) {
        for o in self.fresh.drain(..).rev() {
            self.out.push_front(o);
        }
    }

    // ---- routing ----------------------------------------------------------------------

    /// Sends an envelope wherever its target lives: into a mailbox here, or back to the host
    /// for the mesh or a link. `at` is when it was first routed (the host's clock).
    pub fn route(&mut self, env: Envelope, at: u64, origin: Origin, place: &impl Placement) -> Routed {
        let (node, shard) = match env.to() {
            To::User(j) => place.place_user(j),
            To::Session(a) => (a.node, a.shard),
        };
        let r = if node != self.node {
            Routed::Remote { node, env }
        } else if shard != self.shard {
            Routed::Mesh {
                shard,
                env: Queued { at, msg: env },
            }
        } else {
            self.deliver_here(env, at, origin)
        };
        self.done();
        r
    }

    /// An envelope for this shard (from the mesh, or routed here): into its mailbox.
    /// `Routed::Done`, or `Routed::Full` for a connection.
    pub fn deliver(&mut self, env: Envelope, at: u64, origin: Origin) -> Routed {
        let r = self.deliver_here(env, at, origin);
        self.done();
        r
    }

    /// The sender of an envelope its target's mailbox had no room for will not wait: a
    /// control message is held, a stanza bounces.
    pub fn overflow(&mut self, env: Envelope, at: u64) {
        self.overflow_here(env, at, "mailbox full");
        self.done();
    }

    fn deliver_here(&mut self, env: Envelope, at: u64, origin: Origin) -> Routed {
        if !self.held.is_empty() {
            let key = env.mailbox_key();
            if let Some(q) = self.held.get_mut(&key) {
                // Behind what is held for it: a connection waits there, whatever the kind.
                if origin == Origin::Connection || env.is_control() {
                    q.push_back(Queued { at, msg: env });
                } else {
                    self.bounce(env, "messages for it are held");
                }
                return Routed::Done;
            }
        }
        match env {
            Envelope::Session { to: a, msg: m } => {
                let q = if a.node_gen < self.started {
                    None
                } else {
                    self.sessions.get_mut(&a.id)
                };
                let Some(q) = q else {
                    self.session_gone(a, m);
                    return Routed::Done;
                };
                if q.len() >= self.cap {
                    let env = Envelope::to_session(a, m);
                    if origin == Origin::Connection {
                        return Routed::Full(env);
                    }
                    self.overflow_here(env, at, "session mailbox full");
                    return Routed::Done;
                }
                self.session_mail.push_back(q, Queued { at, msg: m });
                self.emit(Out::Wake(MailboxKey::Session(a.id)));
            }
            Envelope::User { to: j, msg: m } => {
                if !self.users.contains_key(&j) {
                    self.stale.remove(&j);
                    self.emit(Out::Activate(ActorKey::User(j.clone())));
                    self.users.insert(j.clone(), Queue::default());
                }
                let q = self.users.get_mut(&j).expect("inserted");
                if q.len() >= self.cap {
                    let env = Envelope::to_user(j, m);
                    if origin == Origin::Connection {
                        return Routed::Full(env);
                    }
                    self.overflow_here(env, at, "user mailbox full");
                    return Routed::Done;
                }
                self.user_mail.push_back(q, Queued { at, msg: m });
                self.emit(Out::Wake(MailboxKey::Actor(ActorKey::User(j))));
            }
        }
        Routed::Done
    }

    fn overflow_here(&mut self, env: Envelope, at: u64, why: &'static str) {
        if env.is_control() {
            if planted::active(Bug::DropHeld) {
                return;
            }
            return self.hold(Queued { at, msg: env });
        }
        self.bounce(env, why);
    }

    fn bounce(&mut self, env: Envelope, why: &'static str) {
        self.emit(Out::Bounced { env: env.clone(), why });
        self.undeliverable_here(env, "resource-constraint");
    }

    /// Queues behind what is already held for the same mailbox (an `Unbind` overtaking the
    /// session's last `OfflineDelivered`, or its `Bind`, would break the user actor: found by
    /// the simulator).
    fn hold(&mut self, t: Queued<Envelope>) {
        let key = t.msg.mailbox_key();
        if let Some(q) = self.held.get_mut(&key) {
            q.push_back(t);
            return;
        }
        self.held.insert(key.clone(), VecDeque::from([t]));
        self.emit(Out::RetryHeld {
            key,
            after_ms: limits::RETRY_MS,
        });
    }

    /// Moves what is held for `key` into its mailbox while it has room (a mailbox that is
    /// gone counts as room: what is held then goes where a message for it goes); asks to be
    /// called again if some is left.
    pub fn retry_held(&mut self, key: &MailboxKey) {
        while let Some(q) = self.held.get_mut(key) {
            let Some(t) = q.pop_front() else {
                self.held.remove(key);
                break;
            };
            let full = match key {
                MailboxKey::Session(id) => self.sessions.get(id).is_some_and(|q| q.len() >= self.cap),
                MailboxKey::Actor(ActorKey::User(j)) => self.users.get(j).is_some_and(|q| q.len() >= self.cap),
            };
            if full {
                self.held.get_mut(key).expect("present").push_front(t);
                self.emit(Out::RetryHeld {
                    key: key.clone(),
                    after_ms: limits::RETRY_MS,
                });
                break;
            }
            // Delivered as if fresh, with nothing held before it.
            let rest = self.held.remove(key).expect("present");
            self.deliver_here(t.msg, t.at, Origin::Actor);
            if !rest.is_empty() {
                self.held.insert(key.clone(), rest);
            }
        }
        self.done();
    }

    /// The host could not send `env` on: a control message that met a full channel is tried
    /// again shortly, a stanza that did bounces; one whose way is gone is answered.
    pub fn unsent(&mut self, env: Envelope, why: Unsent) {
        match why {
            Unsent::MeshFull | Unsent::LinkFull if env.is_control() => self.emit(Out::Later {
                env,
                after_ms: limits::RETRY_MS,
            }),
            Unsent::MeshFull => self.bounce(env, "shard mesh channel full"),
            Unsent::LinkFull => self.bounce(env, "link to the node full"),
            Unsent::MeshClosed => self.undeliverable_here(env, "internal-server-error"),
            Unsent::NotMember => self.undeliverable_here(env, "remote-server-not-found"),
            Unsent::LinkClosed => self.undeliverable_here(env, "remote-server-timeout"),
        }
        self.done();
    }

    /// A stanza for a session that ended: `msg::session_gone` says what becomes of it.
    fn session_gone(&mut self, addr: SessionAddr, m: SessionMsg) {
        let gone = msg::session_gone(addr, m);
        for env in gone.route {
            self.emit(Out::Route(env));
        }
        if let Some((env, condition)) = gone.bounce {
            self.undeliverable_here(env, condition);
        }
    }

    /// Answers the sender of an undeliverable stanza with an error (`msg::undeliverable`).
    pub fn undeliverable(&mut self, env: Envelope, condition: &str) {
        self.undeliverable_here(env, condition);
        self.done();
    }

    fn undeliverable_here(&mut self, env: Envelope, condition: &str) {
        if let Some(err) = msg::undeliverable(env, condition) {
            self.emit(Out::Route(err));
        }
    }

    // ---- sessions ---------------------------------------------------------------------

    /// A connection accepted here: its session's mailbox (session ids are the host's).
    pub fn open_session(&mut self, id: u64) {
        self.sessions.insert(id, Queue::default());
    }

    /// The session at `addr` (on this shard) ended: what was still queued for it goes where a
    /// message for a vanished session goes.
    pub fn close_session(&mut self, addr: SessionAddr) {
        self.bound.remove(&addr.id);
        if let Some(q) = self.sessions.remove(&addr.id) {
            let left: Vec<_> = self.session_mail.drain(q).collect();
            for t in left {
                self.session_gone(addr, t.msg);
            }
        }
        self.done();
    }

    /// The session `id` asked to bind as `user`, whose actor lives on `owner` now
    /// (recorded from the bind request on: a node that rejoins or a user that moves closes
    /// sessions whose bind is still in flight too — found by the simulator: the bind's answer
    /// was lost with a link, and the actor routed to a session that never learned it was
    /// bound).
    pub fn binding(&mut self, id: u64, user: BareJid, owner: NodeId) {
        if self.sessions.contains_key(&id) {
            self.bound.entry(id).or_insert((user, owner));
        }
    }

    /// Whether the session's bind is recorded.
    pub fn is_binding(&self, id: u64) -> bool {
        self.bound.contains_key(&id)
    }

    /// After a membership change (issue 17: moving an actor never disconnects its clients):
    /// each session here whose user's actor moved to another node or died with one
    /// (`cluster::session_moved`) is told to register with the new incarnation
    /// (`SessionMsg::Rebind`), and each user actor here whose key is placed on another node
    /// now forgets its sessions (`UserMsg::Handoff`) and goes once idle. Only when this node
    /// itself was declared down and came back (`rejoined`) are its sessions closed: the
    /// others unbound them and told their contacts they went. `generation`: this node's
    /// membership generation now; `owner_now` places a user.
    pub fn membership_changed(
        &mut self,
        generation: u64,
        rejoined: bool,
        gone: &[(NodeId, u64)],
        owner_now: impl Fn(&BareJid) -> NodeId,
        at: u64,
    ) -> Moved {
        let mut moved = Moved::default();
        let mut sent = Vec::new();
        for (id, (user, then)) in self.bound.iter_mut() {
            let now = owner_now(user);
            if rejoined {
                moved.kicked.push(*id);
                sent.push((
                    *id,
                    SessionMsg::Kick {
                        condition: "undefined-condition",
                        text: "this server left the cluster and came back; please reconnect".into(),
                    },
                ));
            } else if crate::system::cluster::session_moved(*then, now, gone) {
                *then = now;
                moved.rebound.push(*id);
                sent.push((*id, SessionMsg::Rebind { again: None }));
            }
        }
        for (id, m) in sent {
            let addr = SessionAddr {
                node: self.node,
                node_gen: generation,
                shard: self.shard,
                id,
            };
            // Control messages: held if the mailbox is full, never refused.
            let _ = self.deliver_here(Envelope::to_session(addr, m), at, Origin::Actor);
        }
        let away: Vec<BareJid> = self
            .users
            .keys()
            .filter(|u| owner_now(u) != self.node)
            .cloned()
            .collect();
        self.away = away.iter().cloned().collect();
        for u in away {
            moved.handed_off += 1;
            let _ = self.deliver_here(Envelope::to_user(u, UserMsg::Handoff), at, Origin::Actor);
        }
        self.done();
        moved
    }

    /// Nodes went (`gone`: each with the generation that went): every user actor here
    /// unbinds the sessions they hosted (`UserMsg::NodeDown`).
    pub fn node_down(&mut self, gone: &[(NodeId, u64)], at: u64) {
        let users: Vec<BareJid> = self.users.keys().cloned().collect();
        for u in users {
            for &(node, gen) in gone {
                self.deliver_here(
                    Envelope::to_user(u.clone(), UserMsg::NodeDown { node, gen }),
                    at,
                    Origin::Actor,
                );
            }
        }
        self.done();
    }

    /// A moment after a membership change: every user actor here checks its contacts'
    /// presence (`UserMsg::Resync`; `moved`: the slots whose actors moved, of `slots`).
    pub fn resync(&mut self, moved: &[u32], slots: u32, at: u64) {
        let users: Vec<BareJid> = self.users.keys().cloned().collect();
        for u in users {
            let m = UserMsg::Resync {
                moved: moved.to_vec(),
                slots,
            };
            self.deliver_here(Envelope::to_user(u, m), at, Origin::Actor);
        }
        self.done();
    }

    pub fn pop_session(&mut self, id: u64) -> Option<Queued<SessionMsg>> {
        self.session_mail.pop_front(self.sessions.get_mut(&id)?)
    }

    /// Whether the session has a mailbox here (it is open).
    pub fn has_session(&self, id: u64) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Messages waiting in the session's mailbox.
    pub fn session_queued(&self, id: u64) -> usize {
        self.sessions.get(&id).map_or(0, Queue::len)
    }

    pub fn session_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.sessions.keys().copied()
    }

    /// Every message waiting in a session mailbox.
    pub fn session_mail(&self) -> impl Iterator<Item = &SessionMsg> + '_ {
        self.sessions
            .values()
            .flat_map(|q| self.session_mail.iter(q).map(|t| &t.msg))
    }

    // ---- user actors ------------------------------------------------------------------

    /// The next message for the user's actor. A handoff that a later membership change
    /// undid (the key is placed here again) is not handed to the actor: it may have taken
    /// sessions that registered since, and forgetting them would leave them registered
    /// nowhere — their nodes see no move (found by the simulator: 5 nodes, seed 84, a
    /// handoff held behind a full mailbox for seconds, a contact seen offline for ever). Nor
    /// may the actor go on: while the key was elsewhere another incarnation may have written
    /// its state (3 nodes, `--only partitions`, seed 7: a roster view behind). It ends as
    /// stale instead ([`ShardCore::take_stale`]): its sessions register with the next
    /// incarnation, which loads what is stored. (The handoff is still returned, so that the
    /// host asks at once; `life::stale_again` drops it.)
    pub fn pop_user(&mut self, jid: &BareJid) -> Option<Queued<UserMsg>> {
        let t = self.user_mail.pop_front(self.users.get_mut(jid)?)?;
        if matches!(t.msg, UserMsg::Handoff) && !self.away.contains(jid) {
            tracing::debug!(user = %jid, "a handoff the membership has undone since: the actor ends as stale");
            self.stale.insert(jid.clone());
        }
        Some(t)
    }

    /// Whether the user's actor must end as stale now, before the message just popped
    /// (`life::stale_again` says where that goes): `life::Ending::Stale`. Asked once per
    /// message.
    pub fn take_stale(&mut self, jid: &BareJid) -> bool {
        self.stale.remove(jid)
    }

    /// The messages waiting in the user actor's mailbox.
    pub fn user_mail(&self, jid: &BareJid) -> impl Iterator<Item = &UserMsg> + '_ {
        self.users
            .get(jid)
            .into_iter()
            .flat_map(|q| self.user_mail.iter(q).map(|t| &t.msg))
    }

    /// Messages waiting in the user actor's mailbox.
    pub fn user_queued(&self, jid: &BareJid) -> usize {
        self.users.get(jid).map_or(0, Queue::len)
    }

    /// Whether the user's actor is active here (its mailbox exists).
    pub fn has_user(&self, jid: &BareJid) -> bool {
        self.users.contains_key(jid)
    }

    /// The user actors active here.
    pub fn users(&self) -> impl Iterator<Item = &BareJid> + '_ {
        self.users.keys()
    }

    /// The actor is idle (no sessions): let it go if nothing is queued for it; its durable
    /// state reloads on its next message. `true` when it was let go.
    pub fn passivate(&mut self, jid: &BareJid) -> bool {
        let gone = self.users.get(jid).is_some_and(Queue::is_empty);
        if gone {
            self.users.remove(jid);
        }
        gone
    }

    /// The actor's state could not be loaded: it does not start, and its messages fail
    /// (`life::not_started`).
    pub fn not_started(&mut self, jid: &BareJid) {
        let queued: Vec<_> = self
            .user_mail
            .drain(self.users.remove(jid).unwrap_or_default())
            .collect();
        for t in queued {
            match life::not_started(jid, t.msg) {
                NotStarted::Send(env) => self.emit(Out::Route(env)),
                NotStarted::Bounce(env) => self.undeliverable_here(env, "internal-server-error"),
                NotStarted::Nothing => {}
            }
        }
        self.done();
    }

    /// The actor ended early (`why`) with these sessions: they are closed and the next
    /// incarnation learns they are gone (`life::ended`), what its failed writes asked to send
    /// instead goes (`life::delay_ms`), then what was queued for it, in order, to the next
    /// incarnation.
    pub fn end_user(
        &mut self,
        jid: &BareJid,
        sessions: Vec<(SessionAddr, String)>,
        why: Ending,
        instead: Vec<Envelope>,
    ) {
        let queued: Vec<_> = self
            .user_mail
            .drain(self.users.remove(jid).unwrap_or_default())
            .collect();
        for env in life::ended(jid, sessions, why) {
            self.emit(Out::Route(env));
        }
        for env in instead {
            match life::delay_ms(&env) {
                0 => self.emit(Out::Route(env)),
                ms => self.emit(Out::Later { env, after_ms: ms }),
            }
        }
        for t in queued {
            // A handoff was for the sessions of the incarnation that ended: the next one's
            // register with it themselves.
            if matches!(t.msg, UserMsg::Handoff) {
                continue;
            }
            self.emit(Out::Route(Envelope::to_user(jid.clone(), t.msg)));
        }
        self.done();
    }

    // ---- gauges -----------------------------------------------------------------------

    /// The depth of every user mailbox, then of every session mailbox.
    pub fn depths(&self) -> (impl Iterator<Item = usize> + '_, impl Iterator<Item = usize> + '_) {
        (
            self.users.values().map(Queue::len),
            self.sessions.values().map(Queue::len),
        )
    }

    /// The longest mailbox here and whose it is.
    pub fn deepest(&self) -> Option<(MailboxKey, usize)> {
        let u = self.users.iter().max_by_key(|(_, q)| q.len());
        let s = self.sessions.iter().max_by_key(|(_, q)| q.len());
        let user = |(j, q): (&BareJid, &Queue)| (MailboxKey::user(j), q.len());
        let session = |(id, q): (&u64, &Queue)| (MailboxKey::Session(*id), q.len());
        match (u, s) {
            (Some(u), Some(s)) if u.1.len() >= s.1.len() => Some(user(u)),
            (_, Some(s)) => Some(session(s)),
            (u, None) => u.map(user),
        }
    }
}

#[cfg(test)]
mod tests;
