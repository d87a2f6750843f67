//! The command line: `starling serve`, `starling user …`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rand_core::{OsRng, RngCore};
use starling_actors::c2s::C2sConfig;
use starling_actors::parser::Limits;
use starling_actors::scram;
use starling_actors::user::UserConfig;
use starling_storage::{SledStorage, Storage, Write};

use crate::config::{Config, RegistrationMode};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::control::{Liveness, Supervisor, SupervisorArgs, SupervisorMsg};
use crate::shard::ShardParams;
use crate::storage_thread::{self, StorageHandle};

#[derive(Parser)]
#[command(name = "starling", version = VERSION, about = "Starling, a horizontally scalable XMPP server")]
struct Cli {
    /// Configuration file (TOML). Without one, the embedded defaults apply.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Override a setting: --set c2s.listen=127.0.0.1:5222 (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Shortcut for --set server.data_dir=DIR.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve {
        /// Shortcut for --set server.shards=N.
        #[arg(long)]
        shards: Option<usize>,
    },
    /// Manage accounts (on the data dir of a stopped server).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// The cluster, as a running node sees it (asks its `metrics.listen` endpoint).
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Load-test an XMPP server (Starling, Prosody, ejabberd, …) and report the figures.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Run a scenario (TOML) against a server; prints a Markdown table and, with --out,
    /// writes bench.json, bench.md and bench.png there.
    Run {
        scenario: PathBuf,
        /// The server's c2s address; repeated for a cluster's nodes, client i connects to
        /// the (i mod n)-th.
        #[arg(long, default_value = "127.0.0.1:5222")]
        target: Vec<std::net::SocketAddr>,
        /// The server's process id: its RSS and CPU are reported (repeated for a cluster's
        /// nodes: summed).
        #[arg(long)]
        server_pid: Vec<u32>,
        #[arg(long)]
        out: Option<PathBuf>,
        /// The name of this run in reports (default: the scenario's name).
        #[arg(long)]
        label: Option<String>,
        /// Register the users in band and make their rosters first.
        #[arg(long)]
        provision: bool,
        /// Only provision; no load run.
        #[arg(long)]
        provision_only: bool,
        /// Override a scenario setting: --param users=5000 (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Print which accounts and rosters the scenario needs (a key for reusing a
        /// provisioned server) and exit.
        #[arg(long)]
        describe: bool,
    },
    /// Side-by-side table of bench.json files; the first is the baseline for the ratios.
    Compare {
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, their state and each one's share of the ring.
    Status {
        /// Print the JSON as the node serves it.
        #[arg(long)]
        json: bool,
    },
    /// Decommission the node: its slots move to the others, then it stops by itself.
    /// Waits until it has stopped (asks from this machine only).
    Leave {
        /// Return once the node has accepted, without waiting for it to stop.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the node goes on leaving).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    Add {
        jid: String,
        password: String,
    },
    Del {
        jid: String,
    },
    Passwd {
        jid: String,
        password: String,
    },
    List,
    /// Stored offline messages that could not be parsed back for delivery: set aside,
    /// never deleted (the `starling_offline_unreadable` gauge counts them). One line each:
    /// user, sequence number, arrival time (Unix ms), the stored XML.
    Unreadable {
        /// Only this user's.
        jid: Option<String>,
    },
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    if let Cmd::Bench { cmd } = cli.cmd {
        return match bench(cmd) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("starling bench: {e}");
                1
            }
        };
    }
    let mut overrides = cli.set.clone();
    if let Some(d) = &cli.data_dir {
        overrides.push(format!("server.data_dir={:?}", d.display().to_string()));
    }
    if let Cmd::Serve { shards: Some(n) } = &cli.cmd {
        overrides.push(format!("server.shards={n}"));
    }
    let cfg = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("starling: {e}");
            return 2;
        }
    };
    init_logs(&cfg.log.level);
    let r = match cli.cmd {
        Cmd::Serve { .. } => serve(cfg),
        Cmd::User { cmd } => user(cfg, cmd),
        Cmd::Cluster {
            cmd: ClusterCmd::Status { json },
        } => crate::cluster::status::print(&cfg, json),
        Cmd::Cluster {
            cmd: ClusterCmd::Leave { no_wait, timeout_secs },
        } => crate::cluster::leave::run(&cfg, !no_wait, Duration::from_secs(timeout_secs)),
        Cmd::Bench { .. } => unreachable!("handled before the configuration is loaded"),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("starling: {e}");
            1
        }
    }
}

