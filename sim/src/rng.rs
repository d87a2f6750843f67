//! The run's one source of randomness: ChaCha8 seeded from the seed, with the few helpers the
//! simulator needs. No thread RNG, no `RandomState`, no clock anywhere in simulated code.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};

pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }
    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.u64() % (hi - lo + 1)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.u64() % n as u64) as usize
        }
    }
    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    /// An exponentially distributed delay with the given mean (Poisson arrivals).
    pub fn exp(&mut self, mean: u64) -> u64 {
        let u = ((self.u64() >> 11) as f64 + 1.0) / ((1u64 << 53) as f64 + 1.0);
        (-(u.ln()) * mean as f64) as u64
    }
    /// A generator for one session's own randomness (stream ids, SCRAM nonces).
    pub fn fork(&mut self) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(self.u64())
    }
}
