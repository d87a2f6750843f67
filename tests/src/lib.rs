//! Harness for end-to-end tests: builds and starts the real `starling` binary on free loopback
//! ports with its own data directory, and gives tests a third-party client (tokio-xmpp) and a
//! raw-XML client for error paths.

pub mod raw;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, Stanza};

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
        // `--workspace` resolves features as `cargo test --workspace` does, so the build reuses
        // the test build's artifacts instead of compiling the dependencies a second time.
        cmd.current_dir(root).args(["build", "-q", "--workspace", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building the starling binary failed");
        profile_dir.join("starling")
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
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

    pub fn start(settings: &[&str], users: &[(&str, &str)]) -> Server {
        Self::start_with(settings, users, true)
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

/// Logs in with tokio-xmpp (SCRAM-SHA-256 over STARTTLS) and waits until bound.
pub async fn login(server: &Server, jid: &str, password: &str) -> (Client, Jid) {
    test_cert();
    let mut client = Client::new_starttls(
        Jid::new(jid).expect("jid"),
        password,
        DnsConfig::addr(&server.addr()),
        Timeouts::default(),
    );
    let bound = tokio::time::timeout(WAIT, async {
        loop {
            match client.next().await {
                Some(Event::Online { bound_jid, .. }) => return bound_jid,
                Some(Event::Disconnected(e)) => panic!("{jid} disconnected while logging in: {e}"),
                Some(_) => {}
                None => panic!("{jid}: stream ended while logging in"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{jid} did not come online\n{}", server.log_text()));
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
            match client.next().await {
                Some(Event::Stanza(s)) if pred(&s) => return s,
                Some(Event::Disconnected(e)) => panic!("disconnected while waiting for {what}: {e}"),
                None => panic!("stream ended while waiting for {what}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
