//! NAD, Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention
//! Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021), as an `audit`
//! defense plugin.
//!
//! 1. Teacher: a copy of the given (possibly backdoored) model fine-tuned with cross-entropy on
//!    the clean subset the host lends (`AUDIT_CAP_NEEDS_CLEAN_DATA`: the last `--clean-size` test
//!    images, left out of the evaluation) for `teacher_epochs` epochs (SGD).
//! 2. Student: the given model trained on the same subset with
//!    `CE + sum_l beta_l * AT_loss_l`, where for a feature map `f` `[N, C, H, W]`
//!    `AT(f) = a / (||a||_2 + 1e-6)` with `a = sum_c |f_c|^p` flattened per sample, and
//!    `AT_loss = mean((AT(student) - AT(teacher))^2)` over samples and positions, the teacher frozen
//!    (eval mode, no gradient) and fed the same batch. This is the attention map of NAD's `at.py`
//!    (and BackdoorBench's copy): a sum over channels; a mean would differ only through the `eps`.
//!
//! Layers: by default the last three Conv layers, each taken after the activation that follows it
//! (through BatchNormalization/Identity/Dropout; the conv's own output when a residual `Add` or
//! anything else comes first), skipping a conv that produces the logits and any whose map is 1x1
//! (its attention map is constant). NAD distils the outputs of WRN-16-1's three groups with betas
//! 500, 1000, 1000; a model with fewer convs uses as many as it has, with the last betas. `layers`
//! names the feature maps instead (ONNX value names).
//!
//! Defaults are those of NAD's own code (`config.py`, `main.py`, `utils/util.py`), checked against
//! BackdoorBench's `defense/nad.py` and `config/defense/nad/config.yaml`: 10 teacher epochs
//! (BackdoorBench `te_epochs`; NAD's README: 5-10, "setting all beta = 0" in `main.py`, i.e. the
//! same optimiser), 20 NAD epochs, SGD with momentum 0.9 and Nesterov, lr 0.1 for two epochs then
//! 0.01 (`schedule=nad`: a tenth after two epochs), weight decay 1e-4, batch 64, p = 2, betas
//! 500/1000/1000. BackdoorBench's variant is `lr=0.01 teacher_lr=0.01 schedule=constant
//! weight_decay=0.0005 nesterov=false batch_size=256 epochs=10`: its `adjust_learning_rate` keeps
//! the student at its lr (0.01), the teacher's cosine runs with T_max 100 over 10 epochs (within
//! 2.5% of constant), its optimiser reads `wd` (5e-4) and never the yaml's `weight_decay: 1e-4`,
//! and it trains the student for `te_epochs`, not `epochs`. On its PreAct-ResNet18 its three taps
//! are layer3, layer4 and the 1x1 average pool (whose attention term is constant).
//!
//! The report gives the layers and betas, every teacher and NAD epoch (the NAD loss split into its
//! cross-entropy and attention parts, the latter also per layer), the attention loss between
//! student and teacher in eval mode before and after distillation, and the clean accuracy before,
//! after the teacher's fine-tuning (the teacher's) and after NAD, all on the clean subset, which is
//! also the training data: the host's own evaluation on the rest of the test split is the one to
//! quote.

use std::collections::HashSet;

