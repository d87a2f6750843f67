//! `starling cluster status`: asks the node named by the configuration (its `metrics.listen`
//! endpoint, `/cluster` and `/cluster/slots`) and prints the members, then the slots that
//! node hosts: their leaders, members and lagging replicas. The shards publish their slots
//! into the node's [`SlotTable`] once a second (`link::raft_clock`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::link::Protocol;
use super::View;

/// One slot's group as this node's member sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SlotRow {
    pub slot: u32,
    pub shard: u16,
    /// The leader's name, when one is known.
    pub leader: Option<String>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub committed: u64,
    pub applied: u64,
    /// A configuration change is under way.
    pub changing: bool,
    /// On the leader: committed entries each other member's log lacks.
    pub lag: BTreeMap<String, u64>,
}

/// The node's slots by number, written by its shards, read by `/cluster/slots`.
pub type SlotTable = Arc<Mutex<BTreeMap<u32, SlotRow>>>;

/// A replica this many committed entries behind its leader is shown as lagging.
pub const LAGGING: u64 = 100;

/// Writes shard `shard`'s slots into the table (and drops those it no longer hosts).
pub fn publish(table: &SlotTable, shard: u16, p: &mut Protocol, view: &View) {
    let name = |n: starling_actors::address::NodeId| {
        if n == view.me {
            view.name.clone()
        } else {
            view.peers
                .get(&n)
                .map_or_else(|| format!("node-{n:08x}"), |p| p.name.clone())
        }
    };
    let rows: Vec<SlotRow> = p
        .slots()
        .into_iter()
        .filter_map(|slot| {
            let i = p.slot_info(slot)?;
            Some(SlotRow {
                slot,
                shard,
                leader: i.leader.map(name),
                voters: i.voters.iter().map(|n| name(*n)).collect(),
                learners: i.learners.iter().map(|n| name(*n)).collect(),
                committed: i.committed,
                applied: i.applied,
                changing: i.changing,
                lag: i.lag.iter().map(|(n, l)| (name(*n), *l)).collect(),
            })
        })
        .collect();
    let Ok(mut t) = table.lock() else { return };
    t.retain(|_, r| r.shard != shard);
    for r in rows {
        t.insert(r.slot, r);
    }
}

/// The table as `/cluster/slots` serves it.
pub fn slots_json(table: &SlotTable) -> String {
    let rows: Vec<SlotRow> = table.lock().map(|t| t.values().cloned().collect()).unwrap_or_default();
    serde_json::to_string_pretty(&rows).unwrap_or_default()
}

#[derive(Deserialize)]
struct Member {
    name: String,
    gossip: String,
    transport: String,
    generation: u64,
    state: String,
    #[serde(default)]
    leaving: bool,
    ring_share: f64,
}

#[derive(Deserialize)]
struct Status {
    node: String,
    members: Vec<Member>,
}

/// Why a request to the node's listener failed.
#[derive(Debug)]
pub enum AskError {
    /// Nothing listens there (the node is not running, or has stopped).
    Unreachable(String),
    /// It answered with another status than expected.
    Answered(String),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Unreachable(e) | AskError::Answered(e) => f.write_str(e),
        }
    }
}

/// One HTTP/1.1 request to the node's `metrics.listen` endpoint; the body when the status is
/// `want` (a 2xx code).
pub fn ask(addr: std::net::SocketAddr, method: &str, path: &str, want: &str) -> Result<String, AskError> {
    let unreachable =
        |e: std::io::Error| AskError::Unreachable(format!("cannot reach the node at {addr} (metrics.listen): {e}"));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(unreachable)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(unreachable)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(unreachable)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| AskError::Unreachable(format!("the node at {addr} closed the connection mid-answer")))?;
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != want {
        return Err(AskError::Answered(format!("the node answered {code}: {}", body.trim())));
    }
    Ok(body.to_string())
}

fn fetch(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    ask(addr, "GET", path, "200").map_err(|e| e.to_string())
}

