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
    /// Their indices into the training set. [n] int64
    pub members: Tensor,
    /// Which of `members` are on the smaller side. [n] bool
    pub in_side: Tensor,
    /// Indices (into the training set) of the smaller side of the split. [M] int64
    pub side: Tensor,
    /// Every member's projection on the top principal direction, signed so that the side lies at
    /// the low end. [n] double
    pub depth: Tensor,
    /// Ashman's D of the two sides along the top principal direction: |m1 - m2| / sqrt((v1 + v2) / 2).
    pub separation: f64,
}

/// Classes with fewer samples than this are not split.
const MIN_CLASS: i64 = 10;

/// Per class, the samples labelled with it are projected on the top principal direction of their
/// centred features (e.g. the penultimate layer); an exact two-class Jenks break splits the
/// projection and the smaller side is the class's candidate set. The poisoned samples of a target
/// class form such a side, far from the class's clean samples (the separation Spectral Signatures
/// and Activation Clustering rely on), but every clean class splits too: [`judge_side`] decides.
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
        let (small, depth) = if n_up <= nk - n_up {
            (upper, -&proj)
        } else {
            (upper.logical_not(), proj.shallow_clone())
        };
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
            members: idx,
            in_side: small,
            depth,
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
    /// Samples on the side.
    pub flagged: i64,
    pub separation: f64,
    /// The leave-class-out probe's labels: how many of the side, and of the rest of the class, it
    /// gives each class. [K] each
    pub labels_side: Vec<i64>,
    pub labels_rest: Vec<i64>,
    /// The classes the rest of the class rarely goes to (share below `rare`): not its look-alikes.
    pub novel_classes: Vec<i64>,
    /// Share of the side the probe gives a novel class.
    pub novel_share: f64,
    /// Its Wilson lower confidence bound over the side's size (what is compared with `min_share`).
    pub novel_share_low: f64,
    /// Normalised entropy (0..1, over the K - 1 other classes) of the side's novel labels.
    pub novel_spread: f64,
    /// The probe's mean top probability (over the classes other than this one) on the side and
    /// on the rest (reported, not a criterion).
    pub confidence_side: f64,
    pub confidence_rest: f64,
    /// Both novelty thresholds reached: the side is a candidate, to be confirmed by a second probe.
    pub candidate: bool,
    /// For a candidate: the share of the side on whose label two independent probes agree.
    pub agreement: Option<f64>,
    /// For a candidate: the Wilson lower confidence bound of `agreement` over the side's size
    /// (what is compared with `min_agreement`: six of ten is not evidence of sixty percent).
    pub agreement_low: Option<f64>,
    pub accepted: bool,
}

/// The thresholds of [`judge_side`].
#[derive(Debug, Clone, Copy)]
pub struct Judge {
    /// A class is a look-alike of the judged class when the probe gives it at least this share of
    /// the rest; the others are novel.
    pub rare: f64,
    /// Least share of the side in novel classes, as a lower confidence bound at `novel_z` in
    /// [`judge_side`]; [`paper_groups_judged`] compares the point estimate (keeping a few of the
    /// paper's suspects out of the training costs little, accepting a class costs its images).
    pub min_share: f64,
    /// Least normalised entropy of the side's novel labels.
    pub min_spread: f64,
    /// Least share of a candidate side on whose label two independent probes agree, as a lower
    /// confidence bound at `agreement_z` (one-sided normal quantile; 0: the point estimate).
    pub min_agreement: f64,
    pub agreement_z: f64,
    /// One-sided normal quantile of the novel share's bound (0: the point estimate).
    pub novel_z: f64,
}

/// Wilson score lower bound of a proportion `p` observed on `n` trials at the one-sided normal
/// quantile `z` (z = 0: `p` itself). Small samples get a wide interval: 6 of 10 gives 0.35 at
/// z = 1.645, 600 of 1,000 gives 0.57.
pub fn wilson_lower(p: f64, n: i64, z: f64) -> f64 {
    if n <= 0 {
        return 0.0;
    }
    let n = n as f64;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half) / (1.0 + z2 / n)).max(0.0)
}

