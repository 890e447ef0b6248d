//! ABS (Liu et al., "ABS: Scanning Neural Networks for Back-doors by Artificial Brain
//! Stimulation", ACM CCS 2019) as an `audit` detector that needs the model and clean data. It is
//! also the NONE paper's natural-backdoor measure (Liu et al., NeurIPS 2022: the REASR of a model
//! trained on clean data), so it runs on any model and always reports a number.
//!
//! A backdoor lives in a few inner neurons: driven high, one of them sends any input to the
//! target label. ABS looks for such neurons directly and then checks each one by rebuilding an
//! input trigger for it.
//!
//! 1. Layer. By default the last Conv that is not the logits layer (the last hidden layer when the
//!    model has no Conv); `layer` may name any other node. The neurons are the channels (dim 1)
//!    of the layer's pre-activation value: the input of the activation that follows it, through a
//!    normalisation if one stands between (the layer's own output when no activation follows).
//!    A node that is not a layer is used through its first output.
//! 2. Stimulation. The first `images_per_class` clean images of every class are run to that
//!    value; `m` is its largest entry over those images and the channels (the reference's
//!    per-layer maximum). For every channel c and every value v of
//!    `m * stim_max * i / (stim_steps - 1)`, i = 0..stim_steps, channel c is set to v at every
//!    position and the rest of the graph is run (`audit_nn::Model::forward_with_edits`). Per image
//!    and label, the elevation is the label's largest logit over the non-zero values minus its
//!    logit at v = 0; the image's label is the one with the largest elevation and its margin the
//!    elevation of that label minus the second largest. A neuron is a candidate when at least 90%
//!    of the images share one label L (the reference's `n_imgs * 0.9`); its score is the smallest
//!    margin over the images whose true class is not L and whose label is L (0 if none). The
//!    `top_k` best-scoring candidates are kept, at most one per label (as the reference keeps
//!    them). Every channel, value and image of a chunk is one forward pass (as many channels per
//!    pass as a memory budget for the edited value allows); when the rest of the
//!    graph reads the input only through the layer (a plain CNN), the edited batch is built from
//!    one tap of the layer, else (a residual skip around it) the images are repeated so the skip
//!    carries the same batch.
//! 3. Trigger reverse engineering, per candidate (neuron n, label L) and per trigger-size bound b
//!    of `bounds` (with `bound` added when missing), all in one batch of triggers: a mask
//!    `m = tanh(a) / 2 + 0.5` ([1, H, W]) and pattern `p = tanh(q) / 2 + 0.5` ([C, H, W]) in
//!    pixel space stamp `x' = (1 - m) x + m p` (the model's preprocessing after the stamp). The
//!    loss on a batch of `batch_size` clean images (the reference's weights, sums over the batch
//!    as it takes them) is
//!    `-S(z_n) - S(relu(z_n)) + 1e-4 (S(z_other) + S(relu(z_other))) / (C - 1) + w |m|_1 - k S(logit_L)`
//!    with z the layer's value, S the sum over the batch and positions, k = 1 for the first half of
//!    the steps and 3 after (the reference adds twice the logit term from the middle on), and the
//!    size penalty `w` = 0.01 while at most `b * H * W` mask entries exceed 0.01, 50 above that and
//!    100 beyond 1.2 times the area (the reference's `re_mask_weight` 50 schedule). The mask
//!    starts as a square of side `0.8 sqrt(b H W)` at the image centre (tanh space +2, elsewhere
//!    -4), the pattern from uniform [-1, 1] in tanh space (seeded); Adam (betas 0.9, 0.999) at
//!    `lr` for `steps` steps. A trigger stops (is frozen) at the first step whose stamped batch
//!    sends at least 99% of its images of another class to L while its mask is within the area.
//! 4. REASR. The stamped mask is binary: the entries above 0.1 (the reference's `m^2 > 0.01`),
//!    at most the `b H W` largest of them. REASR = the share of the lent clean images whose class
//!    is not L that the stamped trigger sends to L. The report gives the largest REASR at every
//!    bound with its candidate (layer, channel, label, REASR, mask pixels); the model is flagged
//!    when the largest REASR at `bound` reaches `threshold`, with the labels of the candidates that
//!    reach it as targets. The best trigger at `bound` (its binary mask and mask x pattern) comes
//!    back as two PNG images.
//!
//! Defaults follow NONE's ABS code (abs_test.py, the code behind its natural-backdoor numbers)
//! where it sets them: 20 images per class for the stimulation (its 200 sample images over 10
//! classes), stimulation values 0, 0.5 m and m (`stim_max` 1, `stim_steps` 3: its
//! `[0, 0.5, 1, 2] * max` of which the 2 falls outside the array it writes to), `top_k` 10
//! (`top_n_neurons`), Adam at 0.1 (`re_mask_lr`), 150 steps of 80 images (its 50 epochs of 240
//! images in batches of 80), bounds 12..2% (its `troj_size_override` runs). The threshold 0.8 is
//! the public ABS code's `reasr_bound` (config.json: triggers above 80% REASR are reported as
//! trojan triggers); it was not tuned on any model measured here.
//!
//! Differences from the paper and the references (naiyeleo/ABS, NONE's abs_test.py), stated:
//! - Pixel space: the mask and pattern act on pixels in [0, 1] and the model's preprocessing
//!   follows; NONE's code stamps in the normalised space with the pattern squashed to [0, 1]
//!   there (a different, narrower range).
//! - The stimulated value is the activation's input (after a normalisation that stands between
//!   the layer and its activation), not always the conv's raw output: in the references' models
//!   no normalisation stands there, so they coincide; with BatchNormalization the raw conv output
//!   may be scaled by a negative factor before the activation.
//! - Every stimulation value sets the whole channel map; the reference does the same. The
//!   original ABS (Keras) sampled 0..6.4 m in 5 values: `stim_max` 6.4 and `stim_steps` 5 give
//!   that.
//! - All candidates and bounds are optimised at once on one shared batch per step; the reference
//!   optimises one candidate at a time, one bound per run, over epochs of a fixed 240 images.
//!   Here the batches are drawn (seeded) from every lent clean image, and a frozen trigger keeps
//!   the mask of the step that reached 99%.
//! - The stop test counts the batch's images of another class than L; the reference counts every
//!   image, going to its majority label, and it reports the REASR for the label the optimised
//!   trigger reached (which may differ from the candidate's); here REASR is always for L.
//! - The binary mask is cut to the bound's area (its largest entries): the reference's penalty is
//!   soft, so its stamped mask may exceed the bound it is logged under.
//! - No neuron passing the 90% test: REASR 0 at every bound and not flagged (the reference fails).
//! - REASR is measured on the same lent images the triggers were optimised on, as in the
//!   reference: an optimistic figure for a clean model, not a held-out one.
//! - The paper also reverse-engineers feature-space (filter) triggers; only pixel-space mask
//!   triggers are built here.
//!
//! Measured with the defaults on PyTorch-trained Fashion-MNIST small CNNs (CPU, 1,000 lent
//! images): a BadNets model (3x3 patch, target 0, ASR 0.999) had the target's neuron among its 7
//! candidates, but its best trigger at 6% reached REASR 0.457 (0.925 at 8%, 0.048 at 4%): not
//! flagged; none of its 42 triggers met the 99% stop test, and the masks filled their bound, so
//! the cut to the bound's area decided much of the stamp. The clean model: 0.260 at 6%. The
//! optimisation, not the stimulation, is the weak step here.

