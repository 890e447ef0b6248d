//! SplitMix64: small, fast, good enough for choosing samples, drawing trigger noise and test
//! data. Seeded, with independent streams, so every random choice of a plugin is reproducible
//! from the call's seed.

/// Finalizer of SplitMix64 (a bijective 64-bit mixer).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// A generator for stream `stream` (a number the plugin names, one per kind of choice) of
    /// `seed`; different streams of one seed are independent.
    pub fn stream(seed: u64, stream: u64) -> Self {
        Rng::new(mix(seed ^ mix(stream.wrapping_mul(GOLDEN).wrapping_add(GOLDEN))))
    }

    /// A generator for item `item` (for example a sample index) of stream `stream` of `seed`, so
    /// per-item draws do not depend on the order items are visited in.
    pub fn for_item(seed: u64, stream: u64, item: u64) -> Self {
        let base = Rng::stream(seed, stream).next_u64();
        Rng::new(mix(base ^ mix(item.wrapping_add(GOLDEN))))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in `0..n` (`n > 0`), by multiply-shift (bias below 2^-64 * n).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..8).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..8).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let s1 = Rng::stream(7, 1).next_u64();
        let s2 = Rng::stream(7, 2).next_u64();
        assert_ne!(s1, s2);
        let i1 = Rng::for_item(7, 1, 1).next_u64();
        let i2 = Rng::for_item(7, 1, 2).next_u64();
        assert_ne!(i1, i2);
        assert_eq!(i1, Rng::for_item(7, 1, 1).next_u64());
    }

    #[test]
    fn uniform_and_below_stay_in_range_and_cover_it() {
        let mut r = Rng::new(1);
        let mut seen = [0usize; 5];
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let x = r.uniform(-1.0, 1.0);
            assert!((-1.0..1.0).contains(&x));
            sum += x;
            seen[r.below(5)] += 1;
        }
        assert!((sum / 10_000.0).abs() < 0.05, "mean {}", sum / 10_000.0);
        assert!(seen.iter().all(|&c| c > 1_700 && c < 2_300), "{seen:?}");
    }
}
