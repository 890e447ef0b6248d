//! STRIP (Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on
//! Deep Neural Networks", ACSAC 2019) as an `audit` detector that needs the model, clean data and
//! the training set (input level: it names the training inputs it judges triggered).
//!
//! A trigger overrides the content of the image it is stamped on: superimpose other images on a
//! triggered input and the model still gives the target class, while a clean input's prediction
//! follows whatever was superimposed. For an input x, `overlays` (the paper's N, 100) clean images
//! o_1..o_N are drawn at random (seeded; N distinct images, drawn afresh for every input), the
//! blends `x + o_j` are formed in input space [0, 1] (the model's preprocessing, `audit.mean` and
//! `audit.std`, applied after the blend, as Neural Cleanse applies it), and the input's entropy is
//! the mean over the N blends of the Shannon entropy of the model's softmax, in bits (base 2, the
//! reference's `np.log2`; the paper's sum over N divided by N). A low entropy marks a triggered
//! input.
//!
//! The blend is the reference's (garrisongys/STRIP, `superimpose`:
//! `cv2.addWeighted(background, 1, overlay, 1, 0)`). Its images are float32 in [0, 1]
//! (`x_train.astype('float32') / 255`), and OpenCV saturates integer types only, so on them this
//! is a plain sum in [0, 2], not clipped; `blend=sum` (the default) does the same. `blend=saturate`
//! clips the sum to [0, 1], which is what the same call does on u8 images (kept as an option: a
//! model never saw pixels above 1). BackdoorBench (detection_infer/strip.py) sums the *normalised*
//! tensors, `x + alpha * o` with alpha 1 (filtering) or 0.5 (default), which is
//! `(x + o - 2 mean) / std` in model space rather than `(x + o - mean) / std`; not followed: the
//! blend is defined on pixels. Its entropy is in nats (`p.log()`), which only rescales.
//!
//! Threshold: every lent clean image's entropy is computed the same way, its overlays drawn from
//! the *other* clean images (so an image is never blended with itself), and the threshold is the
//! `frr` quantile of these clean entropies (the paper's preset false rejection rate, 1%), taken
//! as BackdoorBench takes it: the sorted clean entropies' element `floor(frr * M)` (M clean
//! images), and an input is flagged when its entropy is strictly below it (so on the clean images
//! themselves `floor(frr * M)` are rejected). The reference instead fits a normal distribution to
//! the clean entropies and takes its `frr` quantile (`scipy.stats.norm.ppf(0.01, mu, sigma)`); the
//! clean entropies' mean and standard deviation are reported for it, but the empirical quantile is
//! used, since the entropies of a well-trained model are skewed (many near 0), not normal.
//!
//! Inputs judged: the first `max_inputs` samples of the lent training set (default 2,000, 0: all
//! of them; the report's `n_judged`, which the host's precision/recall against poison_idx is
//! restricted to), each
//! with overlays drawn from every clean image. Every judged sample below the threshold is flagged
//! (the verdict's indices), whatever the model-level verdict.
//!
//! Model-level verdict (our rule; the paper judges inputs at run time and has none): on a clean
//! model the number k of the n judged inputs flagged is about binomial(n, frr), so the model is
//! called backdoored when `k > n * frr + z * sqrt(n * frr * (1 - frr))` (`z` 3: about 3 standard
//! deviations above the false rejections expected). This ignores the noise of the threshold
//! itself (estimated from M clean images), which is one reason for a z of 3 rather than 1.645.
//! The target class is then the model's majority prediction (on the unblended input) among the
//! flagged inputs, reported with its share of them. An all-to-all attack has no single target:
//! the flagged inputs then spread over classes and the named class's share shows it.
//!
//! Everything runs on the device in batches: about `batch` blended images per forward pass
//! (`batch / overlays` inputs times their overlays), the overlay indices drawn on the CPU (so a
//! seed draws the same overlays on every device) as the top `overlays` of uniform random numbers
//! per input, the entropies kept on the device until every input is done. Between forward passes
//! only the host's cancel flag is polled and progress reported, neither of which reads the device.

