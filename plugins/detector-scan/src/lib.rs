//! SCAn, the statistical contamination analyzer (Tang, Wang, Zhang, Zhang, "Demon in the Variant:
//! Statistical Analysis of DNNs for Robust Backdoor Contamination Detection", USENIX Security
//! 2021), as an `audit` detector that needs the model, its training set (untrusted, judged) and
//! the clean subset the host lends (trusted). Sample level: it names the training samples it
//! suspects.
//!
//! The model's representation of an input (here the penultimate features, the input of the
//! output layer: `audit_plugin_common::samples::penultimate_features`) is taken as the sum of an
//! identity and a variation, `r = mu_y + e`, with `mu_y ~ N(0, S_mu)` one vector per class and
//! `e ~ N(0, S_e)` shared by every class (the "Joint Bayesian" model of face verification). A
//! clean class is one identity plus variation; a target class of a backdoor holds two: its own
//! images and the triggered images of other classes, which the model sends to it. SCAn
//! 1. fits the global model on the clean set: `S_mu` and `S_e` by the EM of the reference code
//!    (start: the class means and the residuals around them; E step: each class's identity is
//!    its posterior mean `n_k S_mu (n_k S_mu + S_e)^-1 xbar_k`; M step: `S_mu` and `S_e` are the
//!    sample covariances of the identities and of the residuals, every sample counted once;
//!    until the relative change of the two matrices is below 1e-6 or `em_iters` steps);
//! 2. per class of the training set (the local model): splits the class into two subgroups with
//!    means `u_1`, `u_2` sharing `S_e`, alternating the means and the assignment of each sample
//!    to the nearer mean in the Mahalanobis metric of `S_e` (which is 2-means after whitening by
//!    `S_e^-1/2`);
//! 3. scores the class by the log-likelihood ratio of two identities against one, which under the
//!    shared `S_e` is the statistic of the reference code,
//!    `J_c = (1/n) sum_i [d(r_i, mu)^2 - d(r_i, u_g(i))^2]`, `d` the `S_e` Mahalanobis distance,
//!    `mu` the class's posterior identity under one identity and `u_g(i)` its sample's subgroup
//!    mean: how much two identities shorten the variation a class needs;
//! 4. normalises the class statistics by the median and the MAD over the classes (anomaly index
//!    `(J_c - median) / (1.4826 * MAD)`) and flags a class whose index exceeds `threshold`, the
//!    paper's `e^2` (7.389). A flagged class is a target class; its samples in the poisoned
//!    subgroup (below) are the suspicious samples. A class that is not flagged contributes no
//!    samples: when nothing is flagged the poisoned samples are misses (false negatives), never
//!    false positives (the pitfall ALGORITHMS.md names in a public implementation).
//!
//! As in BackdoorBench's SCAn (scan.py), the local model of a class is fitted on the training
//! samples of the class together with the clean samples of that class (all of them centred on
//! the mean of the union), and the clean samples decide which subgroup is the poisoned one.
//!
//! Differences from the paper and the reference codes (TDteach/Demon-in-the-Variant, SCAn.py;
//! BackdoorBench detection_pretrain/scan.py), stated:
//! - Features: the penultimate features (BackdoorBench sums a chosen layer's maps over space).
//! - Reduction: when the feature dimension D exceeds `dims` (0, the default: the clean sample
//!   count / 10, so that `S_e` is estimated from at least ten samples per dimension), the features
//!   of both sets are projected on the top principal directions of the union of the training and
//!   the clean features (`samples::principal_components`); the references use the raw features.
//! - Ridge: every inverse of `S_e` (the metric, the whitening, the posterior identities) uses
//!   `S_e + ridge * (tr(S_e) / D) I` (`ridge` 1e-3); the references use pseudo-inverses.
//! - EM stop: relative change `(|dS_mu| + |dS_e|) / (|S_mu| + |S_e|)` (Frobenius) below 1e-6;
//!   the references stop at an absolute change of 1e-5, at most 100 steps (our `em_iters`).
//! - Split starts: the references start from one random assignment; here `restarts` starts run
//!   together on the device: the first splits the whitened class by the sign of its top principal
//!   projection, the others start from two distinct samples drawn from a seeded SplitMix64 (so a
//!   seed gives the same start on every device); each runs at most `split_iters` steps (the
//!   references: 100) and stops when no assignment changes; the start with the largest `J` (the
//!   best two-identity fit) is kept.
//! - Anomaly index: one-sided (only a large `J` is a target: a class that fits one identity
//!   unusually well is no backdoor sign); the reference code takes `|J - median|`, so an unusually
//!   small `J` would be flagged there, and divides `J` by its maximum first (no effect on the
//!   index). The threshold is strict, as there (`> e^2`). With fewer than 3 tested classes, or a
//!   MAD of 0, there is no test and nothing is flagged.
//! - Poisoned subgroup (`poisoned_side`): `clean-share` (default) takes the subgroup whose share
//!   of clean samples is the lower (BackdoorBench compares the clean counts, not shares; the
//!   reference SCAn.py returns both subgroups and leaves the choice to its caller); ties (no
//!   clean sample of the class, or equal shares) go to the subgroup with fewer training samples;
//!   `smaller` always takes the subgroup with fewer training samples. The share rule also
//!   handles a class whose poisoned part is the larger one, which `smaller` would get wrong; it
//!   relies on the clean samples of the class resembling its genuine training samples.
//! - Classes with fewer than `min_class_size` training samples are not tested (no statistic,
//!   never flagged).
//! - The statistics can be very large: `J` is in units of the variation's Mahalanobis metric,
//!   which the clean set fixes, so a model whose clean variation is small (the unit tests' block
//!   images: `tr(S_e)` 0.8) has clean classes at J ~ 1,400; only the index over classes is
//!   compared with the threshold.
//! - Everything is batched: one eval-mode pass per set in batches of `batch_size`, the
//!   statistics in double precision on the call's device, one host read of the per-class
//!   numbers at the end (the references loop over samples on the host in numpy).
//!
//! Measured (PyTorch-trained Fashion-MNIST small CNNs, 20,000 training images, the host's 1,000
//! clean test images, CPU, defaults; features 128 -> 100 dimensions by PCA): BadNets at 5%
//! (target 0): class 0 flagged alone (J 441 against a median of 11.0, index 189), 990 samples,
//! precision 1.0, recall 0.99 against the poisoned indices, 28 s; the clean model: not flagged
//! (largest index 3.0, class 5), 24 s. The unit tests' numbers are beside them in tests.rs.