/// Leave-class-out reclassification. `pred` is [n] int64: for every member of the class, the
/// label a probe that never saw the class gives it (its best class other than this one). The
/// class's clean images go to its look-alikes (T-shirts to shirt, pullover, dress, coat), and so
/// does a clean sub-population the split isolates, or to one class that resembles it (sandals that
/// look like ankle boots). The source images of an all-to-one poisoning come from every other
/// class: the probe sends most of a poisoned side to classes the rest of the class never goes to
/// (`novel_share`), and spreads it over several of them (`novel_spread`). Both thresholds make
/// the side a candidate; [`confirm_side`] then asks a second probe: the poisoned images are genuine
/// images of the classes the probes learnt, so two probes name the same class for most of them,
/// while a clean class that a probe scatters by guessing (bags) gets different guesses.
/// `logits` is [n, K]: the probe's logits for every member of the class.
pub fn judge_side(s: &ClassSide, logits: &Tensor, k: i64, t: Judge) -> SideVerdict {
    let flagged = s.side.size()[0];
    let logits = without_class(logits, s.class);
    let pred = logits.argmax(-1, false);
    let top = logits.softmax(-1, Kind::Float).amax([1], false);
    let mean_of = |m: &Tensor| {
        let v = top.masked_select(m);
        if v.size()[0] > 0 {
            v.mean(Kind::Float).double_value(&[])
        } else {
            0.0
        }
    };
    let (confidence_side, confidence_rest) = (mean_of(&s.in_side), mean_of(&s.in_side.logical_not()));
    let counts = |m: &Tensor| {
        Vec::<i64>::try_from(
            pred.masked_select(m)
                .bincount::<Tensor>(None, k)
                .to_device(audit_nn::tch::Device::Cpu),
        )
        .unwrap_or_default()
    };
    let (side, rest) = (counts(&s.in_side), counts(&s.in_side.logical_not()));
    let novel = novel_classes(&rest, s.class, t.rare);
    let (novel_share, novel_spread) = novelty(&side, &novel, k);
    let novel_share_low = wilson_lower(novel_share, flagged, t.novel_z);
    SideVerdict {
        class: s.class,
        n: s.n,
        flagged,
        separation: s.separation,
        labels_side: side,
        labels_rest: rest,
        novel_classes: novel,
        novel_share,
        novel_share_low,
        novel_spread,
        confidence_side,
        confidence_rest,
        candidate: flagged > 0 && novel_share_low >= t.min_share && novel_spread >= t.min_spread,
        agreement: None,
        agreement_low: None,
        accepted: false,
    }
}

/// All-to-all poisoning: the class a side comes from, when the side is not a candidate only
/// because its novel part is concentrated. Each class's poisoned images then come from one other
/// class, so the probe sends the side, confidently novel (`novel_share_low` passing `min_share`),
/// to one class (`novel_spread` below `min_spread`): the novel class holding most of the side.
pub fn mapped_source(v: &SideVerdict, t: Judge) -> Option<i64> {
    if v.candidate || v.flagged == 0 || v.novel_share_low < t.min_share || v.novel_spread >= t.min_spread {
        return None;
    }
    v.novel_classes
        .iter()
        .copied()
        .max_by_key(|&c| (v.labels_side[c as usize], -c))
}

impl ClassSide {
    /// A second handle on the same tensors.
    pub fn shallow_clone(&self) -> ClassSide {
        ClassSide {
            class: self.class,
            n: self.n,
            members: self.members.shallow_clone(),
            in_side: self.in_side.shallow_clone(),
            side: self.side.shallow_clone(),
            depth: self.depth.shallow_clone(),
            separation: self.separation,
        }
    }
}

/// [n, K] logits as float with column `class` at -inf: a leave-class-out probe's answer among the
/// other classes.
fn without_class(logits: &Tensor, class: i64) -> Tensor {
    let l = logits.to_kind(Kind::Float).copy();
    let _ = l.select(1, class).fill_(f64::NEG_INFINITY);
    l
}

/// The classes other than `class` that get less than `rare` of `rest` (the probe's label counts
/// of a class's members outside the set judged, [K]): not the class's look-alikes.
fn novel_classes(rest: &[i64], class: i64, rare: f64) -> Vec<i64> {
    let total = rest.iter().sum::<i64>().max(1) as f64;
    (0..rest.len() as i64)
        .filter(|&j| j != class && (rest[j as usize] as f64) < rare * total)
        .collect()
}

/// Of a set's probe label counts `set` ([K]): the share in the `novel` classes, and the
/// normalised entropy (0..1, over the K - 1 other classes) of that part.
fn novelty(set: &[i64], novel: &[i64], k: i64) -> (f64, f64) {
    let total = set.iter().sum::<i64>();
    let counts: Vec<f64> = novel.iter().map(|&j| set[j as usize] as f64).collect();
    let novel_total: f64 = counts.iter().sum();
    let share = if total > 0 { novel_total / total as f64 } else { 0.0 };
    let spread = if novel_total > 0.0 && k > 2 {
        -counts
            .iter()
            .filter(|&&v| v > 0.0)
            .map(|&v| (v / novel_total) * (v / novel_total).ln())
            .sum::<f64>()
            / ((k - 1) as f64).ln()
    } else {
        0.0
    };
    (share, spread)
}

/// What the probe makes of some of a class's members (`which`, [n] bool over the probe's
/// members): their label counts ([K]), the share of them in the `novel` classes and that part's
/// spread (as [`judge_side`] computes them for a side).
pub fn probe_novelty(probe: &ClassProbe, which: &Tensor, novel: &[i64], k: i64) -> (Vec<i64>, f64, f64) {
    let labels = probe.pred.masked_select(which);
    let counts = Vec::<i64>::try_from(labels.bincount::<Tensor>(None, k).to_device(audit_nn::tch::Device::Cpu))
        .unwrap_or_default();
    let (share, spread) = novelty(&counts, novel, k);
    (counts, share, spread)
}

