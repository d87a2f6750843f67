//! Harness for end-to-end tests: builds and starts the real `starling` binary on free loopback
//! ports with its own data directory, and gives tests a third-party client (tokio-xmpp) and a
//! raw-XML client for error paths.

pub mod raw;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use futures::StreamExt;
use tokio_xmpp::connect::{DnsConfig, StartTlsServerConnector};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaState, StanzaStream, StreamEvent};
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{IqRequest, IqResponse, Stanza};

/// The `starling` binary of this build profile, built once per test process.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe path");
        // target/<profile>/deps/<test> → target/<profile>/starling
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The binary an operator gets: the whole workspace would compile the simulator's
        // planted bugs into it (sim enables the feature, and features unify). Without sim,
        // every dependency resolves with the features of `cargo test --workspace`, so only
        // starling-actors and starling-node build a second time (`-p starling-node` alone
        // would rebuild some fifty dependencies with other features); `--version` proves it.
        cmd.current_dir(root)
            .args(["build", "-q", "--workspace", "--exclude", "sim", "--bins"]);
        // What cargo set for this test process (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, …) must
        // not reach the build: build scripts such as ring's rerun when those differ from the
        // test build's, and ring and everything above it would compile again.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&k.as_ref()) || k.starts_with("CARGO_BUILD_");
            if (k.starts_with("CARGO_") && !keep) || k == "OUT_DIR" {
                cmd.env_remove(k.as_ref());
            }
        }
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the starling binary failed");
        let bin = profile_dir.join("starling");
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .expect("starling --version");
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !version.contains("planted"),
            "the binary under test is not the one an operator gets: {version}"
        );
        bin
    })
    .clone()
}

/// One certificate for every test server of this process, trusted by the clients through
/// `SSL_CERT_FILE` (read by rustls-native-certs inside tokio-xmpp).
pub fn test_cert() -> &'static (PathBuf, PathBuf) {
    static CERT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    CERT.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("starling-cert")
            .tempdir()
            .expect("tempdir")
            .keep();
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, c.cert.pem()).expect("write cert");
        std::fs::write(&key, c.key_pair.serialize_pem()).expect("write key");
        // Set once, before any client of this process reads it.
        std::env::set_var("SSL_CERT_FILE", &cert);
        (cert, key)
    })
}

/// A loopback port nobody listens on, never handed out twice in this process: a server that
/// is being restarted has let go of its ports, and another test must not take them meanwhile.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls_port: u16,
    pub metrics_port: u16,
    settings: Vec<String>,
    log: PathBuf,
}

