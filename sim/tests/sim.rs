//! The simulator's own guarantees: determinism, a clean sweep with every invariant checked,
//! and oracles that catch each planted bug.

use sim::{run, Bug, Config};

fn quiet() -> Config {
    Config {
        keep_events: 0,
        ..Config::default()
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let cfg = quiet();
    for seed in [3, 41, 977] {
        let a = run(seed, &cfg);
        let b = run(seed, &cfg);
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} did not replay");
        assert_eq!(a.events, b.events);
        assert_eq!(a.violation, b.violation);
        assert_eq!(format!("{:?}", a.stats), format!("{:?}", b.stats));
    }
    assert_ne!(run(1, &cfg).trace_hash, run(2, &cfg).trace_hash);
}

/// CI's sweep: 200 seeds, each with faults drawn from it, every invariant checked. The
/// totals show that the sweep exercised what it claims to.
#[test]
fn a_sweep_of_200_seeds_holds_every_invariant() {
    let cfg = quiet();
    let mut failed = Vec::new();
    let (mut logins, mut accepted, mut offline, mut errored) = (0, 0, 0, 0);
    let (mut cuts, mut node_crashes, mut shard_crashes, mut bounces, mut lost, mut dups) = (0, 0, 0, 0, 0, 0);
    for seed in 0..200 {
        let out = run(seed, &cfg);
        if out.violation.is_some() {
            failed.push(out.report());
        }
        let s = &out.stats;
        logins += s.logins;
        accepted += s.messages_accepted;
        offline += s.messages_stored_offline;
        errored += s.messages_errored;
        cuts += s.connections_cut;
        node_crashes += s.node_crashes;
        shard_crashes += s.shard_crashes;
        bounces += s.bounces;
        lost += s.messages_lost_in_crash;
        dups += s.duplicates_excused;
    }
    println!(
        "200 seeds: logins {logins} accepted {accepted} offline {offline} errored {errored} cuts {cuts} \
         node-crashes {node_crashes} shard-crashes {shard_crashes} bounces {bounces} lost-in-crash {lost} dup-excused {dups}"
    );
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    for (what, n) in [
        ("logins", logins),
        ("accepted messages", accepted),
        ("offline messages", offline),
        ("error answers", errored),
        ("connection cuts", cuts),
        ("node crashes", node_crashes),
        ("shard crashes", shard_crashes),
        ("bounces", bounces),
        ("redeliveries after a crash", dups),
    ] {
        assert!(n > 0, "the sweep never produced {what}");
    }
}

/// CI's three-node sweep: the real membership (foca over simulated UDP), routing by each
/// node's ring, node-to-node links with the node's wire codec, remote account reads,
/// replicated writes, handoffs and read repair, with every single-node fault (cuts, storms,
/// shard crashes, slow storage, small mailboxes) but none of the cluster's own faults (node
/// crashes, joins, gossip loss and partitions: swept one at a time in
/// `every_invariant_holds_under_each_cluster_fault`). Membership must converge (invariant 5)
/// and every other invariant hold.
#[test]
fn a_three_node_sweep_holds_every_invariant() {
    let cfg = Config {
        nodes: 3,
        cluster_faults: Some(Vec::new()),
        ..quiet()
    };
    let mut failed = Vec::new();
    let (mut handed, mut snapshots, mut shard_crashes, mut cuts) = (0, 0, 0, 0);
    for seed in 0..100 {
        let out = run(seed, &cfg);
        if out.violation.is_some() {
            failed.push(out.report());
        }
        handed += out.stats.messages_handed;
        snapshots += out.stats.snapshots;
        shard_crashes += out.stats.shard_crashes;
        cuts += out.stats.connections_cut;
    }
    println!("100 seeds, 3 nodes: handed {handed} snapshots {snapshots} shard-crashes {shard_crashes} cuts {cuts}");
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    for (what, n) in [
        ("handed messages", handed),
        ("raft snapshots (the two nodes that join the first)", snapshots),
        ("shard crashes", shard_crashes),
        ("connection cuts", cuts),
    ] {
        assert!(n > 0, "the sweep never produced {what}");
    }
    // Replays exactly, membership included.
    let (a, b) = (run(7, &cfg), run(7, &cfg));
    assert_eq!(a.trace_hash, b.trace_hash);
}

/// CI's sweep of the cluster's own faults: for each of node crashes and restarts, a late
/// join, partitions and lost or duplicated gossip, 50 seeds with that fault drawn (on top
/// of every single-node fault), and every invariant asserted: no accepted message lost or
/// handed twice, "stored" only when it survives, presence and rosters converged, queues in
/// their bounds, membership converged. Each fault must also happen in the sweep.
///
/// Known open, listed so that the rest is asserted: such a seed must still fail (a change
/// that makes it pass, by a fix or by moving the trace, must take it off the list).
/// Partitions 1, listed before (a roster told stored then missing after three rejoins, the
/// stale-actor gap), passes since the replicated state moved to Raft (`system::consensus`);
/// loss 49 (stale presence) since sessions register with a moved actor (`UserMsg::Rebind`).
const KNOWN_OPEN: &[(&str, u64, &str)] = &[];

