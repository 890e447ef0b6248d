//! SCAn's statistics (Tang et al., USENIX Security 2021), shared by the `scan` detector (which
//! documents the method, its references and the differences from them) and the NONE defense's
//! clean-label check (`clean_label=scan`): the identity/variation model fitted by EM on a trusted
//! clean set, a two-identity split of every training class in the variation's whitened space, the
//! log-likelihood ratio `J` of each class, its MAD anomaly index over the classes, and the samples
//! of the suspicious subgroup of every class whose index exceeds the threshold. Everything runs
//! in double precision on the features' device; the per-class numbers are read to the host once.

use audit_nn::tch::{self, Kind, Tensor};
use audit_sdk::rng::Rng;
use audit_sdk::{Call, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::samples::{class_indices, mad_index, principal_components, read_class_stats, to_i64s, MadIndex};

/// Relative change of the global model's covariances below which its EM stops.
const EM_TOL: f64 = 1e-6;

/// The paper's threshold of the anomaly index, `e^2`.
pub const THRESHOLD: f64 = 7.38905609893065;

/// Which subgroup of a flagged class is suspicious.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The subgroup with the lower share of clean samples; ties to the smaller.
    CleanShare,
    /// The subgroup with fewer training samples.
    Smaller,
}

/// The settings of [`analyse`] (the `scan` detector's parameters of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScanConfig {
    /// A class is a target when its anomaly index is strictly above this.
    pub threshold: f64,
    pub em_iters: usize,
    pub split_iters: usize,
    pub restarts: i64,
    /// Features with more dimensions are reduced to this many by PCA (0: clean count / 10).
    pub dims: i64,
    /// Ridge added to `S_e` before it is inverted, relative to `tr(S_e) / D` (> 0).
    pub ridge: f64,
    pub poisoned_side: Side,
    /// Classes with fewer training samples are not tested.
    pub min_class_size: i64,
}

impl Default for ScanConfig {
    /// The detector's defaults.
    fn default() -> ScanConfig {
        ScanConfig {
            threshold: THRESHOLD,
            em_iters: 100,
            split_iters: 100,
            restarts: 5,
            dims: 0,
            ridge: 1e-3,
            poisoned_side: Side::CleanShare,
            min_class_size: 10,
        }
    }
}

/// `s + ridge * (tr(s) / d) I` (the trace floored at a tiny positive value, so an all-zero `s`
/// still inverts).
pub fn regularised(s: &Tensor, ridge: f64) -> Tensor {
    let d = s.size()[0];
    let scale = (s.trace() / d as f64).clamp_min(1e-12) * ridge;
    s + Tensor::eye(d, (Kind::Double, s.device())) * scale
}

/// The global model: the identity and the variation covariances fitted on the clean set.
#[derive(Debug)]
pub struct GlobalModel {
    /// [D, D] double: the covariance of the identities.
    pub s_mu: Tensor,
    /// [D, D] double: the covariance of the variation (without the ridge).
    pub s_e: Tensor,
    /// EM steps run.
    pub iterations: usize,
    /// Whether the relative change fell below the tolerance.
    pub converged: bool,
}

/// Sample covariances (divisor N - 1) of the per-sample identities `mu[y_i]` (each class's
/// identity counted once per sample) and of the residuals `x_i - mu[y_i]`.
fn moments(x: &Tensor, y: &Tensor, mu: &Tensor, counts: &Tensor) -> (Tensor, Tensor) {
    let n = x.size()[0] as f64;
    let w = counts.unsqueeze(1);
    let mean = (mu * &w).sum_dim_intlist(0, true, Kind::Double) / n;
    let du = mu - mean;
    let s_mu = (&du * &w).tr().matmul(&du) / (n - 1.0);
    let e = x - mu.index_select(0, y);
    let de = &e - e.mean_dim(0, true, Kind::Double);
    let s_e = de.tr().matmul(&de) / (n - 1.0);
    (s_mu, s_e)
}

