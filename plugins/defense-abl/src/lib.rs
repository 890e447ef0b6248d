//! ABL, Anti-Backdoor Learning (Li et al., "Anti-Backdoor Learning: Training Clean Models on
//! Poisoned Data", NeurIPS 2021), as an `audit` defense plugin.
//!
//! ABL trains on the possibly poisoned training set the host lends (`AUDIT_CAP_NEEDS_TRAINING_DATA`;
//! no trusted clean subset) in three phases:
//!
//! 1. **Isolation**: train (by default from a fresh initialisation of the given graph, as ABL trains
//!    from scratch) with a loss that keeps the batch loss near a floor `gamma`: LGA,
//!    `sign(L - gamma) * L`, or flooding, `|L - gamma| + gamma`, where `L` is the batch-mean
//!    cross-entropy as in ABL's reference code. Backdoor samples are learned much faster than clean
//!    ones, so once the loss hovers at the floor they sit far below it. Both variants have the same
//!    gradient (`sign(L - gamma) * dL`); they differ only in the value logged.
//! 2. **Isolate** the `isolation_ratio` share of training samples with the lowest cross-entropy,
//!    computed in eval mode over the whole training set in one batched pass on the device
//!    (`floor(n * ratio)` samples, as the reference's `int(len * ratio)`). Their indices are
//!    returned as `dropped` (the host scores them against the data's `poison_idx`).
//! 3. **Train on the rest** (the reference's "finetuning" of the isolation model on the other 99%),
//!    then **unlearn** the isolated samples by gradient ascent (minimise `-CE`) at a small learning
//!    rate, reusing the training optimiser (its momentum carries over, as in the reference).
//!
//! Defaults and where they come from (reference code: github.com/bboylyg/ABL, `config.py`,
//! `backdoor_isolation.py`, `backdoor_unlearning.py`; BackdoorBench: `config/defense/abl/*.yaml`):
//! - `gamma` 0.5 and `isolation_ratio` 0.01: the paper's setting (`T = 100`, `T_te = 20`, `gamma = 0.5`,
//!   `p = 1%`) and the reference code.
//! - `isolation_epochs` 20: the paper's turning epoch `T_te = 20` (also BackdoorBench's
//!   `tuning_epochs`); the reference `config.py` says 10.
//! - `train_epochs` 60: the reference's `finetuning_epochs` (and BackdoorBench's); with 20 isolation
//!   and BackdoorBench's 20 unlearning epochs this is the paper's `T = 100` epochs in total.
//! - `unlearning_epochs` 5: the reference `config.py` (its loop only evaluates in the first of the 5,
//!   so it ascends 4 epochs; here every epoch ascends). BackdoorBench uses 20.
//! - `lr` 0.1, SGD with Nesterov momentum 0.9, weight decay 1e-4: the reference code (both phases
//!   start at 0.1). Schedule `step`: the reference's `learning_rate_finetuning` keeps 0.1 for 40
//!   epochs, then 0.01 (then 0.001 from epoch 60, unreached at 60 epochs; here x0.1 every 40). The
//!   isolation phase keeps `lr` constant, as the reference does.
//! - `unlearning_lr` 0.0005: the reference's `lr_unlearning_init` (BackdoorBench uses 1e-4).
//! - `batch_size` 128: the reference `config.py` (its last change; the README's logs were made with
//!   64, BackdoorBench uses 256).
//! - `isolation_loss` lga: the paper's method (the reference `config.py` and BackdoorBench default
//!   to flooding, which has the same gradient, see above).
//! - `unlearning_stop_accuracy` -1 (off): ABL has no early stop. Gradient ascent runs away once it
//!   starts (the isolated loss grows slowly from a near-0 start, then explodes within a few steps
//!   and takes clean accuracy with it); this stops the phase after the first epoch that leaves the
//!   isolated samples' accuracy at or below the given value. A non-finite loss or weights end any
//!   phase with an error rather than exporting a broken model.
//! - `freeze_bn` false: the reference unlearns with `model.train()`, so BatchNormalization statistics
//!   follow the isolated batches. `augment` false: the reference augments (crop, flip, cutout) only
//!   while training on the rest, for CIFAR-10; here `augment` turns on crop (padding 4) and flip for
//!   that phase only (no cutout), off by default for digit/clothing data.
//!
//! The report gives every epoch of every phase (objective, cross-entropy, training accuracy,
//! seconds), the isolated set (size, loss threshold, label histogram: its majority label is the
//! suspected target class) and the accuracy in eval mode on the training rest and on the isolated
//! set before and after unlearning. That rest still holds any poisoned samples that were not
//! isolated, so the host's own before/after evaluation on the test split is the one to quote.
//!
//! Measured here (Fashion-MNIST, small CNN, BadNets 5%, 12,000 training images): isolation is exact
//! (precision 1.0, recall 0.2 at 1%), but by the time unlearning starts the isolated samples' loss
//! is about 1e-6, its gradient nearly 0, and ascent at ABL's rate leaves the backdoor in (ASR 0.997
//! with 5/5/5 epochs, 0.999 with the full defaults); the plugin warns when that happens. Only an
//! aggressive ascent with the early stop removed it (ASR 0.000) and it cost clean accuracy.