fn bench(cmd: BenchCmd) -> Result<(), String> {
    use crate::bench;
    match cmd {
        BenchCmd::Run {
            scenario,
            target,
            server_pid,
            out,
            label,
            provision,
            provision_only,
            params,
            describe,
        } => {
            let sc = bench::Scenario::load_with(&scenario, &params)?;
            if describe {
                println!("{}{}@{}-roster{}", sc.user_prefix, sc.users, sc.domain, sc.roster_size);
                return Ok(());
            }
            let label = label.unwrap_or_else(|| sc.name.clone());
            let report = bench::run(bench::BenchArgs {
                scenario: sc,
                targets: target,
                server_pids: server_pid,
                out: out.clone(),
                label,
                provision,
                provision_only,
            })?;
            if let Some(r) = report {
                println!("{}", r.to_markdown());
                if let Some(dir) = out {
                    r.write(&dir)?;
                    eprintln!("wrote {}/bench.{{json,md,png}}", dir.display());
                }
            }
            Ok(())
        }
        BenchCmd::Compare { reports } => {
            let mut rs = Vec::new();
            for p in reports {
                let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                rs.push(serde_json::from_str::<bench::Report>(&text).map_err(|e| format!("{}: {e}", p.display()))?);
            }
            print!("{}", bench::report::compare(&rs));
            Ok(())
        }
    }
}

fn init_logs(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STARLING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn open_store(cfg: &Config) -> Result<SledStorage, String> {
    std::fs::create_dir_all(&cfg.server.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", cfg.server.data_dir.display()))?;
    SledStorage::open(&cfg.server.data_dir.join("db")).map_err(|e| e.to_string())
}

fn check_memlock() -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
        && lim.rlim_cur < 512 * 1024
    {
        return Err(format!(
            "RLIMIT_MEMLOCK is {} bytes; glommio needs at least 512 KiB (ulimit -l 8192)",
            lim.rlim_cur
        ));
    }
    Ok(())
}

/// The version `--version` prints; a build with the simulator's planted bugs compiled in
/// (the `planted-bugs` feature, never for production) says so.
const VERSION: &str = if starling_actors::planted::COMPILED_IN {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (planted bugs compiled in: a simulator build, not for production)"
    )
} else {
    env!("CARGO_PKG_VERSION")
};