/// Each class's posterior identity given its `counts[k]` samples with mean `means[k]`:
/// `n_k S_mu (n_k S_mu + S_e')^-1 xbar_k` ([K, D]; 0 for an empty class), `S_e'` regularised.
fn posterior_identities(s_mu: &Tensor, s_e_reg: &Tensor, means: &Tensor, counts: &Tensor) -> Tensor {
    let k = means.size()[0];
    let a = counts.view([k, 1, 1]) * s_mu.unsqueeze(0) + s_e_reg.unsqueeze(0);
    let sol = Tensor::linalg_solve(&a, &means.unsqueeze(2), true).squeeze_dim(2);
    // Row form of S_mu sol (S_mu is symmetric).
    sol.matmul(s_mu) * counts.unsqueeze(1)
}

/// The global model of `x` ([N, D], labels `y` in 0..k) by the reference's EM; `x` is centred
/// on its mean first.
pub fn global_model(x: &Tensor, y: &Tensor, k: i64, max_iters: usize, ridge: f64) -> Result<GlobalModel> {
    tch::no_grad(|| {
        let x = x.to_kind(Kind::Double);
        let x = &x - x.mean_dim(0, true, Kind::Double);
        let onehot = y.one_hot(k).to_kind(Kind::Double);
        let counts = onehot.sum_dim_intlist(0, false, Kind::Double);
        let means = onehot.tr().matmul(&x) / counts.clamp_min(1.0).unsqueeze(1);
        let (mut s_mu, mut s_e) = moments(&x, y, &means, &counts);
        let mut iterations = 0;
        let mut converged = false;
        while iterations < max_iters {
            iterations += 1;
            let mu = posterior_identities(&s_mu, &regularised(&s_e, ridge), &means, &counts);
            let (n_mu, n_e) = moments(&x, y, &mu, &counts);
            let change = ((&n_mu - &s_mu).norm() + (&n_e - &s_e).norm()) / (s_mu.norm() + s_e.norm() + 1e-300);
            s_mu = n_mu;
            s_e = n_e;
            let change = change.double_value(&[]);
            if !change.is_finite() {
                return Err(Error::failed(
                    "the global model's EM diverged (non-finite covariance); try a larger `ridge`",
                ));
            }
            if change < EM_TOL {
                converged = true;
                break;
            }
        }
        Ok(GlobalModel {
            s_mu,
            s_e,
            iterations,
            converged,
        })
    })
}

/// `W` with `W Wᵀ = s^-1` (s symmetric positive definite): whitened rows `x W` have the
/// Mahalanobis metric of `s` as their Euclidean one.
pub fn whitener(s: &Tensor) -> Tensor {
    let (evals, evecs) = s.linalg_eigh("L");
    evecs * evals.clamp_min(1e-300).rsqrt().unsqueeze(0)
}

/// Squared distances of points [n, d] to centres [R, 2, d]: [R, n, 2].
fn sq_dist(z: &Tensor, centres: &Tensor) -> Tensor {
    let zz = z.square().sum_dim_intlist(1, false, Kind::Double).view([1, -1, 1]);
    let cc = centres.square().sum_dim_intlist(2, false, Kind::Double).unsqueeze(1);
    let zc = z.matmul(&centres.transpose(1, 2));
    (zz + cc - zc * 2.0).clamp_min(0.0)
}

/// The subgroup means of assignments [R, n] (0/1) of `z` ([n, d]): [R, 2, d]; an empty
/// subgroup keeps its row of `fallback`.
fn group_means(z: &Tensor, assign: &Tensor, fallback: &Tensor) -> Tensor {
    let onehot = assign.one_hot(2).to_kind(Kind::Double);
    let counts = onehot.sum_dim_intlist(1, false, Kind::Double).unsqueeze(2);
    let sums = onehot.transpose(1, 2).matmul(z);
    (&sums / counts.clamp_min(1.0)).where_self(&counts.gt(0.0), fallback)
}