use std::cell::RefCell;

use audit_nn::train::{self, Augment, DeviceData, Optimizer, Preprocess, Schedule, TrainConfig, Trainer};
use audit_nn::{tch, Model};
use audit_plugin_common::{
    check_fit, device, device_data, export_hardened, load_model, nn_err, run_epochs, EpochNotes,
};
use audit_sdk::{abi, Call, DatasetRef, Defense, Error, Hardened, Plugin, PluginInfo, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"isolation_loss":{"type":"string","default":"lga","enum":["lga","flooding"],"description":"loss of the isolation phase on the batch-mean cross-entropy L: lga = sign(L - gamma) * L (the paper's local gradient ascent), flooding = |L - gamma| + gamma (same gradient)"},
"gamma":{"type":"number","default":0.5,"minimum":0,"description":"loss floor of the isolation phase (ABL: 0.5)"},
"isolation_epochs":{"type":"integer","default":20,"minimum":0,"maximum":10000,"description":"epochs of the isolation phase on the whole training set (the paper's turning epoch T_te = 20)"},
"isolation_ratio":{"type":"number","default":0.01,"minimum":0,"maximum":0.5,"description":"share of training samples with the lowest loss to isolate and unlearn (ABL: 1%); must pick at least one sample"},
"init":{"type":"string","default":"fresh","enum":["fresh","model"],"description":"fresh: re-initialise the weights and train from scratch (ABL); model: start from the given weights"},
"train_epochs":{"type":"integer","default":60,"minimum":0,"maximum":10000,"description":"epochs of training on the rest after isolation (ABL's finetuning_epochs 60; 20 + 60 + 20 = the paper's 100 epochs with BackdoorBench's 20 unlearning epochs)"},
"unlearning_epochs":{"type":"integer","default":5,"minimum":0,"maximum":10000,"description":"epochs of gradient ascent on the isolated samples (ABL's code: 5; BackdoorBench: 20)"},
"lr":{"type":"number","default":0.1,"minimum":0,"description":"SGD learning rate of the isolation phase (constant) and of the training on the rest (ABL: 0.1)"},
"lr_schedule":{"type":"string","default":"step","enum":["step","cosine","constant"],"description":"schedule of the training on the rest: step = x0.1 every 40 epochs (ABL's code), cosine annealing to 0 over train_epochs, or constant"},
"unlearning_lr":{"type":"number","default":0.0005,"minimum":0,"description":"constant learning rate of the unlearning phase (ABL: 0.0005)"},
"unlearning_stop_accuracy":{"type":"number","default":-1,"minimum":-1,"maximum":1,"description":"stop unlearning early once the isolated samples' accuracy on their given labels (eval mode, checked after every epoch) is at or below this; -1 never stops (ABL)"},
"momentum":{"type":"number","default":0.9,"minimum":0,"maximum":1,"description":"SGD momentum, Nesterov when above 0 (ABL: 0.9, Nesterov)"},
"weight_decay":{"type":"number","default":0.0001,"minimum":0,"description":"L2 weight decay (ABL: 1e-4)"},
"batch_size":{"type":"integer","default":128,"minimum":1,"description":"batch size of every phase (ABL's config.py: 128)"},
"augment":{"type":"boolean","default":false,"description":"random crop (padding 4) and horizontal flip while training on the rest (CIFAR-style data); isolation and unlearning never augment"},
"freeze_bn":{"type":"boolean","default":false,"description":"keep BatchNormalization running statistics fixed during unlearning (ABL's code unlearns in train mode: false)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the defense (added to the host's seed)"}}}"#;

