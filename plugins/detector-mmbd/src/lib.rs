//! MM-BD (Wang et al., "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor
//! Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024) as a data-free `audit` detector.
//!
//! A backdoor's target class can be reached from almost any input: the trigger is a shortcut that
//! gives it an abnormally large logit margin. For every class t, `images` uniform random images in
//! [0, 1] are pushed by gradient ascent on `logit_t - max_{j != t} logit_j` (on the clamped image,
//! through the model's preprocessing) for at most `steps` steps; the class's statistic is the
//! largest margin reached. A gamma distribution is fitted by maximum likelihood to the statistics
//! of the K - 1 classes other than the largest; the p-value of the largest under the null of K
//! such draws is `1 - F(r_max)^K`, and the model is flagged when it is below `alpha`, with the
//! target the class of the largest statistic.
//!
//! Every class is optimised in one batch (K x `images` inputs) on the device; a class stops when
//! its loss changes by less than `tolerance` relatively (the reference's early stop, decided on
//! the device: one host read every `check_every` steps). Differences from the public reference
//! (wanghangpsu/MM-BD, univ_bd.py), stated: its SGD optimiser is created anew each step, so its
//! momentum never acts; here the step is plain gradient ascent at `lr` (the same arithmetic). Its
//! null fit also fits a location (scipy's three-parameter `gamma.fit`), which on nine values has
//! no stable maximum; here the location is 0 (the margins are positive), or just below the
//! smallest null value when some are not.
//!
//! One target class is assumed: an all-to-all backdoor raises every class's margin alike and is
//! out of the method's reach.

use audit_nn::ops::Mode;
use audit_nn::tch::{self, Kind, Tensor};
use audit_plugin_common::{device, load_model, nn_err};
use audit_sdk::{Call, DatasetRef, Detector, Error, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::json;
use statrs::distribution::{ContinuousCDF, Gamma};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"images":{"type":"integer","default":30,"minimum":1,"maximum":10000,"description":"random images optimised per class (the reference's 30)"},
"steps":{"type":"integer","default":300,"minimum":1,"maximum":100000,"description":"most gradient steps per class (the reference's 300)"},
"lr":{"type":"number","default":0.01,"minimum":0,"description":"step size of the gradient ascent on the margin (the reference's SGD lr 1e-2)"},
"tolerance":{"type":"number","default":0.00001,"minimum":0,"description":"a class stops when its loss changes by less than this share from one step to the next (the reference's 1e-5)"},
"check_every":{"type":"integer","default":10,"minimum":1,"description":"steps between two host reads of the stopping state (the stopping itself is decided every step on the device)"},
"alpha":{"type":"number","default":0.05,"minimum":0,"maximum":1,"description":"the model is flagged when the p-value of the largest class statistic under the gamma null is below this"},
"input":{"type":"string","default":"","description":"CxHxW of the model input when the model's input shape is symbolic (empty: from the model)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the random start images (added to the host's seed)"}}}"#;

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    images: i64,
    steps: usize,
    lr: f64,
    tolerance: f64,
    check_every: usize,
    alpha: f64,
    input: String,
    seed: u64,
}

/// The plugin.
#[derive(Debug, Default)]
pub struct MmBd;

impl Plugin for MmBd {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "mmbd",
            version: env!("CARGO_PKG_VERSION"),
            description: "MM-BD: data-free; per class the largest logit margin reachable from random images, \
                          flagged when the largest is an outlier of a gamma null fitted to the others",
            params_schema: SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL,
        }
    }
}

/// The model's input as [C, H, W]: from the `input` parameter, else the model's first input.
fn input_chw(p: &Params, model: &audit_nn::Model) -> Result<[i64; 3]> {
    if !p.input.is_empty() {
        let v: Option<Vec<i64>> = p.input.split('x').map(|s| s.trim().parse().ok()).collect();
        return match v.as_deref() {
            Some(&[c, h, w]) if c > 0 && h > 0 && w > 0 && c * h * w <= 1 << 24 => Ok([c, h, w]),
            _ => Err(Error::invalid(format!(
                "parameter `input`: `{}` is not CxHxW with positive sizes (for example 1x28x28)",
                p.input
            ))),
        };
    }
    let first = model
        .inputs
        .first()
        .ok_or_else(|| Error::invalid("the model has no input"))?;
    match first.dims[..] {
        [_, Some(c), Some(h), Some(w)] if c > 0 && h > 0 && w > 0 => Ok([c, h, w]),
        _ => Err(Error::invalid(format!(
            "input `{}` has shape {:?} (not [N, C, H, W] with known C, H, W): pass --param input=CxHxW",
            first.name, first.dims
        ))),
    }
}

