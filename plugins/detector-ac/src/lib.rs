//! Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava,
//! "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", arXiv:1811.03728,
//! 2018) as an `audit` detector that needs the model and its training set (sample level: it names
//! the training samples it suspects).
//!
//! The poisoned samples of a target class are images of other classes that the model sends to it
//! because of the trigger, so their activations form a group of their own. Per class (the samples
//! by their training label): the penultimate features (the input of the model's output layer:
//! `audit_plugin_common::samples::penultimate_features`), reduced to `dims` (10) dimensions,
//! split into two clusters by k-means; the class is poisoned when the smaller cluster holds at
//! most `size_threshold` (0.35) of the class and the split is real, its silhouette score (the
//! mean over samples of `(b - a) / max(a, b)`, a the mean distance to the own cluster, b to the
//! other; Euclidean, on the reduced features) at least `silhouette` (0.10). The flagged samples
//! are the smaller cluster of each flagged class. The thresholds are those of IBM ART's
//! `ActivationDefence` (the paper's authors' implementation): `analyze_by_relative_size` and
//! `analyze_by_silhouette_score` use 0.35 and 0.10; the paper itself reports the relative size
//! and the silhouette score as the signals and sets no silhouette threshold.
//!
//! Differences from the paper and ART, stated: the reduction is PCA (the top `dims` principal
//! directions of the centred class features, ART's default `reduce="PCA"`), not the paper's ICA;
//! k-means is 2-means with k-means++ seeding (first centre uniform, second drawn in proportion
//! to the squared distance to the first, both from a seeded SplitMix64 on the host so a seed
//! gives the same start on every device), `restarts` (10) runs of a fixed `iterations` (50)
//! Lloyd steps, all restarts in one batch of tensor ops on the device, keeping the restart with
//! the smallest inertia (ART uses scikit-learn's MiniBatchKMeans); the silhouette is computed on
//! at most `silhouette_samples` (2,000) samples of the class drawn without replacement (seeded;
//! ART and scikit-learn use all); the thresholds are inclusive (`<=` size, `>=` silhouette) and
//! not rounded (ART rounds the share to 2 and the silhouette to 4 decimals and compares strictly).
//! ART's default analysis (`smaller`) calls the smaller cluster of every class poisoned, with no
//! model-level verdict; this plugin uses the silhouette analysis, which gives one. Classes with
//! fewer than `min_class_size` samples are not clustered (never flagged); a split with an empty
//! cluster (all features equal) has no silhouette and is not flagged.

