//! The benchmark's results: a JSON file, a Markdown table, a PNG plot of throughput and
//! latency over time, and a side-by-side comparison of several runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::scenario::Scenario;
use super::ThreadStats;

/// Counters sampled once a second by the main thread (cumulative).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub logins: u64,
    pub sent: u64,
    pub received: u64,
    pub server_cpu: Option<f64>,
    pub server_rss_kib: Option<u64>,
    /// Filled in from the per-second latency histograms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    pub count: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    pub scenario: Scenario,
    pub logins_ok: u64,
    pub logins_failed: u64,
    /// Logins completed per second over the login phase.
    pub logins_per_sec: f64,
    pub login_ms: Percentiles,
    pub measured_secs: f64,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// Sent in the measured window and never received (after a 2 s drain).
    pub messages_lost: u64,
    pub messages_sent_per_sec: f64,
    pub messages_received_per_sec: f64,
    /// Sent in the measured window to users not online (the server stores them).
    #[serde(default)]
    pub messages_stored: u64,
    #[serde(default)]
    pub messages_stored_per_sec: f64,
    pub stanzas_sent: u64,
    pub stanzas_received: u64,
    /// End-to-end message latency in the measured window, milliseconds.
    pub latency_ms: Percentiles,
    pub errors: BTreeMap<String, u64>,
    /// CPU cores the load generator itself used during the measured window.
    pub generator_cores: Option<f64>,
    pub server_pid: Option<u32>,
    /// CPU cores the server used during the measured window.
    pub server_cores: Option<f64>,
    /// Messages delivered per second per server core busy.
    pub messages_per_server_core_sec: Option<f64>,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_online_kib: Option<u64>,
    pub server_rss_end_kib: Option<u64>,
    /// (RSS with everyone online − RSS before logins) / sessions.
    pub server_rss_per_session_kib: Option<f64>,
    pub timeline: Vec<Sample>,
}

pub struct Inputs {
    pub label: String,
    pub scenario: Scenario,
    pub target: String,
    pub stats: ThreadStats,
    pub logins_ok: u64,
    pub logins_failed: u64,
    pub login_secs: f64,
    pub measured_secs: f64,
    pub generator_cores: Option<f64>,
    pub server_pid: Option<u32>,
    pub server_cores: Option<f64>,
    pub rss_before: Option<u64>,
    pub rss_online: Option<u64>,
    pub rss_end: Option<u64>,
    pub timeline: Vec<Sample>,
}

fn percentiles(h: &hdrhistogram::Histogram<u64>, scale: f64) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.5) as f64 / scale,
        p90: h.value_at_quantile(0.9) as f64 / scale,
        p99: h.value_at_quantile(0.99) as f64 / scale,
        p999: h.value_at_quantile(0.999) as f64 / scale,
        max: h.max() as f64 / scale,
        mean: h.mean() / scale,
        count: h.len(),
    }
}

pub fn build(i: Inputs) -> Report {
    let s = &i.stats;
    let mut timeline = i.timeline;
    for sample in &mut timeline {
        let sec = sample.t.floor() as usize;
        if let Some(h) = sec.checked_sub(1).and_then(|k| s.latency_by_sec.get(k)) {
            if !h.is_empty() {
                sample.p50_ms = Some(h.value_at_quantile(0.5) as f64 / 1000.0);
                sample.p99_ms = Some(h.value_at_quantile(0.99) as f64 / 1000.0);
            }
        }
    }
    let received_per_sec = s.measured_received as f64 / i.measured_secs;
    Report {
        label: i.label,
        target: i.target,
        logins_ok: i.logins_ok,
        logins_failed: i.logins_failed,
        logins_per_sec: if i.login_secs > 0.0 {
            i.logins_ok as f64 / i.login_secs
        } else {
            0.0
        },
        login_ms: percentiles(&s.login_us, 1000.0),
        measured_secs: i.measured_secs,
        messages_sent: s.measured_sent,
        messages_received: s.measured_received,
        messages_lost: s.measured_sent.saturating_sub(s.measured_received),
        messages_sent_per_sec: s.measured_sent as f64 / i.measured_secs,
        messages_received_per_sec: received_per_sec,
        messages_stored: s.measured_stored,
        messages_stored_per_sec: s.measured_stored as f64 / i.measured_secs,
        stanzas_sent: s.stanzas_sent,
        stanzas_received: s.stanzas_received,
        latency_ms: percentiles(&s.latency_us, 1000.0),
        errors: s.errors.clone(),
        generator_cores: i.generator_cores,
        server_pid: i.server_pid,
        server_cores: i.server_cores,
        // Delivered or stored: each is a message the server handled.
        messages_per_server_core_sec: i
            .server_cores
            .filter(|c| *c > 0.0)
            .map(|c| (received_per_sec + s.measured_stored as f64 / i.measured_secs) / c),
        server_rss_before_kib: i.rss_before,
        server_rss_online_kib: i.rss_online,
        server_rss_end_kib: i.rss_end,
        server_rss_per_session_kib: i
            .rss_before
            .zip(i.rss_online)
            .filter(|_| i.logins_ok > 0)
            .map(|(a, b)| (b as f64 - a as f64) / i.logins_ok as f64),
        timeline,
        scenario: i.scenario,
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "–".into())
}