use std::collections::HashSet;

use audit_nn::ops::Mode;
use audit_nn::tch::{self, Kind, Tensor};
use audit_nn::train::Preprocess;
use audit_nn::Model;
use audit_plugin_common::samples::{to_f64s, to_i64s};
use audit_plugin_common::triggers::{batch_order, report_image, squash, stamp};
use audit_plugin_common::{check_fit, device, device_data, load_model, nn_err, require_clean};
use audit_sdk::{Call, DatasetRef, Detector, Error, Plugin, PluginInfo, Result, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"layer":{"type":"string","default":"","description":"node whose neurons are stimulated (empty: the last conv before the classifier head)"},
"images_per_class":{"type":"integer","default":20,"minimum":1,"maximum":10000,"description":"clean images per class for the stimulation analysis (NONE's ABS code: 200 over 10 classes)"},
"stim_max":{"type":"number","default":1.0,"minimum":0,"maximum":1000,"description":"largest stimulation value, as a multiple of the layer's largest activation on those images (must be > 0)"},
"stim_steps":{"type":"integer","default":3,"minimum":2,"maximum":64,"description":"stimulation values from 0 to stim_max, evenly spaced (3: 0, 0.5, 1 as NONE's code)"},
"top_k":{"type":"integer","default":10,"minimum":1,"maximum":1000,"description":"candidate neurons kept for trigger reverse engineering, at most one per label (the reference's 10)"},
"steps":{"type":"integer","default":150,"minimum":1,"maximum":100000,"description":"optimisation steps of the triggers (the reference's 50 epochs of 3 batches)"},
"lr":{"type":"number","default":0.1,"minimum":0,"description":"Adam step size on the tanh-space mask and pattern (the reference's 0.1; must be > 0)"},
"bounds":{"type":"string","default":"0.12,0.10,0.08,0.06,0.04,0.02","description":"trigger-size bounds, comma-separated fractions of the image area in (0, 1]; the max REASR is reported at each"},
"bound":{"type":"number","default":0.06,"minimum":0,"maximum":1,"description":"the bound (fraction of the image area, > 0) whose max REASR decides the verdict (added to bounds when missing)"},
"threshold":{"type":"number","default":0.8,"minimum":0,"maximum":1,"description":"flagged when the max REASR at `bound` reaches this (the ABS reference's reasr_bound 0.8)"},
"batch_size":{"type":"integer","default":80,"minimum":1,"maximum":100000,"description":"clean images per optimisation step, shared by every trigger (the reference's 80)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the start patterns and of the batch order (added to the host's seed)"}}}"#;

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    layer: String,
    images_per_class: usize,
    stim_max: f64,
    stim_steps: i64,
    top_k: usize,
    steps: usize,
    lr: f64,
    bounds: String,
    bound: f64,
    threshold: f64,
    batch_size: i64,
    seed: u64,
}

