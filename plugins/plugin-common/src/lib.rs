//! Helpers shared by the bundled plugins that run the engine, defenses and detectors (rlib only:
//! a plugin links it; it exports no plugin entry point): engine errors as plugin errors, the
//! device, datasets on the device, the model's preprocessing metadata, a check that data fits the
//! model, the fine-tuning parameter block and its epoch loop, and the export of a hardened model
//! with the metadata every defense writes. The graph walks live in `audit_nn::graph`. The
//! sample-level detectors' shared steps (penultimate features of a whole dataset, per-class
//! indices, principal components, the MAD anomaly index) are in [`samples`]; their test kit in
//! `testing` (cargo feature `testing`).

use audit_nn::tch::{self, Device};
use audit_nn::train::{Augment, DeviceData, EpochStats, Hooks, Optimizer, Preprocess, Schedule, TrainConfig, Trainer};
use audit_nn::Model;
use audit_sdk::{Call, DatasetRef, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub mod samples;
pub mod scan;
#[cfg(feature = "testing")]
pub mod testing;
pub mod triggers;

pub fn nn_err(e: audit_nn::NnError) -> Error {
    match e {
        audit_nn::NnError::Cancelled => Error::cancelled(),
        audit_nn::NnError::Other(m) => Error::failed(m),
        other => Error::invalid(other.to_string()),
    }
}

/// The device the host asked for (`auto` resolves to CUDA when it is available).
pub fn device(call: &Call<'_>) -> Result<Device> {
    let req: audit_nn::DeviceRequest = call
        .device
        .parse()
        .map_err(|e: audit_nn::DeviceError| Error::invalid(e.to_string()))?;
    audit_nn::resolve_device(req).map_err(|e| Error::invalid(e.to_string()))
}

/// The lent model loaded on `device` with its preprocessing; `require_params` refuses a model
/// with nothing to train.
pub fn load_model(model_bytes: &[u8], device: Device, require_params: bool) -> Result<(Model, Preprocess)> {
    let mut model = Model::load(model_bytes, None).map_err(nn_err)?;
    model.to_device(device);
    if require_params && model.parameter_count() == 0 {
        return Err(Error::invalid("the model has no trainable parameters to train"));
    }
    let pre = preprocess(&model)?;
    Ok((model, pre))
}

/// The clean subset a defense with `AUDIT_CAP_NEEDS_CLEAN_DATA` needs, or an error naming it.
pub fn require_clean<'a, 'b>(name: &str, clean: Option<&'b DatasetRef<'a>>) -> Result<&'b DatasetRef<'a>> {
    clean.filter(|c| !c.is_empty()).ok_or_else(|| {
        Error::invalid(format!(
            "{name} needs a clean subset (the host lends the last --clean-size test images)"
        ))
    })
}

/// The dataset on the device.
pub fn device_data(d: &DatasetRef<'_>, device: Device) -> Result<DeviceData> {
    let s = d.images.shape;
    let shape = [s[0], s[1], s[2], s[3]];
    Ok(match d.images.dtype {
        audit_sdk::Dtype::U8 => DeviceData::from_u8(d.images.as_u8()?, shape, d.labels, device),
        _ => DeviceData::from_f32(d.images.as_f32()?, shape, d.labels, device),
    })
}

/// Pixel normalisation from the model's `audit.mean` / `audit.std` metadata (the host writes it;
/// checked: finite numbers, std > 0).
pub fn preprocess(model: &Model) -> Result<Preprocess> {
    Preprocess::from_metadata(model).map_err(|e| Error::invalid(format!("model metadata: {e}")))
}

/// Runs one sample through the model and checks that its logits cover every label of `data`
/// (`what` names the data in messages: "the clean subset", "the training set").
pub fn check_fit(model: &Model, data: &DeviceData, pre: &Preprocess, what: &str) -> Result<i64> {
    let logits = tch::no_grad(|| model.forward(&pre.apply(&data.x.narrow(0, 0, 1)), audit_nn::Mode::Eval))
        .map_err(|e| Error::invalid(format!("{what} does not fit the model: {e}")))?;
    if logits.dim() != 2 {
        return Err(Error::invalid(format!(
            "the model's output has shape {:?}; expected [batch, classes]",
            logits.size()
        )));
    }
    let k = logits.size()[1];
    let max_label = data.y.max().int64_value(&[]);
    if max_label >= k {
        return Err(Error::invalid(format!(
            "{what} has label {max_label} but the model has only {k} outputs"
        )));
    }
    Ok(k)
}

/// Hooks that report a training's progress to the host under `label` and poll the host's cancel
/// flag between batches.
pub fn host_hooks<'a>(call: &'a Call<'_>, label: &'a str) -> Hooks<'a> {
    let host = call.host;
    Hooks {
        progress: Box::new(move |_, done, total| host.progress(label, done, total)),
        cancelled: Box::new(move || host.is_cancelled()),
    }
}