/// `isolation_loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum IsolationLoss {
    /// `sign(L - gamma) * L`.
    Lga,
    /// `|L - gamma| + gamma`.
    Flooding,
}

/// `init`: where the isolation phase starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Init {
    /// Re-initialised weights (ABL trains from scratch).
    Fresh,
    /// The given weights.
    Model,
}

/// `lr_schedule` of the training on the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum LrSchedule {
    /// x0.1 every 40 epochs (ABL's code).
    Step,
    /// Cosine annealing to 0 over `train_epochs`.
    Cosine,
    /// The base rate throughout.
    Constant,
}

impl LrSchedule {
    fn schedule(self) -> Schedule {
        match self {
            LrSchedule::Step => Schedule::Step { every: 40, gamma: 0.1 },
            LrSchedule::Cosine => Schedule::Cosine { min_lr: 0.0 },
            LrSchedule::Constant => Schedule::Constant,
        }
    }
}

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    isolation_loss: IsolationLoss,
    gamma: f64,
    isolation_epochs: usize,
    isolation_ratio: f64,
    init: Init,
    train_epochs: usize,
    unlearning_epochs: usize,
    lr: f64,
    lr_schedule: LrSchedule,
    unlearning_lr: f64,
    unlearning_stop_accuracy: f64,
    momentum: f64,
    weight_decay: f64,
    batch_size: i64,
    augment: bool,
    freeze_bn: bool,
    seed: u64,
}

impl Params {
    fn check(&self) -> Result<()> {
        if !(self.isolation_ratio > 0.0 && self.isolation_ratio <= 0.5) {
            return Err(Error::invalid(format!(
                "parameter `isolation_ratio`: {} is not a share in (0, 0.5]",
                self.isolation_ratio
            )));
        }
        Ok(())
    }
}

/// The plugin.
#[derive(Debug, Default)]
pub struct Abl;

impl Plugin for Abl {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "abl",
            version: env!("CARGO_PKG_VERSION"),
            description: "ABL (anti-backdoor learning): isolate the lowest-loss 1% of the training set, train on the rest, unlearn the isolated samples",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_TRAINING_DATA | abi::AUDIT_CAP_NEEDS_MODEL,
        }
    }
}

/// The optimiser settings every phase shares; `epochs`, `schedule`, `augment` and `lr` per phase.
fn config(p: &Params, epochs: usize, lr: f64, schedule: Schedule, crop_flip: bool, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: p.batch_size,
        lr,
        weight_decay: p.weight_decay,
        optimizer: Optimizer::Sgd {
            momentum: p.momentum,
            // libtorch refuses Nesterov without momentum.
            nesterov: p.momentum > 0.0,
        },
        schedule,
        freeze_bn: false,
        augment: Augment::crop_flip(crop_flip),
        seed,
        group_lr: vec![],
    }
}

/// The per-sample loss of a phase, given per-sample cross-entropy and its batch mean.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Objective {
    /// `sign(L - gamma) * L` on the batch mean `L`.
    Lga(f64),
    /// `|L - gamma| + gamma` on the batch mean `L`.
    Flooding(f64),
    /// Cross-entropy.
    Descend,
    /// `-CE` (gradient ascent).
    Ascend,
}

