//! `starling bench` end to end: provision users in band against a real server, run a short
//! scenario (plain and STARTTLS + SCRAM), and check the reports it writes.

use std::process::Command;

use starling_tests::{binary, Server};

const SCENARIO: &str = r#"
name = "e2e"
users = 40
login_rate = 200
roster_size = 2
presence_changes = 1
messages_per_user_per_sec = 5.0
duration_secs = 2
warmup_secs = 0.5
source_addrs = 4
threads = 2
"#;

fn run_bench(server: &Server, out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let scenario = server.dir.path().join("e2e.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let mut args = vec![
        "bench".to_string(),
        "run".into(),
        scenario.display().to_string(),
        "--provision".into(),
        "--target".into(),
        format!("127.0.0.1:{}", server.port),
        "--server-pid".into(),
        server.pid().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(binary()).args(&args).output().expect("run starling bench");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "bench failed:\n{stdout}\n{stderr}\n{}",
        server.log_text()
    );
    assert!(stdout.contains("| latency p99 (ms) |"), "{stdout}");
    let json = std::fs::read_to_string(out.join("bench.json")).expect("bench.json");
    serde_json::from_str(&json).expect("valid JSON")
}

fn check(r: &serde_json::Value, out: &std::path::Path) {
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
    assert_eq!(n("logins_ok"), 40.0, "{r}");
    assert_eq!(n("logins_failed"), 0.0, "{r}");
    assert!(n("logins_per_sec") > 0.0, "{r}");
    assert!(n("messages_received") > 0.0, "{r}");
    assert_eq!(n("messages_lost"), 0.0, "{r}");
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
    let lat = &r["latency_ms"];
    assert!(lat["p50"].as_f64().unwrap() > 0.0, "{r}");
    assert!(lat["p99"].as_f64().unwrap() >= lat["p50"].as_f64().unwrap(), "{r}");
    // Given the server's pid: its memory and CPU.
    assert!(n("server_rss_online_kib") > 1000.0, "{r}");
    assert!(r["server_cores"].as_f64().is_some(), "{r}");
    assert!(r["generator_cores"].as_f64().is_some(), "{r}");
    assert!(!r["timeline"].as_array().unwrap().is_empty(), "{r}");
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("messages received/s"), "{md}");
    let png = std::fs::read(out.join("bench.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "not a plot: {} bytes",
        png.len()
    );
}

#[test]
fn bench_runs_a_scenario_and_reports() {
    let server = Server::start(&["c2s.require_tls=false", "registration.mode=\"open\""], &[]);
    let plain = server.dir.path().join("plain");
    let r = run_bench(&server, &plain, &["--label", "plain"]);
    check(&r, &plain);
    assert_eq!(r["label"], "plain");

    // The same users again (provisioning finds them in place), over STARTTLS with SCRAM.
    let tls = server.dir.path().join("tls");
    let r = run_bench(
        &server,
        &tls,
        &["--param", "tls=true", "--param", "mechanism=\"SCRAM-SHA-256\""],
    );
    check(&r, &tls);

    // Two reports side by side.
    let o = Command::new(binary())
        .args(["bench", "compare"])
        .arg(plain.join("bench.json"))
        .arg(tls.join("bench.json"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    assert!(
        table.contains("| metric | plain |") && table.contains("(plain: "),
        "{table}"
    );
}