/// Share of the stimulation images that must agree on a neuron's label (the reference's 0.9).
const AGREEMENT: f64 = 0.9;
/// The reference's `re_mask_weight`.
const MASK_WEIGHT: f64 = 50.0;
/// Mask entries above this count towards the size bound during the optimisation.
const MASK_EPSILON: f64 = 0.01;
/// Mask entries above this are stamped (the reference's `m * m > 0.01`).
const STAMP_LEVEL: f64 = 0.1;
/// A trigger whose batch success reaches this stops.
const SUCCESS: f64 = 0.99;
/// Steps between two host reads (cancel flag, progress, which triggers still run).
const CHECK_EVERY: usize = 10;
/// Elements of the edited value per stimulation pass (smaller on the CPU, see
/// [`input_elements`]).
fn stim_elements(dev: tch::Device) -> i64 {
    if dev.is_cuda() {
        1 << 25
    } else {
        1 << 22
    }
}
/// Input elements per optimisation or evaluation pass (the activations kept for the backward
/// pass of a small CNN are about a hundred times more). On the CPU the passes are kept small
/// enough that their tensors stay below the allocator's mmap threshold, so memory is reused
/// instead of mapped, zeroed and unmapped on every op.
fn input_elements(dev: tch::Device) -> i64 {
    if dev.is_cuda() {
        1 << 22
    } else {
        1 << 18
    }
}
/// Adam's betas and epsilon (torch's defaults, which the reference uses).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// The plugin.
#[derive(Debug, Default)]
pub struct Abs;

impl Plugin for Abs {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "abs",
            version: env!("CARGO_PKG_VERSION"),
            description: "ABS: stimulate each neuron of an inner layer, keep those that lift one label on most images, \
                          reverse-engineer a small trigger for each; flagged when its REASR at the size bound reaches the threshold",
            params_schema: SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL | audit_sdk::abi::AUDIT_CAP_NEEDS_CLEAN_DATA,
        }
    }
}

/// The bounds to optimise for: `bounds` parsed, `bound` added when missing, largest first.
fn bound_list(p: &Params) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for part in p.bounds.split(',') {
        let v: f64 = part.trim().parse().map_err(|_| {
            Error::invalid(format!(
                "parameter `bounds`: `{}` is not a number (expected fractions such as 0.12,0.06)",
                part.trim()
            ))
        })?;
        if !(v > 0.0 && v <= 1.0) {
            return Err(Error::invalid(format!(
                "parameter `bounds`: {v} is not a fraction of the image area in (0, 1]"
            )));
        }
        out.push(v);
    }
    if !(p.bound > 0.0 && p.bound <= 1.0) {
        return Err(Error::invalid(format!(
            "parameter `bound`: {} is not a fraction of the image area in (0, 1]",
            p.bound
        )));
    }
    out.push(p.bound);
    out.sort_by(|a, b| b.total_cmp(a));
    out.dedup_by(|a, b| (*a - *b).abs() < 1e-12);
    Ok(out)
}

/// Checks what the schema cannot say; returns the bounds.
fn check(p: &Params) -> Result<Vec<f64>> {
    if !(p.lr > 0.0 && p.lr.is_finite()) {
        return Err(Error::invalid(format!("parameter `lr`: {} must be > 0", p.lr)));
    }
    if !(p.stim_max > 0.0 && p.stim_max.is_finite()) {
        return Err(Error::invalid(format!(
            "parameter `stim_max`: {} must be > 0",
            p.stim_max
        )));
    }
    bound_list(p)
}

/// Where the stimulation happens.
#[derive(Debug, Clone)]
struct Site {
    /// The node the user names (the layer).
    node: String,
    /// The value whose channels are the neurons.
    value: usize,
    value_name: String,
    /// The rest of the graph reads the input only through `value`.
    cut: bool,
}

/// The value a layer's neurons are read at: the input of the activation after it (through
/// normalisations and identities), or the layer's output when no activation follows.
fn pre_activation(model: &Model, v: usize) -> usize {
    let g = model.graph();
    let (a, found) = g.activation_after(v);
    if !found {
        return a;
    }
    g.producer(a).and_then(|n| g.node(n).input(0)).unwrap_or(v)
}

/// Whether every node downstream of `x` reads the graph input only through `x`, and every graph
/// output is downstream of it: then the rest of the graph can run on a batch of edited copies of
/// `x` alone.
fn is_cut(model: &Model, x: usize) -> bool {
    let g = model.graph();
    let mut dep: HashSet<usize> = model.inputs.iter().filter_map(|i| g.value(&i.name)).collect();
    let mut down: HashSet<usize> = [x].into();
    for n in g.nodes() {
        let ins: Vec<usize> = n.inputs.iter().flatten().copied().collect();
        let reads_down = ins.iter().any(|v| down.contains(v));
        if reads_down && ins.iter().any(|v| dep.contains(v) && !down.contains(v)) {
            return false;
        }
        if ins.iter().any(|v| dep.contains(v)) {
            dep.extend(n.outputs.iter().copied());
        }
        if reads_down {
            down.extend(n.outputs.iter().copied());
        }
    }
    model
        .outputs
        .iter()
        .all(|o| g.value(&o.name).is_some_and(|v| down.contains(&v)))
}

