//! A write batch is atomic on disk: a process killed (SIGKILL) in the middle of a stream of
//! batches leaves each batch whole or absent, never half-applied — as `MemoryStorage`, the
//! simulator's store, assumes. The test runs itself as the writer: a child process of this
//! test binary applies batches until it is killed; the parent reopens the store and checks.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use starling_storage::{OfflineMessage, RosterItem, SledStorage, Storage, Write};

const WRITER_ENV: &str = "STARLING_STORAGE_WRITER_DIR";
const USERS: u64 = 8;

fn user(i: u64) -> String {
    format!("u{}@x", i % USERS)
}

/// Batch `i` for `user(i)`: every seventh deletes what the user has (roster items and offline
/// messages up to `i`), the others add roster item `c{i}` and offline message `i`; each sets
/// the roster version to `i`. So after any prefix of whole batches, a user's roster items and
/// offline messages name the same numbers, and the version names the last batch.
fn batch(i: u64, have: &mut BTreeMap<String, BTreeSet<u64>>) -> Vec<Write> {
    let u = user(i);
    let mine = have.entry(u.clone()).or_default();
    let mut w = Vec::new();
    if i.is_multiple_of(7) {
        for c in std::mem::take(mine) {
            w.push(Write::DeleteRosterItem {
                user: u.clone(),
                contact: format!("c{c}"),
            });
        }
        w.push(Write::DeleteOffline {
            user: u.clone(),
            upto: i,
        });
    } else {
        mine.insert(i);
        w.push(Write::PutRosterItem {
            user: u.clone(),
            item: RosterItem {
                jid: format!("c{i}"),
                in_roster: true,
                ..Default::default()
            },
        });
        w.push(Write::PushOffline {
            user: u.clone(),
            // Large enough that sled's log buffers fill (and reach the file) mid-stream.
            msg: OfflineMessage {
                seq: i,
                stamp_unix_ms: i,
                xml: format!("<message><body>{}</body></message>", "x".repeat(3000)),
            },
        });
    }
    w.push(Write::SetRosterVer { user: u, ver: i });
    w
}

/// The child: applies batches for ever, flushing every tenth (group commit), and reports.
fn writer(dir: &str) -> ! {
    let mut s = SledStorage::open(std::path::Path::new(dir)).expect("open");
    let mut have = BTreeMap::new();
    for i in 1.. {
        s.apply(&batch(i, &mut have)).expect("apply");
        if i.is_multiple_of(10) {
            s.flush().expect("flush");
            println!("{i}");
        }
    }
    unreachable!()
}

#[test]
fn a_killed_writer_leaves_every_batch_whole_or_absent() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        writer(&dir);
    }
    for round in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_killed_writer_leaves_every_batch_whole_or_absent",
                "--nocapture",
            ])
            .env(WRITER_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the writer");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it get going, then kill it at a moment that differs between rounds.
        let want = 200 + round * 150;
        let flushed: u64 = loop {
            let l = lines.next().expect("writer output").expect("a line");
            if let Ok(n) = l.trim().parse::<u64>() {
                if n >= want {
                    break n;
                }
            }
        };
        std::thread::sleep(Duration::from_millis(3 + round * 7));
        let _ = child.kill();
        let _ = child.wait();

        let s = SledStorage::open(dir.path()).expect("reopen after the kill");
        let mut last = 0;
        for u in 0..USERS {
            let u = user(u);
            let d = s.load_user(&u).unwrap();
            let roster: BTreeSet<u64> = d.roster.iter().map(|r| r.jid[1..].parse().unwrap()).collect();
            let offline: BTreeSet<u64> = d.offline.iter().map(|m| m.seq).collect();
            assert_eq!(roster, offline, "round {round}: half a batch of {u} is on disk");
            let ver = d.roster_ver;
            assert!(
                roster.iter().all(|i| *i <= ver),
                "round {round}: {u} at {ver} has {roster:?}"
            );
            if !ver.is_multiple_of(7) {
                assert!(
                    roster.contains(&ver),
                    "round {round}: {u}'s batch {ver} only partly applied"
                );
            }
            last = last.max(ver);
        }
        assert!(
            last >= flushed,
            "round {round}: flushed batches lost ({last} < {flushed})"
        );
    }
}