/// A two-subgroup split of one class in the whitened space.
#[derive(Debug)]
pub struct Split {
    /// [n] i64, 0 or 1: the subgroup of each sample (the kept start).
    pub assign: Tensor,
    /// [R] double: `J` of every start.
    pub j: Tensor,
    /// [] i64: the kept start (largest `J`).
    pub best: Tensor,
    /// Steps the starts ran (all together) before no assignment changed, or the cap.
    pub steps: usize,
}

/// Splits the whitened class `z` ([n, d], n >= 2) into two subgroups sharing the variation
/// (2-means in the whitened space) from `restarts` starts, and scores each start by
/// `J = mean |z - mu|^2 - mean |z - u_g|^2` with `mu` ([d]) the class's one-identity fit.
pub fn split(z: &Tensor, mu: &Tensor, restarts: i64, max_steps: usize, rng: &mut Rng) -> Split {
    tch::no_grad(|| {
        let n = z.size()[0];
        let dev = z.device();
        let overall = z.mean_dim(0, true, Kind::Double);
        // Start 0: the sign of the top principal projection; the others: two distinct samples.
        let top = principal_components(z, 1)
            .scores
            .select(1, 0)
            .gt(0.0)
            .to_kind(Kind::Int64);
        let fallback = Tensor::cat(&[&overall, &overall], 0).unsqueeze(0);
        let first = group_means(z, &top.unsqueeze(0), &fallback);
        let mut centres = if restarts > 1 {
            let mut picks = Vec::with_capacity(2 * (restarts as usize - 1));
            for _ in 1..restarts {
                let a = rng.below(n as usize) as i64;
                let mut b = rng.below(n as usize - 1) as i64;
                if b >= a {
                    b += 1;
                }
                picks.extend([a, b]);
            }
            let others = z
                .index_select(0, &Tensor::from_slice(&picks).to_device(dev))
                .view([restarts - 1, 2, -1]);
            Tensor::cat(&[first, others], 0)
        } else {
            first
        };
        let mut assign = sq_dist(z, &centres).argmin(2, false);
        let mut steps = 0;
        while steps < max_steps {
            steps += 1;
            centres = group_means(z, &assign, &centres);
            let next = sq_dist(z, &centres).argmin(2, false);
            let same = next.equal(&assign);
            assign = next;
            if same {
                break;
            }
        }
        let means = group_means(z, &assign, &centres);
        let d_two = sq_dist(z, &means)
            .gather(2, &assign.unsqueeze(2), false)
            .squeeze_dim(2)
            .mean_dim(1, false, Kind::Double);
        let d_one = (z - mu.unsqueeze(0))
            .square()
            .sum_dim_intlist(1, false, Kind::Double)
            .mean(Kind::Double);
        let j = d_one - d_two;
        let best = j.argmax(0, false);
        Split {
            assign: assign.index_select(0, &best.unsqueeze(0)).squeeze_dim(0),
            j,
            best,
            steps,
        }
    })
}

/// What the local model found in one class (on the device until read).
struct ClassResult {
    /// Indices of the class's samples in the union (training first: < N are training indices).
    indices: Tensor,
    assign: Tensor,
    /// [6] double: J of the kept start, kept start, training samples in subgroups 0 and 1,
    /// clean samples in subgroups 0 and 1.
    stats: Tensor,
    steps: usize,
}