/// The stimulated node and value: `layer` when given, else the last hidden conv (the last hidden
/// layer of any kind when there is no conv).
fn choose_site(model: &Model, layer: &str) -> Result<Site> {
    let layers = model.layers();
    let hidden: Vec<_> = layers.iter().filter(|l| !l.is_output).collect();
    let g = model.graph();
    let (node, value) = if layer.is_empty() {
        let l = hidden
            .iter()
            .rev()
            .find(|l| l.op_type == "Conv")
            .or(hidden.last())
            .ok_or_else(|| {
                Error::invalid("the model has no hidden layer to stimulate (name a node with parameter `layer`)")
            })?;
        (l.node.clone(), pre_activation(model, l.value))
    } else if let Some(l) = layers.iter().find(|l| l.node == layer) {
        if l.is_output {
            return Err(Error::invalid(format!(
                "parameter `layer`: `{layer}` is the logits layer; name an inner node"
            )));
        }
        (l.node.clone(), pre_activation(model, l.value))
    } else {
        let n = g.node_named(layer).ok_or_else(|| {
            let names: Vec<&str> = hidden.iter().map(|l| l.node.as_str()).collect();
            Error::invalid(format!(
                "parameter `layer`: no node named `{layer}` (hidden layers: {})",
                names.join(", ")
            ))
        })?;
        let v = *n
            .outputs
            .first()
            .ok_or_else(|| Error::invalid(format!("parameter `layer`: node `{layer}` has no output")))?;
        (n.name.to_string(), v)
    };
    Ok(Site {
        node,
        value,
        value_name: g.value_name(value).to_string(),
        cut: is_cut(model, value),
    })
}

/// A candidate neuron from the stimulation analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub channel: i64,
    pub label: i64,
    /// The smallest elevation margin over the images of another class that it sends to `label`.
    pub score: f64,
    /// How many stimulation images share `label`.
    pub agree: i64,
}

/// The candidates: neurons whose label is shared by at least 90% of `n_images` images, best
/// score first, at most one per label, at most `top_k`. `label`, `agree`, `score` per neuron.
pub fn pick(label: &[i64], agree: &[i64], score: &[f64], n_images: i64, top_k: usize) -> Vec<Candidate> {
    let need = (n_images as f64 * AGREEMENT).floor() as i64;
    let mut c: Vec<Candidate> = (0..label.len())
        .filter(|&i| agree[i] >= need)
        .map(|i| Candidate {
            channel: i as i64,
            label: label[i],
            score: score[i],
            agree: agree[i],
        })
        .collect();
    c.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.channel.cmp(&b.channel)));
    let mut seen = HashSet::new();
    c.retain(|x| seen.insert(x.label));
    c.truncate(top_k);
    c
}

/// What the stimulation found.
#[derive(Debug)]
struct Stimulation {
    candidates: Vec<Candidate>,
    neurons: i64,
    images: i64,
    max_activation: f64,
    values: Vec<f64>,
    /// Neurons that passed the agreement test.
    passing: usize,
}

/// `base` ([cc * V * n, C, ...], chunk-major: channel, then value, then image) with channel
/// `c0 + i` of the i-th block set to the block's value at every position.
fn stimulated(base: &Tensor, c0: i64, cc: i64, values: &Tensor, n: i64) -> Tensor {
    let s = base.size();
    let ch = s[1];
    let nv = values.size()[0];
    let rest = &s[2..];
    let mut full = vec![cc, nv, n, ch];
    full.extend_from_slice(rest);
    let mut sel_shape = vec![cc, 1, 1, ch];
    sel_shape.extend(rest.iter().map(|_| 1));
    let mut val_shape = vec![1, nv, 1, 1];
    val_shape.extend(rest.iter().map(|_| 1));
    let dev = base.device();
    let sel = (Tensor::arange(cc, (Kind::Int64, dev)) + c0)
        .one_hot(ch)
        .to_kind(base.kind())
        .view(sel_shape.as_slice());
    let v = values.to_kind(base.kind()).view(val_shape.as_slice());
    let b = base.view(full.as_slice());
    (&b * (-&sel + 1.0) + &sel * v).view(s.as_slice())
}