/// One class's leave-class-out probe: its label for every member of the class.
#[derive(Debug)]
pub struct ClassProbe {
    pub class: i64,
    /// Indices (into the training set) of the class's members. [n] int64
    pub members: Tensor,
    /// The probe's best class other than this one, per member. [n] int64
    pub pred: Tensor,
}

impl ClassProbe {
    /// From the probe's [n, K] logits for the members.
    pub fn new(class: i64, members: &Tensor, logits: &Tensor) -> ClassProbe {
        ClassProbe {
            class,
            members: members.shallow_clone(),
            pred: without_class(logits, class).argmax(-1, false),
        }
    }

    /// Which members the probe sends to one of `classes`. [n] bool
    pub fn sent_to(&self, classes: &[i64], k: i64) -> Tensor {
        let mut hit = Tensor::zeros([k], (Kind::Bool, self.pred.device()));
        if !classes.is_empty() {
            let _ = hit.index_fill_(0, &Tensor::from_slice(classes).to_device(self.pred.device()), 1);
        }
        hit.index_select(0, &self.pred)
    }
}

/// The verdict on the paper's suspects of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct PaperGroup {
    pub class: i64,
    /// The paper's suspects labelled with the class, and the class's size.
    pub suspects: i64,
    pub n: i64,
    /// The split took at least half of the class.
    pub swept: bool,
    /// Share of the suspects the class's probe gives a novel class (one the class's other members
    /// go to less than `rare`; for a swept class, one the whole class goes to less than `rare`),
    /// and the normalised entropy of that part.
    pub novel_share: f64,
    pub novel_spread: f64,
    /// Suspects that stay dropped.
    pub kept: i64,
}

/// Judges the paper's suspects class by class with the leave-class-out probes. Poisoned samples
/// are genuine images of the other classes (the probe names their sources, spread over them); the
/// clean images the global split takes (sandals, sneakers, whole classes on clean and low-rate
/// models: 2,000-5,000 samples measured) go where their class goes, or a look-alike
/// sub-population to one class. A class the split took less than half of keeps its suspects only
/// when the probe sends at least `t.min_share` of them to classes the rest of the class does not
/// go to and spreads that part (`t.min_spread`), as [`judge_side`] judges a side. A swept class
/// (at least half taken; poisoned samples are a minority of their class) keeps only the suspects
/// the probe sends to a class the whole class rarely goes to. Classes without a probe keep their
/// suspects. `paper` is [N] bool; returns the filtered mask.
pub fn paper_groups_judged(paper: &Tensor, probes: &[ClassProbe], k: i64, t: Judge) -> (Tensor, Vec<PaperGroup>) {
    let mut out = paper.copy();
    let mut groups = Vec::new();
    for p in probes {
        let in_group = paper.index_select(0, &p.members);
        let suspects = in_group.sum(Kind::Int64).int64_value(&[]);
        if suspects == 0 {
            continue;
        }
        let counts = |m: &Tensor| {
            Vec::<i64>::try_from(
                p.pred
                    .masked_select(m)
                    .bincount::<Tensor>(None, k)
                    .to_device(audit_nn::tch::Device::Cpu),
            )
            .unwrap_or_default()
        };
        let n = p.members.size()[0];
        let swept = 2 * suspects >= n;
        let group = counts(&in_group);
        let novel = if swept {
            novel_classes(&counts(&in_group.ones_like()), p.class, t.rare)
        } else {
            novel_classes(&counts(&in_group.logical_not()), p.class, t.rare)
        };
        let (novel_share, novel_spread) = novelty(&group, &novel, k);
        let stay = if swept {
            in_group.logical_and(&p.sent_to(&novel, k))
        } else if novel_share >= t.min_share && novel_spread >= t.min_spread {
            in_group.shallow_clone()
        } else {
            in_group.zeros_like()
        };
        let back = in_group.logical_and(&stay.logical_not());
        let _ = out.index_fill_(0, &p.members.masked_select(&back), 0);
        let kept = stay.sum(Kind::Int64).int64_value(&[]);
        groups.push(PaperGroup {
            class: p.class,
            suspects,
            n,
            swept,
            novel_share,
            novel_spread,
            kept,
        });
    }
    (out, groups)
}

/// The paper's suspects of one class as a candidate side, for the same judgement as the split's
/// side: the suspects of a class the paper's split took less than half of; of a swept class (at
/// least half taken: the poisoned samples, if any, are a minority of it) those its probe sends to
/// a class the whole class goes to less than `rare`. `h` is the paper's per-sample score [N]; the
/// side lies at the low end of `depth` (-h). None when the side would be empty.
pub fn paper_side(paper: &Tensor, h: &Tensor, probe: &ClassProbe, k: i64, rare: f64) -> Option<ClassSide> {
    let in_group = paper.index_select(0, &probe.members);
    let n = probe.members.size()[0];
    let suspects = in_group.sum(Kind::Int64).int64_value(&[]);
    let in_side = if 2 * suspects >= n {
        let all = Vec::<i64>::try_from(
            probe
                .pred
                .bincount::<Tensor>(None, k)
                .to_device(audit_nn::tch::Device::Cpu),
        )
        .unwrap_or_default();
        in_group.logical_and(&probe.sent_to(&novel_classes(&all, probe.class, rare), k))
    } else {
        in_group
    };
    let side = probe.members.masked_select(&in_side);
    if side.size()[0] == 0 {
        return None;
    }
    let depth = -h.index_select(0, &probe.members).to_kind(Kind::Double);
    let (a, b) = (
        depth.masked_select(&in_side),
        depth.masked_select(&in_side.logical_not()),
    );
    let stat = |t: &Tensor| {
        if t.size()[0] > 1 {
            (t.mean(Kind::Double).double_value(&[]), t.var(false).double_value(&[]))
        } else {
            (0.0, 0.0)
        }
    };
    let ((ma, va), (mb, vb)) = (stat(&a), stat(&b));
    let pooled = ((va + vb) / 2.0).sqrt();
    Some(ClassSide {
        class: probe.class,
        n,
        members: probe.members.shallow_clone(),
        in_side,
        side,
        depth,
        separation: if pooled > 0.0 { (ma - mb).abs() / pooled } else { 0.0 },
    })
}