use audit_nn::tch::{self, Kind, Tensor};
use audit_plugin_common::samples::{class_features, principal_components, read_class_stats, to_i64s, ClassFeatures};
use audit_sdk::rng::Rng;
use audit_sdk::{Call, DatasetRef, Detector, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"dims":{"type":"integer","default":10,"minimum":1,"maximum":1000,"description":"dimensions the penultimate features of each class are reduced to by PCA (the paper's 10, reduced by ICA there)"},
"size_threshold":{"type":"number","default":0.35,"minimum":0,"maximum":0.5,"description":"a class is poisoned when its smaller cluster holds at most this share of it (the paper's and ART's 0.35)"},
"silhouette":{"type":"number","default":0.1,"minimum":-1,"maximum":1,"description":"... and the two clusters' silhouette score is at least this (ART's silhouette analysis: 0.10)"},
"restarts":{"type":"integer","default":10,"minimum":1,"maximum":1000,"description":"k-means++ starts per class (run together on the device); the one with the smallest inertia is kept"},
"iterations":{"type":"integer","default":50,"minimum":1,"maximum":10000,"description":"Lloyd iterations per start (a fixed count: the loop never reads the device)"},
"silhouette_samples":{"type":"integer","default":2000,"minimum":2,"maximum":100000,"description":"the silhouette score is computed on at most this many samples of the class (a seeded subsample)"},
"min_class_size":{"type":"integer","default":10,"minimum":2,"maximum":1000000,"description":"classes with fewer training samples are not clustered (never flagged)"},
"batch_size":{"type":"integer","default":512,"minimum":1,"maximum":65536,"description":"images per forward pass while reading the penultimate features"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the k-means++ starts and of the silhouette subsample (added to the host's seed)"}}}"#;

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    dims: i64,
    size_threshold: f64,
    silhouette: f64,
    restarts: i64,
    iterations: usize,
    silhouette_samples: i64,
    min_class_size: i64,
    batch_size: i64,
    seed: u64,
}

/// The plugin.
#[derive(Debug, Default)]
pub struct ActivationClustering;

impl Plugin for ActivationClustering {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "ac",
            version: env!("CARGO_PKG_VERSION"),
            description: "Activation Clustering: per class, 2-means on the training samples' penultimate features \
                          reduced to 10 dimensions by PCA; a class whose smaller cluster holds at most 35% of it \
                          with silhouette >= 0.10 is flagged, with that cluster's samples",
            params_schema: SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
    }
}

/// Squared Euclidean distances of every point to every centre: points [n, d], centres
/// [R, k, d] -> [R, n, k].
fn sq_dist(z: &Tensor, centres: &Tensor) -> Tensor {
    let zz = z.square().sum_dim_intlist(1, false, Kind::Float).view([1, -1, 1]);
    let cc = centres.square().sum_dim_intlist(2, false, Kind::Float).unsqueeze(1);
    let zc = centres.matmul(&z.tr()).transpose(1, 2);
    (zz + cc - zc * 2.0).clamp_min(0.0)
}

/// 2-means of `z` ([n, d] float, n >= 2): `restarts` k-means++ starts drawn from `rng`, each
/// refined by `iterations` Lloyd steps (an emptied cluster keeps its centre), all in one batch on
/// the device. Returns the labels ([n] i64, 0 or 1) of the start with the smallest inertia.
pub fn two_means(z: &Tensor, restarts: i64, iterations: usize, rng: &mut Rng) -> Tensor {
    tch::no_grad(|| {
        let n = z.size()[0];
        let dev = z.device();
        let first: Vec<i64> = (0..restarts).map(|_| rng.below(n as usize) as i64).collect();
        let u: Vec<f32> = (0..restarts).map(|_| rng.next_f64() as f32).collect();
        let c0 = z.index_select(0, &Tensor::from_slice(&first).to_device(dev));
        // k-means++: the second centre with probability proportional to the squared distance
        // to the first (inverse CDF at a host-drawn uniform; no read of the device).
        let d0 = sq_dist(z, &c0.unsqueeze(1)).squeeze_dim(2);
        let cdf = d0.cumsum(1, Kind::Float);
        let total = cdf.narrow(1, n - 1, 1);
        let thr = Tensor::from_slice(&u).to_device(dev).unsqueeze(1) * &total;
        let second = cdf
            .lt_tensor(&thr)
            .sum_dim_intlist(1, false, Kind::Int64)
            .clamp_max(n - 1);
        let c1 = z.index_select(0, &second);
        let mut centres = Tensor::stack(&[c0, c1], 1);
        for _ in 0..iterations {
            let assign = sq_dist(z, &centres).argmin(2, false);
            let onehot = assign.one_hot(2).to_kind(Kind::Float);
            let counts = onehot.sum_dim_intlist(1, false, Kind::Float).unsqueeze(2);
            let sums = onehot.transpose(1, 2).matmul(z);
            let moved = &sums / counts.clamp_min(1.0);
            centres = moved.where_self(&counts.gt(0.0), &centres);
        }
        let d = sq_dist(z, &centres);
        let (best, assign) = d.min_dim(2, false);
        let inertia = best.sum_dim_intlist(1, false, Kind::Float);
        assign.index_select(0, &inertia.argmin(0, true)).squeeze_dim(0)
    })
}

/// The mean silhouette score of a 2-cluster labelling (scikit-learn's definition: a sample alone
/// in its cluster scores 0), Euclidean distances. NaN when a cluster is empty. [] (double).
pub fn silhouette(z: &Tensor, labels: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let z = z.to_kind(Kind::Double);
        let dist = Tensor::cdist(&z, &z, 2.0, None::<i64>);
        let onehot = labels.one_hot(2).to_kind(Kind::Double);
        let counts = onehot.sum_dim_intlist(0, false, Kind::Double);
        let sums = dist.matmul(&onehot);
        let own = labels.unsqueeze(1);
        let other = (-labels + 1).unsqueeze(1);
        let own_count = counts.index_select(0, labels) - 1.0;
        let other_count = counts.index_select(0, &(-labels + 1));
        let a = sums.gather(1, &own, false).squeeze_dim(1) / own_count.clamp_min(1.0);
        let b = sums.gather(1, &other, false).squeeze_dim(1) / &other_count;
        let s = ((&b - &a) / a.maximum(&b)).nan_to_num(0.0, None::<f64>, None::<f64>);
        let s = s.where_self(&own_count.gt(0.0), &s.zeros_like());
        let mean = s.mean(Kind::Double);
        let undefined = counts.min().le(0.0);
        mean.where_self(&undefined.logical_not(), &mean.full_like(f64::NAN))
    })
}