/// Step 2: every neuron of the site stimulated at every value on every image, batched.
fn stimulate(
    call: &Call<'_>,
    model: &Model,
    pre: &Preprocess,
    site: &Site,
    xs: &Tensor,
    ys: &Tensor,
    p: &Params,
) -> Result<Stimulation> {
    let n = xs.size()[0];
    let dev = xs.device();
    tch::no_grad(|| -> Result<Stimulation> {
        let xin = pre.normalize(xs);
        let (_, taps) = model
            .forward_with_taps(&[&xin], Mode::Eval, &[site.value])
            .map_err(nn_err)?;
        let z = taps[0].to_kind(Kind::Float);
        let s = z.size();
        if s.len() < 2 || s[0] != n || s[1] < 2 {
            return Err(Error::invalid(format!(
                "parameter `layer`: the value `{}` of node `{}` has shape {s:?}; it needs [batch, channels >= 2, ...]",
                site.value_name, site.node
            )));
        }
        let ch = s[1];
        let per: i64 = s[1..].iter().product();
        let mut maxv = z.max().double_value(&[]);
        if !(maxv > 0.0 && maxv.is_finite()) {
            // No positive activation to scale by: stimulate in units of 1.
            maxv = 1.0;
        }
        let nv = p.stim_steps;
        let vals: Vec<f64> = (0..nv)
            .map(|i| maxv * p.stim_max * i as f64 / (nv - 1) as f64)
            .collect();
        let values = Tensor::from_slice(&vals).to_kind(Kind::Float).to_device(dev);
        let cc = (stim_elements(dev) / (nv * n * per).max(1)).clamp(1, ch);
        let mut labels = Vec::new();
        let mut margins = Vec::new();
        let label = "stimulating neurons";
        let mut c0 = 0;
        while c0 < ch {
            call.host.check_cancelled()?;
            call.host.progress(label, c0 as u64, ch as u64);
            let k = cc.min(ch - c0);
            let reps = k * nv;
            let logits = if site.cut {
                let base = z.repeat_along(reps);
                let edited = stimulated(&base, c0, k, &values, n);
                let (outs, _) = model
                    .forward_with_edits(&[&xin], Mode::Eval, &[], &mut |v, _| {
                        (v == site.value).then(|| edited.shallow_clone())
                    })
                    .map_err(nn_err)?;
                outs.into_iter().next()
            } else {
                let x = xin.repeat_along(reps);
                let (outs, _) = model
                    .forward_with_edits(&[&x], Mode::Eval, &[], &mut |v, t| {
                        (v == site.value).then(|| stimulated(&t.to_kind(Kind::Float), c0, k, &values, n))
                    })
                    .map_err(nn_err)?;
                outs.into_iter().next()
            }
            .ok_or_else(|| Error::failed("the model produced no output"))?;
            let kk = logits.size()[1];
            if kk < 2 {
                return Err(Error::invalid("the model has fewer than 2 outputs"));
            }
            let l = logits.to_kind(Kind::Float).view([k, nv, n, kk]);
            // [k, n, K]: the largest logit over the non-zero values minus the logit at zero.
            let elev = l.narrow(1, 1, nv - 1).amax([1].as_slice(), false) - l.select(1, 0);
            let (top, idx) = elev.topk(2, -1, true, true);
            labels.push(idx.select(2, 0));
            margins.push(top.select(2, 0) - top.select(2, 1));
            c0 += k;
        }
        call.host.progress(label, ch as u64, ch as u64);
        let lab = Tensor::cat(&labels, 0); // [C, n]
        let mar = Tensor::cat(&margins, 0);
        let kk = lab.max().int64_value(&[]).max(ys.max().int64_value(&[])) + 1;
        let counts = lab.one_hot(kk).sum_dim_intlist([1].as_slice(), false, Kind::Int64); // [C, K]
        let (agree, ml) = counts.max_dim(1, false);
        let ml_col = ml.unsqueeze(1);
        let valid = lab.eq_tensor(&ml_col).logical_and(&ys.unsqueeze(0).ne_tensor(&ml_col));
        let inf = Tensor::full_like(&mar, f64::INFINITY);
        let best = mar.where_self(&valid, &inf).amin([1].as_slice(), false);
        let any = valid.any_dim(1, false);
        let score = best.where_self(&any, &best.zeros_like());
        let ml = to_i64s(&ml)?;
        let agree = to_i64s(&agree)?;
        let score = to_f64s(&score)?;
        let need = (n as f64 * AGREEMENT).floor() as i64;
        Ok(Stimulation {
            passing: agree.iter().filter(|&&a| a >= need).count(),
            candidates: pick(&ml, &agree, &score, n, p.top_k),
            neurons: ch,
            images: n,
            max_activation: maxv,
            values: vals,
        })
    })
}

/// Repeating a batch along dim 0.
trait RepeatAlong {
    fn repeat_along(&self, times: i64) -> Tensor;
}

impl RepeatAlong for Tensor {
    fn repeat_along(&self, times: i64) -> Tensor {
        let mut r = vec![times];
        r.extend(std::iter::repeat_n(1, self.dim() - 1));
        self.repeat(r.as_slice())
    }
}

/// One Adam step on the rows of `param` where `rows` is true (the others keep their values and
/// moments); no gradient recorded.
struct Adam {
    m: Tensor,
    v: Tensor,
    t: i32,
}

impl Adam {
    fn new(like: &Tensor) -> Adam {
        Adam {
            m: like.zeros_like(),
            v: like.zeros_like(),
            t: 0,
        }
    }

    fn step(&mut self, param: &Tensor, lr: f64, rows: &Tensor) {
        self.t += 1;
        let g = param.grad();
        let mut shape = vec![-1];
        shape.extend(std::iter::repeat_n(1, param.dim() - 1));
        let sel = rows.view(shape.as_slice());
        let m = &self.m * BETA1 + &g * (1.0 - BETA1);
        let v = &self.v * BETA2 + (&g * &g) * (1.0 - BETA2);
        let mhat = &m / (1.0 - BETA1.powi(self.t));
        let vhat = &v / (1.0 - BETA2.powi(self.t));
        let new = param - mhat / (vhat.sqrt() + ADAM_EPS) * lr;
        self.m = m.where_self(&sel, &self.m);
        self.v = v.where_self(&sel, &self.v);
        param.shallow_clone().copy_(&new.where_self(&sel, param));
        let _ = param.grad().zero_();
    }
}

/// One trigger per (bound, candidate), bound-major.
#[derive(Debug)]
struct Triggers {
    /// Binary stamped masks. [T, 1, H, W]
    mask: Tensor,
    /// Patterns in [0, 1]. [T, C, H, W]
    pattern: Tensor,
    /// Pixels of each stamped mask.
    pixels: Vec<i64>,
    /// Whether the trigger reached the stop test during the optimisation.
    reached: Vec<bool>,
    /// Steps it ran.
    steps_run: Vec<i64>,
}

