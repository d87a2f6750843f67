//! The invariants (issue 4), checked while the simulation runs and at quiescence:
//! 1. no stanza the server accepted is lost or handed over twice: it reaches a session, or is
//!    in offline storage, or its sender gets an error;
//! 2. a client is told "stored" only for writes that survive a crash;
//! 3. presence and rosters converge: after quiescence every online contact's view is right;
//! 4. every mailbox and queue stays within its bound;
//! 5. membership and placement converge after faults heal (with the cluster; N = 1 today).
//!
//! What cannot be promised without stream management (XEP-0198) is excused precisely: a
//! stanza in flight inside a node when it crashes (accepted, not yet handed over or durably
//! stored) is lost with it, and an offline message handed to a session whose deletion was not
//! yet durable at a crash comes again after it. A stanza written to a connection that is cut
//! is "handed over": the server cannot know whether the client read it.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: u8,
    pub at_ms: u64,
    pub what: String,
}

pub fn invariant_name(i: u8) -> &'static str {
    match i {
        1 => "no accepted stanza lost or delivered twice",
        2 => "told stored only when it survives a crash",
        3 => "presence and rosters converge",
        4 => "queues within their bounds",
        5 => "membership and placement converge",
        _ => "simulator",
    }
}

#[derive(Debug, Default)]
pub struct MsgRec {
    pub from: String,
    pub to: String,
    pub accepted_ms: u64,
    pub handed: u32,
    pub stored_durable: bool,
    pub errored: bool,
    pub lost_in_crash: bool,
    /// It may be handed over once more: it was still in durable offline storage at a crash
    /// after it had been handed over.
    pub redelivery_allowed: u32,
    /// The nodes it passed through (bit per node): a crash of one of them may have lost it.
    pub touched: u64,
    /// Replicated deletions of it from offline storage not yet acknowledged (cluster): until
    /// one is, a node that takes the user over may hand it again from a copy that has it.
    pub deletes_pending: u32,
    /// A replicated deletion of it from offline storage was acknowledged.
    pub deleted: bool,
}

#[derive(Default)]
pub struct Messages {
    pub recs: BTreeMap<String, MsgRec>,
}

impl Messages {
    pub fn accepted(&mut self, id: &str, from: &str, to: &str, now_ms: u64) -> Option<Violation> {
        if self.recs.contains_key(id) {
            return Some(Violation {
                invariant: 1,
                at_ms: now_ms,
                what: format!("message {id} accepted twice from the client's stream"),
            });
        }
        self.recs.insert(
            id.to_string(),
            MsgRec {
                from: from.to_string(),
                to: to.to_string(),
                accepted_ms: now_ms,
                ..Default::default()
            },
        );
        None
    }

    /// A bound session of the recipient was handed the message (it writes it to its client).
    pub fn handed(&mut self, id: &str, to_user: &str, now_ms: u64) -> Result<bool, Violation> {
        let Some(r) = self.recs.get_mut(id) else {
            return Err(Violation {
                invariant: 1,
                at_ms: now_ms,
                what: format!("message {id} handed to {to_user} but never accepted"),
            });
        };
        if r.to != to_user {
            return Err(Violation {
                invariant: 1,
                at_ms: now_ms,
                what: format!("message {id} for {} handed to {to_user}", r.to),
            });
        }
        let excused = r.handed > 0 && (r.redelivery_allowed > 0 || r.deletes_pending > 0);
        if r.handed > 0 && !excused {
            return Err(Violation {
                invariant: 1,
                at_ms: now_ms,
                what: format!(
                    "message {id} from {} to {} handed over twice (accepted at {} ms) with no crash to excuse it (its deletion {})",
                    r.from,
                    r.to,
                    r.accepted_ms,
                    if r.deleted { "was acknowledged" } else { "was never acknowledged" }
                ),
            });
        }
        if excused && r.deletes_pending == 0 {
            r.redelivery_allowed -= 1;
        }
        r.handed += 1;
        Ok(excused)
    }

    /// It was routed on `node`.
    pub fn touch(&mut self, id: &str, node: u32) {
        if let Some(r) = self.recs.get_mut(id) {
            r.touched |= 1 << node.min(63);
        }
    }

    /// It was in a frame on a node-to-node link that closed before it arrived (the node
    /// counts it in `starling_cluster_envelopes_lost_total`). Returns whether that is news.
    pub fn lost(&mut self, id: &str) -> bool {
        match self.recs.get_mut(id) {
            Some(r) if r.handed == 0 && !r.stored_durable && !r.errored && !r.lost_in_crash => {
                r.lost_in_crash = true;
                true
            }
            _ => false,
        }
    }

    pub fn errored(&mut self, id: &str) {
        if let Some(r) = self.recs.get_mut(id) {
            r.errored = true;
        }
    }

    pub fn stored_durably(&mut self, id: &str) {
        if let Some(r) = self.recs.get_mut(id) {
            r.stored_durable = true;
        }
    }

