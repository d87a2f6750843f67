//! `starling cluster leave`: when a node may start leaving, and when a leaving node may stop.
//!
//! Leaving is gossiped (`Membership::start_leaving`); every member then takes the leaver off
//! its ring, so the leaders of the leaver's slots add the ring's new choice and remove the
//! leaver (`consensus`: a leaving voter is removed even below the replication), and the
//! leaver joins no group and drops copies not started yet. Its host (the node's membership
//! driver, the simulator's leave check) looks at the slots its shards host at a steady
//! cadence; once it has hosted none for [`QUIET_LOOKS`] looks in a row — a leader that had not
//! heard of the leave yet could still add it, so one empty look is not enough — it says
//! goodbye to the membership and its process stops, its sessions closing with
//! `system-shutdown` (their clients reconnect to another node). Whatever it acknowledged is by
//! then committed on the groups that no longer include it.

/// Looks in a row that must find no slot hosted before the leaving node stops.
pub const QUIET_LOOKS: u32 = 3;

/// Why a leave was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No other member stays: nobody could take the slots.
    Alone,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Alone => write!(
                f,
                "no other member stays in the cluster to take this node's slots; stop it instead"
            ),
        }
    }
}

/// Whether node `me` may start leaving, given the ring as it sees it (the members up and not
/// leaving): some other member must stay to take its slots.
pub fn may_start(ring: &starling_gossip::Ring, me: &str) -> Result<(), Refused> {
    if !ring.members().iter().any(|m| m != me) {
        Err(Refused::Alone)
    } else {
        Ok(())
    }
}

/// What the host does after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Look again later: slots are still hosted (or were, too recently).
    Wait { hosted: usize, quiet: u32 },
    /// Say goodbye to the membership and stop the process.
    Stop,
}

/// A leave under way on this node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Leave {
    quiet: u32,
}

impl Leave {
    pub fn new() -> Self {
        Self::default()
    }

    /// One look: `hosted` is the number of slots this node's shards host (voter, learner or
    /// a copy waiting for its snapshot).
    pub fn look(&mut self, hosted: usize) -> Step {
        self.quiet = if hosted == 0 { self.quiet + 1 } else { 0 };
        if self.quiet >= QUIET_LOOKS {
            Step::Stop
        } else {
            Step::Wait {
                hosted,
                quiet: self.quiet,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaver_stops_only_after_quiet_looks_in_a_row() {
        let mut l = Leave::new();
        assert_eq!(l.look(5), Step::Wait { hosted: 5, quiet: 0 });
        assert_eq!(l.look(0), Step::Wait { hosted: 0, quiet: 1 });
        assert_eq!(l.look(0), Step::Wait { hosted: 0, quiet: 2 });
        // A leader that had not heard of the leave added it again: start over.
        assert_eq!(l.look(1), Step::Wait { hosted: 1, quiet: 0 });
        for q in 1..QUIET_LOOKS {
            assert_eq!(l.look(0), Step::Wait { hosted: 0, quiet: q });
        }
        assert_eq!(l.look(0), Step::Stop);
    }

    #[test]
    fn a_node_alone_may_not_leave() {
        let ring = |names: &[&str]| starling_gossip::Ring::new(names.iter().map(|n| n.to_string()));
        assert_eq!(may_start(&ring(&["n1"]), "n1"), Err(Refused::Alone));
        // Leaving already: off its own ring, alone all the same.
        assert_eq!(may_start(&ring(&[]), "n1"), Err(Refused::Alone));
        assert!(Refused::Alone.to_string().contains("stop it instead"));
        assert_eq!(may_start(&ring(&["n1", "n2"]), "n1"), Ok(()));
    }
}
