//! `starling bench`: a load generator in the role Tsung and amoc play for ejabberd and
//! MongooseIM. It speaks plain XMPP, so it measures Starling, Prosody and ejabberd alike.
//!
//! A run: provision (optional: register users in band, make rosters by subscription
//! handshakes), log `online_users` in at `login_rate` from many loopback source addresses,
//! then everyone sends chat messages to online contacts and changes presence; after the
//! warm-up the measured period starts. Each message carries its send time, so the receiver
//! (this same process) records the end-to-end latency in an HDR histogram.

pub mod client;
pub mod report;
pub mod scenario;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use starling_actors::parser::StreamEvent;
use starling_actors::xml::Element;
use tokio::sync::watch;

use client::{Connection, Login};
pub use report::Report;
pub use scenario::Scenario;

/// What the command line asks for.
pub struct BenchArgs {
    pub scenario: Scenario,
    /// The servers' c2s addresses (a cluster's nodes): client i connects to the (i mod n)-th.
    pub targets: Vec<SocketAddr>,
    /// The servers' processes: CPU and RSS are their sums.
    pub server_pids: Vec<u32>,
    pub out: Option<PathBuf>,
    pub label: String,
    pub provision: bool,
    pub provision_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Logging in (provisioning: logging in before the handshakes).
    Login,
    /// Provisioning: send the subscription requests.
    Subscribe,
    /// Load runs (warm-up, then the measured period).
    Run,
    /// No more sending; read what is still in flight.
    Drain,
    Stop,
}

/// State shared by all generator threads (atomics only on the hot path).
struct Shared {
    sc: Scenario,
    targets: Vec<SocketAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    start: Instant,
    online: Vec<AtomicBool>,
    logins_ok: AtomicU64,
    logins_failed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    /// The measured window, in ns since `start` (u64::MAX: not yet).
    from_ns: AtomicU64,
    to_ns: AtomicU64,
    /// Provisioning progress.
    registered: AtomicUsize,
    logged_in: AtomicUsize,
    rosters_done: AtomicUsize,
}

impl Shared {
    /// The server client `i` connects to.
    fn target(&self, i: usize) -> SocketAddr {
        self.targets[i % self.targets.len().max(1)]
    }

    fn ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn measured(&self, ns: u64) -> bool {
        ns >= self.from_ns.load(Ordering::Relaxed) && ns < self.to_ns.load(Ordering::Relaxed)
    }
}

/// What one generator thread measured.
pub struct ThreadStats {
    login_us: Histogram<u64>,
    latency_us: Histogram<u64>,
    /// Latency per second of the run (index: second since start).
    latency_by_sec: Vec<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    measured_sent: u64,
    measured_received: u64,
    /// Sent in the measured window to users not online (`offline_share`).
    measured_stored: u64,
    stanzas_sent: u64,
    stanzas_received: u64,
}

impl ThreadStats {
    fn new() -> Self {
        ThreadStats {
            login_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram"),
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram"),
            latency_by_sec: Vec::new(),
            errors: BTreeMap::new(),
            measured_sent: 0,
            measured_received: 0,
            measured_stored: 0,
            stanzas_sent: 0,
            stanzas_received: 0,
        }
    }
    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
    fn merge(&mut self, o: ThreadStats) {
        let _ = self.login_us.add(&o.login_us);
        let _ = self.latency_us.add(&o.latency_us);
        for (i, h) in o.latency_by_sec.into_iter().enumerate() {
            if self.latency_by_sec.len() <= i {
                self.latency_by_sec
                    .resize_with(i + 1, || Histogram::new_with_bounds(1, 600_000_000, 2).expect("h"));
            }
            let _ = self.latency_by_sec[i].add(&h);
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.measured_sent += o.measured_sent;
        self.measured_received += o.measured_received;
        self.measured_stored += o.measured_stored;
        self.stanzas_sent += o.stanzas_sent;
        self.stanzas_received += o.stanzas_received;
    }
}

type Stats = Rc<RefCell<ThreadStats>>;

/// CPU seconds (user + system) of a process from /proc, or of this one.
/// CPU seconds the processes used, summed (`None` for any that cannot be read); with no
/// process, this one's own.
fn cpu_secs_of(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return cpu_secs(None);
    }
    pids.iter().map(|p| cpu_secs(Some(*p))).sum()
}