use audit_nn::train::{self, Augment, DeviceData, Optimizer, Preprocess, Schedule, TrainConfig, Trainer};
use audit_nn::{tch, Mode, Model};
use audit_plugin_common::{
    check_fit, device, device_data, export_hardened, load_model, nn_err, require_clean, run_epochs, EpochNotes,
};
use audit_sdk::{abi, Call, DatasetRef, Defense, Error, Hardened, Plugin, PluginInfo, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"teacher_epochs":{"type":"integer","default":10,"minimum":0,"maximum":10000,"description":"epochs of plain fine-tuning (cross-entropy) that turn a copy of the model into the teacher (BackdoorBench te_epochs 10; NAD: 5-10)"},
"epochs":{"type":"integer","default":20,"minimum":0,"maximum":10000,"description":"attention-distillation epochs of the student (NAD's code 20; BackdoorBench runs te_epochs, 10)"},
"lr":{"type":"number","default":0.1,"minimum":0,"description":"student learning rate (NAD's code 0.1, a tenth after 2 epochs with schedule=nad; BackdoorBench 0.01 constant)"},
"teacher_lr":{"type":"number","default":0.1,"minimum":0,"description":"teacher fine-tuning learning rate (NAD: main.py with beta = 0, so as the student; BackdoorBench 0.01)"},
"batch_size":{"type":"integer","default":64,"minimum":1,"description":"batch size of both phases (NAD 64; BackdoorBench 256)"},
"weight_decay":{"type":"number","default":0.0001,"minimum":0,"description":"L2 weight decay of both phases (NAD's code 1e-4; BackdoorBench's optimiser 5e-4)"},
"momentum":{"type":"number","default":0.9,"minimum":0,"maximum":1,"description":"SGD momentum of both phases"},
"nesterov":{"type":"boolean","default":true,"description":"Nesterov momentum (NAD's code; BackdoorBench: false)"},
"schedule":{"type":"string","default":"nad","enum":["nad","constant","cosine"],"description":"learning-rate schedule of both phases: nad (NAD's code: the base rate for 2 epochs, then a tenth), constant (BackdoorBench's NAD) or cosine annealing to 0"},
"p":{"type":"number","default":2.0,"minimum":0.5,"maximum":8,"description":"power of the attention map: sum over channels of |f|^p, L2-normalised per sample"},
"betas":{"type":"string","default":"500,1000,1000","description":"attention-loss weight of each layer, comma separated, shallow to deep: one per layer, or one for all; with the default layers and fewer than 3 convs the last ones are used (NAD: 500,1000,1000)"},
"layers":{"type":"string","default":"","description":"comma-separated ONNX value names of [N,C,H,W] feature maps to distil; empty: the last three Conv layers, each after the activation that follows it"},
"augment":{"type":"boolean","default":false,"description":"random crop (padding 4) and horizontal flip in both phases (CIFAR-style data; NAD uses it on CIFAR-10)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the defense (added to the host's seed)"}}}"#;

/// Layers distilled by default (NAD: the three groups of a WRN).
const DEFAULT_LAYERS: usize = 3;
/// NAD's `eps` in the attention map's normalisation.
const EPS: f64 = 1e-6;
/// `schedule` of both phases (serialized as the schema spells it, for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum LrSchedule {
    /// NAD's code: the base rate for two epochs, then a tenth.
    Nad,
    /// The base rate throughout (BackdoorBench's NAD).
    Constant,
    /// Cosine annealing to 0.
    Cosine,
}

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    teacher_epochs: usize,
    epochs: usize,
    lr: f64,
    teacher_lr: f64,
    batch_size: i64,
    weight_decay: f64,
    momentum: f64,
    nesterov: bool,
    schedule: LrSchedule,
    p: f64,
    betas: String,
    layers: String,
    augment: bool,
    seed: u64,
}

/// The plugin.
#[derive(Debug, Default)]
pub struct Nad;

impl Plugin for Nad {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "nad",
            version: env!("CARGO_PKG_VERSION"),
            description:
                "NAD (ICLR 2021): fine-tune a teacher on clean data, then distil its attention maps into the model",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_CLEAN_DATA | abi::AUDIT_CAP_NEEDS_MODEL,
        }
    }
}

/// NAD's attention map of a feature map `[N, C, ...]`: `sum_c |f|^p` flattened per sample and
/// divided by its L2 norm plus 1e-6. Returns `[N, H*W]`; an all-zero map stays zero.
pub fn attention_map(f: &Tensor, p: f64) -> Tensor {
    let n = f.size()[0];
    let a = if p == 2.0 {
        f.square()
    } else {
        f.abs().pow_tensor_scalar(p)
    };
    let a = a
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .reshape([n, -1]);
    // torch.norm, as NAD: its gradient is 0 (not NaN) at a zero vector (tested).
    let norm = a.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    a / (norm + EPS)
}