/// What one epoch of [`run_epochs`] reports beyond the trainer's statistics.
#[derive(Debug, Default)]
pub struct EpochNotes {
    /// More fields of the epoch's report entry.
    pub fields: Map<String, Value>,
    /// Text after the loss in the epoch's log line, such as ` (CE 0.31, attention 0.02)`.
    pub text: String,
    /// Stop after this epoch (an early-stopping rule fired).
    pub stop: bool,
}

impl EpochNotes {
    /// Notes with these report fields and no text.
    pub fn fields(fields: Value) -> EpochNotes {
        EpochNotes {
            fields: fields.as_object().cloned().unwrap_or_default(),
            ..EpochNotes::default()
        }
    }
}

/// The training loop every bundled plugin runs: up to `epochs` epochs named
/// `"{phase} epoch e/E"`, each one `epoch(e, hooks)` (a [`Trainer`] epoch of any kind, given
/// [`host_hooks`]), with the host's cancellation checked between epochs and batches, one log line
/// and one report entry per epoch (`epoch`, `loss`, `train_accuracy`, `seconds` and the epoch's
/// own fields). A loss that is no longer finite is an error (the training diverged), so a
/// diverged model is never exported.
pub fn run_epochs<F>(call: &Call<'_>, phase: &str, epochs: usize, mut epoch: F) -> Result<Vec<Value>>
where
    F: FnMut(usize, &mut Hooks<'_>) -> Result<(EpochStats, EpochNotes)>,
{
    let host = call.host;
    let mut log = Vec::with_capacity(epochs);
    for e in 0..epochs {
        host.check_cancelled()?;
        let label = format!("{phase} epoch {}/{epochs}", e + 1);
        let (stats, notes) = epoch(e, &mut host_hooks(call, &label))?;
        host.info(&format!(
            "{label}: loss {:.4}{}, train accuracy {:.4} ({:.1}s)",
            stats.loss, notes.text, stats.accuracy, stats.seconds
        ));
        let diverged = !stats.loss.is_finite();
        let mut entry = Map::new();
        entry.insert("epoch".into(), json!(e + 1));
        entry.insert("loss".into(), json!(stats.loss));
        entry.extend(notes.fields);
        entry.insert("train_accuracy".into(), json!(stats.accuracy));
        entry.insert("seconds".into(), json!(stats.seconds));
        log.push(Value::Object(entry));
        if diverged {
            return Err(Error::failed(format!(
                "{label}: the loss is no longer finite (training diverged); lower the learning rate or the number of epochs"
            )));
        }
        if notes.stop {
            host.info(&format!("{phase}: stopped early after epoch {}", e + 1));
            break;
        }
    }
    host.check_cancelled()?;
    Ok(log)
}

/// Trains `epochs` plain epochs (cross-entropy) of a fine-tuning ([`run_epochs`], phase
/// `fine-tune`).
pub fn train_epochs(
    call: &Call<'_>,
    model: &Model,
    trainer: &mut Trainer,
    data: &DeviceData,
    pre: &Preprocess,
    epochs: usize,
) -> Result<Vec<Value>> {
    run_epochs(call, "fine-tune", epochs, |_, hooks| {
        let stats = trainer.epoch(model, data, pre, hooks).map_err(nn_err)?;
        Ok((stats, EpochNotes::default()))
    })
}

/// Exports the hardened model with the metadata every defense writes: `audit.defense` (the
/// plugin's name) and `audit.defense_params` (the resolved parameters, as JSON).
pub fn export_hardened(model: &Model, defense: &str, call: &Call<'_>) -> Result<Vec<u8>> {
    model
        .export(&[
            ("audit.defense".to_string(), defense.to_string()),
            (
                "audit.defense_params".to_string(),
                Value::Object(call.params.0.clone()).to_string(),
            ),
        ])
        .map_err(nn_err)
}

/// The schema properties of [`FineTune`] (a JSON fragment without braces, to `concat!` into a
/// plugin's schema between other properties). The defaults are BackdoorBench's fine-tuning.
#[macro_export]
macro_rules! fine_tune_schema {
    () => {
        r#""epochs":{"type":"integer","default":10,"minimum":0,"maximum":10000,"description":"fine-tuning epochs on the clean subset"},
"lr":{"type":"number","default":0.01,"minimum":0,"description":"fine-tuning learning rate"},
"batch_size":{"type":"integer","default":128,"minimum":1,"description":"fine-tuning batch size"},
"weight_decay":{"type":"number","default":0.0005,"minimum":0,"description":"fine-tuning L2 weight decay"},
"optimizer":{"type":"string","default":"sgd","enum":["sgd","adam"],"description":"sgd (with momentum) or adam (betas 0.9, 0.999)"},
"momentum":{"type":"number","default":0.9,"minimum":0,"maximum":1,"description":"SGD momentum of the fine-tuning (ignored by adam)"},
"schedule":{"type":"string","default":"cosine","enum":["cosine","constant"],"description":"fine-tuning learning-rate schedule: cosine annealing to 0 (BackdoorBench) or constant"},
"freeze_bn":{"type":"boolean","default":false,"description":"keep BatchNormalization running statistics fixed while fine-tuning (affine parameters still train)"},
"augment":{"type":"boolean","default":false,"description":"random crop (padding 4) and horizontal flip while fine-tuning (CIFAR-style data)"}"#
    };
}

/// `optimizer` of a fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FineTuneOptimizer {
    /// SGD with `momentum` (not Nesterov).
    Sgd,
    /// Adam, betas 0.9 and 0.999.
    Adam,
}

/// `schedule` of a fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FineTuneSchedule {
    /// Cosine annealing to 0 (BackdoorBench).
    Cosine,
    /// The base rate throughout.
    Constant,
}