impl Server {
    /// Starts a server with `users` provisioned through `starling user add` and extra
    /// `--set` settings. `use_test_cert`: configure the shared test certificate (otherwise
    /// the server generates its own on first start).
    pub fn start_with(settings: &[&str], users: &[(&str, &str)], use_test_cert: bool) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("starling-e2e")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let tls_port = free_port();
        let metrics_port = free_port();
        let mut all: Vec<String> = vec![
            format!("metrics.listen=\"127.0.0.1:{metrics_port}\""),
            format!("c2s.listen=\"127.0.0.1:{port}\""),
            format!("c2s.direct_tls_listen=\"127.0.0.1:{tls_port}\""),
            "server.shards=2".into(),
            "server.shutdown_grace_secs=2".into(),
        ];
        if use_test_cert {
            let (c, k) = test_cert();
            all.push(format!("tls.cert={:?}", c.display().to_string()));
            all.push(format!("tls.key={:?}", k.display().to_string()));
        }
        all.extend(settings.iter().map(|s| s.to_string()));
        let log = dir.path().join("server.log");
        let mut s = Server {
            child: None,
            dir,
            port,
            tls_port,
            metrics_port,
            settings: all,
            log,
        };
        for (jid, pw) in users {
            let out = s.cli(&["user", "add", jid, pw]);
            assert!(
                out.status.success(),
                "user add {jid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s.spawn();
        s
    }

    /// A cluster member named `name`, gossiping on UDP `gossip`, its transport on TCP
    /// `transport`, joining through the gossip ports in `seeds`. In-band registration is
    /// open: accounts must be created through the cluster (they live on their owner node).
    pub fn start_node(name: &str, gossip: u16, transport: u16, seeds: &[u16], settings: &[&str]) -> Server {
        let seeds: Vec<String> = seeds.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let mut all = vec![
            format!("cluster.node_name={name:?}"),
            format!("cluster.gossip=\"127.0.0.1:{gossip}\""),
            format!("cluster.transport=\"127.0.0.1:{transport}\""),
            format!("cluster.seeds=[{}]", seeds.join(",")),
            "registration.mode=open".to_string(),
            "c2s.require_tls=false".to_string(),
        ];
        all.extend(settings.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        Self::start_with(&refs, &[], true)
    }

    pub fn start(settings: &[&str], users: &[(&str, &str)]) -> Server {
        Self::start_with(settings, users, true)
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    fn base_args(&self) -> Vec<String> {
        let mut a = vec![
            "--data-dir".to_string(),
            self.dir.path().join("data").display().to_string(),
        ];
        for s in &self.settings {
            a.push("--set".into());
            a.push(s.clone());
        }
        a
    }

    /// Runs a `starling` subcommand on this server's data dir.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut a = self.base_args();
        a.extend(args.iter().map(|s| s.to_string()));
        Command::new(binary()).args(a).output().expect("run starling")
    }

    /// Starts a `starling` subcommand on this server's data dir without waiting for it.
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        let mut a = self.base_args();
        a.extend(args.iter().map(|s| s.to_string()));
        Command::new(binary())
            .args(a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run starling")
    }

    /// Whether the process has exited by itself (its status then), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().expect("wait")?;
        self.child = None;
        Some(st)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut a = self.base_args();
        a.push("serve".into());
        let child = Command::new(binary())
            .args(a)
            .env(
                "STARLING_LOG",
                std::env::var("STARLING_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn starling");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "starling exited at start ({st}); if it mentions io_uring: glommio needs io_uring, \
                     which Docker's default seccomp profile blocks.\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "starling did not listen within 30 s\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait: a clean shutdown (clients told, storage flushed).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("starling did not stop within 30 s of SIGTERM\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process dies at once (no leave, no flush beyond what was acknowledged).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the process again after `stop` or `kill9`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    pub fn restart(&mut self) {
        let st = self.stop();
        assert!(st.success(), "unclean exit {st}\n{}", self.log_text());
        self.spawn();
    }

    /// GET on the metrics listener; returns (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics port");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read response");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (head.lines().next().unwrap_or("").to_string(), body.to_string())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // STARLING_KEEP_LOGS=DIR keeps each server's log for debugging.
        if let Ok(dir) = std::env::var("STARLING_KEEP_LOGS") {
            let name = self
                .dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = std::fs::copy(&self.log, Path::new(&dir).join(format!("{name}.log")));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(20);

/// With `STARLING_TEST_CLIENT_LOG=FILE`, the client library's own log (tokio-xmpp logs every
/// stanza it sends and receives at trace level) is appended to FILE.
fn client_log() {
    struct FileLog(std::sync::Mutex<std::fs::File>);
    impl log::Log for FileLog {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.target().starts_with("tokio_xmpp")
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                use std::io::Write;
                let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(
                    f,
                    "{:?} {:?} {} {}",
                    std::time::SystemTime::now(),
                    std::thread::current().id(),
                    r.level(),
                    r.args()
                );
            }
        }
        fn flush(&self) {}
    }
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        if let Ok(path) = std::env::var("STARLING_TEST_CLIENT_LOG") {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("client log file");
            if log::set_boxed_logger(Box::new(FileLog(std::sync::Mutex::new(f)))).is_ok() {
                log::set_max_level(log::LevelFilter::Trace);
            }
        }
    });
}

/// A tokio-xmpp client, driven through its `StanzaStream` (tokio-xmpp does the connection,
/// STARTTLS, SCRAM, binding and stanza (de)serialisation).
///
/// Why not `tokio_xmpp::Client`: in tokio-xmpp 6.0.0 its receive half (`StanzaReceiver`)
/// returns `Pending` without registering a waker when the send half holds their shared lock,
/// so a stanza that arrives while the test is sending can stall the client forever — seen
/// here as lost IQ answers and roster pushes under parallel test load, while the server's
/// trace log shows them written. Owning the `StanzaStream` in one task avoids that lock.
pub struct Client {
    stream: StanzaStream,
    /// Stanzas read while waiting for an IQ answer, handed out first.
    pending: VecDeque<Stanza>,
    next_id: u64,
    name: String,
}

impl Client {
    /// The next stanza from the server (none: the stream ended).
    pub async fn next_stanza(&mut self) -> Option<Stanza> {
        if let Some(s) = self.pending.pop_front() {
            return Some(s);
        }
        loop {
            match self.stream.next().await? {
                Event::Stanza(s) => return Some(s),
                Event::Stream(StreamEvent::Suspended) => panic!("{}: disconnected", self.name),
                Event::Stream(_) => {}
            }
        }
    }