/// Per-sample attention loss `[N]`: the mean over positions of the squared difference of the two
/// attention maps (NAD's `F.mse_loss` is the mean of this over the batch).
pub fn attention_loss(student: &Tensor, teacher_map: &Tensor, p: f64) -> Tensor {
    (attention_map(student, p) - teacher_map)
        .square()
        .mean_dim([1i64].as_slice(), false, Kind::Float)
}

/// One distilled feature map.
#[derive(Debug, Clone)]
struct AtLayer {
    value: String,
    id: usize,
    /// The conv it follows (default selection).
    node: Option<String>,
    /// `post-activation`, `pre-activation` (default selection) or `given`.
    taken: &'static str,
    /// [C, H, W] of the map.
    shape: Vec<i64>,
    beta: f64,
}

/// Parses `betas`: finite non-negative numbers, comma separated.
fn parse_betas(s: &str) -> Result<Vec<f64>> {
    let betas = s
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| match b.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(Error::invalid(format!(
                "betas: `{b}` is not a non-negative number (expected a comma-separated list such as 500,1000,1000)"
            ))),
        })
        .collect::<Result<Vec<f64>>>()?;
    if betas.is_empty() {
        return Err(Error::invalid(
            "betas is empty: give one weight per layer, e.g. 500,1000,1000",
        ));
    }
    Ok(betas)
}

/// Matches betas to `k` layers: one each, one for all, or (default layers only) the last `k`.
fn assign_betas(betas: &[f64], k: usize, default_layers: bool, notes: &mut Vec<String>) -> Result<Vec<f64>> {
    if betas.len() == k {
        Ok(betas.to_vec())
    } else if betas.len() == 1 {
        Ok(vec![betas[0]; k])
    } else if default_layers && betas.len() > k {
        notes.push(format!(
            "the model has {k} usable conv layer(s); using the last {k} of the {} betas",
            betas.len()
        ));
        Ok(betas[betas.len() - k..].to_vec())
    } else {
        Err(Error::invalid(format!(
            "betas has {} values but {k} layer(s) are distilled: give one per layer or a single one",
            betas.len()
        )))
    }
}

/// The feature maps to distil, with their betas.
fn choose_layers(model: &Model, p: &Params, sample: &Tensor, notes: &mut Vec<String>) -> Result<Vec<AtLayer>> {
    let betas = parse_betas(&p.betas)?;
    let shapes = model.value_shapes(sample).map_err(nn_err)?;
    let given: Vec<&str> = p.layers.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let default_layers = given.is_empty();
    let mut chosen = Vec::new();
    if default_layers {
        let graph = model.graph();
        let mut convs = Vec::new();
        for l in model.layers().into_iter().filter(|l| l.op_type == "Conv") {
            if l.is_output {
                notes.push(format!("conv `{}` produces the logits; not distilled", l.node));
                continue;
            }
            let (id, post) = graph.activation_after(l.value);
            let value = graph.value_name(id).to_string();
            let shape = shapes.get(&id).cloned().unwrap_or_default();
            if shape.len() != 4 || shape[2] * shape[3] <= 1 {
                notes.push(format!(
                    "conv `{}`: its map `{value}` has shape {shape:?}, no spatial extent; not distilled",
                    l.node
                ));
                continue;
            }
            convs.push(AtLayer {
                value,
                id,
                node: Some(l.node.clone()),
                taken: if post { "post-activation" } else { "pre-activation" },
                shape: shape[1..].to_vec(),
                beta: 0.0,
            });
        }
        if convs.is_empty() {
            return Err(Error::invalid(
                "the model has no Conv layer with a spatial feature map to distil; name [N,C,H,W] feature maps with --param layers=NAME,...",
            ));
        }
        chosen = convs.split_off(convs.len().saturating_sub(DEFAULT_LAYERS));
    } else {
        let mut seen = HashSet::new();
        for name in given {
            if !seen.insert(name) {
                return Err(Error::invalid(format!("layers: `{name}` is listed twice")));
            }
            let id = model.value_id(name).ok_or_else(|| {
                Error::invalid(format!(
                    "layers: the model has no value named `{name}` (give ONNX value names, e.g. a Relu's output)"
                ))
            })?;
            let shape = shapes.get(&id).cloned().unwrap_or_default();
            if shape.len() != 4 {
                return Err(Error::invalid(format!(
                    "layers: `{name}` has shape {shape:?}; attention maps need an [N, C, H, W] feature map computed by the model"
                )));
            }
            if shape[2] * shape[3] <= 1 {
                notes.push(format!(
                    "`{name}` is 1x1: its attention map is constant and adds nothing"
                ));
            }
            chosen.push(AtLayer {
                value: name.to_string(),
                id,
                node: None,
                taken: "given",
                shape: shape[1..].to_vec(),
                beta: 0.0,
            });
        }
    }
    let betas = assign_betas(&betas, chosen.len(), default_layers, notes)?;
    for (l, b) in chosen.iter_mut().zip(betas) {
        l.beta = b;
    }
    Ok(chosen)
}