use audit_nn::ops::Mode;
use audit_nn::tch::{self, Kind, Tensor};
use audit_nn::train::{DeviceData, Preprocess};
use audit_nn::Model;
use audit_plugin_common::samples::{to_f64s, to_i64s};
use audit_plugin_common::{check_fit, device, device_data, load_model, nn_err, require_clean};
use audit_sdk::{Call, DatasetRef, Detector, Error, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"overlays":{"type":"integer","default":100,"minimum":1,"maximum":10000,"description":"clean images superimposed on each input (the paper's N; capped at the number of other clean images)"},
"frr":{"type":"number","default":0.01,"minimum":0,"maximum":1,"description":"false rejection rate: the threshold is this quantile of the clean images' entropies (the paper's 1%; must be > 0 and < 1)"},
"z":{"type":"number","default":3.0,"minimum":0,"maximum":100,"description":"the model is flagged when more than n * frr + z * sqrt(n * frr * (1 - frr)) of the n judged inputs are below the threshold"},
"max_inputs":{"type":"integer","default":2000,"minimum":0,"description":"judge only the first this many training samples (0: all; the default keeps a CPU scan to minutes: each input costs `overlays` forwards; the host scores the flagged ones against poison_idx among the judged, reported as n_judged)"},
"blend":{"type":"string","default":"sum","enum":["sum","saturate"],"description":"superimposition in [0, 1]: sum (x + o, not clipped: the reference's cv2.addWeighted on float images) or saturate (x + o clipped to 1, as cv2.addWeighted on u8 images)"},
"batch":{"type":"integer","default":4096,"minimum":1,"maximum":1048576,"description":"blended images per forward pass (inputs x overlays)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the overlay draws (added to the host's seed)"}}}"#;

/// How an overlay is superimposed on an input (both in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Blend {
    /// `x + o`, in [0, 2] (the reference: `cv2.addWeighted` on float32 images does not clip).
    Sum,
    /// `min(x + o, 1)` (`cv2.addWeighted` on u8 images saturates).
    Saturate,
}

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    overlays: i64,
    frr: f64,
    z: f64,
    max_inputs: i64,
    blend: Blend,
    batch: i64,
    seed: u64,
}

/// The quantiles reported for the clean and the judged entropies.
const QUANTILES: [f64; 9] = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0];

/// The plugin.
#[derive(Debug, Default)]
pub struct Strip;

impl Plugin for Strip {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "strip",
            version: env!("CARGO_PKG_VERSION"),
            description:
                "STRIP: superimpose clean images on each training input; inputs whose mean prediction entropy \
                          is below the clean images' 1% quantile are flagged as triggered",
            params_schema: SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL
                | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA
                | audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
    }
}

/// The threshold: element `floor(frr * M)` of the sorted clean entropies (BackdoorBench's
/// `clean_entropy[int(fpr * len)]`), the last one when that is past the end. None when empty.
pub fn threshold(clean: &[f64], frr: f64) -> Option<f64> {
    let mut v = clean.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = ((frr * v.len() as f64).floor() as usize).min(v.len() - 1);
    Some(v[at])
}

/// The most flagged inputs a clean model is expected to give: `n * frr + z * sqrt(n * frr * (1 - frr))`
/// (the binomial mean plus z standard deviations); more than this flags the model.
pub fn flag_bound(n: usize, frr: f64, z: f64) -> f64 {
    let n = n as f64;
    n * frr + z * (n * frr * (1.0 - frr)).sqrt()
}

/// The `q` quantile of sorted values (linear interpolation, numpy's default). None when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// Summary statistics of a set of entropies: count, mean, standard deviation (population) and
/// the [`QUANTILES`] (as `q0`, `q01`, ..., `q100` in percent).
pub fn summary_stats(values: &[f64]) -> Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = if v.is_empty() {
        None
    } else {
        Some(v.iter().sum::<f64>() / n)
    };
    let std = mean.map(|m| (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt());
    let mut out = json!({"count": v.len(), "mean": mean, "std": std});
    for q in QUANTILES {
        out[format!("q{:02}", (q * 100.0).round() as i64)] = json!(quantile(&v, q));
    }
    out
}

/// The majority class among `classes` with its count (the smallest class on ties). None when
/// empty.
pub fn majority(classes: &[i64], k: usize) -> Option<(i64, usize)> {
    let counts = class_counts(classes, k);
    let (c, &n) = counts
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    (n > 0).then_some((c as i64, n))
}

/// How many of `classes` fall in each of the `k` classes (values outside 0..k are not counted).
pub fn class_counts(classes: &[i64], k: usize) -> Vec<usize> {
    let mut counts = vec![0usize; k];
    for &c in classes {
        if let Some(n) = usize::try_from(c).ok().and_then(|c| counts.get_mut(c)) {
            *n += 1;
        }
    }
    counts
}