/// Step 3: every candidate's trigger at every bound, optimised together.
#[allow(clippy::too_many_arguments)]
fn reverse(
    call: &Call<'_>,
    model: &Model,
    pre: &Preprocess,
    site: &Site,
    x01: &Tensor,
    y: &Tensor,
    cands: &[Candidate],
    bounds: &[f64],
    p: &Params,
) -> Result<Triggers> {
    let dev = x01.device();
    let s = x01.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let nt = (cands.len() * bounds.len()) as i64;
    let area: Vec<f64> = bounds
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b * (h * w) as f64, cands.len()))
        .collect();
    let neuron: Vec<i64> = (0..bounds.len())
        .flat_map(|_| cands.iter().map(|k| k.channel))
        .collect();
    let labels: Vec<i64> = (0..bounds.len()).flat_map(|_| cands.iter().map(|k| k.label)).collect();
    // Start: a centred square per bound (tanh space +2, elsewhere -4), patterns uniform in
    // [-1, 1] of tanh space, drawn on the CPU so a seed gives the same start on every device.
    let seed = call.seed.wrapping_add(p.seed);
    tch::manual_seed(seed as i64);
    let q = (Tensor::rand([nt, c, h, w], (Kind::Float, tch::Device::Cpu)) * 2.0 - 1.0)
        .to_device(dev)
        .set_requires_grad(true);
    let a0 = Tensor::full([nt, 1, h, w], -4.0, (Kind::Float, tch::Device::Cpu));
    for (t, &ar) in area.iter().enumerate() {
        let side = ((ar.sqrt() * 0.8) as i64).max(1);
        let (r0, c0) = (h / 2, w / 2);
        let _ = a0
            .get(t as i64)
            .narrow(1, r0, side.min(h - r0))
            .narrow(2, c0, side.min(w - c0))
            .fill_(2.0);
    }
    let a = a0.to_device(dev).set_requires_grad(true);
    let b = p.batch_size.min(n);
    let order = Tensor::from_slice(&batch_order(n as usize, b as usize, p.steps, seed))
        .to_device(dev)
        .view([p.steps as i64, b]);
    let area_t = Tensor::from_slice(&area).to_kind(Kind::Float).to_device(dev);
    let neuron_t = Tensor::from_slice(&neuron).to_device(dev);
    let label_t = Tensor::from_slice(&labels).to_device(dev);
    let mut active = Tensor::ones([nt], (Kind::Bool, dev));
    let mut ran = Tensor::zeros([nt], (Kind::Int64, dev));
    let (mut adam_a, mut adam_q) = (Adam::new(&a), Adam::new(&q));
    let per_chunk = (input_elements(dev) / (b * c * h * w).max(1)).max(1);
    let mut ids: Vec<i64> = (0..nt).collect();
    let progress = "reversing triggers";
    for step in 0..p.steps {
        if step % CHECK_EVERY == 0 {
            call.host.check_cancelled()?;
            call.host.progress(progress, step as u64, p.steps as u64);
            let on = to_i64s(&active)?;
            ids = (0..nt).filter(|&t| on[t as usize] != 0).collect();
            if ids.is_empty() {
                break;
            }
        }
        let idx = order.get(step as i64);
        let xb = x01.index_select(0, &idx);
        let yb = y.index_select(0, &idx);
        let k_logit = if step > p.steps / 2 { 3.0 } else { 1.0 };
        let mut done_all = Vec::new();
        let mut rows_all = Vec::new();
        for chunk in ids.chunks(per_chunk as usize) {
            let tc = chunk.len() as i64;
            let sel_ids = Tensor::from_slice(chunk).to_device(dev);
            let m = squash(&a.index_select(0, &sel_ids));
            let pat = squash(&q.index_select(0, &sel_ids));
            let xin = pre.normalize(&stamp(&m, &pat, &xb));
            let (outs, taps) = model
                .forward_with_taps(&[&xin], Mode::Eval, &[site.value])
                .map_err(nn_err)?;
            let logits = outs[0].to_kind(Kind::Float);
            let kk = logits.size()[1];
            let logits = logits.view([tc, b, kk]);
            let z = taps[0].to_kind(Kind::Float);
            let cl = z.size()[1];
            let z = z.view([tc, b, cl, -1]);
            let lab = label_t.index_select(0, &sel_ids);
            let sel = neuron_t
                .index_select(0, &sel_ids)
                .one_hot(cl)
                .to_kind(Kind::Float)
                .view([tc, 1, cl, 1]);
            let other_sel = -&sel + 1.0;
            let relu = z.relu();
            let dims = [1i64, 2, 3];
            let v1 = (&z * &sel).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
            let r1 = (&relu * &sel).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
            let v2 = (&z * &other_sel).sum_dim_intlist(dims.as_slice(), false, Kind::Float) / (cl - 1) as f64;
            let r2 = (&relu * &other_sel).sum_dim_intlist(dims.as_slice(), false, Kind::Float) / (cl - 1) as f64;
            let lsum = logits
                .gather(2, &lab.view([tc, 1, 1]).expand([tc, b, 1], false), false)
                .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float);
            let msum = m.sum_dim_intlist(dims.as_slice(), false, Kind::Float);
            let nz = m.gt(MASK_EPSILON).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
            let ar = area_t.index_select(0, &sel_ids);
            let small = Tensor::full_like(&msum, 0.01);
            let weight = Tensor::full_like(&msum, 2.0 * MASK_WEIGHT).where_self(
                &nz.gt_tensor(&(&ar * 1.2)),
                &Tensor::full_like(&msum, MASK_WEIGHT).where_self(&nz.gt_tensor(&ar), &small),
            );
            let loss = -&v1 - &r1 + (&v2 + &r2) * 1e-4 + &weight * &msum - lsum * k_logit;
            loss.sum(Kind::Float).backward();
            tch::no_grad(|| {
                let pred = logits.argmax(2, false);
                let other = yb.unsqueeze(0).ne_tensor(&lab.unsqueeze(1)).to_kind(Kind::Float);
                let hit = pred.eq_tensor(&lab.unsqueeze(1)).to_kind(Kind::Float) * &other;
                let success = hit.sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                    / other
                        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                        .clamp_min(1.0);
                done_all.push(success.ge(SUCCESS).logical_and(&nz.le_tensor(&ar)));
                rows_all.push(sel_ids);
            });
        }
        tch::no_grad(|| {
            let rows = Tensor::cat(&rows_all, 0);
            let done = Tensor::cat(&done_all, 0);
            // A trigger that reached the test keeps the mask it reached it with.
            let updated = Tensor::zeros([nt], (Kind::Bool, dev)).index_put_(
                &[Some(rows.shallow_clone())],
                &done.logical_not(),
                false,
            );
            let finished =
                Tensor::zeros([nt], (Kind::Bool, dev)).index_put_(&[Some(rows.shallow_clone())], &done, false);
            active = active.logical_and(&finished.logical_not());
            ran = &ran + updated.to_kind(Kind::Int64) + finished.to_kind(Kind::Int64);
            adam_a.step(&a, p.lr, &updated);
            adam_q.step(&q, p.lr, &updated);
        });
    }
    call.host.progress(progress, p.steps as u64, p.steps as u64);
    tch::no_grad(|| -> Result<Triggers> {
        let m = squash(&a); // [T, 1, H, W]
        let flat = m.view([nt, h * w]);
        // Rank of every entry within its mask (0 = largest).
        let order = flat.argsort(1, true);
        let ranks = flat.zeros_like().to_kind(Kind::Int64).scatter(
            1,
            &order,
            &Tensor::arange(h * w, (Kind::Int64, dev))
                .unsqueeze(0)
                .expand([nt, h * w], false),
        );
        let keep = flat
            .gt(STAMP_LEVEL)
            .logical_and(&ranks.to_kind(Kind::Float).lt_tensor(&area_t.floor().unsqueeze(1)));
        let mask = keep.to_kind(Kind::Float).view([nt, 1, h, w]);
        let reached = to_i64s(&active.logical_not())?;
        Ok(Triggers {
            pixels: to_i64s(&keep.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64))?,
            mask,
            pattern: squash(&q),
            reached: reached.iter().map(|&r| r != 0).collect(),
            steps_run: to_i64s(&ran)?,
        })
    })
}