/// The local model of one class: its posterior identity under one identity, the split, and
/// the subgroup counts. `x` is the union ([N + Nc, D], centred), `clean` its 0/1 clean marks.
#[allow(clippy::too_many_arguments)]
fn local_class(
    x: &Tensor,
    clean: &Tensor,
    indices: Tensor,
    g: &GlobalModel,
    s_e_reg: &Tensor,
    w: &Tensor,
    p: &ScanConfig,
    rng: &mut Rng,
) -> ClassResult {
    tch::no_grad(|| {
        let xc = x.index_select(0, &indices);
        let n = xc.size()[0] as f64;
        let xbar = xc.mean_dim(0, true, Kind::Double);
        let count = Tensor::from_slice(&[n]).to_device(x.device());
        let mu = posterior_identities(&g.s_mu, s_e_reg, &xbar, &count);
        let z = xc.matmul(w);
        let mu_z = mu.matmul(w).squeeze_dim(0);
        let s = split(&z, &mu_z, p.restarts, p.split_iters, rng);
        let side = s.assign.to_kind(Kind::Double);
        let is_clean = clean.index_select(0, &indices);
        let train: Tensor = is_clean.ones_like() - &is_clean;
        let other: Tensor = side.ones_like() - &side;
        let stats = Tensor::stack(
            &[
                s.j.index_select(0, &s.best.unsqueeze(0)).squeeze_dim(0),
                s.best.to_kind(Kind::Double),
                (&other * &train).sum(Kind::Double),
                (&side * &train).sum(Kind::Double),
                (&other * &is_clean).sum(Kind::Double),
                (&side * &is_clean).sum(Kind::Double),
            ],
            0,
        );
        ClassResult {
            indices,
            assign: s.assign,
            stats,
            steps: s.steps,
        }
    })
}

/// The suspicious subgroup (0 or 1) of a flagged class with `train` training and `clean` clean
/// samples in its two subgroups.
pub fn poisoned_side(rule: Side, train: [f64; 2], clean: [f64; 2]) -> usize {
    let smaller = if train[0] < train[1] { 0 } else { 1 };
    match rule {
        Side::Smaller => smaller,
        Side::CleanShare => {
            let share = |s: usize| {
                let all = train[s] + clean[s];
                if all > 0.0 {
                    clean[s] / all
                } else {
                    0.0
                }
            };
            let (a, b) = (share(0), share(1));
            if a < b {
                0
            } else if b < a {
                1
            } else {
                smaller
            }
        }
    }
}

/// The flagged classes: anomaly index strictly above `threshold` (None: no test, never).
pub fn flagged(index: &[Option<f64>], threshold: f64) -> Vec<i64> {
    index
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is_some_and(|i| i > threshold))
        .map(|(c, _)| c as i64)
        .collect()
}

/// The reduced dimension: `dims` (0: clean count / 10, at least 1), never above `d`.
pub fn target_dims(dims: i64, d: i64, clean: i64) -> i64 {
    let want = if dims == 0 { (clean / 10).max(1) } else { dims };
    want.min(d)
}

/// What SCAn found in one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScan {
    pub class: usize,
    pub samples: i64,
    pub clean_samples: i64,
    /// None: not tested (too few training samples) or not finite.
    pub j: Option<f64>,
    pub anomaly_index: Option<f64>,
    pub flagged: bool,
    /// Training samples in subgroups 0 and 1.
    pub subgroup_sizes: Option<[i64; 2]>,
    pub clean_in_subgroups: Option<[i64; 2]>,
    pub kept_start: Option<i64>,
    pub split_steps: Option<usize>,
    /// Of a flagged class: its suspicious subgroup.
    pub poisoned_subgroup: Option<usize>,
    pub flagged_samples: i64,
}

/// The outcome of [`analyse`].
#[derive(Debug)]
pub struct ScanOutcome {
    pub classes: Vec<ClassScan>,
    /// The flagged (target) classes.
    pub targets: Vec<i64>,
    /// The training indices of the flagged classes' suspicious subgroups, sorted.
    pub suspicious: Vec<i64>,
    /// The MAD test over the tested classes' `J` (None: fewer than 3, or no spread).
    pub test: Option<MadIndex>,
    /// The class with the largest anomaly index.
    pub top_class: Option<usize>,
    pub feature_dim: i64,
    pub dims: i64,
    /// Share of the variance the PCA kept (None: no reduction).
    pub explained_variance: Option<f64>,
    pub em_steps: usize,
    pub em_converged: bool,
    pub trace_s_mu: f64,
    pub trace_s_e: f64,
}