/// Confirms a candidate side with a second, independent leave-class-out probe (`second` is its
/// [n, K] logits for the class's members; `first` the first probe's): accepted when the two name
/// the same class for at least `t.min_agreement` of the side, as a Wilson lower bound over the
/// side's size at `t.agreement_z` (a side of a dozen images agreeing by chance is not confirmed).
pub fn confirm_side(v: &mut SideVerdict, s: &ClassSide, first: &Tensor, second: &Tensor, t: Judge) {
    let label = |l: &Tensor| without_class(l, s.class).argmax(-1, false).masked_select(&s.in_side);
    let (a, b) = (label(first), label(second));
    let agreement = if a.size()[0] > 0 {
        a.eq_tensor(&b)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    } else {
        0.0
    };
    let low = wilson_lower(agreement, a.size()[0], t.agreement_z);
    v.agreement = Some(agreement);
    v.agreement_low = Some(low);
    v.accepted = v.candidate && low >= t.min_agreement;
}

/// What an accepted class's trigger detector trains on, and the part of the class held out to check it.
pub struct TriggerSets {
    /// Positives: the side, as indices into the training set. int64
    pub side: Tensor,
    /// The core's half the detector trains on, as indices into the training set. int64
    pub core: Tensor,
    /// The core's other half, as positions in the side's `members`. int64
    pub held_out: Tensor,
}

/// The training set of an accepted class's trigger detector, three labelled groups: the side
/// (label 1); samples of the other classes ([`other_classes`], label 0: the poisoned images'
/// sources, without the trigger); and every second member of the class farther from the side
/// than the rest's median (label 2: its clean core), the other half held out to check the
/// detector. A classifier that separates these cannot use the images' content, which the side
/// shares with one of the other groups, only the trigger; it then finds the poisoned samples the
/// split left with the clean ones. The core is a group of its own so that it weighs as much as
/// the side and the other classes: a detector that calls the whole class positive then pays for
/// it (with the core among the other classes' negatives it cost a few percent of the loss, and
/// on a clean PyTorch model a side of 45 trousers grew to 1,796).
pub fn trigger_sets(s: &ClassSide) -> TriggerSets {
    let device = s.members.device();
    let rest = s.in_side.logical_not();
    let depth_rest = s.depth.masked_select(&rest);
    let core = if depth_rest.size()[0] > 0 {
        let median = depth_rest.median().double_value(&[]);
        rest.logical_and(&s.depth.gt(median)).nonzero().squeeze_dim(1)
    } else {
        Tensor::zeros([0], (Kind::Int64, device))
    };
    let nc = core.size()[0];
    let every = |start: i64| core.index_select(0, &Tensor::arange_start_step(start, nc, 2, (Kind::Int64, device)));
    TriggerSets {
        side: s.side.shallow_clone(),
        core: s.members.index_select(0, &every(0)),
        held_out: every(1),
    }
}

/// The first `n` samples of `order` (a random permutation of the training set) whose label is
/// none of `classes` and that `exclude` ([N] bool) does not mark: a trigger detector's images of
/// other classes. int64 indices
pub fn other_classes(labels: &Tensor, order: &Tensor, classes: &[i64], n: i64, exclude: Option<&Tensor>) -> Tensor {
    let ordered = labels.index_select(0, order);
    let mut outside = match exclude {
        Some(e) => e.index_select(0, order).logical_not(),
        None => ordered.ones_like().to_kind(Kind::Bool),
    };
    for &c in classes {
        outside = outside.logical_and(&ordered.ne(c));
    }
    let other = order.masked_select(&outside);
    other.narrow(0, 0, n.min(other.size()[0]))
}

/// Which of the paper's suspects stay dropped beside the class-wise split when a target class was
/// detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaperWithTargets {
    /// None: the class-wise suspects (the side and the trigger detector's finds) replace them. In
    /// a target class the paper's split also takes many clean images (on our BadNets model 81% of
    /// the class), and elsewhere it takes only clean images.
    None,
    /// Those labelled with a target class.
    Targets,
    /// All except those in a non-target class the split swept (held at least half of).
    Unswept,
}