    /// Sends a stanza (an id is added when it has none) and waits until it is written.
    pub async fn send_stanza(&mut self, mut stanza: Stanza) -> Result<(), std::io::Error> {
        self.next_id += 1;
        let id = format!("t{}", self.next_id);
        match &mut stanza {
            Stanza::Message(m) if m.id.is_none() => m.id = Some(tokio_xmpp::parsers::message::Id(id)),
            Stanza::Presence(p) if p.id.is_none() => p.id = Some(id),
            _ => {}
        }
        let mut token = self.stream.send(Box::new(stanza)).await;
        match token.wait_for(StanzaStage::Sent).await {
            Some(StanzaState::Sent { .. }) | Some(StanzaState::Acked { .. }) => Ok(()),
            other => Err(std::io::Error::other(format!("{}: not sent: {other:?}", self.name))),
        }
    }

    /// Sends an IQ request and waits (bounded) for the answer with its id; other stanzas
    /// that arrive meanwhile are kept for `next_stanza`.
    pub async fn iq(&mut self, to: Option<Jid>, req: IqRequest) -> IqResponse {
        self.next_id += 1;
        let id = format!("iq{}", self.next_id);
        let iq = match req {
            IqRequest::Get(payload) => Iq::Get {
                from: None,
                to,
                id: id.clone(),
                payload,
            },
            IqRequest::Set(payload) => Iq::Set {
                from: None,
                to,
                id: id.clone(),
                payload,
            },
        };
        self.send_stanza(Stanza::Iq(iq)).await.expect("send IQ");
        let name = self.name.clone();
        tokio::time::timeout(WAIT, async {
            let mut skipped = VecDeque::new();
            let answer = loop {
                let Some(s) = self.stream.next().await else {
                    panic!("{name}: stream ended while waiting for IQ {id}")
                };
                match s {
                    Event::Stanza(Stanza::Iq(Iq::Result { id: i, payload, .. })) if i == id => {
                        break IqResponse::Result(payload)
                    }
                    Event::Stanza(Stanza::Iq(Iq::Error { id: i, error, .. })) if i == id => {
                        break IqResponse::Error(error)
                    }
                    Event::Stanza(other) => skipped.push_back(other),
                    Event::Stream(StreamEvent::Suspended) => panic!("{name}: disconnected"),
                    Event::Stream(_) => {}
                }
            };
            self.pending.extend(skipped);
            answer
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: no answer to IQ within {WAIT:?}"))
    }

    /// Closes the stream cleanly.
    pub async fn send_end(self) -> Result<(), std::io::Error> {
        self.stream.close().await;
        Ok(())
    }
}

/// Logs in with tokio-xmpp (SCRAM-SHA-256 over STARTTLS) and waits until bound.
pub async fn login(server: &Server, jid: &str, password: &str) -> (Client, Jid) {
    test_cert();
    client_log();
    let mut stream = StanzaStream::new_c2s(
        StartTlsServerConnector::from(DnsConfig::addr(&server.addr())),
        Jid::new(jid).expect("jid"),
        password.to_string(),
        Timeouts::default(),
        16,
    );
    let bound = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => return bound_jid,
                Some(Event::Stream(StreamEvent::Suspended)) => panic!("{jid} disconnected while logging in"),
                Some(_) => {}
                None => panic!("{jid}: stream ended while logging in"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{jid} did not come online\n{}", server.log_text()));
    let client = Client {
        stream,
        pending: VecDeque::new(),
        next_id: 0,
        name: jid.to_string(),
    };
    (client, bound)
}

/// Bounds any wait in a test, so that a lost answer fails the test instead of hanging CI.
pub trait Within: std::future::Future + Sized {
    fn within(self, what: &'static str) -> impl std::future::Future<Output = Self::Output> {
        async move {
            tokio::time::timeout(WAIT, self)
                .await
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        }
    }
}

impl<F: std::future::Future> Within for F {}

/// Waits for the first stanza satisfying `pred`, skipping others.
pub async fn expect_stanza(client: &mut Client, what: &str, mut pred: impl FnMut(&Stanza) -> bool) -> Stanza {
    tokio::time::timeout(WAIT, async {
        loop {
            match client.next_stanza().await {
                Some(s) if pred(&s) => return s,
                Some(_) => {}
                None => panic!("stream ended while waiting for {what}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