fn serve(cfg: Config) -> Result<(), String> {
    check_memlock()?;
    if starling_actors::planted::COMPILED_IN {
        tracing::error!("this binary has the simulator's planted bugs compiled in (switched off); build starling-node alone for production");
    }
    let store = open_store(&cfg)?;
    // The slots' Raft state, read before the storage thread takes the store.
    let slots = cfg.cluster.slots;
    let mut raft_restore = Vec::new();
    for slot in store.raft_slots().map_err(|e| e.to_string())? {
        if slot >= slots {
            return Err(format!(
                "the store holds Raft slot {slot} but cluster.slots is {slots}: the slot count is fixed when the cluster is made"
            ));
        }
        if let Some(stored) = store.raft_stored(slot).map_err(|e| e.to_string())? {
            if !stored.state.is_empty() {
                raft_restore.push((slot, stored));
            }
        }
    }
    let (cert, key) = crate::tls::cert_paths(&cfg)?;
    let tls = crate::tls::server_config(&cert, &key)?;
    let shards = cfg.shards();
    let (storage_tx, storage_rx) = flume::bounded(storage_thread::QUEUE);
    let cluster = crate::cluster::setup(&cfg, shards)?;
    // A single node, or the first node of a new cluster (no seeds but itself), makes every
    // slot's group when its store has none; another node waits to be added by the leaders.
    let raft_bootstrap = raft_restore.is_empty() && cluster.as_ref().is_none_or(|c| c.params.bootstrap);
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let params = ShardParams {
        slots,
        raft_restore: Arc::new(raft_restore),
        raft_bootstrap,
        incarnation,
        cluster: cluster.as_ref().map(|c| c.params.clone()),
        node: cluster.as_ref().map(|c| c.node).unwrap_or(0),
        shards,
        c2s: C2sConfig {
            domains: cfg.server.domains.clone(),
            require_tls: cfg.c2s.require_tls,
            tls_available: true,
            anonymous: cfg.auth.anonymous,
            registration_open: cfg.registration.mode == RegistrationMode::Open,
            limits: Limits {
                max_stanza_bytes: cfg.c2s.max_stanza_bytes,
                max_depth: cfg.c2s.max_depth,
                max_attrs: cfg.c2s.max_attributes,
            },
            scram_iterations: cfg.auth.scram_iterations,
            max_pending: 64,
            version: env!("CARGO_PKG_VERSION").into(),
        },
        user: UserConfig {
            max_offline: cfg.offline.max_per_user,
            max_roster_items: cfg.roster.max_items,
        },
        c2s_listen: cfg.c2s.listen,
        direct_tls_listen: cfg.direct_tls_addr(),
        tls,
        storage: StorageHandle::new(storage_tx.clone()),
        mailbox: cfg.c2s.mailbox,
        passivate_after: std::time::Duration::from_millis(cfg.actors.passivate_after_ms),
        max_auth_failures: cfg.auth.max_failures_per_minute,
        grace: Duration::from_secs(cfg.server.shutdown_grace_secs),
        negotiation_timeout: Duration::from_secs(cfg.c2s.negotiation_timeout_secs),
        write_timeout: Duration::from_secs(cfg.c2s.write_timeout_secs),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("control")
        .build()
        .map_err(|e| format!("cannot start the control plane: {e}"))?;
    rt.block_on(async move {
        // The handlers first: a SIGTERM while the node starts (a supervisor that gives up
        // quickly, a test that restarts at once) must stop it cleanly once it is up, not kill
        // it with the signal's default action.
        let mut signals = Signals::install()?;
        let live = Liveness::default();
        let status = crate::metrics::ClusterStatus::default();
        let control = crate::metrics::ClusterControl::default();
        let left = Arc::new(tokio::sync::Notify::new());
        let slot_table = cluster.as_ref().map(|c| c.params.slot_table.clone());
        let metrics_task = match cfg.metrics_addr() {
            Some(addr) => {
                let handle = crate::metrics::install()?;
                let listener = crate::metrics::bind(addr).await?;
                let l = live.clone();
                let health: crate::metrics::HealthCheck = Arc::new(move || {
                    l.shards_alive.load(Ordering::Relaxed) == shards && l.storage_alive.load(Ordering::Relaxed)
                });
                tracing::info!(%addr, "metrics and health endpoint listening");
                Some(tokio::spawn(crate::metrics::serve(
                    listener,
                    crate::metrics::Endpoints {
                        handle,
                        health,
                        cluster: status.clone(),
                        slots: slot_table,
                        control: control.clone(),
                    },
                )))
            }
            None => None,
        };
        let args = SupervisorArgs {
            live,
            store,
            params,
            storage_tx,
            storage_rx,
        };
        let (sup, handle) = ractor::Actor::spawn(Some("supervisor".into()), Supervisor, args)
            .await
            .map_err(|e| format!("startup failed: {e}"))?;
        // Gossip starts once the shards listen on the transport: peers may send at once.
        let driver = match cluster {
            Some(c) => Some(
                ractor::Actor::spawn(
                    Some("membership".into()),
                    crate::cluster::driver::Driver,
                    c.driver_args(status, left.clone()),
                )
                .await
                .map_err(|e| format!("cluster membership failed to start: {e}"))?,
            ),
            None => None,
        };
        if let Some((d, _)) = &driver {
            let _ = control.set(d.clone());
        }
        tracing::info!(
            domains = ?cfg.server.domains,
            c2s = %cfg.c2s.listen,
            direct_tls = %cfg.c2s.direct_tls_listen,
            shards,
            data_dir = %cfg.server.data_dir.display(),
            "starling is up"
        );
        tokio::select! {
            _ = signals.wait() => tracing::info!("signal received"),
            _ = left.notified() => tracing::info!("cluster leave finished: stopping"),
        }
        if let Some((d, h)) = driver {
            // Leave first: the others stop routing here before our shards go.
            let _ = ractor::call!(d, crate::cluster::driver::DriverMsg::Leave);
            d.stop(None);
            let _ = h.await;
        }
        ractor::call!(sup, SupervisorMsg::Shutdown).map_err(|e| format!("shutdown: {e}"))?;
        sup.stop(None);
        let _ = handle.await;
        if let Some(t) = metrics_task {
            t.abort();
        }
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// SIGTERM and SIGINT, registered as soon as `serve` starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let e = |e: std::io::Error| format!("cannot handle signals: {e}");
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(e)?,
            int: signal(SignalKind::interrupt()).map_err(e)?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn user(cfg: Config, cmd: UserCmd) -> Result<(), String> {
    let mut store = open_store(&cfg)?;
    let bare = |j: &str| -> Result<String, String> {
        let b = jid::BareJid::new(j).map_err(|e| format!("{j:?} is not a valid JID: {e}"))?;
        if b.node().is_none() {
            return Err(format!("{j:?} needs a user part (user@domain)"));
        }
        if !cfg.server.domains.iter().any(|d| d == b.domain().as_str()) {
            eprintln!(
                "warning: {} is not one of server.domains {:?}",
                b.domain(),
                cfg.server.domains
            );
        }
        Ok(b.to_string())
    };
    let creds = |password: &str| {
        let mut s1 = [0u8; 16];
        let mut s2 = [0u8; 16];
        OsRng.fill_bytes(&mut s1);
        OsRng.fill_bytes(&mut s2);
        scram::new_account(password, s1, s2, cfg.auth.scram_iterations)
    };
    let e = |e: starling_storage::StorageError| e.to_string();
    match cmd {
        UserCmd::Add { jid, password } => {
            let u = bare(&jid)?;
            if !store.create_account(&u, &creds(&password)).map_err(e)? {
                return Err(format!("{u} already exists"));
            }
            store.flush().map_err(e)?;
            println!("added {u}");
        }
        UserCmd::Del { jid } => {
            let u = bare(&jid)?;
            if store.account(&u).map_err(e)?.is_none() {
                return Err(format!("{u} does not exist"));
            }
            store.apply(&[Write::DeleteUser { user: u.clone() }]).map_err(e)?;
            store.flush().map_err(e)?;
            println!("deleted {u}");
        }
        UserCmd::Passwd { jid, password } => {
            let u = bare(&jid)?;
            if store.account(&u).map_err(e)?.is_none() {
                return Err(format!("{u} does not exist"));
            }
            store
                .apply(&[Write::PutAccount {
                    user: u.clone(),
                    account: creds(&password),
                }])
                .map_err(e)?;
            store.flush().map_err(e)?;
            println!("password changed for {u}");
        }
        UserCmd::List => {
            for u in store.list_accounts().map_err(e)? {
                println!("{u}");
            }
        }
        UserCmd::Unreadable { jid } => {
            let only = jid.as_deref().map(bare).transpose()?;
            for (u, m) in store.unreadable().map_err(e)? {
                if only.as_ref().is_none_or(|o| *o == u) {
                    println!("{u}\t{}\t{}\t{}", m.seq, m.stamp_unix_ms, m.xml);
                }
            }
        }
    }
    Ok(())
}