/// Step 4: per trigger, the share of the images of another class than its label that the
/// stamped trigger sends to the label.
fn reasr(model: &Model, pre: &Preprocess, tr: &Triggers, labels: &[i64], x01: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
    let s = x01.size();
    let (n, per) = (s[0], s[1] * s[2] * s[3]);
    let nt = labels.len() as i64;
    if nt == 0 {
        return Ok(vec![]);
    }
    let dev = x01.device();
    let lab = Tensor::from_slice(labels).to_device(dev).unsqueeze(1);
    let chunk = (input_elements(dev) / (nt * per).max(1)).max(1);
    let mut hits = Tensor::zeros([nt], (Kind::Double, dev));
    let mut count = Tensor::zeros([nt], (Kind::Double, dev));
    tch::no_grad(|| -> Result<()> {
        let mut at = 0;
        while at < n {
            let k = (n - at).min(chunk);
            let xb = x01.narrow(0, at, k);
            let other = y.narrow(0, at, k).unsqueeze(0).ne_tensor(&lab);
            let pred = model
                .forward(&pre.normalize(&stamp(&tr.mask, &tr.pattern, &xb)), Mode::Eval)
                .map_err(nn_err)?
                .argmax(1, false)
                .view([nt, k]);
            hits += pred
                .eq_tensor(&lab)
                .logical_and(&other)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
            count += other.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
            at += k;
        }
        Ok(())
    })?;
    to_f64s(&(hits / count.clamp_min(1.0)))
}

/// The stimulation images: the first `per_class` images of every class (indices, ascending).
fn per_class_indices(labels: &[i64], per_class: usize) -> Vec<i64> {
    let mut taken = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        let t = taken.entry(l).or_insert(0usize);
        if *t < per_class {
            *t += 1;
            out.push(i as i64);
        }
    }
    out
}