/// What the clustering found in one class (on the device until read).
struct Clusters {
    indices: Tensor,
    /// [n] 0/1 labels.
    labels: Tensor,
    /// [3] double: size of cluster 0, size of cluster 1, silhouette.
    stats: Tensor,
}

fn cluster_class(p: &Params, features: &Tensor, indices: Tensor, rng: &mut Rng) -> Clusters {
    let n = indices.size()[0];
    let reduced = principal_components(&features.index_select(0, &indices), p.dims);
    let z = reduced.scores.to_kind(Kind::Float);
    let labels = two_means(&z, p.restarts, p.iterations, rng);
    let m = p.silhouette_samples.min(n);
    let (zs, ls) = if m < n {
        // The first m of a seeded shuffle (partial Fisher-Yates).
        let mut perm: Vec<i64> = (0..n).collect();
        for i in 0..m as usize {
            let j = i + rng.below(n as usize - i);
            perm.swap(i, j);
        }
        let pick = Tensor::from_slice(&perm[..m as usize]).to_device(z.device());
        (z.index_select(0, &pick), labels.index_select(0, &pick))
    } else {
        (z.shallow_clone(), labels.shallow_clone())
    };
    let sizes = labels.one_hot(2).sum_dim_intlist(0, false, Kind::Double);
    let stats = Tensor::cat(&[sizes, silhouette(&zs, &ls).unsqueeze(0)], 0);
    Clusters { indices, labels, stats }
}

/// Whether a class is flagged: its smaller cluster is not empty and holds at most
/// `size_threshold` of it, and the silhouette is at least `silhouette` (NaN: never).
pub fn is_poisoned(share: f64, silhouette: f64, size_threshold: f64, min_silhouette: f64) -> bool {
    share > 0.0 && share <= size_threshold && silhouette >= min_silhouette
}