use audit_nn::tch::{self, Kind, Tensor};
use audit_plugin_common::samples::{
    class_indices, mad_index, penultimate_features, principal_components, read_class_stats, to_i64s,
};
use audit_plugin_common::{check_fit, device, device_data, load_model, require_clean};
use audit_sdk::rng::Rng;
use audit_sdk::{Call, DatasetRef, Detector, Error, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"threshold":{"type":"number","default":7.38905609893065,"minimum":0,"description":"a class is a target when the anomaly index of its statistic J (median and MAD over the classes, large side) exceeds this (the paper's e^2)"},
"em_iters":{"type":"integer","default":100,"minimum":1,"maximum":10000,"description":"most EM steps of the global model (S_mu, S_e) on the clean set; it stops earlier when the relative change is below 1e-6"},
"split_iters":{"type":"integer","default":100,"minimum":1,"maximum":10000,"description":"most alternating steps of each class's two-subgroup split; it stops earlier when no assignment changes"},
"restarts":{"type":"integer","default":5,"minimum":1,"maximum":100,"description":"starts of each class's split (the first from the top principal direction, the others from two seeded random samples), run together; the one with the largest J is kept"},
"dims":{"type":"integer","default":0,"minimum":0,"maximum":100000,"description":"features with more dimensions are reduced to this many by PCA of the training and clean features; 0: the clean sample count / 10"},
"ridge":{"type":"number","default":0.001,"minimum":0,"maximum":1,"description":"ridge added to S_e before it is inverted, relative to its mean eigenvalue (tr(S_e) / D); must be > 0"},
"poisoned_side":{"type":"string","default":"clean-share","enum":["clean-share","smaller"],"description":"which subgroup of a flagged class is suspicious: the one with the lower share of clean samples (ties: the smaller), or always the smaller"},
"min_class_size":{"type":"integer","default":10,"minimum":2,"maximum":1000000,"description":"classes with fewer training samples are not tested (no statistic, never flagged)"},
"batch_size":{"type":"integer","default":512,"minimum":1,"maximum":65536,"description":"images per forward pass while reading the penultimate features"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the random split starts (added to the host's seed)"}}}"#;

/// Relative change of the global model's covariances below which its EM stops.
const EM_TOL: f64 = 1e-6;

/// Which subgroup of a flagged class is suspicious.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Side {
    /// The subgroup with the lower share of clean samples; ties to the smaller.
    CleanShare,
    /// The subgroup with fewer training samples.
    Smaller,
}

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    threshold: f64,
    em_iters: usize,
    split_iters: usize,
    restarts: i64,
    dims: i64,
    ridge: f64,
    poisoned_side: Side,
    min_class_size: i64,
    batch_size: i64,
    seed: u64,
}

impl Params {
    /// What the schema cannot say: finite threshold, positive ridge.
    fn check(&self) -> Result<()> {
        if !self.threshold.is_finite() {
            return Err(Error::invalid(format!(
                "parameter `threshold`: {} must be finite",
                self.threshold
            )));
        }
        if !(self.ridge > 0.0 && self.ridge.is_finite()) {
            return Err(Error::invalid(format!(
                "parameter `ridge`: {} must be > 0 (S_e is inverted)",
                self.ridge
            )));
        }
        Ok(())
    }
}

/// The plugin.
#[derive(Debug, Default)]
pub struct Scan;

impl Plugin for Scan {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "scan",
            version: env!("CARGO_PKG_VERSION"),
            description: "SCAn: identity/variation model of the penultimate features fitted by EM on the clean set; per \
                          training class, a two-identity split and its log-likelihood ratio J; a class whose J has a MAD \
                          anomaly index above e^2 is a target, with its subgroup away from the clean samples",
            params_schema: SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL
                | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA
                | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
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
    p: &Params,
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
fn poisoned_side(rule: Side, train: [f64; 2], clean: [f64; 2]) -> usize {
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

impl Detector for Scan {
    fn scan(&self, call: &Call<'_>, model: &[u8], data: Option<&DatasetRef<'_>>) -> Result<Verdict> {
        self.scan_with_clean(call, model, data, None)
    }

    fn scan_with_clean(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        data: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Verdict> {
        let p: Params = call.params.parse()?;
        p.check()?;
        let train = data
            .filter(|d| !d.is_empty())
            .ok_or_else(|| Error::invalid("scan needs the training set (the samples it judges): pass --data DATA"))?;
        let clean = require_clean("scan", clean)?;
        if clean.len() < 2 {
            return Err(Error::invalid(
                "scan needs at least 2 clean images (the global model's covariances)",
            ));
        }
        let started = std::time::Instant::now();
        let device = device(call)?;
        let (mut model, pre) = load_model(model_bytes, device, false)?;
        model.set_trainable(false);
        let train_data = device_data(train, device)?;
        let k = check_fit(&model, &train_data, &pre, "the training set")?;
        let clean_data = device_data(clean, device)?;
        check_fit(&model, &clean_data, &pre, "the clean subset")?;
        let n = train_data.len();
        let nc = clean_data.len();
        let ft = penultimate_features(
            call,
            &model,
            &train_data,
            &pre,
            p.batch_size,
            "penultimate features (training)",
        )?;
        let fc = penultimate_features(
            call,
            &model,
            &clean_data,
            &pre,
            p.batch_size,
            "penultimate features (clean)",
        )?;
        drop(model);
        let feature_dim = ft.size()[1];
        let dims = target_dims(p.dims, feature_dim, nc);
        let both = Tensor::cat(&[ft.to_kind(Kind::Double), fc.to_kind(Kind::Double)], 0);
        drop((ft, fc));
        let (both, explained) = if dims < feature_dim {
            let pc = principal_components(&both, dims);
            let share = pc.eigenvalues.narrow(0, 0, dims).sum(Kind::Double) / pc.eigenvalues.sum(Kind::Double);
            (pc.scores, Some(share.double_value(&[])))
        } else {
            (both, None)
        };
        let clean_counts = to_i64s(&clean_data.y.bincount::<Tensor>(None, k))?;
        let clean_classes = clean_counts.iter().filter(|&&c| c > 0).count();
        if clean_classes < 2 {
            return Err(Error::invalid(format!(
                "scan needs clean images of at least 2 classes (the identity covariance); the clean subset has {clean_classes}"
            )));
        }
        call.host.check_cancelled()?;
        call.host.progress("global model", 0, 1);
        let g = global_model(&both.narrow(0, n, nc), &clean_data.y, k, p.em_iters, p.ridge)?;
        call.host.progress("global model", 1, 1);
        let s_e_reg = regularised(&g.s_e, p.ridge);
        let w = whitener(&s_e_reg);
        // The local models: the union of the training and the clean samples, centred on its mean.
        let x = &both - both.mean_dim(0, true, Kind::Double);
        drop(both);
        let y_all = Tensor::cat(&[&train_data.y, &clean_data.y], 0);
        let is_clean = Tensor::cat(
            &[
                Tensor::zeros([n], (Kind::Double, device)),
                Tensor::ones([nc], (Kind::Double, device)),
            ],
            0,
        );
        let per_class = class_indices(&y_all, k)?;
        let train_sizes = to_i64s(&train_data.y.bincount::<Tensor>(None, k))?;
        let seed = call.seed.wrapping_add(p.seed);
        let mut results: Vec<Option<ClassResult>> = Vec::with_capacity(k as usize);
        for (c, idx) in per_class.into_iter().enumerate() {
            call.host.check_cancelled()?;
            call.host.progress("local models", c as u64, k as u64);
            // One random stream per class: a class's split does not depend on the others.
            let mut rng = Rng::stream(seed, c as u64);
            results.push(
                (train_sizes[c] >= p.min_class_size)
                    .then(|| local_class(&x, &is_clean, idx, &g, &s_e_reg, &w, &p, &mut rng)),
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
        let targets = flagged(&index, p.threshold);
        let mut picked = Vec::new();
        let mut side_of = vec![None; k as usize];
        for &t in &targets {
            let r = results[t as usize].as_ref().expect("a flagged class was tested");
            let s = per[t as usize].expect("stats of a tested class");
            let side = poisoned_side(p.poisoned_side, [s[2], s[3]], [s[4], s[5]]);
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
        let backdoored = !targets.is_empty();
        let summary = match (&test, top_class) {
            (Some(t), Some(c)) => format!(
                "largest J {:.3} (class {c}), median {:.3}, anomaly index {:.2} (threshold {:.3}): {}",
                j[c].unwrap_or(f64::NAN),
                t.median,
                index[c].unwrap_or(f64::NAN),
                p.threshold,
                if backdoored {
                    format!("flagged class(es) {targets:?}, {} samples", suspicious.len())
                } else {
                    "not flagged".to_string()
                }
            ),
            _ => format!(
                "no outlier test: {} class(es) with at least {} training samples and spread in their J (need 3): not \
                 flagged",
                values.len(),
                p.min_class_size
            ),
        };
        call.host.info(&summary);
        let s_mu_trace = g.s_mu.trace().double_value(&[]);
        let s_e_trace = g.s_e.trace().double_value(&[]);
        let classes: Vec<Value> = (0..k as usize)
            .map(|c| {
                let s = per[c];
                let flagged_samples = side_of[c].zip(s).map(|(side, s)| s[2 + side] as i64).unwrap_or(0);
                json!({
                    "class": c,
                    "samples": train_sizes[c],
                    "clean_samples": clean_counts[c],
                    "j": j[c],
                    "anomaly_index": index[c],
                    "flagged": targets.contains(&(c as i64)),
                    "subgroup_sizes": s.map(|s| [s[2] as i64, s[3] as i64]),
                    "clean_in_subgroups": s.map(|s| [s[4] as i64, s[5] as i64]),
                    "kept_start": s.map(|s| s[1] as i64),
                    "split_steps": results[c].as_ref().map(|r| r.steps),
                    "poisoned_subgroup": side_of[c],
                    "flagged_samples": flagged_samples,
                })
            })
            .collect();
        Ok(Verdict {
            backdoored,
            target_classes: targets.clone(),
            details: json!({
                "detector": "scan",
                "level": "sample",
                "device": format!("{device:?}").to_lowercase(),
                "score_name": "anomaly_index",
                "score": top_class.and_then(|c| index[c]),
                "threshold": p.threshold,
                "statistic": "j",
                "median_j": test.as_ref().map(|t| t.median),
                "mad": test.as_ref().map(|t| t.mad),
                "per_class": classes,
                "training_samples": n,
                "clean_samples": nc,
                "feature_dim": feature_dim,
                "dims": dims,
                "reduction": if explained.is_some() { "pca" } else { "none" },
                "explained_variance": explained,
                "ridge": p.ridge,
                "em_iters": p.em_iters,
                "em_steps": g.iterations,
                "em_converged": g.converged,
                "trace_s_mu": s_mu_trace,
                "trace_s_e": s_e_trace,
                "split_iters": p.split_iters,
                "restarts": p.restarts,
                "poisoned_side": match p.poisoned_side { Side::CleanShare => "clean-share", Side::Smaller => "smaller" },
                "min_class_size": p.min_class_size,
                "flagged_samples": suspicious.len(),
                "seed": seed,
                "summary": summary,
                "seconds": started.elapsed().as_secs_f64(),
            }),
            suspicious,
        })
    }
}

audit_sdk::export_plugin!(detector: Scan);

#[cfg(test)]
mod tests;
