//! NONE's analysis, vectorised on the device: neuron selection per layer, the exact two-class
//! Jenks break of the sample scores, and the class-wise split of the penultimate features.

use audit_nn::tch::{Kind, Tensor};

/// What the analysis of one round selected.
#[derive(Debug)]
pub struct Selection {
    /// Per layer: the reset neurons (channels), best first.
    pub neurons: Vec<Vec<i64>>,
    /// Per layer: their scores.
    pub scores: Vec<Vec<f64>>,
    /// Per sample: the sum over layers of the activation of the layer's top neuron. [N]
    pub h: Tensor,
}

/// Per layer, `score[c] = max_k (max_{i: p_ik > lamda_h} A[i,c] - (mean + 3 std)_{i: p_ik < lamda_l} A[i,c])`
/// (0 for a class with no confident or no unconfident sample; std with ddof 0), and the top
/// `ceil(fraction * C)` channels. `probs` is [N, K]; each `acts` entry is [N, C_l].
pub fn select_neurons(probs: &Tensor, acts: &[Tensor], lamda_h: f64, lamda_l: f64, fraction: f64) -> Selection {
    let k = probs.size()[1];
    let confident = probs.gt(lamda_h);
    let weak = probs.lt(lamda_l).to_kind(Kind::Double); // [N, K]
    let weak_count = weak.sum_dim_intlist([0i64].as_slice(), false, Kind::Double); // [K]
    let has_conf = confident.any_dim(0, false); // [K]
    let n = probs.size()[0];
    let mut h = Tensor::zeros([n], (Kind::Double, probs.device()));
    let (mut neurons, mut scores) = (Vec::new(), Vec::new());
    for a in acts {
        let a = a.to_kind(Kind::Double);
        let c = a.size()[1];
        // Max over confident samples, per class: [K, C].
        let max_conf = if lamda_h >= 0.5 {
            // A sample is confident for at most one class: one scatter-max over the confident rows.
            let rows = confident.any_dim(1, false).nonzero().flatten(0, -1);
            let cls = confident.index_select(0, &rows).to_kind(Kind::Int64).argmax(1, false);
            // Group the confident rows by class (one sort), then one max per contiguous block.
            let (sorted_cls, order) = cls.sort(0, false);
            let grouped = a.index_select(0, &rows.index_select(0, &order));
            let counts = Vec::<i64>::try_from(
                sorted_cls
                    .bincount::<Tensor>(None, k)
                    .to_device(audit_nn::tch::Device::Cpu),
            )
            .unwrap_or_default();
            let neg = Tensor::full([c], f64::NEG_INFINITY, (Kind::Double, a.device()));
            let mut start = 0;
            let mut blocks = Vec::with_capacity(k as usize);
            for &count in &counts {
                blocks.push(if count > 0 {
                    grouped.narrow(0, start, count).amax([0], false)
                } else {
                    neg.shallow_clone()
                });
                start += count;
            }
            Tensor::stack(&blocks, 0)
        } else {
            let neg = Tensor::full([1, c], f64::NEG_INFINITY, (Kind::Double, a.device()));
            Tensor::stack(
                &(0..k)
                    .map(|j| {
                        a.where_self(&confident.select(1, j).unsqueeze(1), &neg)
                            .amax([0], false)
                    })
                    .collect::<Vec<_>>(),
                0,
            )
        };
        // Mean and std over unconfident samples, per class, by matrix products: [K, C].
        let cnt = weak_count.clamp_min(1.0).unsqueeze(1);
        let mean = weak.tr().mm(&a) / &cnt;
        let var = (weak.tr().mm(&(&a * &a)) / &cnt - &mean * &mean).clamp_min(0.0);
        let diff = max_conf - (&mean + var.sqrt() * 3.0);
        let valid = has_conf.logical_and(&weak_count.gt(0.0)).unsqueeze(1);
        let diff = diff.where_self(&valid, &Tensor::zeros_like(&diff));
        let score = diff.amax([0], false); // [C]
        let top = ((fraction * c as f64).ceil() as i64).clamp(0, c);
        if top == 0 {
            neurons.push(vec![]);
            scores.push(vec![]);
            continue;
        }
        let (vals, idx) = score.topk(top, 0, true, true);
        let chosen: Vec<i64> = Vec::<i64>::try_from(idx.to_device(audit_nn::tch::Device::Cpu)).unwrap_or_default();
        h += a.select(1, chosen[0]);
        scores.push(Vec::<f64>::try_from(vals.to_device(audit_nn::tch::Device::Cpu)).unwrap_or_default());
        neurons.push(chosen);
    }
    Selection { neurons, scores, h }
}