impl Detector for ActivationClustering {
    fn scan(&self, call: &Call<'_>, model_bytes: &[u8], data: Option<&DatasetRef<'_>>) -> Result<Verdict> {
        let p: Params = call.params.parse()?;
        let started = std::time::Instant::now();
        let ClassFeatures {
            device,
            n,
            k,
            features,
            per_class,
            sizes,
        } = class_features(call, "ac", model_bytes, data, p.batch_size)?;
        let dim = features.size()[1];
        let seed = call.seed.wrapping_add(p.seed);
        let mut clusters: Vec<Option<Clusters>> = Vec::with_capacity(k as usize);
        for (c, idx) in per_class.into_iter().enumerate() {
            call.host.check_cancelled()?;
            call.host.progress("clustering", c as u64, k as u64);
            // One random stream per class: a class's clusters do not depend on the others.
            let mut rng = Rng::stream(seed, c as u64);
            clusters.push((sizes[c] >= p.min_class_size).then(|| cluster_class(&p, &features, idx, &mut rng)));
        }
        call.host.progress("clustering", k as u64, k as u64);
        // One read of every class's cluster sizes and silhouette.
        let per: Vec<Option<(f64, f64, f64)>> = read_class_stats::<3>(
            &clusters
                .iter()
                .map(|c| c.as_ref().map(|c| &c.stats))
                .collect::<Vec<_>>(),
        )?
        .into_iter()
        .map(|v| v.map(|[a, b, s]| (a, b, s)))
        .collect();
        let share = |c: usize| per[c].map(|(a, b, _)| a.min(b) / (a + b));
        let sil = |c: usize| per[c].map(|(_, _, s)| s).filter(|s| s.is_finite());
        let targets: Vec<i64> = (0..k as usize)
            .filter(|&c| match (share(c), sil(c)) {
                (Some(sh), Some(s)) => is_poisoned(sh, s, p.size_threshold, p.silhouette),
                _ => false,
            })
            .map(|c| c as i64)
            .collect();
        // The flagged samples: the smaller cluster of each flagged class (one read at the end).
        let mut picked = Vec::new();
        for &t in &targets {
            let c = clusters[t as usize].as_ref().expect("a flagged class was clustered");
            let (a, b, _) = per[t as usize].expect("stats");
            let smaller = if b <= a { 1 } else { 0 };
            picked.push(c.indices.masked_select(&c.labels.eq(smaller)));
        }
        let mut suspicious = if picked.is_empty() {
            vec![]
        } else {
            to_i64s(&Tensor::cat(&picked, 0))?
        };
        suspicious.sort_unstable();
        // The score: the smallest smaller-cluster share among the classes whose silhouette passes
        // (flagged when it is at most size_threshold).
        let candidates: Vec<usize> = (0..k as usize)
            .filter(|&c| sil(c).is_some_and(|s| s >= p.silhouette) && share(c).is_some_and(|s| s > 0.0))
            .collect();
        let best = candidates
            .iter()
            .copied()
            .min_by(|&a, &b| share(a).unwrap_or(1.0).total_cmp(&share(b).unwrap_or(1.0)));
        let backdoored = !targets.is_empty();
        let summary = match best {
            Some(c) => format!(
                "smallest cluster share {:.3} (class {c}, silhouette {:.3}) among {} class(es) with silhouette >= {}, \
                 size threshold {}: {}",
                share(c).unwrap_or(f64::NAN),
                sil(c).unwrap_or(f64::NAN),
                candidates.len(),
                p.silhouette,
                p.size_threshold,
                if backdoored {
                    format!("flagged class(es) {targets:?}, {} samples", suspicious.len())
                } else {
                    "not flagged".to_string()
                }
            ),
            None => format!("no class's two clusters reach silhouette {}: not flagged", p.silhouette),
        };
        call.host.info(&summary);
        let classes: Vec<Value> = (0..k as usize)
            .map(|c| {
                json!({
                    "class": c,
                    "samples": sizes[c],
                    "cluster_sizes": per[c].map(|(a, b, _)| [a as i64, b as i64]),
                    "smaller_share": share(c),
                    "silhouette": sil(c),
                    "flagged": targets.contains(&(c as i64)),
                })
            })
            .collect();
        Ok(Verdict {
            backdoored,
            target_classes: targets.clone(),
            details: json!({
                "detector": "ac",
                "level": "sample",
                "device": format!("{device:?}").to_lowercase(),
                "score_name": "smaller_cluster_share",
                "score": best.and_then(share),
                "size_threshold": p.size_threshold,
                "silhouette_threshold": p.silhouette,
                "dims": p.dims,
                "reduction": "pca",
                "restarts": p.restarts,
                "iterations": p.iterations,
                "per_class": classes,
                "training_samples": n,
                "feature_dim": dim,
                "flagged_samples": suspicious.len(),
                "seed": seed,
                "summary": summary,
                "seconds": started.elapsed().as_secs_f64(),
            }),
            suspicious,
        })
    }
}

audit_sdk::export_plugin!(detector: ActivationClustering);

#[cfg(test)]
mod tests;