impl ScanOutcome {
    /// One line: the largest `J`, the median, the index against the threshold, the verdict.
    pub fn summary(&self, cfg: &ScanConfig) -> String {
        match (&self.test, self.top_class) {
            (Some(t), Some(c)) => format!(
                "largest J {:.3} (class {c}), median {:.3}, anomaly index {:.2} (threshold {:.3}): {}",
                self.classes[c].j.unwrap_or(f64::NAN),
                t.median,
                self.classes[c].anomaly_index.unwrap_or(f64::NAN),
                cfg.threshold,
                if self.targets.is_empty() {
                    "not flagged".to_string()
                } else {
                    format!(
                        "flagged class(es) {:?}, {} samples",
                        self.targets,
                        self.suspicious.len()
                    )
                }
            ),
            _ => format!(
                "no outlier test: {} class(es) with at least {} training samples and spread in their J (need 3): not \
                 flagged",
                self.classes.iter().filter(|c| c.j.is_some()).count(),
                cfg.min_class_size
            ),
        }
    }

    /// The numbers a report shows (the per-class entries, the test, the reduction, the EM).
    pub fn details(&self) -> Value {
        json!({
            "score": self.top_class.and_then(|c| self.classes[c].anomaly_index),
            "median_j": self.test.as_ref().map(|t| t.median),
            "mad": self.test.as_ref().map(|t| t.mad),
            "per_class": self.classes,
            "feature_dim": self.feature_dim,
            "dims": self.dims,
            "reduction": if self.explained_variance.is_some() { "pca" } else { "none" },
            "explained_variance": self.explained_variance,
            "em_steps": self.em_steps,
            "em_converged": self.em_converged,
            "trace_s_mu": self.trace_s_mu,
            "trace_s_e": self.trace_s_e,
            "flagged_samples": self.suspicious.len(),
        })
    }
}