/// The exact two-class Jenks natural break of `h`: the split of the sorted values that minimises
/// the summed within-class squared deviations. Returns the smallest value of the upper class.
pub fn jenks_break(h: &Tensor) -> f64 {
    let n = h.size()[0];
    if n < 2 {
        return f64::INFINITY;
    }
    let (v, _) = h.to_kind(Kind::Double).sort(0, false);
    if v.double_value(&[0]) == v.double_value(&[n - 1]) {
        // No spread: nothing stands out.
        return f64::INFINITY;
    }
    let cs = v.cumsum(0, Kind::Double);
    let cs2 = (&v * &v).cumsum(0, Kind::Double);
    let total = cs.get(n - 1);
    let total2 = cs2.get(n - 1);
    // Lower class = first i values, i in 1..n-1.
    let i = Tensor::arange_start(1, n, (Kind::Double, v.device()));
    let s1 = cs.narrow(0, 0, n - 1);
    let q1 = cs2.narrow(0, 0, n - 1);
    let sse1 = &q1 - &s1 * &s1 / &i;
    let s2 = &total - &s1;
    let q2 = &total2 - &q1;
    let sse2 = &q2 - &s2 * &s2 / (-&i + n as f64);
    let best = (sse1 + sse2).argmin(0, false).int64_value(&[]);
    v.double_value(&[best + 1])
}

/// One class of the class-wise split.
#[derive(Debug)]
pub struct ClassSide {
    pub class: i64,
    /// Samples labelled with the class.
    pub n: i64,
    /// Indices (into the training set) of the smaller side of the split. [M] int64
    pub side: Tensor,
    /// Ashman's D of the two sides along the top principal direction: |m1 - m2| / sqrt((v1 + v2) / 2).
    pub separation: f64,
}

/// Classes with fewer samples than this are not split.
const MIN_CLASS: i64 = 10;

/// Per class, the samples labelled with it are projected on the top principal direction of their
/// centred features (e.g. the penultimate layer); an exact two-class Jenks break splits the
/// projection and the smaller side is the class's candidate set. The poisoned samples of a target
/// class form such a side, far from the class's clean samples (the separation Spectral Signatures
/// and Activation Clustering rely on), but every clean class splits too: [`judge_sides`] decides.
/// `features` is [N, D], `labels` [N] int64, `k` the number of classes.
pub fn class_sides(features: &Tensor, labels: &Tensor, k: i64) -> Vec<ClassSide> {
    let f = features.to_kind(Kind::Double);
    let mut out = Vec::new();
    for class in 0..k {
        let idx = labels.eq(class).nonzero().flatten(0, -1);
        let nk = idx.size()[0];
        if nk < MIN_CLASS {
            continue;
        }
        let fk = f.index_select(0, &idx);
        let fk = &fk - fk.mean_dim([0i64].as_slice(), true, Kind::Double);
        let (_, vecs) = fk.tr().mm(&fk).linalg_eigh("L");
        let proj = fk.mv(&vecs.select(1, vecs.size()[1] - 1));
        let brk = jenks_break(&proj);
        if !brk.is_finite() {
            continue;
        }
        let upper = proj.ge(brk);
        let n_up = upper.sum(Kind::Int64).int64_value(&[]);
        let small = if n_up <= nk - n_up { upper } else { upper.logical_not() };
        let (a, b) = (proj.masked_select(&small), proj.masked_select(&small.logical_not()));
        let var = |t: &Tensor| {
            if t.size()[0] > 0 {
                t.var(false).double_value(&[])
            } else {
                0.0
            }
        };
        let mean = |t: &Tensor| {
            if t.size()[0] > 0 {
                t.mean(Kind::Double).double_value(&[])
            } else {
                0.0
            }
        };
        let pooled = ((var(&a) + var(&b)) / 2.0).sqrt();
        let gap = (mean(&a) - mean(&b)).abs();
        out.push(ClassSide {
            class,
            n: nk,
            side: idx.masked_select(&small),
            separation: if pooled > 0.0 { gap / pooled } else { 0.0 },
        });
    }
    out
}

/// The verdict on one class's side.
#[derive(Debug, Clone, PartialEq)]
pub struct SideVerdict {
    pub class: i64,
    pub n: i64,
    pub flagged: i64,
    pub separation: f64,
    /// Share of the side that a probe model, trained without any class's side, does not put in
    /// the class.
    pub away: f64,
    /// Normalised entropy (0..1, over the K - 1 other classes) of the probe's labels for the part of
    /// the side it puts elsewhere.
    pub spread: f64,
    pub accepted: bool,
}