/// Largest margin `logit_t - max_{j != t} logit_j` per row, `t` the row's target. [n]
fn margins(logits: &Tensor, target: &Tensor) -> Tensor {
    let own = logits.gather(1, &target.unsqueeze(1), false).squeeze_dim(1);
    let others = logits.scatter_value(1, &target.unsqueeze(1), f64::NEG_INFINITY);
    own - others.amax([1], false)
}

/// The per-class statistics of the optimisation, and how many steps each class took.
struct Statistics {
    per_class: Vec<f64>,
    steps: Vec<i64>,
}

/// Gradient ascent on every class's margin at once.
fn max_margins(
    call: &Call<'_>,
    p: &Params,
    model: &audit_nn::Model,
    pre: &audit_nn::train::Preprocess,
    chw: [i64; 3],
    k: i64,
) -> Result<Statistics> {
    let dev = model.device;
    let n = p.images;
    tch::manual_seed(call.seed.wrapping_add(p.seed) as i64);
    let mut x = Tensor::rand([k * n, chw[0], chw[1], chw[2]], (Kind::Float, dev)).set_requires_grad(true);
    let target = Tensor::arange(k, (Kind::Int64, dev)).repeat_interleave_self_int(n, 0, None);
    let mut active = Tensor::ones([k], (Kind::Bool, dev));
    let mut last = Tensor::full([k], 1000.0, (Kind::Double, dev));
    let mut stat = Tensor::zeros([k], (Kind::Double, dev));
    let mut steps = Tensor::zeros([k], (Kind::Int64, dev));
    for step in 0..p.steps {
        if step % p.check_every == 0 {
            call.host.check_cancelled()?;
            call.host.progress("maximising margins", step as u64, p.steps as u64);
            if !bool::try_from(active.any()).unwrap_or(true) {
                break;
            }
        }
        let logits = model
            .forward(&pre.normalize(&x.clamp(0.0, 1.0)), Mode::Eval)
            .map_err(nn_err)?;
        let m = margins(&logits, &target).view([k, n]);
        // The reference's loss per class: minus the sum of its images' margins.
        let loss = -m.sum_dim_intlist(1, false, Kind::Double);
        let now = m.detach().amax([1], false).to_kind(Kind::Double);
        stat = now.where_self(&active, &stat);
        loss.sum(Kind::Float).backward();
        tch::no_grad(|| {
            let mut g = x.grad();
            let keep = active
                .repeat_interleave_self_int(n, 0, None)
                .to_kind(Kind::Float)
                .view([k * n, 1, 1, 1]);
            let _ = x.g_sub_(&(g.shallow_clone() * keep * p.lr));
            let _ = g.zero_();
        });
        let loss = loss.detach();
        steps += active.to_kind(Kind::Int64);
        let converged = ((&last - &loss).abs() / last.abs()).lt(p.tolerance);
        active = active.logical_and(&converged.logical_not());
        last = loss;
    }
    call.host.progress("maximising margins", p.steps as u64, p.steps as u64);
    let to_vec = |t: &Tensor| {
        Vec::<f64>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Double))
            .map_err(|e| Error::failed(e.to_string()))
    };
    Ok(Statistics {
        per_class: to_vec(&stat)?,
        steps: to_vec(&steps)?.into_iter().map(|s| s as i64).collect(),
    })
}

/// Maximum-likelihood gamma fit (shape, scale) of positive values with location 0: the shape
/// solves `ln a - digamma(a) = ln(mean) - mean(ln x)` (decreasing in a; bisection on ln a).
pub fn fit_gamma(x: &[f64]) -> Option<(f64, f64)> {
    if x.len() < 2 || x.iter().any(|&v| !v.is_finite() || v <= 0.0) {
        return None;
    }
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let s = mean.ln() - x.iter().map(|v| v.ln()).sum::<f64>() / n;
    if s.is_nan() || s <= 0.0 {
        // All equal: a degenerate (infinitely narrow) gamma.
        return None;
    }
    let f = |a: f64| a.ln() - statrs::function::gamma::digamma(a) - s;
    let (mut lo, mut hi) = (-30f64, 30f64);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if f(mid.exp()) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let a = ((lo + hi) / 2.0).exp();
    Some((a, mean / a))
}