/// The overlay indices of `m` inputs: per input `n_over` distinct indices into a pool of `pool`
/// images, uniformly at random (the top `n_over` of uniform numbers, drawn on the CPU from the
/// generator `tch::manual_seed` set). `exclude`, when given, is the pool index of each input
/// itself (a clean image is never its own overlay). [m, n_over] int64 on the CPU.
fn overlay_indices(m: i64, pool: i64, n_over: i64, exclude: Option<i64>) -> Tensor {
    let r = Tensor::rand([m, pool], (Kind::Float, tch::Device::Cpu));
    let r = match exclude {
        Some(first) => {
            let own = Tensor::arange_start(first, first + m, (Kind::Int64, tch::Device::Cpu)).unsqueeze(1);
            r.scatter_value(1, &own, -1.0)
        }
        None => r,
    };
    r.topk(n_over, 1, true, false).1
}

/// Softmax entropy in bits of each row of `logits` ([B, K] -> [B]).
fn entropy_bits(logits: &Tensor) -> Tensor {
    let logp = logits.to_kind(Kind::Float).log_softmax(1, Kind::Float);
    -(logp.exp() * &logp).sum_dim_intlist(1, false, Kind::Float) / std::f64::consts::LN_2
}

/// Where the superimposition runs and what it reports progress against.
struct Superimposer<'a> {
    call: &'a Call<'a>,
    model: &'a Model,
    pre: &'a Preprocess,
    /// The clean images in [0, 1] on the device. [M, C, H, W]
    pool: Tensor,
    overlays: i64,
    blend: Blend,
    batch: i64,
    /// Inputs done and in all, for the host's progress bar.
    done: u64,
    total: u64,
}

impl Superimposer<'_> {
    /// The STRIP entropy (bits, mean over the overlays) and the model's prediction of every
    /// input of `x` (raw images on the device), both on the device ([n] float, [n] int64).
    /// `own`: the inputs are the pool itself (each excluded from its own overlays).
    fn run(&mut self, x: &Tensor, own: bool) -> Result<(Tensor, Tensor)> {
        const LABEL: &str = "superimposing";
        let n = x.size()[0];
        let dev = self.pool.device();
        let s = self.pool.size();
        let (c, h, w) = (s[1], s[2], s[3]);
        let m_pool = s[0];
        let no = self.overlays;
        let chunk = (self.batch / no).max(1);
        let mut ents = Vec::new();
        let mut preds = Vec::new();
        tch::no_grad(|| -> Result<()> {
            let mut at = 0;
            while at < n {
                self.call.host.check_cancelled()?;
                self.call.host.progress(LABEL, self.done, self.total);
                let m = (n - at).min(chunk);
                let xb = Preprocess::to_unit(&x.narrow(0, at, m));
                let idx = overlay_indices(m, m_pool, no, own.then_some(at)).to_device(dev);
                let over = self.pool.index_select(0, &idx.view([-1])).view([m, no, c, h, w]);
                let mixed = xb.unsqueeze(1) + over;
                let mixed = match self.blend {
                    Blend::Sum => mixed,
                    Blend::Saturate => mixed.clamp_max(1.0),
                };
                let logits = self
                    .model
                    .forward(&self.pre.normalize(&mixed.view([m * no, c, h, w])), Mode::Eval)
                    .map_err(nn_err)?;
                ents.push(entropy_bits(&logits).view([m, no]).mean_dim(1, false, Kind::Float));
                let own_logits = self
                    .model
                    .forward(&self.pre.normalize(&xb), Mode::Eval)
                    .map_err(nn_err)?;
                preds.push(own_logits.argmax(1, false));
                at += m;
                self.done += m as u64;
            }
            Ok(())
        })?;
        self.call.host.progress(LABEL, self.done, self.total);
        if ents.is_empty() {
            return Ok((
                Tensor::zeros([0], (Kind::Float, dev)),
                Tensor::zeros([0], (Kind::Int64, dev)),
            ));
        }
        Ok((Tensor::cat(&ents, 0), Tensor::cat(&preds, 0)))
    }
}

