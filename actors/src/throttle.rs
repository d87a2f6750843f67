//! Per-IP limit on failed authentications, in virtual or real time given by the caller.

// BTreeMap, not HashMap: its RandomState would make eviction order differ between runs, and
// the simulator replays runs exactly (no RandomState in simulated code).
use std::collections::BTreeMap;

pub struct AuthThrottle {
    max_failures: u32,
    window_ms: u64,
    max_entries: usize,
    /// IP (v4 mapped into v6, as u128) → (window start, failures in window).
    failures: BTreeMap<u128, (u64, u32)>,
}

impl AuthThrottle {
    pub fn new(max_failures: u32, window_ms: u64, max_entries: usize) -> Self {
        AuthThrottle {
            max_failures,
            window_ms,
            max_entries,
            failures: BTreeMap::new(),
        }
    }

    /// Whether `ip` may try to authenticate now.
    pub fn allowed(&self, ip: u128, now: u64) -> bool {
        match self.failures.get(&ip) {
            Some(&(start, n)) => now.saturating_sub(start) >= self.window_ms || n < self.max_failures,
            None => true,
        }
    }

    pub fn record_failure(&mut self, ip: u128, now: u64) {
        if self.failures.len() >= self.max_entries && !self.failures.contains_key(&ip) {
            let w = self.window_ms;
            self.failures.retain(|_, (start, _)| now.saturating_sub(*start) < w);
            if self.failures.len() >= self.max_entries {
                // Bounded: under a flood from more addresses than we track, the oldest window is
                // forgotten rather than memory growing without limit.
                if let Some(oldest) = self.failures.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k) {
                    self.failures.remove(&oldest);
                }
            }
        }
        let e = self.failures.entry(ip).or_insert((now, 0));
        if now.saturating_sub(e.0) >= self.window_ms {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_until_window_passes_and_stays_bounded() {
        let mut t = AuthThrottle::new(3, 60_000, 2);
        for _ in 0..3 {
            assert!(t.allowed(1, 1000));
            t.record_failure(1, 1000);
        }
        assert!(!t.allowed(1, 2000));
        assert!(t.allowed(2, 2000));
        assert!(t.allowed(1, 61_000));
        t.record_failure(2, 3000);
        t.record_failure(3, 4000);
        assert!(t.failures.len() <= 2);
    }
}