/// What the null says about the largest statistic.
#[derive(Debug, Clone, PartialEq)]
pub struct NullTest {
    pub target: usize,
    pub r_max: f64,
    pub shape: f64,
    pub scale: f64,
    /// Subtracted from every value before the fit (0 when all null values are positive).
    pub location: f64,
    pub p_value: f64,
}

/// Fits the gamma null to every statistic but the largest and returns the largest's p-value
/// `1 - F(r_max)^K`. None when there are fewer than 3 classes or the null is degenerate.
pub fn null_test(stats: &[f64]) -> Option<NullTest> {
    if stats.len() < 3 || stats.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let target = (0..stats.len()).max_by(|&a, &b| stats[a].total_cmp(&stats[b]))?;
    let r_max = stats[target];
    let null: Vec<f64> = stats
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != target)
        .map(|(_, &v)| v)
        .collect();
    let min = null.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = null.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let location = if min > 0.0 {
        0.0
    } else {
        min - (max - min).max(1.0) * 1e-3
    };
    let shifted: Vec<f64> = null.iter().map(|v| v - location).collect();
    let (shape, scale) = fit_gamma(&shifted)?;
    let g = Gamma::new(shape, 1.0 / scale).ok()?;
    let cdf = g.cdf(r_max - location);
    let p_value = (1.0 - cdf.powi(stats.len() as i32)).clamp(0.0, 1.0);
    Some(NullTest {
        target,
        r_max,
        shape,
        scale,
        location,
        p_value,
    })
}

impl Detector for MmBd {
    fn scan(&self, call: &Call<'_>, model_bytes: &[u8], _data: Option<&DatasetRef<'_>>) -> Result<Verdict> {
        let p: Params = call.params.parse()?;
        let started = std::time::Instant::now();
        let device = device(call)?;
        let (mut model, pre) = load_model(model_bytes, device, false)?;
        model.set_trainable(false);
        let chw = input_chw(&p, &model)?;
        let probe = tch::no_grad(|| {
            model.forward(
                &Tensor::zeros([1, chw[0], chw[1], chw[2]], (Kind::Float, device)),
                Mode::Eval,
            )
        })
        .map_err(|e| {
            Error::invalid(format!(
                "the model does not run on a 1x{}x{}x{} input: {e}",
                chw[0], chw[1], chw[2]
            ))
        })?;
        let k = match probe.size()[..] {
            [1, k] if k >= 2 => k,
            ref s => {
                return Err(Error::invalid(format!(
                    "the model's first output has shape {s:?} for one image; MM-BD needs [1, K] logits with K >= 2"
                )))
            }
        };
        let s = max_margins(call, &p, &model, &pre, chw, k)?;
        let test = null_test(&s.per_class);
        let backdoored = test.as_ref().is_some_and(|t| t.p_value < p.alpha);
        let targets = match &test {
            Some(t) if backdoored => vec![t.target as i64],
            _ => vec![],
        };
        let summary = match &test {
            Some(t) => format!(
                "largest margin {:.3} (class {}), p = {:.3e} under a gamma null (shape {:.3}, scale {:.3}) of the other {} classes: {}",
                t.r_max,
                t.target,
                t.p_value,
                t.shape,
                t.scale,
                k - 1,
                if backdoored { "flagged" } else { "not flagged" }
            ),
            None => "the null could not be fitted (fewer than 3 classes, or all other statistics equal): not flagged".to_string(),
        };
        call.host.info(&summary);
        Ok(Verdict {
            backdoored,
            target_classes: targets,
            suspicious: vec![],
            details: json!({
                "detector": "mmbd",
                "level": "model",
                "device": format!("{device:?}").to_lowercase(),
                "score_name": "p_value",
                "score": test.as_ref().map(|t| t.p_value),
                "alpha": p.alpha,
                "statistics": s.per_class,
                "steps": s.steps,
                "largest_class": test.as_ref().map(|t| t.target),
                "null": test.as_ref().map(|t| json!({"family": "gamma", "shape": t.shape, "scale": t.scale, "location": t.location})),
                "images_per_class": p.images,
                "input": chw,
                "summary": summary,
                "seconds": started.elapsed().as_secs_f64(),
            }),
        })
    }
}

audit_sdk::export_plugin!(detector: MmBd);

#[cfg(test)]
mod tests;
