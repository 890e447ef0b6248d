//! Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
//! Neural Networks", IEEE S&P 2019) as an `audit` detector that needs the model and clean data.
//!
//! A backdoor is a shortcut: a small trigger sends any input to the target class. For every class
//! t a mask `m_t = (tanh(a_t) + 1) / 2` ([1, H, W]) and a pattern `p_t = (tanh(b_t) + 1) / 2`
//! ([C, H, W]) in input space [0, 1] are optimised so that `x' = (1 - m_t) * x + m_t * p_t` sends
//! clean images x to t with the smallest mask: loss `CE(model(x'), t) + lambda_t * |m_t|_1`
//! (the model's preprocessing applied after the blend), Adam at `lr`. `lambda_t` starts at
//! `init_cost` and follows the reference's schedule: multiplied by `cost_multiplier` after
//! `patience` consecutive steps whose attack success on the batch is at least `success`, divided
//! by it after `patience` consecutive steps below. The class's statistic is the L1 norm of its best
//! mask (the smallest one whose batch success reached `success`; a class that never reached it
//! keeps its last mask and is reported as such). The anomaly index of class t is
//! `(median - L1_t) / (1.4826 * MAD)` over the K norms (small side only), and a class whose index
//! is at least `threshold` (the paper's 2) is flagged as a target.
//!
//! Every class is optimised in one batch (K x `samples_per_step` blended images per step) on the
//! device, with the schedule and the best-mask bookkeeping done there too: the loop never reads a
//! tensor back to the host. Differences from the reference (bolunwang/backdoor, visualizer.py),
//! stated: the schedule counts steps, not epochs of mini-batches, and runs a fixed `steps` (no
//! early stop); the attack success and the cross-entropy of class t are taken over the batch's
//! images whose label is not t (the reference counts images already of class t as successes);
//! a class that never reached `success` is not flagged whatever its index (its small mask did
//! not flip the images, so it is no trigger). Adam's betas are the reference's (0.5, 0.9).
//! The reported success rates are measured after the optimisation on every lent clean image of
//! another class, not on the last batch.

use audit_nn::ops::Mode;
use audit_nn::tch::{self, Kind, Reduction, Tensor};
use audit_plugin_common::samples::to_f64s;
use audit_plugin_common::triggers::{batch_order, report_image, squash, stamp};
use audit_plugin_common::{check_fit, device, device_data, load_model, nn_err, require_clean};
use audit_sdk::{Call, DatasetRef, Detector, Error, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"steps":{"type":"integer","default":300,"minimum":1,"maximum":100000,"description":"optimisation steps (every class at once; each step one batch of clean images)"},
"samples_per_step":{"type":"integer","default":32,"minimum":1,"maximum":4096,"description":"clean images blended per class and step (the reference's batch of 32)"},
"lr":{"type":"number","default":0.1,"minimum":0,"description":"Adam step size on the tanh-space mask and pattern (the reference's 0.1; must be > 0)"},
"init_cost":{"type":"number","default":0.001,"minimum":0,"description":"initial weight lambda of the mask's L1 norm in the loss (the reference's 1e-3)"},
"cost_multiplier":{"type":"number","default":1.5,"minimum":1,"maximum":100,"description":"lambda is multiplied by this after `patience` successful steps, divided by it after `patience` failed ones"},
"patience":{"type":"integer","default":5,"minimum":1,"maximum":100000,"description":"consecutive steps above (or below) `success` before lambda changes (the reference's 5)"},
"success":{"type":"number","default":0.99,"minimum":0,"maximum":1,"description":"attack success on the batch that counts a mask as a trigger (the reference's 0.99)"},
"threshold":{"type":"number","default":2.0,"minimum":0,"description":"a class whose anomaly index (MAD, small side) is at least this is flagged (the paper's 2)"},
"check_every":{"type":"integer","default":10,"minimum":1,"description":"steps between two checks of the host's cancel flag and progress reports"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the random start masks and patterns and of the clean-batch order (added to the host's seed)"}}}"#;

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    steps: usize,
    samples_per_step: i64,
    lr: f64,
    init_cost: f64,
    cost_multiplier: f64,
    patience: i64,
    success: f64,
    threshold: f64,
    check_every: usize,
    seed: u64,
}

/// Adam's betas and epsilon (the reference's Keras `Adam(lr, beta_1=0.5, beta_2=0.9)`).
const BETA1: f64 = 0.5;
const BETA2: f64 = 0.9;
const ADAM_EPS: f64 = 1e-8;

/// The plugin.
#[derive(Debug, Default)]
pub struct NeuralCleanse;

impl Plugin for NeuralCleanse {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "nc",
            version: env!("CARGO_PKG_VERSION"),
            description: "Neural Cleanse: per class the smallest mask and pattern that send clean images to it; \
                          classes whose mask is an outlier on the small side (MAD anomaly index >= 2) are flagged",
            params_schema: SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA,
        }
    }
}

