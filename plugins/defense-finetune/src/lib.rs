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

use audit_nn::train::{self, Trainer};
use audit_nn::{tch, Model};
use audit_plugin_common::{
    check_fit, device, device_data, export_hardened, fine_tune_schema, load_model, nn_err, require_clean, train_epochs,
    FineTune,
};
use audit_sdk::{abi, Call, DatasetRef, Defense, Hardened, Plugin, PluginInfo, Result};
use serde::Deserialize;
use serde_json::json;
use tch::{Kind, Tensor};

const SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    fine_tune_schema!(),
    r#",
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the defense (added to the host's seed)"}}}"#
);

/// Parameters (see the schema for meaning), but for the fine-tuning block: a [`FineTune`],
/// parsed from the same object.
#[derive(Debug, Clone, Deserialize)]
struct Params {
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
        let tune: FineTune = call.params.parse()?;
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
        let mut trainer = Trainer::new(&model, tune.config(seed)).map_err(nn_err)?;
        let epochs = train_epochs(call, &model, &mut trainer, &data, &pre, tune.epochs)?;
        let after = train::accuracy(&model, &data, &pre, 512).map_err(nn_err)?;
        host.info(&format!("clean accuracy after fine-tuning: {after:.4}"));
        let moved = distance(&start, &model);

        let out = export_hardened(&model, "finetune", call)?;
        Ok(Hardened {
            model: out,
            dropped: vec![],
            report: json!({
                "defense": "finetune",
                "device": format!("{device:?}").to_lowercase(),
                "n_clean": data.len(),
                "classes": classes,
                "fine_tune": tune.report(),
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