/// Whether the paper's suspects are judged class by class by the leave-class-out probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaperFilter {
    /// [`paper_groups_judged`]: a class's suspects stay only when the probe calls them novel.
    Novel,
    /// All stay.
    None,
}

/// The paper's suspects that stay dropped beside the class-wise split. With no detected target
/// class (`targets` empty) all of them: nothing argues against the split (the paper's behaviour).
/// Otherwise as `rule` says: the poisoned samples of an all-to-one poisoning all carry the
/// target's label, so the paper's suspects in other classes are clean images its split took; a
/// class the global split swept is described by it, not triggered (on Blend it takes whole classes
/// of sandals or sneakers). `paper` is [N] bool, `labels` [N] int64.
pub fn paper_suspects_kept(paper: &Tensor, labels: &Tensor, k: i64, targets: &[i64], rule: PaperWithTargets) -> Tensor {
    if targets.is_empty() {
        return paper.shallow_clone();
    }
    let mut keep_class = match rule {
        PaperWithTargets::None => return paper.zeros_like(),
        PaperWithTargets::Targets => Tensor::zeros([k], (Kind::Bool, paper.device())),
        PaperWithTargets::Unswept => {
            let total = labels.bincount::<Tensor>(None, k);
            let in_split = labels.masked_select(paper).bincount::<Tensor>(None, k);
            (in_split * 2).lt_tensor(&total)
        }
    };
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

    /// A class with a far, tight sub-cluster is split along it; the leave-class-out verdict
    /// accepts a side spread over the other classes and keeps one sent to a single look-alike;
    /// the trigger detector's sets are the side against other classes and the class's core.
    #[test]
    fn class_sides_judge_and_trigger_sets() {
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
        let depth = Vec::<f64>::try_from(&sides[0].depth).unwrap();
        let deepest_rest = depth[15..].iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(
            depth[..15].iter().all(|&v| v < deepest_rest),
            "the side lies at the low end of depth"
        );
        let t = Judge {
            rare: 0.05,
            min_share: 0.5,
            min_spread: 0.5,
            min_agreement: 0.6,
            agreement_z: 1.645,
            novel_z: 1.645,
        };
        // Logits naming `labels`, sure where `scale` is large; the judged class always gets the
        // largest logit, which judge_side must ignore.
        let logits = |labels: &Tensor, scale: &Tensor, judged: i64| {
            let l = labels.one_hot(k).to_kind(Kind::Float) * scale.unsqueeze(1);
            let _ = l.select(1, judged).fill_(50.0);
            l
        };
        let sure_side = |side: &Tensor| side.to_kind(Kind::Float) * 4.0 + 1.0;
        // Class 0's probe labels: the side spread over 2 and 3, the rest all 1 (its look-alike);
        // the probe is sure of the side, unsure of the rest.
        let pred0 = Tensor::ones([per], (Kind::Int64, Device::Cpu));
        for i in 0..15 {
            let _ = pred0.get(i).fill_(2 + (i % 2));
        }
        let l0 = logits(&pred0, &sure_side(&sides[0].in_side), 0);
        let mut v0 = judge_side(&sides[0], &l0, k, t);
        assert!(
            v0.candidate && !v0.accepted,
            "a candidate until a second probe confirms it: {v0:?}"
        );
        confirm_side(&mut v0, &sides[0], &l0, &l0, t);
        assert!(
            v0.accepted && v0.novel_classes == [2, 3] && v0.novel_share == 1.0,
            "{v0:?}"
        );
        assert!((v0.novel_spread - (2f64.ln() / 3f64.ln())).abs() < 0.02, "{v0:?}");
        assert_eq!((v0.labels_side[1], v0.labels_rest[1]), (0, 45));
        assert!(v0.confidence_side > v0.confidence_rest + 0.3, "{v0:?}");
        assert_eq!(v0.agreement, Some(1.0));
        // A second probe that names other classes for the side (guesses): not confirmed.
        let other0 = pred0.where_self(&sides[0].in_side.logical_not(), &(&pred0 - 1));
        let mut guess = v0.clone();
        confirm_side(
            &mut guess,
            &sides[0],
            &l0,
            &logits(&other0, &sure_side(&sides[0].in_side), 0),
            t,
        );
        assert!(!guess.accepted && guess.agreement == Some(0.0), "{guess:?}");
        // Class 1: its side all to one class the rest never goes to (a look-alike sub-population).
        let mut pred1 = Tensor::zeros([per], (Kind::Int64, Device::Cpu));
        let _ = pred1.masked_fill_(&sides[1].in_side, 2);
        let v1 = judge_side(&sides[1], &logits(&pred1, &sure_side(&sides[1].in_side), 1), k, t);
        assert!(
            !v1.accepted && v1.novel_share == 1.0 && v1.novel_spread == 0.0,
            "{v1:?}"
        );
        // Class 2: side and rest scattered alike over 0, 1, 3 (a scattered clean class): nothing is novel.
        let pick = Tensor::from_slice(&[0i64, 1, 3]);
        let pred2 = pick.index_select(0, &Tensor::arange(per, (Kind::Int64, Device::Cpu)).remainder(3));
        let v2 = judge_side(&sides[2], &logits(&pred2, &sure_side(&sides[2].in_side), 2), k, t);
        assert!(
            !v2.accepted && v2.novel_classes.is_empty() && v2.novel_share == 0.0,
            "{v2:?}"
        );

        let order = Tensor::arange(per * k, (Kind::Int64, Device::Cpu)).flip([0]);
        let sets = trigger_sets(&sides[0]);
        assert_eq!(Vec::<i64>::try_from(&sets.side).unwrap(), s0);
        let other = Vec::<i64>::try_from(&other_classes(&labels, &order, &[0], 50, None)).unwrap();
        assert!(other.iter().all(|&i| i >= per), "other classes only: {other:?}");
        assert_eq!(other.len(), 50, "the first 50 of the order outside class 0");
        // Excluded samples are skipped: the next ones of the order take their places.
        let excluded = Tensor::zeros([per * k], (Kind::Bool, Device::Cpu));
        let _ = excluded.narrow(0, per * k - 10, 10).fill_(1);
        let other2 = Vec::<i64>::try_from(&other_classes(&labels, &order, &[0], 50, Some(&excluded))).unwrap();
        assert_eq!(other2.len(), 50);
        assert!(other2.iter().all(|&i| i >= per && i < per * k - 10), "{other2:?}");
        // Members are 0..per in order, so positions and indices coincide.
        let mut core = Vec::<i64>::try_from(&sets.core).unwrap();
        let held = Vec::<i64>::try_from(&sets.held_out).unwrap();
        assert_eq!(core.len(), 11, "every second of the core trains");
        assert_eq!(held.len(), 11, "the other half is held out");
        assert!(core.iter().all(|i| !held.contains(i)), "{core:?} {held:?}");
        core.extend(held);
        assert_eq!(other[0], per * k - 1);
        assert!(
            core.iter().all(|&i| (15..per).contains(&i)),
            "the core is class 0 off the side: {core:?}"
        );
        assert_eq!(
            core.len(),
            22,
            "the farther half of the 45 others (strictly above the median)"
        );
    }

    /// The paper's suspects of a class stay only when the probe sends them, spread, where the rest
    /// of the class does not go; of a swept class only those sent where the class rarely goes.
    #[test]
    fn paper_groups_stay_only_when_novel() {
        let (per, k) = (40i64, 5i64);
        let labels = Tensor::arange(k, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per, 0, None);
        // Suspects: class 0 its first 6, class 1 its first 15, class 2 all 40 (swept), class 3
        // its first 8, class 4 none.
        let taken = [6, 15, 40, 8, 0];
        let flags: Vec<bool> = (0..per * k).map(|i| i % per < taken[(i / per) as usize]).collect();
        let paper = Tensor::from_slice(&flags);
        let probe = |class: i64, pred: Vec<i64>| {
            let members = labels.eq(class).nonzero().flatten(0, -1);
            let logits = Tensor::from_slice(&pred).one_hot(k).to_kind(Kind::Float);
            let _ = logits.select(1, class).fill_(9.0);
            ClassProbe::new(class, &members, &logits)
        };
        // Class 0: the suspects spread over 2 and 3 (novel), the rest to 1. Class 1: suspects and
        // rest alike to 0 and 2 (its look-alikes). Class 2: to 0 and 3, but its member 5 to 1,
        // where the class rarely goes. Class 3: the suspects all to 4 (one look-alike
        // sub-population), the rest to 0.
        let p0 = probe(0, (0..per).map(|i| if i < 6 { 2 + i % 2 } else { 1 }).collect());
        let p1 = probe(1, (0..per).map(|i| [0, 2][(i % 2) as usize]).collect());
        let p2 = probe(
            2,
            (0..per)
                .map(|i| if i == 5 { 1 } else { [0, 3][(i % 2) as usize] })
                .collect(),
        );
        let p3 = probe(3, (0..per).map(|i| if i < 8 { 4 } else { 0 }).collect());
        let p4 = probe(4, vec![0; per as usize]);
        let t = Judge {
            rare: 0.05,
            min_share: 0.5,
            min_spread: 0.5,
            min_agreement: 0.6,
            agreement_z: 1.645,
            novel_z: 1.645,
        };
        let (kept, groups) = paper_groups_judged(&paper, &[p0, p1, p2, p3, p4], k, t);
        let count = |class: i64| kept.logical_and(&labels.eq(class)).sum(Kind::Int64).int64_value(&[]);
        assert_eq!((count(0), count(1), count(2), count(3), count(4)), (6, 0, 1, 0, 0));
        assert!(
            bool::try_from(kept.get(2 * per + 5)).unwrap(),
            "class 2's member 5 stays"
        );
        let summary: Vec<(i64, i64, bool, i64)> =
            groups.iter().map(|g| (g.class, g.suspects, g.swept, g.kept)).collect();
        assert_eq!(
            summary,
            [(0, 6, false, 6), (1, 15, false, 0), (2, 40, true, 1), (3, 8, false, 0)]
        );
        assert_eq!(
            (groups[0].novel_share, groups[1].novel_share, groups[3].novel_share),
            (1.0, 0.0, 1.0)
        );
        assert_eq!(groups[3].novel_spread, 0.0);
        // A class without a probe keeps its suspects.
        let (all, none) = paper_groups_judged(&paper, &[], k, t);
        assert!(all.equal(&paper) && none.is_empty());
    }

    /// The agreement test is a lower confidence bound: a handful of images agreeing by chance
    /// is not confirmed, a large side at the same share is; z = 0 is the point estimate.
    #[test]
    fn agreement_is_judged_by_its_lower_bound() {
        assert!((wilson_lower(0.6, 10, 1.645) - 0.352).abs() < 0.005);
        assert!((wilson_lower(0.6, 1000, 1.645) - 0.574).abs() < 0.005);
        assert!((wilson_lower(0.85, 159, 1.645) - 0.795).abs() < 0.005);
        assert_eq!(wilson_lower(0.6, 10, 0.0), 0.6);
        assert_eq!(wilson_lower(1.0, 0, 1.645), 0.0);
        let lower = |n| wilson_lower(0.7, n, 1.645);
        assert!(lower(10) < lower(100) && lower(100) < lower(10_000) && lower(10_000) < 0.7);
        // confirm_side on a candidate of 10 members, 7 of which the two probes agree on.
        let k = 3i64;
        let in_side = Tensor::arange(20, (Kind::Int64, Device::Cpu)).lt(10);
        let side = ClassSide {
            class: 0,
            n: 20,
            members: Tensor::arange(20, (Kind::Int64, Device::Cpu)),
            side: in_side.nonzero().flatten(0, -1),
            in_side: in_side.shallow_clone(),
            depth: Tensor::zeros([20], (Kind::Double, Device::Cpu)),
            separation: 1.0,
        };
        let first = Tensor::zeros([20, k], (Kind::Float, Device::Cpu));
        let _ = first.narrow(1, 1, 1).fill_(1.0);
        let second = first.copy();
        let _ = second.narrow(0, 0, 3).narrow(1, 2, 1).fill_(2.0);
        let judge = |z| Judge {
            rare: 0.05,
            min_share: 0.5,
            min_spread: 0.5,
            min_agreement: 0.6,
            agreement_z: z,
            novel_z: 0.0,
        };
        let mut v = judge_side(&side, &first, k, judge(1.645));
        v.candidate = true;
        confirm_side(&mut v, &side, &first, &second, judge(1.645));
        assert_eq!(v.agreement, Some(0.7));
        assert!(!v.accepted && v.agreement_low.unwrap() < 0.6, "{v:?}");
        confirm_side(&mut v, &side, &first, &second, judge(0.0));
        assert!(v.accepted, "{v:?}");
    }

    /// A class `class` of `n` members (indices 0..n) whose first `side` are on the side.
    fn first_side(class: i64, n: i64, side: i64) -> ClassSide {
        let in_side = Tensor::arange(n, (Kind::Int64, Device::Cpu)).lt(side);
        ClassSide {
            class,
            n,
            members: Tensor::arange(n, (Kind::Int64, Device::Cpu)),
            side: in_side.nonzero().flatten(0, -1),
            in_side,
            depth: Tensor::zeros([n], (Kind::Double, Device::Cpu)),
            separation: 1.0,
        }
    }

    /// [n, k] logits naming `labels`.
    fn naming(labels: &[i64], k: i64) -> Tensor {
        let n = labels.len() as i64;
        let mut logits = Tensor::zeros([n, k], (Kind::Float, Device::Cpu));
        let _ = logits.scatter_(
            1,
            &Tensor::from_slice(labels).unsqueeze(1),
            &Tensor::ones([n, 1], (Kind::Float, Device::Cpu)),
        );
        logits
    }

    /// A side of 45 whose novel share (24 of 45, 0.53) passes `class_novel` as a point estimate
    /// but not as a lower bound (0.41): the clean PyTorch model's trousers that look like
    /// pullovers and coats.
    #[test]
    fn novel_share_is_judged_by_its_lower_bound() {
        let (k, n) = (10i64, 90i64);
        let side = first_side(1, n, 45);
        // The rest goes to class 3; the side's first 21 too, the other 24 to classes 2, 4, 5, 7.
        let labels: Vec<i64> = (0..n)
            .map(|i| {
                if (21..45).contains(&i) {
                    [2, 4, 5, 7][(i % 4) as usize]
                } else {
                    3
                }
            })
            .collect();
        let logits = naming(&labels, k);
        let judge = |z| Judge {
            rare: 0.05,
            min_share: 0.5,
            min_spread: 0.5,
            min_agreement: 0.6,
            agreement_z: 1.645,
            novel_z: z,
        };
        let point = judge_side(&side, &logits, k, judge(0.0));
        assert!((point.novel_share - 24.0 / 45.0).abs() < 1e-9, "{point:?}");
        assert!(point.novel_spread >= 0.5 && point.candidate, "{point:?}");
        let bound = judge_side(&side, &logits, k, judge(1.645));
        assert!(
            !bound.candidate && (bound.novel_share_low - 0.413).abs() < 0.005,
            "{bound:?}"
        );
    }

    /// An all-to-all side: novel but concentrated on one class, which `mapped_source` names; a
    /// spread (candidate) side or a side going where the class goes is not mapped.
    #[test]
    fn mapped_source_names_the_one_novel_class() {
        let (k, n) = (10i64, 60i64);
        let side = first_side(4, n, 30);
        let t = Judge {
            rare: 0.05,
            min_share: 0.5,
            min_spread: 0.5,
            min_agreement: 0.6,
            agreement_z: 1.645,
            novel_z: 1.645,
        };
        let judged = |side_label: &dyn Fn(i64) -> i64| {
            let labels: Vec<i64> = (0..n).map(|i| if i < 30 { side_label(i) } else { 2 }).collect();
            judge_side(&side, &naming(&labels, k), k, t)
        };
        // 27 of the side to class 3, 3 to class 2 (where the rest goes).
        let v = judged(&|i| if i < 27 { 3 } else { 2 });
        assert!(!v.candidate && v.novel_spread < 0.5, "{v:?}");
        assert_eq!(mapped_source(&v, t), Some(3));
        // Spread over five novel classes: a candidate, not mapped.
        let v = judged(&|i| [0, 1, 3, 5, 6][(i % 5) as usize]);
        assert!(v.candidate, "{v:?}");
        assert_eq!(mapped_source(&v, t), None);
        // Where the rest goes: not novel, not mapped.
        let v = judged(&|_| 2);
        assert_eq!(mapped_source(&v, t), None);
    }

    /// The paper's side of a class: its suspects, or of a swept class those sent where the class
    /// rarely goes; at the low end of -h.
    #[test]
    fn paper_side_of_a_swept_class_is_its_novel_members() {
        let (per, k) = (40i64, 4i64);
        let labels = Tensor::arange(k, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per, 0, None);
        let members = labels.eq(0).nonzero().flatten(0, -1);
        let h = Tensor::arange(per * k, (Kind::Double, Device::Cpu));
        // The probe sends member 0 of class 0 to class 3, the others to class 1.
        let pred: Vec<i64> = (0..per).map(|i| if i == 0 { 3 } else { 1 }).collect();
        let logits = Tensor::from_slice(&pred).one_hot(k).to_kind(Kind::Float);
        let probe = ClassProbe::new(0, &members, &logits);
        // Not swept: the first 10 members are the side.
        let few = labels
            .eq(0)
            .logical_and(&Tensor::arange(per * k, (Kind::Int64, Device::Cpu)).lt(10));
        let s = paper_side(&few, &h, &probe, k, 0.05).expect("a side");
        assert_eq!(Vec::<i64>::try_from(&s.side).unwrap(), (0..10).collect::<Vec<_>>());
        assert_eq!((s.class, s.n), (0, per));
        // Swept (all 40): only the one sent to class 3, where 1 of 40 (< 5%) goes.
        let all = labels.eq(0);
        let s = paper_side(&all, &h, &probe, k, 0.05).expect("a side");
        assert_eq!(Vec::<i64>::try_from(&s.side).unwrap(), [0]);
        let depth = Vec::<f64>::try_from(&s.depth).unwrap();
        assert_eq!(depth[5], -5.0, "depth is -h");
        // No suspect in the class: no side.
        assert!(paper_side(&labels.eq(9), &h, &probe, k, 0.05).is_none());
    }

    /// Swept classes go back unless they are a target; with no target the split stays whole.
    #[test]
    fn paper_suspects_in_swept_classes_go_back() {
        let labels = Tensor::arange(3, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(10, 0, None);
        // Class 0: 2 of 10 suspects; classes 1 and 2: 8 of 10 (swept).
        let flags: Vec<bool> = (0..30).map(|i| i % 10 < if i < 10 { 2 } else { 8 }).collect();
        let paper = Tensor::from_slice(&flags);
        let count = |t: &Tensor, class: i64| t.logical_and(&labels.eq(class)).sum(Kind::Int64).int64_value(&[]);
        use PaperWithTargets as P;
        let whole = paper_suspects_kept(&paper, &labels, 3, &[], P::None);
        assert_eq!((count(&whole, 0), count(&whole, 1), count(&whole, 2)), (2, 8, 8));
        let kept = paper_suspects_kept(&paper, &labels, 3, &[2], P::Unswept);
        assert_eq!((count(&kept, 0), count(&kept, 1), count(&kept, 2)), (2, 0, 8));
        let only_target = paper_suspects_kept(&paper, &labels, 3, &[2], P::Targets);
        assert_eq!(
            (count(&only_target, 0), count(&only_target, 1), count(&only_target, 2)),
            (0, 0, 8)
        );
        let none = paper_suspects_kept(&paper, &labels, 3, &[2], P::None);
        assert_eq!(none.sum(Kind::Int64).int64_value(&[]), 0);
        assert_eq!(
            count(&paper_suspects_kept(&paper, &labels, 3, &[], P::None), 1),
            8,
            "no target: all"
        );
    }
}
