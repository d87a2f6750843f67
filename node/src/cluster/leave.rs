//! `starling cluster leave`: decommissions the node named by the configuration. It asks the
//! node (`POST /cluster/leave` on its `metrics.listen` endpoint, from this machine), whose
//! membership driver gossips that it leaves; the others take it off the ring, its slots'
//! groups replace it, and once it has hosted no slot for a few seconds
//! (`starling_actors::system::leave`) it says goodbye and its process exits by itself, its
//! clients told `system-shutdown`. The command follows `/cluster/slots` until the node is
//! gone (or, with `--no-wait`, returns once the node has accepted).

use std::time::{Duration, Instant};

use super::status::{ask, AskError, SlotRow};

pub fn run(cfg: &crate::config::Config, wait: bool, timeout: Duration) -> Result<(), String> {
    let addr = cfg
        .metrics_addr()
        .ok_or("metrics.listen is off: the node is asked to leave there")?;
    let said = ask(addr, "POST", "/cluster/leave", "202").map_err(|e| format!("cluster leave: {e}"))?;
    print!("{said}");
    if !wait {
        return Ok(());
    }
    let start = Instant::now();
    let mut last = None;
    loop {
        match ask(addr, "GET", "/cluster/slots", "200") {
            Ok(body) => {
                let hosted = serde_json::from_str::<Vec<SlotRow>>(&body).map(|r| r.len()).ok();
                if hosted != last {
                    match hosted {
                        Some(n) => println!("{n} slots still hosted here"),
                        None => println!("(unexpected answer from /cluster/slots)"),
                    }
                    last = hosted;
                }
            }
            // The listener closed: the process has stopped.
            Err(AskError::Unreachable(_)) => {
                println!("the node has left the cluster and stopped");
                return Ok(());
            }
            Err(AskError::Answered(e)) => println!("{e}"),
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "the node is still leaving after {}s (its slots wait for the others: see `starling cluster status`)",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
