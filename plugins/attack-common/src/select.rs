//! Which samples get poisoned.

use crate::params::{CommonParams, Mode};
use crate::rng::{stream, Rng};

/// Picks `k` of `candidates` uniformly without replacement (partial Fisher–Yates) and returns them
/// sorted. `k` is capped at `candidates.len()`.
pub fn choose(mut candidates: Vec<usize>, k: usize, rng: &mut Rng) -> Vec<usize> {
    let n = candidates.len();
    let k = k.min(n);
    for i in 0..k {
        let j = i + rng.below(n - i);
        candidates.swap(i, j);
    }
    candidates.truncate(k);
    candidates.sort_unstable();
    candidates
}

/// The outcome of [`plan_poison`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Poisoned sample indices, sorted.
    pub indices: Vec<usize>,
    /// How many the rate asked for: `round(rate * N)`.
    pub requested: usize,
    /// How many samples were eligible.
    pub candidates: usize,
}

impl Plan {
    /// True when fewer samples were eligible than the rate asked for.
    pub fn capped(&self) -> bool {
        self.indices.len() < self.requested
    }
}

/// Chooses the samples to poison: `round(effective_rate * N)` of them, deterministic for `seed`.
///
/// Eligible: with `clean_label` (SIG) the samples of the target class; otherwise, all-to-one: the
/// samples whose label is not the target; all-to-all: every sample. When fewer are eligible, all of
/// them are taken ([`Plan::capped`]).
pub fn plan_poison(common: &CommonParams, labels: &[i64], seed: u64) -> Plan {
    plan(common, labels, seed, false)
}

/// [`plan_poison`] for clean-label attacks: only target-class samples are eligible.
pub fn plan_poison_clean_label(common: &CommonParams, labels: &[i64], seed: u64) -> Plan {
    plan(common, labels, seed, true)
}

pub(crate) fn plan(common: &CommonParams, labels: &[i64], seed: u64, clean_label: bool) -> Plan {
    let requested = (common.effective_rate() * labels.len() as f64).round() as usize;
    let eligible = |y: i64| match (clean_label, common.mode) {
        (true, _) => y == common.target,
        (false, Mode::AllToOne) => y != common.target,
        (false, Mode::AllToAll) => true,
    };
    let candidates: Vec<usize> = (0..labels.len()).filter(|&i| eligible(labels[i])).collect();
    let n_candidates = candidates.len();
    let indices = choose(candidates, requested, &mut Rng::stream(seed, stream::SELECT));
    Plan {
        indices,
        requested,
        candidates: n_candidates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_is_sorted_unique_and_capped() {
        let mut rng = Rng::new(3);
        let c = choose((0..100).collect(), 30, &mut rng);
        assert_eq!(c.len(), 30);
        assert!(c.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(choose(vec![5, 9], 10, &mut rng), vec![5, 9]);
        assert!(choose(vec![], 3, &mut rng).is_empty());
    }

    #[test]
    fn choose_is_roughly_uniform() {
        let mut counts = [0usize; 10];
        let mut rng = Rng::new(11);
        for _ in 0..5_000 {
            for i in choose((0..10).collect(), 3, &mut rng) {
                counts[i] += 1;
            }
        }
        // Each index is picked with probability 0.3: 1500 expected.
        assert!(counts.iter().all(|&c| (1_350..1_650).contains(&c)), "{counts:?}");
    }

    #[test]
    fn plan_respects_eligibility() {
        let labels: Vec<i64> = (0..200).map(|i| i % 4).collect();
        let mut c = CommonParams {
            target: 1,
            mode: Mode::AllToOne,
            poison_rate: 0.2,
            adaptive: false,
        };
        let p = plan_poison(&c, &labels, 5);
        assert_eq!((p.indices.len(), p.requested, p.candidates), (40, 40, 150));
        assert!(p.indices.iter().all(|&i| labels[i] != 1));
        let q = plan_poison_clean_label(&c, &labels, 5);
        assert_eq!((q.indices.len(), q.candidates), (40, 50));
        assert!(q.indices.iter().all(|&i| labels[i] == 1));
        c.poison_rate = 0.5;
        let r = plan_poison_clean_label(&c, &labels, 5);
        assert!(r.capped());
        assert_eq!(r.indices.len(), 50);
    }
}