/// Rows of (metric, value) shared by the single report and the comparison.
fn rows(r: &Report) -> Vec<(&'static str, Option<f64>, usize, bool)> {
    // (name, value, decimals, higher is better)
    vec![
        ("logins/s", Some(r.logins_per_sec), 0, true),
        ("login time p99 (ms)", Some(r.login_ms.p99), 1, false),
        ("messages sent/s", Some(r.messages_sent_per_sec), 0, true),
        ("messages received/s", Some(r.messages_received_per_sec), 0, true),
        ("messages stored offline/s", Some(r.messages_stored_per_sec), 0, true),
        ("latency p50 (ms)", Some(r.latency_ms.p50), 2, false),
        ("latency p90 (ms)", Some(r.latency_ms.p90), 2, false),
        ("latency p99 (ms)", Some(r.latency_ms.p99), 2, false),
        ("latency p99.9 (ms)", Some(r.latency_ms.p999), 2, false),
        ("latency max (ms)", Some(r.latency_ms.max), 2, false),
        (
            "messages undelivered (after 2 s drain)",
            Some(r.messages_lost as f64),
            0,
            false,
        ),
        ("errors", Some(r.errors.values().sum::<u64>() as f64), 0, false),
        ("server CPU (cores)", r.server_cores, 2, false),
        ("messages/s per server core", r.messages_per_server_core_sec, 0, true),
        (
            "server RSS online (MiB)",
            r.server_rss_online_kib.map(|k| k as f64 / 1024.0),
            1,
            false,
        ),
        ("server RSS per session (KiB)", r.server_rss_per_session_kib, 1, false),
        ("generator CPU (cores)", r.generator_cores, 2, false),
    ]
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let sc = &self.scenario;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### {} — scenario `{}`\n\n{} users ({} online, roster {}), logins at {}/s, TLS {}, {}, \
             {} msg/user/s, {} presence changes/user, {} s measured after {} s warm-up; target {}\n",
            self.label,
            sc.name,
            sc.users,
            sc.online(),
            sc.roster_size,
            sc.login_rate,
            if sc.tls { "on" } else { "off" },
            sc.mechanism,
            sc.messages_per_user_per_sec,
            sc.presence_changes,
            sc.duration_secs,
            sc.warmup_secs,
            self.target
        );
        let _ = writeln!(out, "| metric | value |\n|---|---:|");
        let _ = writeln!(
            out,
            "| logins ok / failed | {} / {} |",
            self.logins_ok, self.logins_failed
        );
        for (name, v, d, _) in rows(self) {
            let _ = writeln!(out, "| {name} | {} |", opt(v, d));
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\nErrors by kind:\n");
            for (k, v) in &self.errors {
                let _ = writeln!(out, "- {k}: {v}");
            }
        }
        out
    }

    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("bench.json"), json).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("bench.md"), self.to_markdown()).map_err(|e| e.to_string())?;
        if let Err(e) = self.plot(&dir.join("bench.png")) {
            eprintln!("starling bench: no PNG plot: {e}");
        }
        Ok(())
    }

    /// Throughput (messages/s sent and received) and latency (p50, p99) per second.
    pub fn plot(&self, path: &Path) -> Result<(), String> {
        use plotters::prelude::*;
        font()?;
        let mut per_sec: Vec<(f64, f64, f64)> = Vec::new();
        for w in self.timeline.windows(2) {
            let dt = (w[1].t - w[0].t).max(1e-3);
            per_sec.push((
                w[1].t,
                (w[1].sent - w[0].sent) as f64 / dt,
                (w[1].received - w[0].received) as f64 / dt,
            ));
        }
        let t_max = self.timeline.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
        let y_max = per_sec.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max) * 1.1;
        let lat: Vec<(f64, f64, f64)> = self
            .timeline
            .iter()
            .filter_map(|s| Some((s.t, s.p50_ms?, s.p99_ms?)))
            .collect();
        let l_max = lat.iter().map(|l| l.2).fold(0.1, f64::max) * 1.1;
        let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let (top, bottom) = root.split_vertically(350);
        let mut c = ChartBuilder::on(&top)
            .caption(format!("{} — messages per second", self.label), ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(e)?;
        c.configure_mesh().x_desc("seconds").draw().map_err(e)?;
        c.draw_series(LineSeries::new(per_sec.iter().map(|p| (p.0, p.1)), &BLUE))
            .map_err(e)?
            .label("sent")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        c.draw_series(LineSeries::new(per_sec.iter().map(|p| (p.0, p.2)), &RED))
            .map_err(e)?
            .label("received")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        let mut c = ChartBuilder::on(&bottom)
            .caption("end-to-end latency (ms)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..t_max, 0.0..l_max)
            .map_err(e)?;
        c.configure_mesh().x_desc("seconds").draw().map_err(e)?;
        c.draw_series(LineSeries::new(lat.iter().map(|p| (p.0, p.1)), &GREEN))
            .map_err(e)?
            .label("p50")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        c.draw_series(LineSeries::new(lat.iter().map(|p| (p.0, p.2)), &MAGENTA))
            .map_err(e)?
            .label("p99")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
        Ok(())
    }
}