    /// A node crashed: what was in flight in it is gone (excused); messages already handed
    /// over (or on their way to a session: their confirmation will not reach the actor) but
    /// still in durable offline storage (`still_stored`) may come once more. Returns how
    /// many were lost.
    pub fn crashed(
        &mut self,
        in_node: impl Fn(&MsgRec) -> bool,
        still_stored: &[String],
        to_sessions: &[String],
    ) -> u64 {
        let mut lost = 0;
        for r in self.recs.values_mut() {
            if r.handed == 0 && !r.stored_durable && !r.errored && !r.lost_in_crash && in_node(r) {
                r.lost_in_crash = true;
                lost += 1;
            }
        }
        for id in still_stored {
            if let Some(r) = self.recs.get_mut(id) {
                if r.handed > 0 || to_sessions.contains(id) {
                    r.redelivery_allowed += 1;
                }
            }
        }
        lost
    }

    /// A replicated deletion of these from offline storage started (`+1`) or ended (`-1`).
    pub fn deletes_pending(&mut self, ids: &[String], started: bool) {
        for id in ids {
            if let Some(r) = self.recs.get_mut(id) {
                r.deletes_pending = if started {
                    r.deletes_pending + 1
                } else {
                    r.deletes_pending.saturating_sub(1)
                };
            }
        }
    }

    /// A replicated deletion of these was acknowledged.
    pub fn deleted(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(r) = self.recs.get_mut(id) {
                r.deleted = true;
            }
        }
    }

    /// These were confirmed by a session the server closed for a membership change before
    /// their deletion was acknowledged: the user's next actor, elsewhere, may read them from
    /// a copy that still has them and hand them to the reconnected client once more
    /// (at-least-once, as after a crash). Those whose deletion was acknowledged are not
    /// excused: a stale copy bringing them back is a defect.
    pub fn allow_redelivery_undeleted(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(r) = self.recs.get_mut(id) {
                if !r.deleted {
                    r.redelivery_allowed += 1;
                }
            }
        }
    }

    /// These were written by a session that ended before confirming them: they are still
    /// stored and may come once more.
    pub fn allow_redelivery(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(r) = self.recs.get_mut(id) {
                r.redelivery_allowed += 1;
            }
        }
    }

    /// At quiescence: every accepted message has a fate. `stored(user)` lists the message ids
    /// in the user's offline storage now.
    pub fn check_fates(&self, stored: impl Fn(&str) -> Vec<String>, now_ms: u64) -> Option<Violation> {
        let mut by_user: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (id, r) in &self.recs {
            if r.handed > 0 || r.errored || r.lost_in_crash {
                continue;
            }
            let ids = by_user.entry(r.to.as_str()).or_insert_with(|| stored(&r.to));
            if ids.iter().any(|s| s == id) {
                continue;
            }
            let why = if r.stored_durable {
                "it was stored durably, then vanished from offline storage without being handed over"
            } else {
                "it was neither handed to a session, nor stored offline, nor answered with an error"
            };
            return Some(Violation {
                invariant: 1,
                at_ms: now_ms,
                what: format!(
                    "message {id} from {} to {} (accepted at {} ms) is lost: {why}",
                    r.from, r.to, r.accepted_ms
                ),
            });
        }
        None
    }
}

/// The id attribute of a serialised stanza (offline storage keeps XML).
pub fn xml_id(xml: &str) -> Option<String> {
    for q in ['\'', '"'] {
        let pat = format!(" id={q}");
        if let Some(i) = xml.find(&pat) {
            let rest = &xml[i + pat.len()..];
            return rest.find(q).map(|j| rest[..j].to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_is_caught_unless_a_crash_excuses_it() {
        let mut m = Messages::default();
        assert!(m.accepted("m1", "a", "b", 0).is_none());
        assert_eq!(m.handed("m1", "b", 1), Ok(false));
        assert_eq!(m.handed("m1", "b", 2).unwrap_err().invariant, 1);
        m.crashed(|_| true, &["m1".to_string()], &[]);
        assert_eq!(m.handed("m1", "b", 3), Ok(true));
        assert!(m.handed("m1", "b", 4).is_err());
        // Stored and not yet handed at a crash: it may come once, not twice…
        assert!(m.accepted("m2", "a", "b", 0).is_none());
        m.crashed(|_| false, &["m2".to_string()], &[]);
        assert_eq!(m.handed("m2", "b", 5), Ok(false));
        assert!(m.handed("m2", "b", 6).is_err());
        // …unless it was on its way to a session then: the session's confirmation goes to
        // an actor that died, so the next one hands it again.
        assert!(m.accepted("m3", "a", "b", 0).is_none());
        m.crashed(|_| false, &["m3".to_string()], &["m3".to_string()]);
        assert_eq!(m.handed("m3", "b", 7), Ok(false));
        assert_eq!(m.handed("m3", "b", 8), Ok(true));
        assert!(m.handed("m3", "b", 9).is_err());
    }

    #[test]
    fn fates_lost_stored_errored_and_crash() {
        let mut m = Messages::default();
        for id in ["m1", "m2", "m3", "m4"] {
            m.accepted(id, "a", "b", 0);
        }
        m.errored("m1");
        m.stored_durably("m2");
        let stored = |_: &str| vec!["m2".to_string()];
        let v = m.check_fates(stored, 9).expect("m3 and m4 have no fate");
        assert!(v.what.contains("m3"), "{v:?}");
        assert_eq!(m.crashed(|_| true, &[], &[]), 2);
        assert!(m.check_fates(stored, 9).is_none());
        assert_eq!(xml_id("<message to='b' id='m7' type='chat'/>").as_deref(), Some("m7"));
    }
}