impl Objective {
    /// Per-sample values whose mean is the objective on the batch (the trainer minimises the mean).
    /// LGA and flooding act on the batch mean as ABL's code does: the sign is that of the batch
    /// mean, detached, and broadcast over the samples.
    fn per_sample(self, ce: &Tensor) -> Tensor {
        match self {
            Objective::Lga(gamma) => {
                let s = (ce.mean(Kind::Float) - gamma).sign().detach();
                ce * s
            }
            Objective::Flooding(gamma) => {
                let s = (ce.mean(Kind::Float) - gamma).sign().detach();
                (ce - gamma) * s + gamma
            }
            Objective::Descend => ce.shallow_clone(),
            Objective::Ascend => -ce,
        }
    }
}

/// An early stop checked after every epoch: true ends the phase.
type StopFn<'a> = &'a dyn Fn() -> Result<bool>;

/// A phase of training: its name in progress and logs, its length, its objective and an optional
/// early stop.
struct Phase<'a> {
    name: &'a str,
    epochs: usize,
    objective: Objective,
    stop: Option<StopFn<'a>>,
}

/// Runs a phase on `data`, with progress (`"{name} epoch e/E"`), logs and cancellation from the
/// host (checked between epochs and between batches). One report entry per epoch: the
/// objective's mean, the mean cross-entropy, the training accuracy (train mode), seconds. A
/// non-finite loss (divergence) is an error.
fn run_phase(
    call: &Call<'_>,
    model: &Model,
    trainer: &mut Trainer,
    data: &DeviceData,
    pre: &Preprocess,
    phase: Phase<'_>,
) -> Result<Vec<Value>> {
    let Phase {
        name: phase,
        epochs,
        objective,
        stop,
    } = phase;
    run_epochs(call, phase, epochs, |_, hooks| {
        // Summed on the device; read once per epoch.
        let ce_sum = RefCell::new(Tensor::zeros([], (Kind::Double, data.x.device())));
        let loss = |logits: &Tensor, y: &Tensor| -> Tensor {
            let ce = train::cross_entropy(logits, y);
            let mut sum = ce_sum.borrow_mut();
            *sum += ce.detach().sum(Kind::Double);
            objective.per_sample(&ce)
        };
        let stats = trainer.epoch_with(model, data, pre, &loss, hooks).map_err(nn_err)?;
        let ce = ce_sum.borrow().double_value(&[]) / stats.samples.max(1) as f64;
        let stop = match &stop {
            Some(stop) if stats.loss.is_finite() && ce.is_finite() => stop()?,
            _ => false,
        };
        let notes = EpochNotes {
            text: format!(" (cross-entropy {ce:.4})"),
            stop,
            ..EpochNotes::fields(json!({ "cross_entropy": ce }))
        };
        Ok((stats, notes))
    })
}

/// What the isolation step found.
#[derive(Debug)]
struct Isolation {
    /// Training indices of the isolated samples, ascending.
    isolated: Tensor,
    /// Training indices of the rest, ascending.
    rest: Tensor,
    /// Largest cross-entropy among the isolated samples.
    threshold: f64,
    /// Mean cross-entropy of the isolated samples and of the whole set.
    isolated_mean: f64,
    all_mean: f64,
}

/// Per-sample cross-entropy in eval mode over `data` (batched, on the device), in double precision:
/// confidently fitted samples all have a float32 loss of exactly 0, and the ranking among them is
/// the point.
fn losses(model: &Model, data: &DeviceData, pre: &Preprocess) -> Result<Tensor> {
    let logits = train::predict(model, data, pre, 512).map_err(nn_err)?;
    Ok(logits
        .to_kind(Kind::Double)
        .log_softmax(-1, Kind::Double)
        .nll_loss_nd::<Tensor>(&data.y, None, tch::Reduction::None, -100))
}

/// The `k` samples of `data` with the lowest loss in eval mode.
fn isolate(model: &Model, data: &DeviceData, pre: &Preprocess, k: i64) -> Result<Isolation> {
    let n = data.len();
    let losses = losses(model, data, pre)?;
    // Stable: ties keep the training order, so the choice is deterministic.
    let (sorted, order) = losses.sort_stable(true, 0, false);
    let isolated = order.narrow(0, 0, k).sort(0, false).0;
    let rest = order.narrow(0, k, n - k).sort(0, false).0;
    Ok(Isolation {
        threshold: sorted.double_value(&[k - 1]),
        isolated_mean: sorted.narrow(0, 0, k).mean(Kind::Double).double_value(&[]),
        all_mean: losses.mean(Kind::Double).double_value(&[]),
        isolated,
        rest,
    })
}