fn training_config(p: &Params, lr: f64, epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: p.batch_size,
        lr,
        weight_decay: p.weight_decay,
        optimizer: Optimizer::Sgd {
            momentum: p.momentum,
            nesterov: p.nesterov,
        },
        schedule: match p.schedule {
            LrSchedule::Cosine => Schedule::Cosine { min_lr: 0.0 },
            // `nad` is applied by hand (set_lr after two epochs).
            LrSchedule::Nad | LrSchedule::Constant => Schedule::Constant,
        },
        freeze_bn: false,
        augment: Augment::crop_flip(p.augment),
        seed,
        group_lr: vec![],
    }
}

/// The learning rate of epoch `e` (0-based) of `epochs`, as the trainer applies it.
fn lr_at(schedule: LrSchedule, base: f64, e: usize, epochs: usize) -> f64 {
    match schedule {
        LrSchedule::Cosine => 0.5 * base * (1.0 + (std::f64::consts::PI * e as f64 / epochs.max(1) as f64).cos()),
        LrSchedule::Nad if e >= 2 => base / 10.0,
        LrSchedule::Nad | LrSchedule::Constant => base,
    }
}

/// Sets the `nad` schedule's rate before epoch `e`.
fn apply_schedule(trainer: &mut Trainer, schedule: LrSchedule, base: f64, e: usize) -> Result<()> {
    if schedule == LrSchedule::Nad {
        trainer.set_lr(lr_at(schedule, base, e, 0)).map_err(nn_err)?;
    }
    Ok(())
}

/// Fine-tunes the teacher with cross-entropy; one report entry per epoch.
fn train_teacher(
    call: &Call<'_>,
    teacher: &Model,
    p: &Params,
    data: &DeviceData,
    pre: &Preprocess,
    seed: u64,
) -> Result<Vec<Value>> {
    let n = p.teacher_epochs;
    let mut trainer = Trainer::new(teacher, training_config(p, p.teacher_lr, n, seed)).map_err(nn_err)?;
    run_epochs(call, "teacher", n, |e, hooks| {
        apply_schedule(&mut trainer, p.schedule, p.teacher_lr, e)?;
        let stats = trainer.epoch(teacher, data, pre, hooks).map_err(nn_err)?;
        Ok((
            stats,
            EpochNotes::fields(json!({ "lr": lr_at(p.schedule, p.teacher_lr, e, n) })),
        ))
    })
}

/// The teacher's attention maps of a batch (eval mode, no gradient).
fn teacher_maps(teacher: &Model, x: &Tensor, ids: &[usize], p: f64) -> audit_nn::Result<Vec<Tensor>> {
    tch::no_grad(|| {
        let (_, taps) = teacher.forward_with_taps(&[x], Mode::Eval, ids)?;
        Ok(taps.iter().map(|t| attention_map(t, p)).collect())
    })
}