/// The fine-tuning parameters a defense shares with the others (schema: [`fine_tune_schema!`]).
/// Parse it from the call's parameters beside the defense's own struct (`call.params.parse()`
/// ignores the other keys): not `#[serde(flatten)]`ed into it, because a flattened field's
/// error no longer names the parameter.
#[derive(Debug, Clone, Deserialize)]
pub struct FineTune {
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: i64,
    pub weight_decay: f64,
    pub optimizer: FineTuneOptimizer,
    pub momentum: f64,
    pub schedule: FineTuneSchedule,
    pub freeze_bn: bool,
    pub augment: bool,
}

impl FineTune {
    /// The trainer configuration of this fine-tuning.
    pub fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            optimizer: match self.optimizer {
                FineTuneOptimizer::Sgd => Optimizer::sgd(self.momentum),
                FineTuneOptimizer::Adam => Optimizer::adam(),
            },
            schedule: match self.schedule {
                FineTuneSchedule::Cosine => Schedule::Cosine { min_lr: 0.0 },
                FineTuneSchedule::Constant => Schedule::Constant,
            },
            freeze_bn: self.freeze_bn,
            augment: Augment::crop_flip(self.augment),
            seed,
            group_lr: vec![],
        }
    }

    /// The block's values for a report.
    pub fn report(&self) -> Value {
        json!({
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "freeze_bn": self.freeze_bn,
            "augment": self.augment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = concat!(
        r#"{"type":"object","additionalProperties":false,"properties":{"#,
        fine_tune_schema!(),
        r#"}}"#
    );

    #[test]
    fn the_fine_tune_block_resolves_from_its_schema_and_names_bad_values() {
        let given = |v: Value| audit_sdk::Params(v.as_object().cloned().unwrap_or_default());
        let resolved = given(json!({"optimizer": "adam", "epochs": 3}))
            .resolve(SCHEMA)
            .expect("the block's schema is valid and resolves");
        let tune: FineTune = resolved.parse().expect("parses");
        assert_eq!((tune.epochs, tune.optimizer), (3, FineTuneOptimizer::Adam));
        assert_eq!(tune.schedule, FineTuneSchedule::Cosine);
        let cfg = tune.config(7);
        assert!(matches!(cfg.optimizer, Optimizer::Adam { .. }));
        assert_eq!((cfg.epochs, cfg.batch_size, cfg.seed), (3, 128, 7));
        let err = given(json!({"schedule": "step"}))
            .resolve(SCHEMA)
            .unwrap_err()
            .to_string();
        assert!(err.contains("schedule"), "{err}");
    }
}