/// The outlier test over the class norms.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub median: f64,
    /// `1.4826 * median(|L1 - median|)`.
    pub mad: f64,
    /// `(median - L1_t) / mad` per class: positive on the small side.
    pub index: Vec<f64>,
}

/// Anomaly indices of `norms`; None when there are fewer than 3 norms, one is not finite, or the
/// MAD is 0 (more than half of the norms equal: no spread to measure an outlier against).
pub fn anomaly(norms: &[f64]) -> Option<Anomaly> {
    let m = audit_plugin_common::samples::mad_index(norms)?;
    Some(Anomaly {
        median: m.median,
        mad: m.mad,
        index: m.index.iter().map(|v| -v).collect(),
    })
}

/// The classes to flag: anomaly index at least `threshold`, and the mask reached the success
/// threshold (a mask that never flipped the images is no trigger, however small).
pub fn flagged(a: &Anomaly, reached: &[bool], threshold: f64) -> Vec<i64> {
    a.index
        .iter()
        .zip(reached)
        .enumerate()
        .filter(|&(_, (&i, &r))| r && i >= threshold)
        .map(|(t, _)| t as i64)
        .collect()
}

/// The tanh-space value of `u` in [0, 1] (kept off ±1, where atanh is infinite).
fn unsquash(u: &Tensor) -> Tensor {
    ((u - 0.5) * (2.0 - 1e-4)).atanh()
}

/// One Adam step on `param` (in place; no gradient recorded).
struct Adam {
    m: Tensor,
    v: Tensor,
}

impl Adam {
    fn new(like: &Tensor) -> Adam {
        Adam {
            m: like.zeros_like(),
            v: like.zeros_like(),
        }
    }

    fn step(&mut self, param: &Tensor, lr: f64, t: i32) {
        let g = param.grad();
        self.m = &self.m * BETA1 + &g * (1.0 - BETA1);
        self.v = &self.v * BETA2 + (&g * &g) * (1.0 - BETA2);
        let mhat = &self.m / (1.0 - BETA1.powi(t));
        let vhat = &self.v / (1.0 - BETA2.powi(t));
        let _ = param.shallow_clone().g_sub_(&(mhat / (vhat.sqrt() + ADAM_EPS) * lr));
        let _ = param.grad().zero_();
    }
}

/// What the optimisation found, per class (on the device until read).
struct Reversed {
    /// The best mask (or the last one, for a class that never reached `success`). [K, 1, H, W]
    mask: Tensor,
    /// Its pattern. [K, C, H, W]
    pattern: Tensor,
    /// Whether the class's batch success ever reached `success`.
    reached: Vec<bool>,
    /// L1 norm of `mask`.
    l1: Vec<f64>,
    /// lambda at the end.
    cost: Vec<f64>,
}

