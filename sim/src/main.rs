//! `cargo run -p sim --release -- --seed N` runs one simulation and prints its trace hash
//! and verdict; `--seeds A..B` sweeps. A failing seed prints the violated invariant, the last
//! events before it and the command that replays it.

use std::process::ExitCode;

use clap::Parser;
use sim::{Bug, Config};

#[derive(Parser)]
#[command(about = "Starling's deterministic simulator")]
struct Args {
    /// Run one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep a range of seeds, `A..B` (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    #[arg(long, default_value_t = 3)]
    shards: u16,
    #[arg(long, default_value_t = 12)]
    clients: usize,
    /// Virtual milliseconds of activity before quiescence.
    #[arg(long, default_value_t = 20_000)]
    duration_ms: u64,
    /// Run without faults.
    #[arg(long)]
    no_faults: bool,
    /// Clients never remove contacts nor cancel subscriptions.
    #[arg(long)]
    no_churn: bool,
    /// Switch on a planted bug (to see the oracles catch it): drop-offline,
    /// keep-delivered-offline, forget-roster-push, ignore-offline-cap, ack-before-flush,
    /// drop-held, ack-before-commit.
    #[arg(long = "bug")]
    bugs: Vec<String>,
    /// With --nodes > 1, only these cluster faults (comma-separated: loss, partitions,
    /// joins, crashes, leaves; `none` for none of them); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// How long an idle user actor stays before it is let go (0: at once, as by default).
    #[arg(long, default_value_t = 0)]
    passivate_after_ms: u64,
    /// Events to show before a failure.
    #[arg(long, default_value_t = 40)]
    last: usize,
    /// Print every run's report, not only failures.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if let Ok(filter) = std::env::var("SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .without_time()
            .init();
    }
    let mut bugs = Vec::new();
    for b in &a.bugs {
        match Bug::ALL.iter().find(|x| x.name() == b) {
            Some(x) => bugs.push(*x),
            None => {
                let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
                eprintln!("unknown bug {b:?}; known: {}", names.join(", "));
                return ExitCode::from(2);
            }
        }
    }
    let cfg = Config {
        nodes: a.nodes,
        shards: a.shards,
        clients: a.clients,
        duration_ms: a.duration_ms,
        bugs,
        faults: !a.no_faults,
        keep_events: a.last,
        churn: !a.no_churn,
        cluster_faults: a.only.clone(),
        passivate_after_ms: a.passivate_after_ms,
    };
    for o in a.only.iter().flatten() {
        if !["loss", "partitions", "joins", "crashes", "leaves", "none"].contains(&o.as_str()) {
            eprintln!("--only takes loss, partitions, joins, crashes, leaves or none; not {o:?}");
            return ExitCode::from(2);
        }
    }
    if a.nodes == 0 || a.nodes > 16 {
        eprintln!("--nodes wants 1 to 16");
        return ExitCode::from(2);
    }
    let seeds = match (a.seed, a.seeds.as_deref()) {
        (Some(s), _) => s..s + 1,
        (None, Some(r)) => match r.split_once("..").map(|(x, y)| (x.parse::<u64>(), y.parse::<u64>())) {
            Some((Ok(x), Ok(y))) if x < y => x..y,
            _ => {
                eprintln!("--seeds wants A..B with A < B, e.g. 0..200");
                return ExitCode::from(2);
            }
        },
        (None, None) => 0..1,
    };
    let mut flags = String::new();
    if a.nodes != 1 {
        flags += &format!(" --nodes {}", a.nodes);
    }
    if a.shards != 3 {
        flags += &format!(" --shards {}", a.shards);
    }
    if a.clients != 12 {
        flags += &format!(" --clients {}", a.clients);
    }
    if a.duration_ms != 20_000 {
        flags += &format!(" --duration-ms {}", a.duration_ms);
    }
    if a.no_faults {
        flags += " --no-faults";
    }
    if a.no_churn {
        flags += " --no-churn";
    }
    if a.passivate_after_ms != 0 {
        flags += &format!(" --passivate-after-ms {}", a.passivate_after_ms);
    }
    if let Some(o) = &a.only {
        flags += &format!(" --only {}", o.join(","));
    }
    for b in &a.bugs {
        flags += &format!(" --bug {b}");
    }
    let (mut ok, mut failed) = (0u64, Vec::new());
    let one = seeds.end - seeds.start == 1;
    for seed in seeds {
        let out = sim::run(seed, &cfg);
        if out.violation.is_some() {
            failed.push(seed);
            print!("{}", out.report());
            println!("  replay: cargo run -p sim --release -- --seed {seed}{flags}");
        } else {
            ok += 1;
            if a.verbose || one {
                print!("{}", out.report());
            }
        }
    }
    if !one {
        println!(
            "{ok} seeds ok, {} failed{}",
            failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(": {failed:?}")
            }
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
