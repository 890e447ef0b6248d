//! Fine-Pruning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
//! Deep Neural Networks", RAID 2018) as an `audit` defense plugin, with BackdoorBench's defaults.
//!
//! 1. Rank: one eval-mode pass over the clean subset the host lends (`AUDIT_CAP_NEEDS_CLEAN_DATA`)
//!    measures each channel's mean activation (spatial mean, then mean over the samples).
//!    - `layer=last-conv` (default): the channels of the last Conv layer that still feeds another
//!      layer (a final 1x1 conv that produces the logits, as in NiN, is skipped). With
//!      `activation=post` (default) they are ranked on the output of the activation that follows
//!      the conv (through BatchNormalization/Identity/Dropout), i.e. post-ReLU as BackdoorBench
//!      and the paper do; when no activation follows directly (a residual `Add` comes first) the
//!      last value reached (the BN output) is used and the report says `pre-activation`.
//!      `activation=pre` ranks on the conv's own output.
//!    - `layer=penultimate`: the features entering the final linear layer (Gemm/MatMul), as
//!      BackdoorBench v2's `fp.py` hooks them; pruning masks the final layer's input columns.
//! 2. Prune: the least active channels, `ceil(step * C)` more per step (BackdoorBench's
//!    `once_prune_ratio`, 1%), while the clean accuracy on the clean subset either does not fall
//!    or falls by a relative amount under `acc_budget` (BackdoorBench's `acc_ratio`, 10%). The
//!    first step that breaks the budget stops the search and is undone: the model keeps the last
//!    count that met it (BackdoorBench keeps the breaking one through an aliasing slip, and prunes
//!    `num_pruned - 1` channels; here exactly the reported count is pruned). At least one channel
//!    always remains. A conv channel is pruned by zeroing its filter and bias, its
//!    BatchNormalization scale and shift and the matching input slice of the next layer
//!    (`Model::neuron_slices`); a penultimate feature by zeroing its column of the final layer.
//! 3. Fine-tune on the clean subset (SGD momentum 0.9, lr 0.01, weight decay 5e-4, cosine schedule,
//!    10 epochs) with masks that keep every pruned block at exactly zero after each step.
//!
//! The report gives the ranking, every pruning step with its clean accuracy and whether it met the
//! budget, the pruned channels, the fine-tuning epochs, and the clean accuracy before, after
//! pruning and after fine-tuning. Those accuracies are on the clean subset, which is also the
//! pruning and fine-tuning data: the host's own evaluation on the rest of the test split is the one
//! to quote.

use std::collections::HashSet;

use audit_nn::neurons::{Layer, LayerKind, Slice};
use audit_nn::train::{self, DeviceData, Preprocess, Trainer};
use audit_nn::{tch, Model};
use audit_plugin_common::{
    check_fit, device, device_data, export_hardened, fine_tune_schema, load_model, nn_err, require_clean, train_epochs,
    FineTune,
};
use audit_sdk::{abi, Call, DatasetRef, Defense, Error, Hardened, Plugin, PluginInfo, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{
"layer":{"type":"string","default":"last-conv","enum":["last-conv","penultimate"],"description":"what is pruned: the channels of the last conv layer (Liu et al.), or the features entering the final linear layer (BackdoorBench v2; also for models without convs)"},
"activation":{"type":"string","default":"post","enum":["post","pre"],"description":"last-conv: rank channels on the output of the activation that follows the conv (post-ReLU, as BackdoorBench) or on the conv's own output"},
"step":{"type":"number","default":0.01,"minimum":0.0001,"maximum":1,"description":"share of the layer's channels pruned per step (ceil(step * channels), at least 1)"},
"acc_budget":{"type":"number","default":0.1,"minimum":0,"maximum":1,"description":"pruning continues while the clean accuracy's relative drop from the unpruned model stays under this"},
"#,
    fine_tune_schema!(),
    r#",
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the defense (added to the host's seed)"}}}"#
);

/// `layer`: what is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum LayerChoice {
    /// The channels of the last conv layer that feeds another layer (Liu et al.).
    LastConv,
    /// The features entering the final linear layer (BackdoorBench v2).
    Penultimate,
}

/// `activation`: where `last-conv` channels are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Activation {
    /// After the activation that follows the conv.
    Post,
    /// On the conv's own output.
    Pre,
}

/// Parameters (see the schema for meaning), but for the fine-tuning block: a [`FineTune`],
/// parsed from the same object.
#[derive(Debug, Clone, Deserialize)]
struct Params {
    layer: LayerChoice,
    activation: Activation,
    step: f64,
    acc_budget: f64,
    seed: u64,
}

/// The plugin.
#[derive(Debug, Default)]
pub struct FinePruning;