impl Defense for Abl {
    fn defend(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        train_set: Option<&DatasetRef<'_>>,
        _clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened> {
        let p: Params = call.params.parse()?;
        p.check()?;
        let train_set = train_set.filter(|t| !t.is_empty()).ok_or_else(|| {
            Error::invalid("abl needs the (possibly poisoned) training set: none or an empty one was given")
        })?;
        let n = train_set.len() as i64;
        let k = (n as f64 * p.isolation_ratio).floor() as i64;
        if k < 1 {
            return Err(Error::invalid(format!(
                "isolation_ratio {} of {n} training samples isolates no sample; raise isolation_ratio to at least {:.3} or give more data",
                p.isolation_ratio,
                1.0 / n as f64
            )));
        }
        let device = device(call)?;
        let seed = call.seed.wrapping_add(p.seed);
        let (model, pre) = load_model(model_bytes, device, true)?;
        let full = device_data(train_set, device)?;
        let classes = check_fit(&model, &full, &pre, "the training set")?;
        let host = call.host;

        // 1. Isolation: LGA or flooding on the whole (poisoned) training set.
        if p.init == Init::Fresh {
            model.reinitialize(seed);
        }
        let objective = match p.isolation_loss {
            IsolationLoss::Lga => Objective::Lga(p.gamma),
            IsolationLoss::Flooding => Objective::Flooding(p.gamma),
        };
        let mut trainer = Trainer::new(
            &model,
            config(&p, p.isolation_epochs, p.lr, Schedule::Constant, false, seed),
        )
        .map_err(nn_err)?;
        let isolation_log = run_phase(
            call,
            &model,
            &mut trainer,
            &full,
            &pre,
            Phase {
                name: "isolation",
                epochs: p.isolation_epochs,
                objective,
                stop: None,
            },
        )?;
        drop(trainer);

        // 2. The lowest-loss share, in eval mode over the whole set.
        host.progress("isolating the lowest-loss samples", 0, 1);
        let iso = isolate(&model, &full, &pre, k)?;
        host.progress("isolating the lowest-loss samples", 1, 1);
        host.check_cancelled()?;
        let isolated = full.select(&iso.isolated);
        let rest = full.select(&iso.rest);
        let histogram: Vec<i64> = isolated
            .y
            .f_bincount::<Tensor>(None, classes)
            .and_then(|h| Vec::<i64>::try_from(&h.to_device(tch::Device::Cpu)))
            .map_err(|e| Error::failed(e.to_string()))?;
        let (suspected_target, majority) = histogram
            .iter()
            .enumerate()
            .max_by_key(|&(c, &count)| (count, std::cmp::Reverse(c)))
            .map(|(c, &count)| (c as i64, count))
            .unwrap_or((0, 0));
        host.info(&format!(
            "isolated {k} of {n} samples (loss <= {:.3e}); majority label {suspected_target} ({majority} of {k})",
            iso.threshold
        ));

        // 3. Training on the rest, then unlearning the isolated samples with the same optimiser.
        let schedule = p.lr_schedule.schedule();
        let mut trainer = Trainer::new(
            &model,
            config(&p, p.train_epochs, p.lr, schedule, p.augment, seed.wrapping_add(1)),
        )
        .map_err(nn_err)?;
        let training_log = if rest.is_empty() {
            vec![]
        } else {
            run_phase(
                call,
                &model,
                &mut trainer,
                &rest,
                &pre,
                Phase {
                    name: "training",
                    epochs: p.train_epochs,
                    objective: Objective::Descend,
                    stop: None,
                },
            )?
        };
        let acc = |d: &DeviceData| -> Result<f64> {
            if d.is_empty() {
                Ok(f64::NAN)
            } else {
                train::accuracy(&model, d, &pre, 512).map_err(nn_err)
            }
        };
        let mean_loss =
            |d: &DeviceData| -> Result<f64> { Ok(losses(&model, d, &pre)?.mean(Kind::Double).double_value(&[])) };
        let (rest_before, isolated_before) = (acc(&rest)?, acc(&isolated)?);
        let isolated_loss_before = mean_loss(&isolated)?;
        if p.unlearning_epochs > 0 && isolated_loss_before < 1e-6 {
            host.warn(&format!(
                "the isolated samples are fitted almost exactly (mean cross-entropy {isolated_loss_before:.2e}): the gradient of their loss is nearly 0 and gradient ascent may not move them"
            ));
        }
        trainer.cfg.schedule = Schedule::Constant;
        trainer.cfg.freeze_bn = p.freeze_bn;
        trainer.cfg.augment = Augment::default();
        trainer.set_lr(p.unlearning_lr).map_err(nn_err)?;
        let stopped_at = std::cell::Cell::new(None);
        let epoch = std::cell::Cell::new(0usize);
        let stop = || -> Result<bool> {
            epoch.set(epoch.get() + 1);
            if p.unlearning_stop_accuracy < 0.0 {
                return Ok(false);
            }
            let a = acc(&isolated)?;
            let done = a <= p.unlearning_stop_accuracy;
            if done {
                stopped_at.set(Some(epoch.get()));
            }
            Ok(done)
        };
        let unlearning_log = run_phase(
            call,
            &model,
            &mut trainer,
            &isolated,
            &pre,
            Phase {
                name: "unlearning",
                epochs: p.unlearning_epochs,
                objective: Objective::Ascend,
                stop: Some(&stop),
            },
        )?;
        let finite = model
            .trainable()
            .iter()
            .all(|t| t.isfinite().all().int64_value(&[]) != 0);
        if !finite {
            return Err(Error::failed(
                "the weights are no longer finite (training diverged); lower lr or unlearning_lr",
            ));
        }
        let (rest_after, isolated_after) = (acc(&rest)?, acc(&isolated)?);
        let isolated_loss_after = mean_loss(&isolated)?;
        host.info(&format!(
            "accuracy on the training rest {rest_before:.4} -> {rest_after:.4}, on the isolated samples {isolated_before:.4} -> {isolated_after:.4} (unlearning)"
        ));

        let params = Value::Object(call.params.0.clone());
        let out = export_hardened(&model, "abl", call)?;
        let dropped = Vec::<i64>::try_from(&iso.isolated.to_device(tch::Device::Cpu))
            .map_err(|e| Error::failed(e.to_string()))?;
        let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        Ok(Hardened {
            model: out,
            dropped,
            report: json!({
                "defense": "abl",
                "device": format!("{device:?}").to_lowercase(),
                "params": params,
                "n_train": n,
                "classes": classes,
                "n_isolated": k,
                "n_rest": n - k,
                "isolation_loss_threshold": iso.threshold,
                "isolated_loss_mean": iso.isolated_mean,
                "train_loss_mean": iso.all_mean,
                "isolated_label_histogram": histogram,
                "suspected_target": suspected_target,
                "suspected_target_share": majority as f64 / k as f64,
                "epochs": {
                    "isolation": isolation_log,
                    "training": training_log,
                    "unlearning": unlearning_log,
                },
                "rest_accuracy_before_unlearning": finite(rest_before),
                "rest_accuracy_after_unlearning": finite(rest_after),
                "isolated_accuracy_before_unlearning": isolated_before,
                "isolated_accuracy_after_unlearning": isolated_after,
                "isolated_loss_before_unlearning": isolated_loss_before,
                "isolated_loss_after_unlearning": isolated_loss_after,
                "unlearning_stopped_after_epoch": stopped_at.get(),
                "accuracy_measured_on": "eval mode on the training set minus the isolated samples (it still holds the poisoned samples that were not isolated), and on the isolated samples with their given labels",
            }),
        })
    }
}

audit_sdk::export_plugin!(defense: Abl);

#[cfg(test)]
mod tests;
