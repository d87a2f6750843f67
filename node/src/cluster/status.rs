//! `starling cluster status`: asks the node named by the configuration (its `metrics.listen`
//! endpoint, `/cluster`) and prints the members as a table.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::Deserialize;

#[derive(Deserialize)]
struct Member {
    name: String,
    gossip: String,
    transport: String,
    generation: u64,
    state: String,
    ring_share: f64,
}

#[derive(Deserialize)]
struct Status {
    node: String,
    members: Vec<Member>,
}

fn fetch(addr: std::net::SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the node at {addr} (metrics.listen): {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /cluster HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("malformed answer")?;
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        return Err(format!("the node answered {code}: {}", body.trim()));
    }
    Ok(body.to_string())
}

pub fn print(cfg: &crate::config::Config, json: bool) -> Result<(), String> {
    let addr = cfg
        .metrics_addr()
        .ok_or("metrics.listen is off: the status is served there")?;
    let body = fetch(addr)?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let st: Status = serde_json::from_str(&body).map_err(|e| format!("unexpected answer: {e}"))?;
    println!("cluster as seen by {}", st.node);
    println!(
        "{:<16} {:<8} {:>7}  {:<22} {:<22} GENERATION",
        "NODE", "STATE", "SHARE", "GOSSIP (UDP)", "TRANSPORT (TCP)"
    );
    for m in st.members {
        println!(
            "{:<16} {:<8} {:>6.1}%  {:<22} {:<22} {}",
            m.name,
            m.state.to_lowercase(),
            m.ring_share * 100.0,
            m.gossip,
            m.transport,
            m.generation
        );
    }
    Ok(())
}