impl Plugin for FinePruning {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "fine-pruning",
            version: env!("CARGO_PKG_VERSION"),
            description: "Fine-Pruning (RAID 2018): prune the last conv layer's dormant channels within a clean-accuracy budget, then fine-tune",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_CLEAN_DATA | abi::AUDIT_CAP_NEEDS_MODEL,
        }
    }
}

/// One step of the pruning search.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Channels pruned at this step (cumulative).
    pub pruned: usize,
    /// Clean accuracy with them pruned.
    pub accuracy: f64,
    /// Whether the accuracy met the budget.
    pub accepted: bool,
}

/// Whether `accuracy` meets the budget: not below `base`, or a relative drop under `budget`.
pub fn within_budget(base: f64, accuracy: f64, budget: f64) -> bool {
    accuracy >= base || (base > 0.0 && (base - accuracy) / base < budget)
}

/// Channels pruned per step: `ceil(step * channels)` (BackdoorBench), at least 1.
pub fn step_size(channels: usize, step: f64) -> usize {
    // The small epsilon keeps 0.01 * 300 = 3.0000000000000004 at 3.
    ((step * channels as f64 - 1e-9).ceil() as usize).max(1)
}

/// The pruning search: tries `k = step, 2 step, ...` (while `k < channels`) pruned channels,
/// `eval(k)` giving the clean accuracy, and stops at the first `k` that breaks the budget relative
/// to `base`. Returns the largest accepted `k` (0 when the first step already breaks it) and every
/// step tried.
pub fn search(
    channels: usize,
    step: usize,
    base: f64,
    budget: f64,
    mut eval: impl FnMut(usize) -> Result<f64>,
) -> Result<(usize, Vec<Step>)> {
    let mut kept = 0;
    let mut steps = Vec::new();
    let mut k = step.max(1);
    while k < channels {
        let accuracy = eval(k)?;
        let accepted = within_budget(base, accuracy, budget);
        steps.push(Step {
            pruned: k,
            accuracy,
            accepted,
        });
        if !accepted {
            break;
        }
        kept = k;
        k += step.max(1);
    }
    Ok((kept, steps))
}

/// What is pruned and where it is measured.
struct Target {
    /// `last-conv` or `penultimate`.
    mode: &'static str,
    /// The node whose channels are pruned (the conv, or the final linear layer for penultimate).
    node: String,
    op_type: String,
    /// The value whose per-channel means rank the channels, as a layer to tap.
    tap: Layer,
    ranked_on: &'static str,
    /// The parameter blocks of each channel.
    slices: Vec<Vec<Slice>>,
    /// Notes for the report (a skipped classifier conv, ...).
    notes: Vec<String>,
}