pub fn print(cfg: &crate::config::Config, json: bool) -> Result<(), String> {
    let addr = cfg
        .metrics_addr()
        .ok_or("metrics.listen is off: the status is served there")?;
    let body = fetch(addr, "/cluster")?;
    let slots = fetch(addr, "/cluster/slots")?;
    if json {
        println!("{{\"members\": {body}, \"slots\": {slots}}}");
        return Ok(());
    }
    let st: Status = serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))?;
    println!("cluster as seen by {}", st.node);
    println!(
        "{:<16} {:<8} {:>7}  {:<22} {:<22} GENERATION",
        "NODE", "STATE", "SHARE", "GOSSIP (UDP)", "TRANSPORT (TCP)"
    );
    for m in st.members {
        let state = if m.leaving {
            format!("{} (leaving)", m.state.to_lowercase())
        } else {
            m.state.to_lowercase()
        };
        println!(
            "{:<16} {:<8} {:>6.1}%  {:<22} {:<22} {}",
            m.name,
            state,
            m.ring_share * 100.0,
            m.gossip,
            m.transport,
            m.generation
        );
    }
    let rows: Vec<SlotRow> = serde_json::from_str(&slots).map_err(|e| format!("unexpected answer: {e}"))?;
    print!("{}", slots_text(&st.node, &rows));
    Ok(())
}

/// The slots part of the status: per node, the slots it is a voter, learner and leader of
/// (of those this node hosts), then one line per slot.
pub fn slots_text(node: &str, rows: &[SlotRow]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mut per: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for r in rows {
        for v in &r.voters {
            per.entry(v).or_default()[0] += 1;
        }
        for l in &r.learners {
            per.entry(l).or_default()[1] += 1;
        }
        if let Some(l) = &r.leader {
            per.entry(l).or_default()[2] += 1;
        }
    }
    let _ = writeln!(s, "\nslots hosted by {node}: {}", rows.len());
    let _ = writeln!(s, "{:<16} {:>6} {:>8} {:>7}", "NODE", "VOTER", "LEARNER", "LEADER");
    for (n, [v, l, d]) in &per {
        let _ = writeln!(s, "{n:<16} {v:>6} {l:>8} {d:>7}");
    }
    let _ = writeln!(
        s,
        "\n{:>4} {:<12} {:<32} {:>9} {:>9}  NOTE",
        "SLOT", "LEADER", "VOTERS", "COMMITTED", "APPLIED"
    );
    for r in rows {
        let mut note = Vec::new();
        if r.leader.is_none() {
            note.push("no leader".to_string());
        }
        if !r.learners.is_empty() {
            note.push(format!("learners {}", r.learners.join(",")));
        }
        if r.changing {
            note.push("changing members".into());
        }
        for (n, l) in &r.lag {
            if *l >= LAGGING {
                note.push(format!("{n} lags {l}"));
            }
        }
        let _ = writeln!(
            s,
            "{:>4} {:<12} {:<32} {:>9} {:>9}  {}",
            r.slot,
            r.leader.as_deref().unwrap_or("-"),
            r.voters.join(","),
            r.committed,
            r.applied,
            note.join("; ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slots_table_names_leaders_members_and_laggards() {
        let row = |slot, leader: Option<&str>, lag: &[(&str, u64)]| SlotRow {
            slot,
            shard: 0,
            leader: leader.map(str::to_string),
            voters: vec!["n1".into(), "n2".into(), "n3".into()],
            learners: if slot == 2 { vec!["n4".into()] } else { Vec::new() },
            committed: 500,
            applied: 500,
            changing: slot == 2,
            lag: lag.iter().map(|(n, l)| (n.to_string(), *l)).collect(),
        };
        let rows = [
            row(0, Some("n1"), &[("n2", 0), ("n3", 3)]),
            row(1, Some("n2"), &[("n1", 250)]),
            row(2, None, &[]),
        ];
        let t = slots_text("n1", &rows);
        assert!(t.contains("slots hosted by n1: 3"), "{t}");
        let n1 = t.lines().find(|l| l.starts_with("n1 ")).unwrap();
        assert_eq!(n1.split_whitespace().collect::<Vec<_>>(), ["n1", "3", "0", "1"], "{t}");
        let n4 = t.lines().find(|l| l.starts_with("n4 ")).unwrap();
        assert_eq!(n4.split_whitespace().collect::<Vec<_>>(), ["n4", "0", "1", "0"], "{t}");
        let line = |slot: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with(&format!("{slot} ")))
                .unwrap()
                .to_string()
        };
        assert!(line("1").contains("n1 lags 250"), "{t}");
        assert!(!line("0").contains("lags"), "{t}");
        assert!(
            line("2").contains("no leader") && line("2").contains("learners n4") && line("2").contains("changing"),
            "{t}"
        );
        let back: Vec<SlotRow> = serde_json::from_str(&serde_json::to_string(&rows).unwrap()).unwrap();
        assert_eq!(back, rows);
    }
}