/// Registers a system TrueType font for the plot's text (plotters draws text with ab_glyph).
fn font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ];
        let bytes = candidates
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or("no TrueType font found (install fonts-dejavu-core)")?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| "the font could not be read".to_string())
    })
    .clone()
}

/// Side by side: the first report is the baseline each other one is compared with.
pub fn compare(reports: &[Report]) -> String {
    let mut out = String::new();
    let Some(base) = reports.first() else {
        return out;
    };
    let _ = write!(out, "| metric |");
    for r in reports {
        let _ = write!(out, " {} |", r.label);
    }
    let _ = write!(out, "\n|---|");
    for _ in reports {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    let base_rows = rows(base);
    for (k, (name, bv, d, higher)) in base_rows.iter().enumerate() {
        let _ = write!(out, "| {name} | {} |", opt(*bv, *d));
        for r in &reports[1..] {
            let v = rows(r)[k].1;
            // Ratio: how many times better the baseline is (>1: baseline better).
            let ratio = match (bv, v) {
                (Some(b), Some(v)) if *b > 0.0 && v > 0.0 => Some(if *higher { b / v } else { v / b }),
                _ => None,
            };
            match ratio {
                Some(x) => {
                    let _ = write!(out, " {} ({}: {x:.1}×) |", opt(v, *d), base.label);
                }
                None => {
                    let _ = write!(out, " {} |", opt(v, *d));
                }
            }
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "\n(n×: how many times better {} is on that row; >1 means {} is ahead.)",
        base.label, base.label
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(label: &str, rate: f64, p99: f64) -> Report {
        Report {
            label: label.into(),
            messages_received_per_sec: rate,
            latency_ms: Percentiles {
                p99,
                ..Percentiles::default()
            },
            ..Report::default()
        }
    }

    #[test]
    fn comparison_gives_ratios_in_the_baselines_favour() {
        let t = compare(&[report("starling", 1000.0, 1.0), report("prosody", 100.0, 4.0)]);
        assert!(
            t.contains("| messages received/s | 1000 | 100 (starling: 10.0×) |"),
            "{t}"
        );
        assert!(t.contains("| latency p99 (ms) | 1.00 | 4.00 (starling: 4.0×) |"), "{t}");
    }
}