/// Chooses the layer to prune and precomputes every channel's parameter blocks.
fn target(model: &Model, p: &Params, sample: &Tensor) -> Result<Target> {
    let layers = model.layers();
    let graph = model.graph();
    let shapes = model.value_shapes(sample).map_err(nn_err)?;
    let mut notes = Vec::new();
    if p.layer == LayerChoice::Penultimate {
        let out = layers.iter().rev().find(|l| l.is_output).ok_or_else(|| {
            Error::invalid("layer=penultimate: the model has no final linear layer (Gemm or MatMul with a weight)")
        })?;
        let id = graph
            .node(out.node_id)
            .input(0)
            .ok_or_else(|| Error::failed(format!("the final layer {} has no input", out.node)))?;
        let input = graph.value_name(id).to_string();
        let shape = shapes.get(&id).cloned().unwrap_or_default();
        if shape.len() != 2 {
            return Err(Error::invalid(format!(
                "layer=penultimate: the final layer's input `{input}` has shape {shape:?}; expected [batch, features]"
            )));
        }
        let features = shape[1];
        // The weight's input dimension.
        let dim = match out.kind {
            LayerKind::Gemm { trans_b: true } => 1,
            LayerKind::Gemm { trans_b: false } | LayerKind::MatMul => 0,
            LayerKind::Conv => {
                return Err(Error::invalid(format!(
                    "layer=penultimate: the final layer `{}` is a Conv, not a linear layer (Gemm or MatMul); use layer=last-conv",
                    out.node
                )))
            }
        };
        let wshape = model.params[out.weight].tensor.size();
        if wshape.get(dim) != Some(&features) {
            return Err(Error::invalid(format!(
                "layer=penultimate: the final layer's weight {wshape:?} does not take {features} features"
            )));
        }
        let slices = (0..features)
            .map(|c| {
                vec![Slice {
                    param: out.weight,
                    ranges: vec![(dim as i64, c, c + 1)],
                }]
            })
            .collect();
        let mut tap = out.clone();
        tap.value = id;
        tap.value_name = input;
        tap.channels = features;
        return Ok(Target {
            mode: "penultimate",
            node: out.node.clone(),
            op_type: out.op_type.clone(),
            tap,
            ranked_on: "final-linear-input",
            slices,
            notes,
        });
    }

    let layer_nodes: HashSet<usize> = layers.iter().map(|l| l.node_id).collect();
    let convs: Vec<&Layer> = layers.iter().filter(|l| l.op_type == "Conv").collect();
    let Some(&last) = convs.last() else {
        return Err(Error::invalid(
            "the model has no Conv layer to prune; use --param layer=penultimate to prune the features entering the final linear layer",
        ));
    };
    let conv = match convs.iter().rev().find(|l| graph.reaches(l.value, &layer_nodes)) {
        Some(&c) => {
            if c.node != last.node {
                notes.push(format!(
                    "the last conv `{}` produces the logits (no layer follows it); pruning `{}` instead",
                    last.node, c.node
                ));
            }
            c
        }
        None => {
            return Err(Error::invalid(format!(
                "the only conv layers feed the output directly (last: `{}`); use --param layer=penultimate",
                last.node
            )))
        }
    };
    let (tap_value, post) = if p.activation == Activation::Post {
        graph.activation_after(conv.value)
    } else {
        (conv.value, false)
    };
    let tap_name = graph.value_name(tap_value).to_string();
    if p.activation == Activation::Post && !post {
        notes.push(format!(
            "no activation follows `{}` directly; channels ranked on `{tap_name}` (pre-activation)",
            conv.node
        ));
    }
    let mut tap = conv.clone();
    tap.value = tap_value;
    tap.value_name = tap_name;
    let slices = (0..conv.channels)
        .map(|c| model.neuron_slices(conv, c, &shapes).map_err(nn_err))
        .collect::<Result<Vec<_>>>()?;
    Ok(Target {
        mode: "last-conv",
        node: conv.node.clone(),
        op_type: conv.op_type.clone(),
        tap,
        ranked_on: if post { "post-activation" } else { "pre-activation" },
        slices,
        notes,
    })
}

/// Channel indices sorted by ascending mean activation (ties by index).
pub fn rank(means: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..means.len()).collect();
    order.sort_by(|&a, &b| means[a].total_cmp(&means[b]).then(a.cmp(&b)));
    order
}

/// Copies of parameters, to undo a pruning step.
struct Snapshot(Vec<(usize, Tensor)>);

impl Snapshot {
    fn take(model: &Model, slices: &[Vec<Slice>]) -> Snapshot {
        let params: std::collections::BTreeSet<usize> = slices.iter().flatten().map(|s| s.param).collect();
        Snapshot(
            params
                .into_iter()
                .map(|i| (i, model.params[i].tensor.detach().copy()))
                .collect(),
        )
    }

    fn restore(&self, model: &Model) {
        tch::no_grad(|| {
            for (i, t) in &self.0 {
                model.params[*i].tensor.shallow_clone().copy_(t);
            }
        });
    }
}

