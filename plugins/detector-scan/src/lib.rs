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

use audit_plugin_common::samples::penultimate_features;
pub use audit_plugin_common::scan::{
    analyse, flagged, global_model, poisoned_side, regularised, split, target_dims, whitener, GlobalModel, ScanConfig,
    Side, Split,
};
use audit_plugin_common::{check_fit, device, device_data, load_model, require_clean};
use audit_sdk::{Call, DatasetRef, Detector, Error, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::json;

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
    /// The statistics' settings.
    fn config(&self) -> ScanConfig {
        ScanConfig {
            threshold: self.threshold,
            em_iters: self.em_iters,
            split_iters: self.split_iters,
            restarts: self.restarts,
            dims: self.dims,
            ridge: self.ridge,
            poisoned_side: self.poisoned_side,
            min_class_size: self.min_class_size,
        }
    }

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
        let seed = call.seed.wrapping_add(p.seed);
        let cfg = p.config();
        let found = analyse(call, &ft, &train_data.y, &fc, &clean_data.y, k, &cfg, seed)?;
        drop((ft, fc));
        let summary = found.summary(&cfg);
        call.host.info(&summary);
        let backdoored = !found.targets.is_empty();
        let mut details = found.details();
        let extra = json!({
            "detector": "scan",
            "level": "sample",
            "device": format!("{device:?}").to_lowercase(),
            "score_name": "anomaly_index",
            "threshold": p.threshold,
            "statistic": "j",
            "training_samples": n,
            "clean_samples": nc,
            "ridge": p.ridge,
            "em_iters": p.em_iters,
            "split_iters": p.split_iters,
            "restarts": p.restarts,
            "poisoned_side": p.poisoned_side,
            "min_class_size": p.min_class_size,
            "seed": seed,
            "summary": summary,
            "seconds": started.elapsed().as_secs_f64(),
        });
        if let (Some(d), Some(e)) = (details.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        Ok(Verdict {
            backdoored,
            target_classes: found.targets,
            details,
            suspicious: found.suspicious,
        })
    }
}

audit_sdk::export_plugin!(detector: Scan);

#[cfg(test)]
mod tests;
