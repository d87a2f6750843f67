//! The trace: a hash over every event in order (equal seeds give equal hashes; a test checks
//! it) and the last few events in words, for the report of a failure.

use std::collections::VecDeque;

use xxhash_rust::xxh3::Xxh3;

pub struct Trace {
    hash: Xxh3,
    recent: VecDeque<String>,
    keep: usize,
    pub events: u64,
    /// `SIM_DUMP_EVENTS` set: every event goes to stderr as it is recorded (to diff two
    /// builds' runs of one seed).
    dump: bool,
}

impl Trace {
    pub fn new(keep: usize) -> Self {
        Trace {
            hash: Xxh3::new(),
            recent: VecDeque::with_capacity(keep),
            keep,
            events: 0,
            dump: std::env::var_os("SIM_DUMP_EVENTS").is_some(),
        }
    }

    /// Records one event: `at` in µs and its description (which names everything that
    /// distinguishes it, payload bytes included).
    pub fn record(&mut self, at: u64, what: String) {
        self.events += 1;
        self.hash.update(&at.to_le_bytes());
        self.hash.update(what.as_bytes());
        if self.dump {
            eprintln!("{at} {what}");
        }
        self.keep_line(format!("{:>10.3} ms  {what}", at as f64 / 1000.0));
    }

    /// Keeps a line for the failure report without hashing it (it adds detail, not events).
    pub fn note(&mut self, at: u64, what: String) {
        self.keep_line(format!("{:>10.3} ms    {what}", at as f64 / 1000.0));
    }

    fn keep_line(&mut self, line: String) {
        if self.keep == 0 {
            return;
        }
        if self.recent.len() == self.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    pub fn digest(&self) -> u64 {
        self.hash.digest()
    }

    pub fn recent(&self) -> Vec<String> {
        self.recent.iter().cloned().collect()
    }
}