/// SCAn on features already read: `train` ([N, D], labels `train_y` in 0..k) is judged, `clean`
/// ([Nc, D], labels `clean_y`) is trusted. Progress goes to the call's host ("global model",
/// "local models"); `seed` seeds the split starts (one stream per class). Refused (invalid):
/// fewer than 2 clean images, or clean images of fewer than 2 classes.
#[allow(clippy::too_many_arguments)]
pub fn analyse(
    call: &Call<'_>,
    train: &Tensor,
    train_y: &Tensor,
    clean: &Tensor,
    clean_y: &Tensor,
    k: i64,
    cfg: &ScanConfig,
    seed: u64,
) -> Result<ScanOutcome> {
    let (n, nc) = (train.size()[0], clean.size()[0]);
    if nc < 2 {
        return Err(Error::invalid(
            "scan needs at least 2 clean images (the global model's covariances)",
        ));
    }
    let device = train.device();
    let feature_dim = train.size()[1];
    let dims = target_dims(cfg.dims, feature_dim, nc);
    let both = Tensor::cat(&[train.to_kind(Kind::Double), clean.to_kind(Kind::Double)], 0);
    let (both, explained_variance) = if dims < feature_dim {
        let pc = principal_components(&both, dims);
        let share = pc.eigenvalues.narrow(0, 0, dims).sum(Kind::Double) / pc.eigenvalues.sum(Kind::Double);
        (pc.scores, Some(share.double_value(&[])))
    } else {
        (both, None)
    };
    let clean_counts = to_i64s(&clean_y.bincount::<Tensor>(None, k))?;
    let clean_classes = clean_counts.iter().filter(|&&c| c > 0).count();
    if clean_classes < 2 {
        return Err(Error::invalid(format!(
            "scan needs clean images of at least 2 classes (the identity covariance); the clean subset has {clean_classes}"
        )));
    }
    call.host.check_cancelled()?;
    call.host.progress("global model", 0, 1);
    let g = global_model(&both.narrow(0, n, nc), clean_y, k, cfg.em_iters, cfg.ridge)?;
    call.host.progress("global model", 1, 1);
    let s_e_reg = regularised(&g.s_e, cfg.ridge);
    let w = whitener(&s_e_reg);
    // The local models: the union of the training and the clean samples, centred on its mean.
    let x = &both - both.mean_dim(0, true, Kind::Double);
    drop(both);
    let y_all = Tensor::cat(&[train_y, clean_y], 0);
    let is_clean = Tensor::cat(
        &[
            Tensor::zeros([n], (Kind::Double, device)),
            Tensor::ones([nc], (Kind::Double, device)),
        ],
        0,
    );
    let per_class = class_indices(&y_all, k)?;
    let train_sizes = to_i64s(&train_y.bincount::<Tensor>(None, k))?;
    let mut results: Vec<Option<ClassResult>> = Vec::with_capacity(k as usize);
    for (c, idx) in per_class.into_iter().enumerate() {
        call.host.check_cancelled()?;
        call.host.progress("local models", c as u64, k as u64);
        // One random stream per class: a class's split does not depend on the others.
        let mut rng = Rng::stream(seed, c as u64);
        results.push(
            (train_sizes[c] >= cfg.min_class_size)
                .then(|| local_class(&x, &is_clean, idx, &g, &s_e_reg, &w, cfg, &mut rng)),
        );
    }
    call.host.progress("local models", k as u64, k as u64);
    // One read of every tested class's numbers.
    let per: Vec<Option<[f64; 6]>> =
        read_class_stats(&results.iter().map(|r| r.as_ref().map(|r| &r.stats)).collect::<Vec<_>>())?;
    let j: Vec<Option<f64>> = per.iter().map(|s| s.map(|s| s[0]).filter(|v| v.is_finite())).collect();
    let values: Vec<f64> = j.iter().flatten().copied().collect();
    let test = mad_index(&values);
    let mut index: Vec<Option<f64>> = vec![None; k as usize];
    if let Some(t) = &test {
        let mut it = t.index.iter();
        for (c, v) in j.iter().enumerate() {
            if v.is_some() {
                index[c] = it.next().copied();
            }
        }
    }
    let targets = flagged(&index, cfg.threshold);
    let mut picked = Vec::new();
    let mut side_of = vec![None; k as usize];
    for &t in &targets {
        let r = results[t as usize].as_ref().expect("a flagged class was tested");
        let s = per[t as usize].expect("stats of a tested class");
        let side = poisoned_side(cfg.poisoned_side, [s[2], s[3]], [s[4], s[5]]);
        side_of[t as usize] = Some(side);
        let keep = r.assign.eq(side as i64).logical_and(&r.indices.lt(n));
        picked.push(r.indices.masked_select(&keep));
    }
    let mut suspicious = if picked.is_empty() {
        vec![]
    } else {
        to_i64s(&Tensor::cat(&picked, 0))?
    };
    suspicious.sort_unstable();
    let top_class = (0..k as usize)
        .filter(|&c| index[c].is_some())
        .max_by(|&a, &b| index[a].unwrap_or(f64::MIN).total_cmp(&index[b].unwrap_or(f64::MIN)));
    let classes = (0..k as usize)
        .map(|c| {
            let s = per[c];
            ClassScan {
                class: c,
                samples: train_sizes[c],
                clean_samples: clean_counts[c],
                j: j[c],
                anomaly_index: index[c],
                flagged: targets.contains(&(c as i64)),
                subgroup_sizes: s.map(|s| [s[2] as i64, s[3] as i64]),
                clean_in_subgroups: s.map(|s| [s[4] as i64, s[5] as i64]),
                kept_start: s.map(|s| s[1] as i64),
                split_steps: results[c].as_ref().map(|r| r.steps),
                poisoned_subgroup: side_of[c],
                flagged_samples: side_of[c].zip(s).map(|(side, s)| s[2 + side] as i64).unwrap_or(0),
            }
        })
        .collect();
    Ok(ScanOutcome {
        classes,
        targets,
        suspicious,
        test,
        top_class,
        feature_dim,
        dims,
        explained_variance,
        em_steps: g.iterations,
        em_converged: g.converged,
        trace_s_mu: g.s_mu.trace().double_value(&[]),
        trace_s_e: g.s_e.trace().double_value(&[]),
    })
}