impl Detector for Abs {
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
        let bounds = check(&p)?;
        let clean = require_clean("abs", clean)?;
        let started = std::time::Instant::now();
        let device = device(call)?;
        let (mut model, pre) = load_model(model_bytes, device, false)?;
        model.set_trainable(false);
        let data = device_data(clean, device)?;
        let k = check_fit(&model, &data, &pre, "the clean subset")?;
        if k < 2 {
            return Err(Error::invalid(format!(
                "the model has {k} output(s); ABS compares labels and needs at least 2"
            )));
        }
        let site = choose_site(&model, &p.layer)?;
        let x01 = Preprocess::to_unit(&data.x);
        let idx = per_class_indices(clean.labels, p.images_per_class);
        let sel = Tensor::from_slice(&idx).to_device(device);
        let stim = stimulate(
            call,
            &model,
            &pre,
            &site,
            &x01.index_select(0, &sel),
            &data.y.index_select(0, &sel),
            &p,
        )?;
        let cands = stim.candidates.clone();
        let (tr, rates) = if cands.is_empty() {
            (None, vec![])
        } else {
            let tr = reverse(call, &model, &pre, &site, &x01, &data.y, &cands, &bounds, &p)?;
            let labels: Vec<i64> = (0..bounds.len()).flat_map(|_| cands.iter().map(|c| c.label)).collect();
            let r = reasr(&model, &pre, &tr, &labels, &x01, &data.y)?;
            (Some(tr), r)
        };
        let nc = cands.len();
        // Per bound: the best trigger (index into the bound-major trigger list).
        let best_at = |bi: usize| -> Option<usize> {
            (bi * nc..(bi + 1) * nc).max_by(|&i, &j| rates[i].total_cmp(&rates[j]).then(j.cmp(&i)))
        };
        let trigger_json = |t: usize, tr: &Triggers| {
            let c = &cands[t % nc];
            json!({
                "bound": bounds[t / nc],
                "layer": site.node,
                "channel": c.channel,
                "label": c.label,
                "reasr": rates[t],
                "mask_pixels": tr.pixels[t],
                "reached_success": tr.reached[t],
                "steps": tr.steps_run[t],
            })
        };
        let mut by_bound = Vec::new();
        let mut verdict_best = None;
        for (bi, &b) in bounds.iter().enumerate() {
            let best = best_at(bi);
            let entry = match (best, &tr) {
                (Some(t), Some(tr)) => json!({"bound": b, "max_reasr": rates[t], "best": trigger_json(t, tr)}),
                _ => json!({"bound": b, "max_reasr": 0.0, "best": null}),
            };
            if (b - p.bound).abs() < 1e-12 {
                verdict_best = best;
            }
            by_bound.push(entry);
        }
        let vb = bounds.iter().position(|&b| (b - p.bound).abs() < 1e-12).unwrap_or(0);
        let score = verdict_best.map(|t| rates[t]).unwrap_or(0.0);
        let mut targets: Vec<i64> = (vb * nc..(vb + 1) * nc)
            .filter(|&t| rates.get(t).is_some_and(|&r| r >= p.threshold))
            .map(|t| cands[t % nc].label)
            .collect();
        targets.sort_unstable();
        targets.dedup();
        let backdoored = !targets.is_empty();
        let mut images = Vec::new();
        if let (Some(t), Some(tr)) = (verdict_best, &tr) {
            let c = &cands[t % nc];
            let m = tr.mask.get(t as i64);
            let what = format!(
                "label {} ({} channel {}, bound {}%, REASR {:.3})",
                c.label,
                site.node,
                c.channel,
                p.bound * 100.0,
                rates[t]
            );
            images.push(report_image(format!("{what}: mask"), &m)?);
            images.push(report_image(
                format!("{what}: trigger (pattern x mask)"),
                &(&tr.pattern.get(t as i64) * &m),
            )?);
        }
        let per_bound_text: Vec<String> = by_bound
            .iter()
            .map(|e| {
                format!(
                    "{:.0}%: {:.3}",
                    e["bound"].as_f64().unwrap_or(0.0) * 100.0,
                    e["max_reasr"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        let summary = if cands.is_empty() {
            format!(
                "no neuron of `{}` lifted one label on {:.0}% of {} images: REASR 0, not flagged",
                site.node,
                AGREEMENT * 100.0,
                stim.images
            )
        } else {
            format!(
                "max REASR at {}% {:.3} (threshold {}; {} candidate neurons of `{}`; by bound {}): {}",
                p.bound * 100.0,
                score,
                p.threshold,
                nc,
                site.node,
                per_bound_text.join(", "),
                if backdoored {
                    format!("flagged label(s) {targets:?}")
                } else {
                    "not flagged".to_string()
                }
            )
        };
        call.host.info(&summary);
        let triggers: Vec<Value> = match &tr {
            Some(tr) => (0..rates.len()).map(|t| trigger_json(t, tr)).collect(),
            None => vec![],
        };
        let candidates: Vec<Value> = cands
            .iter()
            .map(|c| json!({"layer": site.node, "channel": c.channel, "label": c.label, "stimulation_margin": c.score, "images_agreeing": c.agree}))
            .collect();
        Ok(Verdict {
            backdoored,
            target_classes: targets,
            suspicious: vec![],
            details: json!({
                "detector": "abs",
                "level": "model",
                "device": format!("{device:?}").to_lowercase(),
                "score_name": "reasr",
                "score": score,
                "threshold": p.threshold,
                "bound": p.bound,
                "reasr_by_bound": by_bound,
                "layer": site.node,
                "layer_value": site.value_name,
                "stimulation": {
                    "images": stim.images,
                    "neurons": stim.neurons,
                    "max_activation": stim.max_activation,
                    "values": stim.values,
                    "neurons_passing": stim.passing,
                    "edited_batch_only": site.cut,
                },
                "candidates": candidates,
                "triggers": triggers,
                "images": images,
                "clean_images": data.len(),
                "steps": p.steps,
                "batch_size": p.batch_size.min(data.len()),
                "summary": summary,
                "seconds": started.elapsed().as_secs_f64(),
            }),
        })
    }
}

audit_sdk::export_plugin!(detector: Abs);

#[cfg(test)]
mod tests;
