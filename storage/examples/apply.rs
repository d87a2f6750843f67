//! Write throughput of `SledStorage` as the storage thread drives it: batches of one user
//! actor's writes (an offline message and its version condition, or a roster item, its
//! version and the batch condition), a flush every `GROUP` batches (group commit).
//!
//! `cargo run --release -p starling-storage --example apply [BATCHES]`

use std::time::Instant;

use starling_storage::{OfflineMessage, RosterItem, SledStorage, Storage, Write};

const GROUP: usize = 64;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = SledStorage::open(dir.path()).expect("open");
    let users = 1000;
    let mut versions = vec![0u64; users];
    let start = Instant::now();
    for i in 0..n {
        let u = i % users;
        let user = format!("user{u}@localhost");
        let mut w = if i % 2 == 0 {
            vec![Write::PushOffline {
                user: user.clone(),
                msg: OfflineMessage {
                    seq: i as u64,
                    stamp_unix_ms: i as u64,
                    xml: format!(
                        "<message to='{user}' from='x@localhost/r' type='chat'><body>{}</body></message>",
                        "x".repeat(64)
                    ),
                },
            }]
        } else {
            vec![
                Write::PutRosterItem {
                    user: user.clone(),
                    item: RosterItem {
                        jid: format!("c{i}@localhost"),
                        in_roster: true,
                        ..Default::default()
                    },
                },
                Write::SetRosterVer {
                    user: user.clone(),
                    ver: i as u64,
                },
            ]
        };
        w.push(Write::NextVersion {
            user,
            base: versions[u],
        });
        versions[u] += 1;
        s.apply(&w).expect("apply");
        if (i + 1) % GROUP == 0 {
            s.flush().expect("flush");
        }
    }
    s.flush().expect("flush");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} batches in {secs:.2} s: {:.0} batches/s (flush every {GROUP})",
        n as f64 / secs
    );
}