/// Exclusionary reclassification (Activation Clustering's check, made stricter): a class's side is
/// taken as poisoned when a probe model that never saw it sends most of it (`away` >= `min_away`)
/// to other classes, and spreads it over them (`spread` >= `min_spread`), as the source images of
/// an all-to-one poisoning come from every class. A clean sub-population that the probe mistakes
/// goes to one or two look-alike classes (a shirt to T-shirt or pullover) and is kept.
/// `pred` is [N] int64: the probe's label for every training sample.
pub fn judge_sides(sides: &[ClassSide], pred: &Tensor, k: i64, min_away: f64, min_spread: f64) -> Vec<SideVerdict> {
    sides
        .iter()
        .map(|s| {
            let m = s.side.size()[0];
            let labels = pred.index_select(0, &s.side);
            let counts = Vec::<i64>::try_from(labels.bincount::<Tensor>(None, k).to_device(audit_nn::tch::Device::Cpu))
                .unwrap_or_default();
            let own = counts.get(s.class as usize).copied().unwrap_or(0);
            let away = if m > 0 { (m - own) as f64 / m as f64 } else { 0.0 };
            let others: Vec<f64> = counts
                .iter()
                .enumerate()
                .filter(|&(c, _)| c as i64 != s.class)
                .map(|(_, &v)| v as f64)
                .collect();
            let total: f64 = others.iter().sum();
            let spread = if total > 0.0 && k > 2 {
                -others
                    .iter()
                    .filter(|&&v| v > 0.0)
                    .map(|&v| (v / total) * (v / total).ln())
                    .sum::<f64>()
                    / ((k - 1) as f64).ln()
            } else {
                0.0
            };
            SideVerdict {
                class: s.class,
                n: s.n,
                flagged: m,
                separation: s.separation,
                away,
                spread,
                accepted: m > 0 && away >= min_away && spread >= min_spread,
            }
        })
        .collect()
}

