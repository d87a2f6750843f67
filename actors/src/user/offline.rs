//! Offline storage (XEP-0160) with delayed-delivery stamps (XEP-0203), capped per user.

use starling_storage::{OfflineMessage, Write};

use super::{stored_stanza, xmpp_timestamp, UserActor};
use crate::address::SessionAddr;
use crate::msg::{Envelope, SessionMsg};
use crate::ns;
use crate::planted::{self, Bug};
use crate::xml::Element;

impl UserActor {
    pub(super) fn store_offline(&mut self, st: Element, now: u64) {
        if planted::active(Bug::DropOffline) {
            return;
        }
        if self.offline.len() >= self.cfg.max_offline && !planted::active(Bug::IgnoreOfflineCap) {
            // Never drop silently: the sender learns the message was not kept.
            tracing::info!(user = %self.jid, "offline queue full; bouncing message");
            return self.bounce(
                &st,
                "resource-constraint",
                Some("the recipient's offline queue is full"),
            );
        }
        let msg = OfflineMessage {
            seq: self.next_seq,
            stamp_unix_ms: now,
            xml: st.to_client_xml(),
        };
        self.next_seq += 1;
        self.offline.push_back(msg.clone());
        let failed = self.bounce_env(&st, "internal-server-error", Some("the message could not be stored"));
        self.persist(
            vec![Write::PushOffline {
                user: self.jid.to_string(),
                msg,
            }],
            Vec::new(),
            failed.into_iter().collect(),
        );
    }

    /// Sends the offline queue to a session, followed by [`SessionMsg::OfflineSent`]; the
    /// messages are deleted when the session confirms it wrote them (at-least-once: a crash
    /// before the deletion is durable delivers them again). A moved session does not get
    /// again what an earlier incarnation sent it (sequence numbers are never reused): its
    /// confirmation may still be on its way here, or have been lost with the incarnation it
    /// went to (found by the simulator: 5 nodes, seed 152, a stale actor ended while the
    /// deletion was unapplied, and the next one handed the same message to the same
    /// connected client).
    pub(super) fn deliver_offline(&mut self, addr: SessionAddr, full: &str, _now: u64) {
        if self.offline.is_empty() || self.offline_inflight.is_some() {
            return;
        }
        let had = self
            .sessions
            .iter()
            .find(|s| s.addr == addr)
            .map_or(0, |s| s.offline_had);
        let domain = self.jid.domain().to_string();
        let mut upto = 0;
        let mut unreadable = Vec::new();
        let msgs: Vec<OfflineMessage> = self.offline.iter().filter(|m| m.seq > had).cloned().collect();
        for m in msgs {
            match stored_stanza(&m.xml) {
                Ok(mut el) => {
                    upto = m.seq;
                    el.set_attr("to", full);
                    el.push_child(
                        Element::new("delay", ns::DELAY)
                            .with_attr("from", domain.as_str())
                            .with_attr("stamp", xmpp_timestamp(m.stamp_unix_ms)),
                    );
                    self.send(Envelope::to_session(addr, SessionMsg::Offline(el)));
                }
                Err(e) => {
                    // Never deleted with the messages around it: set aside for the operator
                    // (`starling user unreadable`, the `starling_offline_unreadable` gauge).
                    // Once set aside it is not tried again, so this is logged once.
                    tracing::error!(user = %self.jid, seq = m.seq, error = ?e, "stored offline message does not parse; set aside as unreadable");
                    unreadable.push(m.seq);
                }
            }
        }
        if !unreadable.is_empty() {
            self.offline.retain(|m| !unreadable.contains(&m.seq));
            let user = self.jid.to_string();
            let writes = unreadable
                .into_iter()
                .map(|seq| Write::SetAsideOffline {
                    user: user.clone(),
                    seq,
                })
                .collect();
            // Its failure ends the actor like any failed write; the records stay queued.
            self.persist(writes, Vec::new(), Vec::new());
        }
        if upto == 0 {
            return;
        }
        self.offline_inflight = Some((addr, upto));
        self.send(Envelope::to_session(addr, SessionMsg::OfflineSent { upto }));
    }

    /// The session wrote the offline messages up to `upto`: delete them.
    /// A session of an earlier incarnation (this one never served it: the user's actor moved
    /// or died after sending) counts too: sequence numbers are never reused, so `upto` names
    /// messages that incarnation sent it. Left stored, they would come again on the next
    /// login (found by the simulator after a join moved a user mid-delivery).
    pub(super) fn offline_delivered(&mut self, addr: SessionAddr, upto: u64) {
        let mine = self.offline_inflight == Some((addr, upto));
        let theirs = !self.sessions.iter().any(|s| s.addr == addr);
        let earlier = theirs && upto < self.next_seq;
        if theirs && !mine && !earlier {
            // Numbered beyond what this incarnation gave out: another one, whose writes are
            // not applied here yet, sent them. Deleting them needs that state: the next
            // incarnation does it (found by the simulator: the confirmation was dropped
            // here and the messages came again after a reconnect).
            if !self.held_confirms.contains(&(addr, upto)) {
                self.held_confirms.push((addr, upto));
            }
            return;
        }
        if !mine && !earlier {
            return;
        }
        if mine {
            self.offline_inflight = None;
        }
        self.delete_confirmed(upto);
    }

    /// Deletes the offline messages up to `upto`, which a session wrote to its client.
    pub(super) fn delete_confirmed(&mut self, upto: u64) {
        if !self.offline.iter().any(|m| m.seq <= upto) {
            return;
        }
        if planted::active(Bug::KeepDeliveredOffline) {
            return;
        }
        self.offline.retain(|m| m.seq > upto);
        // Not deleted: they stay stored and come again (at-least-once, as after a crash).
        self.persist(
            vec![Write::DeleteOffline {
                user: self.jid.to_string(),
                upto,
            }],
            Vec::new(),
            Vec::new(),
        );
    }
}