/// The batched optimisation of every class's mask and pattern.
fn reverse(
    call: &Call<'_>,
    p: &Params,
    model: &audit_nn::Model,
    pre: &audit_nn::train::Preprocess,
    x01: &Tensor,
    y: &Tensor,
    k: i64,
) -> Result<Reversed> {
    let dev = model.device;
    let s = x01.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let b = p.samples_per_step.min(n);
    let seed = call.seed.wrapping_add(p.seed);
    // Start values drawn on the CPU, so a seed gives the same start on every device.
    tch::manual_seed(seed as i64);
    let a = unsquash(&Tensor::rand([k, 1, h, w], (Kind::Float, tch::Device::Cpu)))
        .to_device(dev)
        .set_requires_grad(true);
    let bp = unsquash(&Tensor::rand([k, c, h, w], (Kind::Float, tch::Device::Cpu)))
        .to_device(dev)
        .set_requires_grad(true);
    let order = Tensor::from_slice(&batch_order(n as usize, b as usize, p.steps, seed))
        .to_device(dev)
        .view([p.steps as i64, b]);
    let classes = Tensor::arange(k, (Kind::Int64, dev));
    let target = classes.repeat_interleave_self_int(b, 0, None);
    let (mut adam_a, mut adam_b) = (Adam::new(&a), Adam::new(&bp));
    let mut cost = Tensor::full([k], p.init_cost, (Kind::Float, dev));
    let mut up = Tensor::zeros([k], (Kind::Int64, dev));
    let mut down = Tensor::zeros([k], (Kind::Int64, dev));
    let mut best_l1 = Tensor::full([k], f64::INFINITY, (Kind::Float, dev));
    let mut best_mask = Tensor::zeros([k, 1, h, w], (Kind::Float, dev));
    let mut best_pattern = Tensor::zeros([k, c, h, w], (Kind::Float, dev));
    let mut reached = Tensor::zeros([k], (Kind::Bool, dev));
    let label = "reversing triggers";
    for step in 0..p.steps {
        if step % p.check_every == 0 {
            call.host.check_cancelled()?;
            call.host.progress(label, step as u64, p.steps as u64);
        }
        let idx = order.get(step as i64);
        let xb = x01.index_select(0, &idx);
        // [K, B]: the batch's images of another class than the row's.
        let other = y
            .index_select(0, &idx)
            .unsqueeze(0)
            .ne_tensor(&classes.unsqueeze(1))
            .to_kind(Kind::Float);
        let count = other.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        let mask = squash(&a);
        let pattern = squash(&bp);
        let logits = model
            .forward(&pre.normalize(&stamp(&mask, &pattern, &xb)), Mode::Eval)
            .map_err(nn_err)?;
        let ce = logits
            .cross_entropy_loss::<Tensor>(&target, None, Reduction::None, -100, 0.0)
            .view([k, b]);
        let ce = (ce * &other).sum_dim_intlist(1, false, Kind::Float) / &count;
        let l1 = mask.sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float);
        (ce + &cost * &l1).sum(Kind::Float).backward();
        tch::no_grad(|| {
            let hit = logits
                .argmax(1, false)
                .eq_tensor(&target)
                .view([k, b])
                .to_kind(Kind::Float);
            let success = (hit * &other).sum_dim_intlist(1, false, Kind::Float) / &count;
            let ok = success.ge(p.success);
            // The best mask so far: the smallest that reached the success threshold.
            let better = ok.logical_and(&l1.lt_tensor(&best_l1));
            best_l1 = l1.where_self(&better, &best_l1);
            let sel = better.view([k, 1, 1, 1]);
            best_mask = mask.where_self(&sel, &best_mask);
            best_pattern = pattern.where_self(&sel, &best_pattern);
            reached = reached.logical_or(&ok);
            // The reference's cost schedule.
            let zero = up.zeros_like();
            up = (&up + 1).where_self(&ok, &zero);
            down = zero.where_self(&ok, &(&down + 1));
            let raise = up.ge(p.patience);
            let lower = down.ge(p.patience);
            cost =
                (&cost * p.cost_multiplier).where_self(&raise, &(&cost / p.cost_multiplier).where_self(&lower, &cost));
            up = zero.where_self(&raise, &up);
            down = zero.where_self(&lower, &down);
            let t = step as i32 + 1;
            adam_a.step(&a, p.lr, t);
            adam_b.step(&bp, p.lr, t);
        });
    }
    call.host.progress(label, p.steps as u64, p.steps as u64);
    let (last_mask, last_pattern) = tch::no_grad(|| (squash(&a), squash(&bp)));
    let sel = reached.view([k, 1, 1, 1]);
    let mask = best_mask.where_self(&sel, &last_mask);
    let pattern = best_pattern.where_self(&sel, &last_pattern);
    let l1 = mask.sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float);
    Ok(Reversed {
        reached: to_f64s(&reached)?.into_iter().map(|r| r != 0.0).collect(),
        l1: to_f64s(&l1)?,
        cost: to_f64s(&cost)?,
        mask,
        pattern,
    })
}

/// Share of the clean images of another class that each class's mask and pattern send to it,
/// over every image of `x01` (batched: about 4096 blended images per forward).
fn success_rates(
    model: &audit_nn::Model,
    pre: &audit_nn::train::Preprocess,
    r: &Reversed,
    x01: &Tensor,
    y: &Tensor,
) -> Result<Vec<f64>> {
    let k = r.mask.size()[0];
    let n = x01.size()[0];
    let dev = x01.device();
    let chunk = (4096 / k).max(1);
    let classes = Tensor::arange(k, (Kind::Int64, dev));
    let mut hits = Tensor::zeros([k], (Kind::Double, dev));
    let mut count = Tensor::zeros([k], (Kind::Double, dev));
    tch::no_grad(|| -> Result<()> {
        let mut s = 0;
        while s < n {
            let m = (n - s).min(chunk);
            let xb = x01.narrow(0, s, m);
            let other = y.narrow(0, s, m).unsqueeze(0).ne_tensor(&classes.unsqueeze(1));
            let pred = model
                .forward(&pre.normalize(&stamp(&r.mask, &r.pattern, &xb)), Mode::Eval)
                .map_err(nn_err)?
                .argmax(1, false)
                .view([k, m]);
            let hit = pred.eq_tensor(&classes.unsqueeze(1)).logical_and(&other);
            hits += hit.sum_dim_intlist(1, false, Kind::Double);
            count += other.sum_dim_intlist(1, false, Kind::Double);
            s += m;
        }
        Ok(())
    })?;
    to_f64s(&(hits / count.clamp_min(1.0)))
}