/// Largest absolute value left in the given blocks (0 when they are all exactly zero).
fn max_abs(model: &Model, slices: &[Slice]) -> f64 {
    slices
        .iter()
        .map(|s| {
            let mut t = model.params[s.param].tensor.detach();
            for &(dim, a, b) in &s.ranges {
                t = t.narrow(dim, a, b - a);
            }
            t.abs().max().to_kind(Kind::Double).double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Mean activation per channel of `tap` over `data` (eval mode).
fn mean_activations(
    call: &Call<'_>,
    model: &Model,
    data: &DeviceData,
    pre: &Preprocess,
    tap: &Layer,
) -> Result<Vec<f64>> {
    let host = call.host;
    let acts = model
        .collect_activations(data, pre, std::slice::from_ref(tap), 512, &mut |d, t| {
            host.progress("ranking", d, t)
        })
        .map_err(nn_err)?;
    let means = acts.channel_mean[0].mean_dim([0i64].as_slice(), false, Kind::Double);
    Vec::<f64>::try_from(means.to_device(Device::Cpu)).map_err(|e| Error::failed(e.to_string()))
}

impl Defense for FinePruning {
    fn defend(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        _train: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened> {
        let p: Params = call.params.parse()?;
        let tune: FineTune = call.params.parse()?;
        if !(p.step > 0.0 && p.step <= 1.0) {
            return Err(Error::invalid(format!("parameter `step`: {} is not in (0, 1]", p.step)));
        }
        let clean = require_clean("fine-pruning", clean)?;
        let device = device(call)?;
        let seed = call.seed.wrapping_add(p.seed);
        let (model, pre) = load_model(model_bytes, device, false)?;
        let data = device_data(clean, device)?;
        let classes = check_fit(&model, &data, &pre, "the clean subset")?;
        let host = call.host;

        // 1. Rank.
        let target = target(&model, &p, &pre.apply(&data.x.narrow(0, 0, 1)))?;
        for n in &target.notes {
            host.warn(n);
        }
        let channels = target.slices.len();
        host.check_cancelled()?;
        let means = mean_activations(call, &model, &data, &pre, &target.tap)?;
        if means.len() != channels {
            return Err(Error::failed(format!(
                "measured {} channels at `{}` but `{}` has {channels}",
                means.len(),
                target.tap.value_name,
                target.node
            )));
        }
        let order = rank(&means);

        // 2. Prune while the clean accuracy stays within the budget.
        let base = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!(
            "clean accuracy before pruning: {base:.4}; pruning `{}` ({channels} channels, ranked on `{}`)",
            target.node, target.tap.value_name
        ));
        let per_step = step_size(channels, p.step);
        let snapshot = Snapshot::take(&model, &target.slices);
        let mut applied = 0;
        let (kept, steps) = search(channels, per_step, base, p.acc_budget, |k| {
            host.check_cancelled()?;
            let fresh: Vec<Slice> = order[applied..k]
                .iter()
                .flat_map(|&c| target.slices[c].iter().cloned())
                .collect();
            model.zero_slices(&fresh);
            applied = k;
            let acc = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
            host.progress("pruning", k as u64, channels as u64);
            host.info(&format!(
                "pruned {k}/{channels} ({:.1}%): clean accuracy {acc:.4}",
                100.0 * k as f64 / channels as f64
            ));
            Ok(acc)
        })?;
        let pruned: Vec<usize> = order[..kept].to_vec();
        let pruned_slices: Vec<Slice> = pruned.iter().flat_map(|&c| target.slices[c].iter().cloned()).collect();
        if applied != kept {
            // The last step broke the budget: back to the last count that met it.
            snapshot.restore(&model);
            model.zero_slices(&pruned_slices);
        }
        drop(snapshot);
        let acc_pruned = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!(
            "kept {kept}/{channels} pruned ({:.1}%): clean accuracy {acc_pruned:.4}",
            100.0 * kept as f64 / channels.max(1) as f64
        ));

        // 3. Fine-tune with the pruned blocks held at zero.
        let mut trainer = Trainer::new(&model, tune.config(seed)).map_err(nn_err)?;
        for (param, mask) in model.masks_for(&pruned_slices) {
            trainer.add_mask(param, mask);
        }
        let epochs = train_epochs(call, &model, &mut trainer, &data, &pre, tune.epochs)?;
        let after = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        let residue = max_abs(&model, &pruned_slices);
        if residue != 0.0 {
            return Err(Error::failed(format!(
                "pruned weights regrew during fine-tuning (max |w| = {residue:e})"
            )));
        }
        host.info(&format!("clean accuracy after fine-tuning: {after:.4}"));

        let out = export_hardened(&model, "fine-pruning", call)?;
        let steps: Vec<Value> = steps
            .iter()
            .map(|s| {
                json!({
                    "pruned": s.pruned,
                    "ratio": s.pruned as f64 / channels as f64,
                    "clean_accuracy": s.accuracy,
                    "accepted": s.accepted,
                })
            })
            .collect();
        Ok(Hardened {
            model: out,
            dropped: vec![],
            report: json!({
                "defense": "fine-pruning",
                "device": format!("{device:?}").to_lowercase(),
                "n_clean": data.len(),
                "classes": classes,
                "layer": {
                    "mode": target.mode,
                    "node": target.node,
                    "op_type": target.op_type,
                    "channels": channels,
                    "ranked_value": target.tap.value_name,
                    "ranked_on": target.ranked_on,
                },
                "notes": target.notes,
                "ranking": order,
                "mean_activation": means,
                "step_channels": per_step,
                "acc_budget": p.acc_budget,
                "steps": steps,
                "pruned_channels": pruned,
                "n_pruned": kept,
                "prune_ratio": kept as f64 / channels as f64,
                "clean_accuracy_before": base,
                "clean_accuracy_pruned": acc_pruned,
                "clean_accuracy_after": after,
                "accuracy_measured_on": "the clean subset (also the ranking, pruning and fine-tuning data)",
                "fine_tune": tune.report(),
                "epochs": epochs,
                "pruned_weights_max_abs": residue,
            }),
        })
    }
}

audit_sdk::export_plugin!(defense: FinePruning);

#[cfg(test)]
mod tests;