/// An offline message whose confirmation waited behind its actor, stuck for seconds on a
/// slot without a quorum, came again after the client reconnected elsewhere (invariant 1:
/// offline delivery is at-least-once, but the oracle excuses only confirmations the server
/// itself cut off).
const CONFIRM_STUCK: &str = "offline message confirmed behind a stuck actor came again (invariant 1)";

/// Runs with every cluster fault at once that must still fail (as `KNOWN_OPEN`).
const KNOWN_OPEN_ALL: &[(u32, u64, &str)] = &[(5, 7, CONFIRM_STUCK)];

#[test]
fn every_invariant_holds_under_each_cluster_fault() {
    for only in ["crashes", "joins", "partitions", "loss", "leaves"] {
        let cfg = Config {
            nodes: 3,
            cluster_faults: Some(vec![only.to_string()]),
            ..quiet()
        };
        let mut failed = Vec::new();
        let mut happened = 0;
        for seed in 0..50u64 {
            let out = run(seed, &cfg);
            let known = KNOWN_OPEN.iter().find(|(o, s, _)| *o == only && *s == seed);
            match (&out.violation, known) {
                (Some(_), None) => failed.push(out.report()),
                (Some(_), Some((_, _, what))) => println!("{only} {seed}: known open: {what}"),
                (None, Some((_, _, what))) => {
                    panic!("{only} {seed} passes now ({what}): take it off KNOWN_OPEN")
                }
                (None, None) => {}
            }
            let s = &out.stats;
            happened += match only {
                "crashes" => s.node_crashes,
                "joins" => s.node_joins,
                "partitions" => s.partitions,
                // A leave counts once it finished: the node stopped after its slots moved.
                "leaves" => s.leaves_done,
                _ => s.datagrams_lost,
            };
        }
        assert!(
            failed.is_empty(),
            "{only}: {} of 50 seeds failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        assert!(happened > 0, "no {only} in 50 seeds");
    }
}

/// The Raft issue's bar, in CI: every cluster fault together in each run (node crashes and
/// restarts, partitions, lost and duplicated gossip, a late join, a leave, on top of every
/// single-node fault) at three and five nodes, and every invariant asserted — as many seeds
/// as fit in CI's time (sim/README.md has the long sweeps). Each fault must happen, and the
/// groups must have moved: snapshots sent and configurations changed.
#[test]
fn every_invariant_holds_with_every_cluster_fault_at_three_and_five_nodes() {
    for (nodes, seeds) in [(3u32, 0..150u64), (5, 0..60)] {
        let cfg = Config { nodes, ..quiet() };
        let mut failed = Vec::new();
        let mut seen = [0u64; 7];
        for seed in seeds.clone() {
            let out = run(seed, &cfg);
            let known = KNOWN_OPEN_ALL.iter().find(|(n, s, _)| *n == nodes && *s == seed);
            match (&out.violation, known) {
                (Some(_), None) => failed.push(out.report()),
                (Some(_), Some((_, _, what))) => println!("{nodes} nodes, seed {seed}: known open: {what}"),
                (None, Some((_, _, what))) => {
                    panic!("{nodes} nodes, seed {seed} passes now ({what}): take it off KNOWN_OPEN_ALL")
                }
                (None, None) => {}
            }
            let s = &out.stats;
            for (i, n) in [
                s.node_crashes,
                s.node_joins,
                s.partitions,
                s.datagrams_lost,
                s.snapshots,
                s.conf_changes,
                s.leaves_done,
            ]
            .into_iter()
            .enumerate()
            {
                seen[i] += n;
            }
        }
        println!("{nodes} nodes, seeds {seeds:?}: crashes, joins, partitions, datagrams lost, snapshots, conf changes, leaves: {seen:?}");
        assert!(
            failed.is_empty(),
            "{nodes} nodes: {} of {} seeds failed:\n{}",
            failed.len(),
            seeds.count(),
            failed.join("\n")
        );
        assert!(
            seen.iter().all(|n| *n > 0),
            "{nodes} nodes: something never happened: {seen:?}"
        );
    }
}

/// A write answered before its entry is committed (planted in the shared replicated state,
/// `system::consensus`) is caught in a cluster too: a message or roster item a client was
/// told was stored goes with a node.
#[test]
fn a_write_acknowledged_before_commit_is_caught_in_a_cluster() {
    let cfg = Config {
        nodes: 3,
        bugs: vec![Bug::AckBeforeCommit],
        ..quiet()
    };
    let caught = (0..50).find_map(|seed| run(seed, &cfg).violation.map(|v| (seed, v)));
    let Some((seed, v)) = caught else {
        panic!("ack-before-commit was not caught at three nodes in 50 seeds");
    };
    println!(
        "ack-before-commit, 3 nodes: seed {seed}: invariant {}: {}",
        v.invariant, v.what
    );
    assert!([1, 2].contains(&v.invariant), "caught by the wrong invariant: {v:?}");
}

/// Regressions: runs under one cluster fault that violated a data invariant until the node
/// was fixed (sim/README.md, "Multi-node runs") and hold every invariant now. Checked when
/// they were pinned: with that fix switched off in the simulator's mirror, each of these
/// seeds fails again (joins 66 and 43 failed before the conditional writes and the
/// `failed` envelopes, which cannot be switched off alone).
#[test]
fn the_cluster_runs_that_found_fixes_hold_every_invariant() {
    for (only, seed, what) in [
        ("joins", 66, "two owners during a join overfill an offline queue"),
        (
            "joins",
            7,
            "a replica takes batches from a node it does not see as the owner",
        ),
        ("joins", 43, "a write refused by a lagging replica loses its message"),
        ("partitions", 20, "a stale read on the minority side of a partition"),
        ("partitions", 28, "a stale read on the minority side of a partition"),
        (
            "partitions",
            33,
            "a bind answer lost with a link leaves a ghost session",
        ),
        (
            "partitions",
            75,
            "a bind answer lost with a link leaves a ghost session",
        ),
    ] {
        let cfg = Config {
            nodes: 3,
            cluster_faults: Some(vec![only.to_string()]),
            ..quiet()
        };
        let out = run(seed, &cfg);
        assert!(
            out.violation.is_none(),
            "{what} ({only}, seed {seed}):\n{}",
            out.report()
        );
        let s = &out.stats;
        let faulted = if only == "joins" { s.node_joins } else { s.partitions };
        assert!(faulted > 0, "{what}: the fault did not happen (seed {seed})");
    }
}

/// Regressions under every cluster fault at once: seeds outside CI's sweep that violated an
/// invariant until a fix, each checked failing with the fix undone.
#[test]
fn all_fault_runs_that_found_fixes_hold_every_invariant() {
    const RUNS: &[(u32, u64, &str)] = &[(
        5,
        970,
        "an account read of a slot this node was just removed from answered from the wiped copy",
    )];
    for &(nodes, seed, what) in RUNS {
        let cfg = Config { nodes, ..quiet() };
        let out = run(seed, &cfg);
        assert!(
            out.violation.is_none(),
            "{what} ({nodes} nodes, seed {seed}):\n{}",
            out.report()
        );
    }
}

/// `actors.passivate_after_ms` on one node: idle user actors kept in memory for 300 ms (and
/// let go at a membership change) hold every invariant, and both happen — some are let go
/// late, some get a message while kept.
#[test]
fn idle_actors_kept_in_memory_hold_every_invariant() {
    let cfg = Config {
        passivate_after_ms: 300,
        ..quiet()
    };
    let (mut late, mut reused) = (0, 0);
    let mut failed = Vec::new();
    for seed in 0..100 {
        let out = run(seed, &cfg);
        if out.violation.is_some() {
            failed.push(out.report());
        }
        late += out.stats.passivated_late;
        reused += out.stats.idle_reused;
    }
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(late > 0 && reused > 0, "let go late {late}, reused while idle {reused}");
}

/// Each planted bug is caught by the invariant meant to catch it, within the CI sweep's
/// seeds.
#[test]
fn every_planted_bug_is_caught() {
    let expected = [
        (Bug::DropOffline, 1),
        (Bug::KeepDeliveredOffline, 1),
        (Bug::ForgetRosterPush, 3),
        (Bug::IgnoreOfflineCap, 4),
        (Bug::AckBeforeFlush, 2),
        // In the shared routing code (`system::shard`), which the node runs too.
        (Bug::DropHeld, 1),
        // In the shared replicated state (`system::consensus`): a write answered before
        // its entry is committed, lost with the node's crash.
        (Bug::AckBeforeCommit, 2),
    ];
    assert_eq!(expected.len(), Bug::ALL.len());
    for (bug, invariant) in expected {
        let cfg = Config {
            bugs: vec![bug],
            ..quiet()
        };
        let caught = (0..200).find_map(|seed| run(seed, &cfg).violation.map(|v| (seed, v)));
        let Some((seed, v)) = caught else {
            panic!("planted bug {} was not caught in 200 seeds", bug.name());
        };
        println!(
            "{}: caught at seed {seed}: invariant {}: {}",
            bug.name(),
            v.invariant,
            v.what
        );
        assert_eq!(
            v.invariant,
            invariant,
            "{} caught by the wrong invariant: {v:?}",
            bug.name()
        );
    }
    // And with none planted, the same seeds stay clean (the bug, not the seed, is caught).
    assert!(run(0, &quiet()).violation.is_none());
}
