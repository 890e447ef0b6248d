//! Plain fine-tuning as an `audit` defense plugin: the floor every other defense has to beat.
//!
//! The model is trained for a few epochs on the trusted clean subset the host lends
//! (`AUDIT_CAP_NEEDS_CLEAN_DATA`: the last `--clean-size` test images, left out of the evaluation);
//! nothing is pruned or reset. BackdoorBench's `ft` baseline does the same (SGD, momentum 0.9,
//! weight decay 5e-4, lr 0.01, cosine schedule) with 100 epochs on 5% of the training set; the
//! defaults here are 10 epochs at batch 128.
//!
//! The report gives every epoch (loss, training accuracy) and the clean accuracy before and after,
//! both measured in eval mode on the clean subset: that subset is also the fine-tuning data, so
//! the host's own before/after evaluation (on the rest of the test split) is the one to quote.

use audit_defense_common::{augment, check_fit, device, device_data, load_model, nn_err, require_clean, train_epochs};
use audit_nn::train::{self, Optimizer, Schedule, TrainConfig, Trainer};
use audit_nn::{tch, Model};
use audit_sdk::{abi, Call, DatasetRef, Defense, Hardened, Plugin, PluginInfo, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"epochs":{"type":"integer","default":10,"minimum":0,"maximum":10000,"description":"fine-tuning epochs on the clean subset"},
"lr":{"type":"number","default":0.01,"minimum":0,"description":"learning rate"},
"batch_size":{"type":"integer","default":128,"minimum":1,"description":"training batch size"},
"weight_decay":{"type":"number","default":0.0005,"minimum":0,"description":"L2 weight decay"},
"optimizer":{"type":"string","default":"sgd","enum":["sgd","adam"],"description":"sgd (with momentum) or adam (betas 0.9, 0.999)"},
"momentum":{"type":"number","default":0.9,"minimum":0,"maximum":1,"description":"SGD momentum (ignored by adam)"},
"schedule":{"type":"string","default":"cosine","enum":["cosine","constant"],"description":"learning-rate schedule over the epochs: cosine annealing to 0 (BackdoorBench) or constant"},
"freeze_bn":{"type":"boolean","default":false,"description":"keep BatchNormalization running statistics fixed (affine parameters still train)"},
"augment":{"type":"boolean","default":false,"description":"random crop (padding 4) and horizontal flip while fine-tuning (CIFAR-style data)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the defense (added to the host's seed)"}}}"#;

/// `optimizer` (serialized as the schema spells it, for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum OptimizerChoice {
    /// SGD with `momentum`.
    Sgd,
    /// Adam, betas 0.9 and 0.999.
    Adam,
}

/// `schedule` over the epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum LrSchedule {
    /// Cosine annealing to 0 (BackdoorBench).
    Cosine,
    /// The base rate throughout.
    Constant,
}

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    epochs: usize,
    lr: f64,
    batch_size: i64,
    weight_decay: f64,
    optimizer: OptimizerChoice,
    momentum: f64,
    schedule: LrSchedule,
    freeze_bn: bool,
    augment: bool,
    seed: u64,
}

/// The plugin.
#[derive(Debug, Default)]
pub struct Finetune;

impl Plugin for Finetune {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "finetune",
            version: env!("CARGO_PKG_VERSION"),
            description: "Plain fine-tuning on the clean subset (baseline): no pruning, no reset",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_CLEAN_DATA | abi::AUDIT_CAP_NEEDS_MODEL,
        }
    }
}

fn training_config(p: &Params, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: p.epochs,
        batch_size: p.batch_size,
        lr: p.lr,
        weight_decay: p.weight_decay,
        optimizer: match p.optimizer {
            OptimizerChoice::Sgd => Optimizer::Sgd {
                momentum: p.momentum,
                nesterov: false,
            },
            OptimizerChoice::Adam => Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
            },
        },
        schedule: match p.schedule {
            LrSchedule::Cosine => Schedule::Cosine { min_lr: 0.0 },
            LrSchedule::Constant => Schedule::Constant,
        },
        freeze_bn: p.freeze_bn,
        augment: augment(p.augment),
        seed,
        group_lr: vec![],
    }
}

/// Sum of squared parameter changes (how far fine-tuning moved the weights), for the report.
fn distance(before: &[Tensor], model: &Model) -> f64 {
    let now = model.trainable();
    before
        .iter()
        .zip(now)
        .map(|(a, b)| (b.detach() - a).square().sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt()
}

impl Defense for Finetune {
    fn defend(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        _train: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened> {
        let p: Params = call.params.parse()?;
        let clean = require_clean("finetune", clean)?;
        let device = device(call)?;
        let seed = call.seed.wrapping_add(p.seed);
        let (model, pre) = load_model(model_bytes, device, true)?;
        let data = device_data(clean, device)?;
        let classes = check_fit(&model, &data, &pre, "the clean subset")?;
        let host = call.host;

        let before = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!(
            "clean accuracy before fine-tuning: {before:.4} ({} clean samples)",
            data.len()
        ));
        let start: Vec<Tensor> = model.trainable().iter().map(|t| t.detach().copy()).collect();
        let mut trainer = Trainer::new(&model, training_config(&p, seed)).map_err(nn_err)?;
        let epochs = train_epochs(call, &model, &mut trainer, &data, &pre, p.epochs)?;
        let after = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!("clean accuracy after fine-tuning: {after:.4}"));
        let moved = distance(&start, &model);

        let out = model
            .export(&[
                ("audit.defense".to_string(), "finetune".to_string()),
                (
                    "audit.defense_params".to_string(),
                    Value::Object(call.params.0.clone()).to_string(),
                ),
            ])
            .map_err(nn_err)?;
        Ok(Hardened {
            model: out,
            dropped: vec![],
            report: json!({
                "defense": "finetune",
                "device": format!("{device:?}").to_lowercase(),
                "n_clean": data.len(),
                "classes": classes,
                "optimizer": p.optimizer,
                "schedule": p.schedule,
                "lr": p.lr,
                "batch_size": p.batch_size,
                "freeze_bn": p.freeze_bn,
                "epochs": epochs,
                "clean_accuracy_before": before,
                "clean_accuracy_after": after,
                "accuracy_measured_on": "the clean subset (also the fine-tuning data)",
                "weight_change_l2": moved,
            }),
        })
    }
}

audit_sdk::export_plugin!(defense: Finetune);

#[cfg(test)]
mod tests;