impl Detector for NeuralCleanse {
    fn scan(&self, call: &Call<'_>, model: &[u8], data: Option<&DatasetRef<'_>>) -> Result<Verdict> {
        self.scan_with_clean(call, model, data, None)
    }

    fn scan_with_clean(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        _data: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Verdict> {
        let p: Params = call.params.parse()?;
        if !(p.lr > 0.0 && p.lr.is_finite()) {
            return Err(Error::invalid(format!("parameter `lr`: {} must be > 0", p.lr)));
        }
        let clean = require_clean("nc", clean)?;
        let started = std::time::Instant::now();
        let device = device(call)?;
        let (mut model, pre) = load_model(model_bytes, device, false)?;
        model.set_trainable(false);
        let data = device_data(clean, device)?;
        let k = check_fit(&model, &data, &pre, "the clean subset")?;
        if k < 3 {
            return Err(Error::invalid(format!(
                "the model has {k} classes; Neural Cleanse's outlier test needs at least 3"
            )));
        }
        let x01 = audit_nn::train::Preprocess::to_unit(&data.x);
        let r = reverse(call, &p, &model, &pre, &x01, &data.y, k)?;
        let rates = success_rates(&model, &pre, &r, &x01, &data.y)?;
        let test = anomaly(&r.l1);
        let targets = test
            .as_ref()
            .map(|a| flagged(a, &r.reached, p.threshold))
            .unwrap_or_default();
        let smallest = (0..r.l1.len())
            .min_by(|&i, &j| r.l1[i].total_cmp(&r.l1[j]))
            .unwrap_or(0);
        let mut images = Vec::new();
        for &t in &targets {
            let m = r.mask.get(t);
            images.push(report_image(format!("class {t}: mask"), &m)?);
            images.push(report_image(
                format!("class {t}: trigger (pattern x mask)"),
                &(&r.pattern.get(t) * &m),
            )?);
        }
        let backdoored = !targets.is_empty();
        let not_reached: Vec<usize> = (0..r.reached.len()).filter(|&t| !r.reached[t]).collect();
        let summary = match &test {
            Some(a) => format!(
                "smallest mask L1 {:.1} (class {smallest}), median {:.1}, anomaly index {:.2} (threshold {}): {}{}",
                r.l1[smallest],
                a.median,
                a.index[smallest],
                p.threshold,
                if backdoored {
                    format!("flagged class(es) {targets:?}")
                } else {
                    "not flagged".to_string()
                },
                if not_reached.is_empty() {
                    String::new()
                } else {
                    format!("; classes {not_reached:?} never reached success {}", p.success)
                }
            ),
            None => "the mask norms have no spread (MAD 0): not flagged".to_string(),
        };
        call.host.info(&summary);
        let per_class: Vec<Value> = (0..r.l1.len())
            .map(|t| {
                json!({
                    "class": t,
                    "l1": r.l1[t],
                    "reached_success": r.reached[t],
                    "success_rate": rates[t],
                    "anomaly_index": test.as_ref().map(|a| a.index[t]),
                    "final_cost": r.cost[t],
                })
            })
            .collect();
        Ok(Verdict {
            backdoored,
            target_classes: targets.clone(),
            suspicious: vec![],
            details: json!({
                "detector": "nc",
                "level": "model",
                "device": format!("{device:?}").to_lowercase(),
                "score_name": "anomaly_index",
                "score": test.as_ref().map(|a| a.index[smallest]),
                "threshold": p.threshold,
                "l1_norms": r.l1,
                "anomaly_indices": test.as_ref().map(|a| a.index.clone()),
                "median_l1": test.as_ref().map(|a| a.median),
                "mad": test.as_ref().map(|a| a.mad),
                "smallest_class": smallest,
                "per_class": per_class,
                "images": images,
                "clean_images": data.len(),
                "steps": p.steps,
                "samples_per_step": p.samples_per_step.min(data.len()),
                "summary": summary,
                "seconds": started.elapsed().as_secs_f64(),
            }),
        })
    }
}

audit_sdk::export_plugin!(detector: NeuralCleanse);

#[cfg(test)]
mod tests;