/// Beta-weighted attention loss per layer between student and teacher over `data`, both in eval
/// mode (mean over samples).
fn attention_gap(
    student: &Model,
    teacher: &Model,
    data: &DeviceData,
    pre: &Preprocess,
    layers: &[AtLayer],
    p: f64,
) -> Result<Vec<f64>> {
    let ids: Vec<usize> = layers.iter().map(|l| l.id).collect();
    let betas = Tensor::from_slice(&layers.iter().map(|l| l.beta).collect::<Vec<f64>>()).to_device(student.device);
    let n = data.len();
    let mut sum = Tensor::zeros([layers.len() as i64], (Kind::Double, student.device));
    tch::no_grad(|| -> Result<()> {
        let mut s = 0;
        while s < n {
            let k = (n - s).min(512);
            let x = pre.apply(&data.x.narrow(0, s, k));
            let t = teacher_maps(teacher, &x, &ids, p).map_err(nn_err)?;
            let (_, taps) = student.forward_with_taps(&[&x], Mode::Eval, &ids).map_err(nn_err)?;
            let batch: Vec<Tensor> = taps
                .iter()
                .zip(&t)
                .map(|(f, tm)| attention_loss(f, tm, p).sum(Kind::Double))
                .collect();
            sum += Tensor::stack(&batch, 0);
            s += k;
        }
        Ok(())
    })?;
    let per = (sum * betas / n as f64).to_device(tch::Device::Cpu);
    Vec::<f64>::try_from(per).map_err(|e| Error::failed(e.to_string()))
}

/// Trains the student with CE + the attention losses; one report entry per epoch.
fn distil(
    call: &Call<'_>,
    student: &Model,
    teacher: &Model,
    layers: &[AtLayer],
    p: &Params,
    data: &DeviceData,
    pre: &Preprocess,
) -> Result<Vec<Value>> {
    let n = p.epochs;
    let device = student.device;
    let ids: Vec<usize> = layers.iter().map(|l| l.id).collect();
    let betas: Vec<f64> = layers.iter().map(|l| l.beta).collect();
    let k = layers.len() as i64;
    // The student's own seed stream (the teacher used the defense's seed).
    let seed = call.seed.wrapping_add(p.seed).wrapping_add(1);
    let mut trainer = Trainer::new(student, training_config(p, p.lr, n, seed)).map_err(nn_err)?;
    run_epochs(call, "NAD", n, |e, hooks| {
        apply_schedule(&mut trainer, p.schedule, p.lr, e)?;
        let mut ce_sum = Tensor::zeros([], (Kind::Double, device));
        let mut at_sum = Tensor::zeros([k], (Kind::Double, device));
        let mut step = |x: &Tensor, y: &Tensor, mode: Mode| -> audit_nn::Result<(Tensor, Tensor)> {
            let t = teacher_maps(teacher, x, &ids, p.p)?;
            let (mut outs, taps) = student.forward_with_taps(&[x], mode, &ids)?;
            let logits = outs.swap_remove(0);
            let ce = train::cross_entropy(&logits, y);
            // [B, layers]: beta_l * AT_loss_l per sample.
            let at = Tensor::stack(
                &taps
                    .iter()
                    .zip(&t)
                    .zip(&betas)
                    .map(|((f, tm), &b)| attention_loss(f, tm, p.p) * b)
                    .collect::<Vec<_>>(),
                1,
            );
            tch::no_grad(|| {
                ce_sum += ce.detach().sum(Kind::Double);
                at_sum += at.detach().sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
            });
            let total = ce + at.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
            Ok((total, logits))
        };
        let s = trainer
            .epoch_custom(student, data, pre, &mut step, hooks)
            .map_err(nn_err)?;
        let samples = s.samples as f64;
        let ce = ce_sum.double_value(&[]) / samples;
        let per_layer = Vec::<f64>::try_from((at_sum / samples).to_device(tch::Device::Cpu))
            .map_err(|e| Error::failed(e.to_string()))?;
        let at: f64 = per_layer.iter().sum();
        let notes = EpochNotes {
            text: format!(" (CE {ce:.4}, attention {at:.4})"),
            ..EpochNotes::fields(json!({
                "lr": lr_at(p.schedule, p.lr, e, n),
                "ce_loss": ce,
                "attention_loss": at,
                "attention_loss_per_layer": per_layer,
            }))
        };
        Ok((s, notes))
    })
}