/// Resident set size of the processes, summed, in KiB.
fn rss_kib_of(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(*p)).sum()
}

fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    match pid {
        Some(pid) => {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may hold spaces) start after ')'.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            Some(ticks / hz)
        }
        None => {
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: ru is a valid, writable rusage.
            if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
                return None;
            }
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            Some(t(ru.ru_utime) + t(ru.ru_stime))
        }
    }
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Raises the open-file soft limit to the hard limit; returns the limit now in force.
fn raise_nofile() -> u64 {
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: rl is a valid, writable rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
    }
    rl.rlim_cur
}

/// Runs the benchmark and returns its report (also written under `out` when given).
pub fn run(args: BenchArgs) -> Result<Option<Report>, String> {
    let sc = args.scenario.clone();
    sc.check()?;
    let nofile = raise_nofile();
    let needed = if args.provision { sc.users } else { sc.online() } as u64;
    if needed + 64 > nofile / sc.threads.max(1) as u64 * sc.threads as u64 {
        return Err(format!(
            "{needed} connections need more open files than this process may have ({nofile}); \
             run several generator processes or lower the user count"
        ));
    }
    let fresh = || {
        Arc::new(Shared {
            tls: sc.tls.then(client::insecure_tls),
            targets: args.targets.clone(),
            start: Instant::now(),
            online: (0..sc.users).map(|_| AtomicBool::new(false)).collect(),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            from_ns: AtomicU64::new(u64::MAX),
            to_ns: AtomicU64::new(u64::MAX),
            registered: AtomicUsize::new(0),
            logged_in: AtomicUsize::new(0),
            rosters_done: AtomicUsize::new(0),
            sc: sc.clone(),
        })
    };
    if args.provision || args.provision_only {
        let shared = fresh();
        provision(&shared)?;
        if args.provision_only {
            eprintln!("provisioned {} users with rosters of {}", sc.users, sc.roster_size);
            return Ok(None);
        }
    }
    // A fresh clock and fresh counters for the load run: logins are paced from its start.
    load(&fresh(), &args).map(Some)
}

fn spawn_threads<F, Fut>(
    shared: &Arc<Shared>,
    phase: &watch::Receiver<Phase>,
    per_user: F,
) -> Vec<std::thread::JoinHandle<ThreadStats>>
where
    F: Fn(Arc<Shared>, usize, watch::Receiver<Phase>, Stats) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let threads = shared.sc.threads;
    (0..threads)
        .map(|t| {
            let shared = shared.clone();
            let phase = phase.clone();
            let per_user = per_user.clone();
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let stats: Stats = Rc::new(RefCell::new(ThreadStats::new()));
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async {
                        let mut tasks = Vec::new();
                        let n = shared.sc.users;
                        for i in (t..n).step_by(threads) {
                            tasks.push(tokio::task::spawn_local(per_user(
                                shared.clone(),
                                i,
                                phase.clone(),
                                stats.clone(),
                            )));
                        }
                        for task in tasks {
                            let _ = task.await;
                        }
                    });
                    Rc::try_unwrap(stats)
                        .map(|c| c.into_inner())
                        .unwrap_or_else(|_| ThreadStats::new())
                })
                .expect("spawn generator thread")
        })
        .collect()
}

fn login_of(shared: &Shared, i: usize) -> (String, IpAddr) {
    (shared.sc.local(i), IpAddr::V4(shared.sc.source_addr(i)))
}