/// The paper's suspects that stay dropped beside the class-wise split. With no detected target
/// class (`targets` empty) all of them: nothing argues against the split (the paper's behaviour).
/// Otherwise all but those in a class the global split swept (held at least half of) that is not a
/// target: such a split describes the class, not a trigger (on Blend it takes whole classes of
/// sandals or sneakers), and dropping it would remove the class from the retraining.
/// `paper` is [N] bool, `labels` [N] int64.
pub fn paper_suspects_kept(paper: &Tensor, labels: &Tensor, k: i64, targets: &[i64]) -> Tensor {
    if targets.is_empty() {
        return paper.shallow_clone();
    }
    let total = labels.bincount::<Tensor>(None, k);
    let in_split = labels.masked_select(paper).bincount::<Tensor>(None, k);
    let mut keep_class = (in_split * 2).lt_tensor(&total);
    let _ = keep_class.index_fill_(0, &Tensor::from_slice(targets).to_device(paper.device()), 1);
    paper.logical_and(&keep_class.index_select(0, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit_nn::tch::Device;

    /// Brute force over every split, in plain Rust.
    fn jenks_brute(values: &[f64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let sse = |s: &[f64]| {
            let m = s.iter().sum::<f64>() / s.len() as f64;
            s.iter().map(|x| (x - m) * (x - m)).sum::<f64>()
        };
        let best = (1..v.len())
            .min_by(|&a, &b| {
                (sse(&v[..a]) + sse(&v[a..]))
                    .partial_cmp(&(sse(&v[..b]) + sse(&v[b..])))
                    .unwrap()
            })
            .unwrap();
        v[best]
    }

    #[test]
    fn jenks_matches_brute_force() {
        audit_nn::tch::manual_seed(3);
        for trial in 0..20 {
            let n = 5 + trial * 7;
            let t = Tensor::randn([n], (Kind::Double, Device::Cpu))
                + Tensor::rand([n], (Kind::Double, Device::Cpu))
                    .gt(0.8)
                    .to_kind(Kind::Double)
                    * 4.0;
            let values = Vec::<f64>::try_from(&t).unwrap();
            assert_eq!(jenks_break(&t), jenks_brute(&values), "trial {trial}");
        }
        let clear = Tensor::from_slice(&[0.1f64, 0.2, 0.15, 5.0, 5.2, 0.12]);
        assert_eq!(jenks_break(&clear), 5.0);
    }

    /// The vectorised selection against a direct per-class, per-channel computation.
    #[test]
    #[allow(clippy::needless_range_loop)] // the point is the plain index loop
    fn selection_matches_a_direct_loop() {
        audit_nn::tch::manual_seed(7);
        let (n, k, c) = (200i64, 4i64, 6i64);
        let probs = (Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 3.0).softmax(-1, Kind::Float);
        let a = Tensor::randn([n, c], (Kind::Float, Device::Cpu));
        let sel = select_neurons(&probs, &[a.shallow_clone()], 0.7, 0.1, 0.34);
        let low = select_neurons(&probs, &[a.shallow_clone()], 0.3, 0.1, 0.34);
        assert!(!low.neurons[0].is_empty(), "the class-loop path (lamda_h < 0.5) runs");
        let p: Vec<Vec<f64>> = (0..n)
            .map(|i| Vec::<f64>::try_from(probs.get(i).to_kind(Kind::Double)).unwrap())
            .collect();
        let av: Vec<Vec<f64>> = (0..n)
            .map(|i| Vec::<f64>::try_from(a.get(i).to_kind(Kind::Double)).unwrap())
            .collect();
        let mut score = vec![f64::NEG_INFINITY; c as usize];
        for j in 0..k as usize {
            let s: Vec<usize> = (0..n as usize).filter(|&i| p[i][j] > 0.7).collect();
            let w: Vec<usize> = (0..n as usize).filter(|&i| p[i][j] < 0.1).collect();
            for ch in 0..c as usize {
                let d = if s.is_empty() || w.is_empty() {
                    0.0
                } else {
                    let mx = s.iter().map(|&i| av[i][ch]).fold(f64::NEG_INFINITY, f64::max);
                    let m = w.iter().map(|&i| av[i][ch]).sum::<f64>() / w.len() as f64;
                    let sd = (w.iter().map(|&i| (av[i][ch] - m).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
                    mx - (m + 3.0 * sd)
                };
                score[ch] = score[ch].max(d);
            }
        }
        let mut order: Vec<usize> = (0..c as usize).collect();
        order.sort_by(|&x, &y| score[y].partial_cmp(&score[x]).unwrap());
        let want: Vec<i64> = order[..3].iter().map(|&i| i as i64).collect();
        assert_eq!(sel.neurons[0], want);
        for (got, &ch) in sel.scores[0].iter().zip(&want) {
            assert!((got - score[ch as usize]).abs() < 1e-6);
        }
        let h = Vec::<f64>::try_from(&sel.h).unwrap();
        for i in 0..n as usize {
            assert!((h[i] - av[i][want[0] as usize]).abs() < 1e-6);
        }
    }

    /// A class with a far, tight sub-cluster is split along it; the probe's verdict accepts a side
    /// sent away and spread, and keeps one sent to a single look-alike class.
    #[test]
    fn class_sides_and_judge() {
        audit_nn::tch::manual_seed(11);
        let (per, d, k) = (60i64, 8i64, 4i64);
        let labels = Tensor::arange(k, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per, 0, None);
        let f = Tensor::randn([per * k, d], (Kind::Double, Device::Cpu));
        // Class 0: its first 15 samples sit 12 units away along dimension 3.
        let _ = f.narrow(0, 0, 15).select(1, 3).g_add_scalar_(12.0);
        let sides = class_sides(&f, &labels, k);
        assert_eq!(sides.len(), 4);
        let s0 = Vec::<i64>::try_from(&sides[0].side).unwrap();
        assert_eq!(
            s0,
            (0..15).collect::<Vec<_>>(),
            "class 0's side is its outlying cluster"
        );
        assert!(sides[0].separation > 5.0, "separation {}", sides[0].separation);
        // The probe: class 0's side spread over 1, 2, 3; class 1's side all sent to class 2;
        // everything else predicted as labelled.
        let pred = labels.copy();
        for (i, &idx) in s0.iter().enumerate() {
            let _ = pred.get(idx).fill_(1 + (i as i64 % 3));
        }
        let s1 = Vec::<i64>::try_from(&sides[1].side).unwrap();
        for &idx in &s1 {
            let _ = pred.get(idx).fill_(2);
        }
        let v = judge_sides(&sides, &pred, k, 0.5, 0.8);
        assert!(
            v[0].accepted && (v[0].away - 1.0).abs() < 1e-12 && v[0].spread > 0.99,
            "{:?}",
            v[0]
        );
        assert!(
            !v[1].accepted && (v[1].away - 1.0).abs() < 1e-12 && v[1].spread == 0.0,
            "{:?}",
            v[1]
        );
        assert!(!v[2].accepted && v[2].away == 0.0, "{:?}", v[2]);
    }

    /// Swept classes go back unless they are a target; with no target the split stays whole.
    #[test]
    fn paper_suspects_in_swept_classes_go_back() {
        let labels = Tensor::arange(3, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(10, 0, None);
        // Class 0: 2 of 10 suspects; classes 1 and 2: 8 of 10 (swept).
        let flags: Vec<bool> = (0..30).map(|i| i % 10 < if i < 10 { 2 } else { 8 }).collect();
        let paper = Tensor::from_slice(&flags);
        let count = |t: &Tensor, class: i64| t.logical_and(&labels.eq(class)).sum(Kind::Int64).int64_value(&[]);
        let whole = paper_suspects_kept(&paper, &labels, 3, &[]);
        assert_eq!((count(&whole, 0), count(&whole, 1), count(&whole, 2)), (2, 8, 8));
        let kept = paper_suspects_kept(&paper, &labels, 3, &[2]);
        assert_eq!((count(&kept, 0), count(&kept, 1), count(&kept, 2)), (2, 0, 8));
    }
}