impl Defense for Nad {
    fn defend(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        _train: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened> {
        let p: Params = call.params.parse()?;
        if !(p.p.is_finite() && p.p > 0.0) {
            return Err(Error::invalid(format!(
                "parameter `p`: {} is not a positive number",
                p.p
            )));
        }
        let clean = require_clean("nad", clean)?;
        let device = device(call)?;
        let seed = call.seed.wrapping_add(p.seed);
        let (model, pre) = load_model(model_bytes, device, true)?;
        let data = device_data(clean, device)?;
        let classes = check_fit(&model, &data, &pre, "the clean subset")?;
        let host = call.host;

        let mut notes = Vec::new();
        let layers = choose_layers(&model, &p, &pre.apply(&data.x.narrow(0, 0, 1)), &mut notes)?;
        for n in &notes {
            host.info(n);
        }
        host.info(&format!(
            "distilling {}",
            layers
                .iter()
                .map(|l| format!("`{}` (beta {})", l.value, l.beta))
                .collect::<Vec<_>>()
                .join(", ")
        ));

        let before = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!(
            "clean accuracy before NAD: {before:.4} ({} clean samples)",
            data.len()
        ));
        // 1. The teacher: a fine-tuned copy, then frozen.
        let mut teacher = Model::load(model_bytes, None).map_err(nn_err)?;
        teacher.to_device(device);
        let teacher_log = train_teacher(call, &teacher, &p, &data, &pre, seed)?;
        teacher.set_trainable(false);
        let teacher_acc = train::accuracy(&teacher, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!("clean accuracy of the teacher: {teacher_acc:.4}"));

        // 2. The student: the model itself, distilled.
        let gap_before = attention_gap(&model, &teacher, &data, &pre, &layers, p.p)?;
        let nad_log = distil(call, &model, &teacher, &layers, &p, &data, &pre)?;
        let gap_after = attention_gap(&model, &teacher, &data, &pre, &layers, p.p)?;
        let after = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!("clean accuracy after NAD: {after:.4}"));

        let out = export_hardened(&model, "nad", call)?;
        Ok(Hardened {
            model: out,
            dropped: vec![],
            report: json!({
                "defense": "nad",
                "device": format!("{device:?}").to_lowercase(),
                "n_clean": data.len(),
                "classes": classes,
                "p": p.p,
                "layers": layers.iter().map(|l| json!({
                    "value": l.value,
                    "conv": l.node,
                    "taken": l.taken,
                    "channels": l.shape[0],
                    "shape": l.shape,
                    "beta": l.beta,
                })).collect::<Vec<_>>(),
                "notes": notes,
                "optimizer": if p.nesterov { "sgd-nesterov" } else { "sgd" },
                "schedule": p.schedule,
                "weight_decay": p.weight_decay,
                "momentum": p.momentum,
                "batch_size": p.batch_size,
                "teacher": {"lr": p.teacher_lr, "epochs": teacher_log},
                "nad": {"lr": p.lr, "epochs": nad_log},
                "attention_loss_eval_before": gap_before.iter().sum::<f64>(),
                "attention_loss_eval_after": gap_after.iter().sum::<f64>(),
                "attention_loss_eval_per_layer_before": gap_before,
                "attention_loss_eval_per_layer_after": gap_after,
                "clean_accuracy_before": before,
                "clean_accuracy_teacher": teacher_acc,
                "clean_accuracy_after": after,
                "accuracy_measured_on": "the clean subset (also the teacher's and the student's training data)",
            }),
        })
    }
}

audit_sdk::export_plugin!(defense: Nad);

#[cfg(test)]
mod tests;