/// The fastest provisioning pace (registrations a second).
const PROVISION_RATE: f64 = 200.0;

/// Provisioning retries what a busy server refuses for a moment: resets, timeouts, and
/// errors of type `wait`. Up to 6 attempts, backing off from 250 ms.
async fn with_retries<T, F, Fut>(mut f: F) -> Result<T, client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, client::ClientError>>,
{
    use client::ClientError as E;
    let mut delay = Duration::from_millis(250);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r = match tokio::time::timeout(Duration::from_secs(30), f()).await {
            Ok(r) => r,
            Err(_) => Err(E::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))),
        };
        match r {
            Err(E::Connect(_) | E::Io(_) | E::Closed) if attempt < 6 => {}
            Err(E::Protocol(ref m)) if attempt < 6 && m.contains("wait") => {}
            r => return r,
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

/// Registers every user in band, then makes every roster by subscription handshakes.
fn provision(shared: &Arc<Shared>) -> Result<(), String> {
    let (tx, rx) = watch::channel(Phase::Login);
    let started = Instant::now();
    let handles = spawn_threads(shared, &rx, |shared, i, mut phase, stats| async move {
        // Spread registrations like logins (at most PROVISION_RATE a second: registering
        // hashes a password, which a busy server does slowly), so throttles see a rate.
        let rate = shared.sc.login_rate.min(PROVISION_RATE);
        let at = Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until((shared.start + at).into()).await;
        let (user, source) = login_of(&shared, i);
        let login = Login {
            target: shared.target(i),
            source,
            domain: &shared.sc.domain,
            user: &user,
            password: &shared.sc.password,
            tls: shared.tls.clone(),
            mechanism: &shared.sc.mechanism,
        };
        if let Err(e) = with_retries(|| Connection::register(&login)).await {
            stats.borrow_mut().error(format!("register: {}", e.kind()));
            eprintln!("register {user}: {e}");
        }
        shared.registered.fetch_add(1, Ordering::Relaxed);
        if shared.sc.roster_size == 0 {
            return;
        }
        let (mut c, _) = match with_retries(|| Connection::login(&login)).await {
            Ok(x) => x,
            Err(e) => {
                stats.borrow_mut().error(format!("login: {}", e.kind()));
                eprintln!("login {user}: {e}");
                shared.logged_in.fetch_add(1, Ordering::Relaxed);
                shared.rosters_done.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let _ = c.send("<presence/>").await;
        shared.logged_in.fetch_add(1, Ordering::Relaxed);
        let _ = phase.wait_for(|p| *p >= Phase::Subscribe).await;
        let contacts: Vec<String> = shared
            .sc
            .contacts(i)
            .into_iter()
            .map(|j| format!("{}@{}", shared.sc.local(j), shared.sc.domain))
            .collect();
        // What is already in place (a second run against the same server) needs no handshake:
        // ask for the roster first, then subscribe to the contacts not yet confirmed.
        c.queue("<iq type='get' id='roster0'><query xmlns='jabber:iq:roster'/></iq>");
        let mut confirmed: HashSet<String> = HashSet::new();
        let mut asked = false;
        let mut done = false;
        loop {
            while let Some(ev) = c.take_event() {
                let StreamEvent::Stanza(st) = ev else { continue };
                if st.name == "presence" {
                    let from = st.attr("from").unwrap_or_default();
                    let bare = from.split('/').next().unwrap_or_default().to_string();
                    match st.attr("type") {
                        Some("subscribe") => c.queue(&format!("<presence type='subscribed' to='{bare}'/>")),
                        Some("subscribed") => {
                            confirmed.insert(bare);
                        }
                        _ => {}
                    }
                } else if st.name == "iq" {
                    // The roster result and roster pushes both say whose presence we see.
                    if let Some(q) = st.child("query", "jabber:iq:roster") {
                        for item in q.elements() {
                            if matches!(item.attr("subscription"), Some("to" | "both")) {
                                confirmed.insert(item.attr("jid").unwrap_or_default().to_string());
                            }
                        }
                    }
                    if st.attr("id") == Some("roster0") && st.attr("type") != Some("get") {
                        asked = true;
                        for j in contacts.iter().filter(|j| !confirmed.contains(*j)) {
                            c.queue(&format!("<presence type='subscribe' to='{j}'/>"));
                        }
                    }
                    answer_iq(&mut c, &st);
                }
            }
            if asked && !done && contacts.iter().all(|j| confirmed.contains(j)) {
                done = true;
                shared.rosters_done.fetch_add(1, Ordering::Relaxed);
            }
            if c.flush().await.is_err() {
                break;
            }
            tokio::select! {
                r = c.read_more() => if r.is_err() { break },
                _ = phase.wait_for(|p| *p >= Phase::Stop) => break,
            }
        }
        if !done {
            shared.rosters_done.fetch_add(1, Ordering::Relaxed);
            stats.borrow_mut().error("roster incomplete".into());
        }
        c.close().await;
    });
    let n = shared.sc.users;
    // Generous: a server that hashes a password per registration and per login may manage
    // only tens a second.
    let limit = Duration::from_secs_f64(120.0 + n as f64 / 10.0);
    let wait = |what: &str, count: &AtomicUsize, target: usize| -> Result<(), String> {
        while count.load(Ordering::Relaxed) < target {
            if started.elapsed() > limit {
                return Err(format!("provisioning: {what} not done after {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    let r = wait("registration", &shared.registered, n).and_then(|()| {
        if shared.sc.roster_size == 0 {
            return Ok(());
        }
        // Everyone online (or failed) before the handshakes: requests reach online users.
        wait("logins", &shared.logged_in, n)?;
        std::thread::sleep(Duration::from_millis(500));
        let _ = tx.send(Phase::Subscribe);
        wait("rosters", &shared.rosters_done, n)
    });
    let _ = tx.send(Phase::Stop);
    let mut stats = ThreadStats::new();
    for h in handles {
        stats.merge(h.join().map_err(|_| "generator thread panicked")?);
    }
    eprintln!(
        "provisioning took {:.1}s; problems: {:?}",
        started.elapsed().as_secs_f64(),
        stats.errors
    );
    r?;
    if !stats.errors.is_empty() {
        return Err(format!("provisioning failed: {:?}", stats.errors));
    }
    Ok(())
}

/// Answers the server's IQ requests the way a client does: roster pushes and pings get a
/// result, anything else `service-unavailable`.
fn answer_iq(c: &mut Connection, st: &Element) {
    let Some(t @ ("get" | "set")) = st.attr("type") else {
        return;
    };
    let id = starling_actors::xml::attr_escaped(st.attr("id").unwrap_or_default());
    let to = st
        .attr("from")
        .map(|f| format!(" to='{}'", starling_actors::xml::attr_escaped(f)))
        .unwrap_or_default();
    let known = st
        .first_child()
        .map(|q| q.ns == "jabber:iq:roster" && t == "set" || q.ns == "urn:xmpp:ping")
        .unwrap_or(false);
    if known {
        c.queue(&format!("<iq type='result' id='{id}'{to}/>"));
    } else {
        c.queue(&format!(
            "<iq type='error' id='{id}'{to}><error type='cancel'><service-unavailable \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
        ));
    }
}

/// One online user during the load run.
async fn user_load(shared: Arc<Shared>, i: usize, mut phase: watch::Receiver<Phase>, stats: Stats) {
    let sc = &shared.sc;
    if i >= sc.online() {
        return;
    }
    let at = shared.start + Duration::from_secs_f64(i as f64 / sc.login_rate);
    tokio::time::sleep_until(at.into()).await;
    let (user, source) = login_of(&shared, i);
    let login = Login {
        target: shared.target(i),
        source,
        domain: &sc.domain,
        user: &user,
        password: &sc.password,
        tls: shared.tls.clone(),
        mechanism: &sc.mechanism,
    };
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(sc.login_timeout_secs);
    let mut c = match tokio::time::timeout(limit, Connection::login(&login)).await {
        Ok(Ok((c, _))) => c,
        Ok(Err(e)) => {
            shared.logins_failed.fetch_add(1, Ordering::Relaxed);
            stats.borrow_mut().error(format!("login: {}", e.kind()));
            return;
        }
        Err(_) => {
            shared.logins_failed.fetch_add(1, Ordering::Relaxed);
            stats.borrow_mut().error("login: timed out".into());
            return;
        }
    };
    let _ = stats
        .borrow_mut()
        .login_us
        .record((t0.elapsed().as_micros() as u64).max(1));
    shared.logins_ok.fetch_add(1, Ordering::Relaxed);
    shared.online[i].store(true, Ordering::Relaxed);
    c.queue("<presence/>");
    stats.borrow_mut().stanzas_sent += 1;

    let mut rng = ChaCha8Rng::seed_from_u64(i as u64 ^ 0x5eed);
    let contacts = sc.contacts(i);
    let padding: String = "x".repeat(sc.message_bytes.saturating_sub(24));
    let interval =
        (sc.messages_per_user_per_sec > 0.0).then(|| Duration::from_secs_f64(1.0 / sc.messages_per_user_per_sec));
    let mut next_msg: Option<tokio::time::Instant> = None;
    let mut presence_at: Vec<tokio::time::Instant> = Vec::new();
    let mut away = false;
    let mut seq = 0u64;
    let mut sending = false;
    loop {
        // Handle what has been read.
        while let Some(ev) = c.take_event() {
            match ev {
                StreamEvent::Stanza(st) => on_stanza(&shared, &stats, &mut c, &st),
                StreamEvent::End => {
                    stats.borrow_mut().error("closed by server".into());
                    shared.online[i].store(false, Ordering::Relaxed);
                    return;
                }
                StreamEvent::Header(_) => {}
            }
        }
        if let Err(e) = c.flush().await {
            stats.borrow_mut().error(e.kind());
            shared.online[i].store(false, Ordering::Relaxed);
            return;
        }
        let now_phase = *phase.borrow();
        if now_phase >= Phase::Run && !sending && now_phase < Phase::Drain {
            sending = true;
            let now = tokio::time::Instant::now();
            if let Some(iv) = interval {
                // A random phase, so users do not send in lockstep.
                let off = iv.mul_f64((rng.next_u32() as f64) / (u32::MAX as f64));
                next_msg = Some(now + off);
            }
            // Presence changes spread over the measured period.
            let from = shared.start + Duration::from_nanos(shared.from_ns.load(Ordering::Relaxed));
            let dur = Duration::from_secs_f64(sc.duration_secs);
            for k in 0..sc.presence_changes {
                let slot =
                    dur.mul_f64((k as f64 + (rng.next_u32() as f64 / u32::MAX as f64)) / sc.presence_changes as f64);
                presence_at.push((from + slot).into());
            }
            presence_at.sort();
            presence_at.reverse();
        }
        if now_phase >= Phase::Drain {
            sending = false;
        }
        if now_phase >= Phase::Stop {
            break;
        }
        let msg_due = next_msg.filter(|_| sending);
        let pres_due = presence_at.last().copied().filter(|_| sending);
        tokio::select! {
            r = c.read_more() => {
                if let Err(e) = r {
                    stats.borrow_mut().error(e.kind());
                    shared.online[i].store(false, Ordering::Relaxed);
                    return;
                }
            }
            _ = phase.changed() => {}
            _ = async { tokio::time::sleep_until(msg_due.expect("guarded")).await }, if msg_due.is_some() => {
                let iv = interval.expect("a due message implies an interval");
                next_msg = Some(msg_due.expect("guarded") + iv);
                let offline = sc.offline_share > 0.0
                    && (rng.next_u32() as f64) < sc.offline_share * f64::from(u32::MAX);
                if offline {
                    // To someone not online: stored by the server, never received here.
                    let j = sc.online() + (rng.next_u64() as usize) % (sc.users - sc.online());
                    seq += 1;
                    let ns = shared.ns();
                    let to = format!("{}@{}", sc.local(j), sc.domain);
                    c.queue(&format!(
                        "<message to='{to}' type='chat' id='m{seq}'><body>T{ns} {padding}</body></message>"
                    ));
                    let mut s = stats.borrow_mut();
                    s.stanzas_sent += 1;
                    if shared.measured(ns) {
                        s.measured_stored += 1;
                    }
                } else if let Some(to) = pick_target(&shared, &contacts, i, &mut rng) {
                    seq += 1;
                    let ns = shared.ns();
                    let to = format!("{}@{}", sc.local(to), sc.domain);
                    c.queue(&format!(
                        "<message to='{to}' type='chat' id='m{seq}'><body>T{ns} {padding}</body></message>"
                    ));
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    let mut s = stats.borrow_mut();
                    s.stanzas_sent += 1;
                    if shared.measured(ns) {
                        s.measured_sent += 1;
                    }
                } else {
                    stats.borrow_mut().error("no online contact to send to".into());
                }
            }
            _ = async { tokio::time::sleep_until(pres_due.expect("guarded")).await }, if pres_due.is_some() => {
                presence_at.pop();
                away = !away;
                c.queue(if away { "<presence><show>away</show></presence>" } else { "<presence/>" });
                stats.borrow_mut().stanzas_sent += 1;
            }
        }
    }
    shared.online[i].store(false, Ordering::Relaxed);
    c.close().await;
}

fn pick_target(shared: &Shared, contacts: &[usize], me: usize, rng: &mut ChaCha8Rng) -> Option<usize> {
    for _ in 0..contacts.len().max(1) * 2 {
        if contacts.is_empty() {
            break;
        }
        let c = contacts[(rng.next_u32() as usize) % contacts.len()];
        if shared.online[c].load(Ordering::Relaxed) {
            return Some(c);
        }
    }
    // No online contact: anyone online.
    for _ in 0..16 {
        let j = (rng.next_u64() as usize) % shared.sc.online();
        if j != me && shared.online[j].load(Ordering::Relaxed) {
            return Some(j);
        }
    }
    None
}

fn on_stanza(shared: &Shared, stats: &Stats, c: &mut Connection, st: &Element) {
    let mut s = stats.borrow_mut();
    s.stanzas_received += 1;
    match st.name.as_str() {
        "message" => {
            if st.attr("type") == Some("error") {
                let cond = st
                    .child("error", starling_actors::ns::CLIENT)
                    .and_then(|e| e.first_child())
                    .map(|x| x.name.clone())
                    .unwrap_or_else(|| "unknown".into());
                s.error(format!("message error: {cond}"));
                return;
            }
            let Some(body) = st.child("body", starling_actors::ns::CLIENT) else {
                return;
            };
            let text = body.text();
            let Some(ns) = text
                .strip_prefix('T')
                .and_then(|t| t.split(' ').next())
                .and_then(|t| t.parse::<u64>().ok())
            else {
                return;
            };
            shared.received.fetch_add(1, Ordering::Relaxed);
            let now = shared.ns();
            let us = (now.saturating_sub(ns) / 1000).max(1);
            if shared.measured(ns) {
                s.measured_received += 1;
                let _ = s.latency_us.record(us);
            }
            let sec = (ns / 1_000_000_000) as usize;
            if s.latency_by_sec.len() <= sec {
                s.latency_by_sec
                    .resize_with(sec + 1, || Histogram::new_with_bounds(1, 600_000_000, 2).expect("h"));
            }
            let _ = s.latency_by_sec[sec].record(us);
        }
        "iq" => {
            drop(s);
            answer_iq(c, st);
        }
        _ => {}
    }
}

/// The load run; the main thread samples counters once a second for the timeline.
fn load(shared: &Arc<Shared>, args: &BenchArgs) -> Result<Report, String> {
    let sc = &shared.sc;
    let (tx, rx) = watch::channel(Phase::Login);
    let pids = args.server_pids.as_slice();
    let rss_before = rss_kib_of(pids);
    let handles = spawn_threads(shared, &rx, user_load);
    let mut timeline = Vec::new();
    let sample = |timeline: &mut Vec<report::Sample>| {
        timeline.push(report::Sample {
            t: shared.start.elapsed().as_secs_f64(),
            logins: shared.logins_ok.load(Ordering::Relaxed),
            sent: shared.sent.load(Ordering::Relaxed),
            received: shared.received.load(Ordering::Relaxed),
            server_cpu: if pids.is_empty() { None } else { cpu_secs_of(pids) },
            server_rss_kib: rss_kib_of(pids),
            ..Default::default()
        })
    };
    // Logins.
    let n = sc.online() as u64;
    let login_limit = Duration::from_secs_f64(n as f64 / sc.login_rate + sc.login_timeout_secs + 5.0);
    let mut next_sample = Instant::now();
    while shared.logins_ok.load(Ordering::Relaxed) + shared.logins_failed.load(Ordering::Relaxed) < n {
        if shared.start.elapsed() > login_limit {
            break;
        }
        if Instant::now() >= next_sample {
            sample(&mut timeline);
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let login_secs = shared.start.elapsed().as_secs_f64();
    let rss_online = rss_kib_of(pids);
    // Load: warm-up, then the measured window.
    let warm = Duration::from_secs_f64(sc.warmup_secs);
    let dur = Duration::from_secs_f64(sc.duration_secs);
    let from = shared.start.elapsed() + warm;
    shared.from_ns.store(from.as_nanos() as u64, Ordering::Relaxed);
    shared.to_ns.store((from + dur).as_nanos() as u64, Ordering::Relaxed);
    let _ = tx.send(Phase::Run);
    let until = |t: Duration, timeline: &mut Vec<report::Sample>, next_sample: &mut Instant| {
        while shared.start.elapsed() < t {
            if Instant::now() >= *next_sample {
                sample(timeline);
                *next_sample += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    until(from, &mut timeline, &mut next_sample);
    let srv = || if pids.is_empty() { None } else { cpu_secs_of(pids) };
    let (srv0, own0) = (srv(), cpu_secs(None));
    until(from + dur, &mut timeline, &mut next_sample);
    let (srv1, own1) = (srv(), cpu_secs(None));
    let rss_end = rss_kib_of(pids);
    // Drain: what was sent in the window may still be on its way.
    let _ = tx.send(Phase::Drain);
    until(from + dur + Duration::from_secs(2), &mut timeline, &mut next_sample);
    let _ = tx.send(Phase::Stop);
    let mut stats = ThreadStats::new();
    for h in handles {
        stats.merge(h.join().map_err(|_| "generator thread panicked")?);
    }
    let cpu = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) / dur.as_secs_f64());
    Ok(report::build(report::Inputs {
        label: args.label.clone(),
        scenario: sc.clone(),
        target: shared
            .targets
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(","),
        stats,
        logins_ok: shared.logins_ok.load(Ordering::Relaxed),
        logins_failed: shared.logins_failed.load(Ordering::Relaxed),
        login_secs,
        measured_secs: dur.as_secs_f64(),
        generator_cores: cpu(own0, own1),
        server_pid: pids.first().copied(),
        server_cores: cpu(srv0, srv1),
        rss_before,
        rss_online,
        rss_end,
        timeline,
    }))
}