impl Detector for Strip {
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
        if !(p.frr > 0.0 && p.frr < 1.0) {
            return Err(Error::invalid(format!(
                "parameter `frr`: {} must be > 0 and < 1",
                p.frr
            )));
        }
        let clean = require_clean("strip", clean)?;
        let train = data
            .filter(|d| !d.is_empty())
            .ok_or_else(|| Error::invalid("strip needs the training set (the inputs it judges): pass --data DATA"))?;
        if clean.len() < 2 {
            return Err(Error::invalid(
                "strip needs at least 2 clean images (each clean image is blended with the others)",
            ));
        }
        let started = std::time::Instant::now();
        let device = device(call)?;
        let (mut model, pre) = load_model(model_bytes, device, false)?;
        model.set_trainable(false);
        let clean_data = device_data(clean, device)?;
        let k = check_fit(&model, &clean_data, &pre, "the clean subset")?;
        let train_data = device_data(train, device)?;
        check_fit(&model, &train_data, &pre, "the training set")?;
        let n_train = train_data.len();
        let n = if p.max_inputs > 0 {
            p.max_inputs.min(n_train)
        } else {
            n_train
        };
        let judged = DeviceData {
            x: train_data.x.narrow(0, 0, n),
            y: train_data.y.narrow(0, 0, n),
        };
        let m = clean_data.len();
        let overlays = p.overlays.min(m - 1);
        if overlays < p.overlays {
            call.host.info(&format!(
                "strip: {m} clean images: {overlays} overlays per input instead of {}",
                p.overlays
            ));
        }
        tch::manual_seed(call.seed.wrapping_add(p.seed) as i64);
        let mut sup = Superimposer {
            call,
            model: &model,
            pre: &pre,
            pool: Preprocess::to_unit(&clean_data.x),
            overlays,
            blend: p.blend,
            batch: p.batch,
            done: 0,
            total: (m + n) as u64,
        };
        let (clean_ent, _) = sup.run(&clean_data.x, true)?;
        let clean_ent = to_f64s(&clean_ent)?;
        let (ent, pred) = sup.run(&judged.x, false)?;
        let (ent, pred) = (to_f64s(&ent)?, to_i64s(&pred)?);
        let thr = threshold(&clean_ent, p.frr).ok_or_else(|| Error::failed("no clean entropies"))?;
        if clean_ent.iter().chain(&ent).any(|e| !e.is_finite()) {
            return Err(Error::failed(
                "a prediction entropy is not finite (the model's outputs on blended images are not finite)",
            ));
        }
        let flagged: Vec<i64> = (0..ent.len()).filter(|&i| ent[i] < thr).map(|i| i as i64).collect();
        let flagged_pred: Vec<i64> = flagged.iter().map(|&i| pred[i as usize]).collect();
        let per_class = class_counts(&flagged_pred, k as usize);
        let nf = flagged.len();
        let bound = flag_bound(ent.len(), p.frr, p.z);
        let backdoored = nf as f64 > bound;
        let share = nf as f64 / ent.len().max(1) as f64;
        let top = majority(&flagged_pred, k as usize);
        let targets: Vec<i64> = match (backdoored, top) {
            (true, Some((c, _))) => vec![c],
            _ => vec![],
        };
        let top_share = top.map(|(_, count)| count as f64 / nf as f64);
        let summary = format!(
            "{nf} of {} judged inputs ({:.2}%) below the entropy threshold {thr:.3e} bits (clean {}% quantile; \
             at most {bound:.1} expected from a clean model): {}",
            ent.len(),
            100.0 * share,
            100.0 * p.frr,
            match (backdoored, top) {
                (true, Some((c, count))) => format!(
                    "flagged, target class {c} ({count} of the flagged inputs, {:.0}%)",
                    100.0 * count as f64 / nf as f64
                ),
                _ => "not flagged".to_string(),
            }
        );
        call.host.info(&summary);
        let flagged_ent: Vec<f64> = flagged.iter().map(|&i| ent[i as usize]).collect();
        Ok(Verdict {
            backdoored,
            target_classes: targets,
            suspicious: flagged.clone(),
            details: json!({
                "detector": "strip",
                "level": "input",
                "device": format!("{device:?}").to_lowercase(),
                "score_name": "flagged_share",
                "score": share,
                "threshold": thr,
                "entropy_unit": "bits",
                "frr": p.frr,
                "z": p.z,
                "flag_bound": bound,
                "n_judged": ent.len(),
                "n_flagged": nf,
                "n_training": n_train,
                "clean_images": m,
                "overlays": overlays,
                "blend": match p.blend { Blend::Sum => "sum", Blend::Saturate => "saturate" },
                "clean_entropy": summary_stats(&clean_ent),
                "judged_entropy": summary_stats(&ent),
                "flagged_entropy": summary_stats(&flagged_ent),
                "flagged_per_predicted_class": per_class,
                "majority_class": top.map(|(c, _)| c),
                "majority_share": top_share,
                "summary": summary,
                "seconds": started.elapsed().as_secs_f64(),
            }),
        })
    }
}

audit_sdk::export_plugin!(detector: Strip);

#[cfg(test)]
mod tests;
