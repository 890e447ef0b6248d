//! Measuring a model file: clean accuracy (overall and per class) and, with an attack plugin's
//! trigger, attack success rate and robust accuracy, all through an inference runtime on the ONNX
//! bytes (the artifact that ships): onnxruntime, or tract when onnxruntime cannot be loaded.

use anyhow::{Context, Result};
use serde_json::Map;

use crate::data::{Dataset, Images, LabeledSet, Pixels};
use crate::error::{input_error, input_error_hint};
use crate::infer::{load_runtime, InferenceRuntime, RuntimeChoice};
use crate::plugin::{CallInput, LoadedPlugin, Op};

/// Preprocessing: the model sees `(pixel/255 - mean) / std` per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization {
            mean: vec![0.0],
            std: vec![1.0],
        }
    }
}

impl Normalization {
    /// From `--mean`/`--std` flags, else the model's `audit.mean`/`audit.std` metadata, else 0/1;
    /// parsed and checked (finite, std > 0) by the engine's one parser, `Preprocess::parse`.
    pub fn resolve(
        mean: Option<&str>,
        std: Option<&str>,
        metadata: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Normalization> {
        use audit_nn::train::{Preprocess, MEAN_KEY, STD_KEY};
        let pick = |flag: Option<&str>, key: &str| flag.map(str::to_string).or_else(|| metadata(key));
        let (m, s) = (pick(mean, MEAN_KEY), pick(std, STD_KEY));
        let pre =
            Preprocess::parse(m.as_deref(), s.as_deref()).map_err(|e| crate::error::input_error(e.to_string()))?;
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        Ok(Normalization {
            mean: f32s(&pre.mean),
            std: f32s(&pre.std),
        })
    }

    /// As metadata entries.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let join = |v: &[f32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        vec![
            (audit_nn::train::MEAN_KEY.into(), join(&self.mean)),
            (audit_nn::train::STD_KEY.into(), join(&self.std)),
        ]
    }

    /// Floats for images `start..start+k`, normalised, NCHW.
    pub fn batch(&self, images: &Images, start: usize, k: usize) -> Vec<f32> {
        let per = images.image_len();
        let hw = images.h * images.w;
        let chan = |v: &[f32], c: usize| *v.get(c).or(v.first()).unwrap_or(&0.0);
        let mut out = Vec::with_capacity(k * per);
        for i in 0..k * per {
            let c = (i % per) / hw;
            let raw = match &images.pixels {
                Pixels::U8(v) => v[start * per + i] as f32 / 255.0,
                Pixels::F32(v) => v[start * per + i],
            };
            out.push((raw - chan(&self.mean, c)) / chan(&self.std, c));
        }
        out
    }
}

/// The number of classes a model outputs: its first output's last dimension when the graph
/// states it, else measured by running the engine on one blank image of `chw`.
pub fn model_classes(bytes: &[u8], chw: [i64; 3]) -> Result<usize> {
    let proto = audit_nn::model::parse(bytes).map_err(|e| input_error(e.to_string()))?;
    let graph = proto.graph.as_ref().context("the model has no graph")?;
    let first = graph
        .output
        .first()
        .ok_or_else(|| input_error("the model has no output"))?;
    use audit_nn::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    if let Some(Value::TensorType(t)) = first.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        if let Some(Dim::DimValue(k)) = t
            .shape
            .as_ref()
            .and_then(|s| s.dim.last())
            .and_then(|d| d.value.clone())
        {
            if k > 0 {
                return Ok(k as usize);
            }
        }
    }
    let model = audit_nn::Model::load(bytes, None)?;
    let n = (chw[0] * chw[1] * chw[2]) as usize;
    let (shape, _) = model.predict_f32(&vec![0.0; n], &[1, chw[0], chw[1], chw[2]])?;
    match shape[..] {
        [1, k] if k > 0 => Ok(k as usize),
        _ => Err(input_error(format!(
            "the model's output has shape {shape:?}; expected [batch, classes]"
        ))),
    }
}

/// Labels must be classes of the model: every label of `sets` (and the data's class count)
/// below `classes`. The error (exit 2) names the data, the split and the model's output count.
pub fn check_labels(
    classes: usize,
    data: &str,
    num_classes: usize,
    sets: &[(&str, &LabeledSet)],
    model: &str,
) -> Result<()> {
    for (split, set) in sets {
        if let Some(&bad) = set.labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
            return Err(input_error_hint(
                format!(
                    "{data}: the {split} split has label {bad}, but {model} has {classes} outputs (classes 0..{})",
                    classes.saturating_sub(1)
                ),
                "the data and the model must have the same classes",
            ));
        }
    }
    if num_classes > classes {
        return Err(input_error_hint(
            format!("{data} has {num_classes} classes, but {model} has {classes} outputs"),
            "the data and the model must have the same classes",
        ));
    }
    Ok(())
}

/// Where a model and a dataset meet (attack --model, harden, compare), before anything trains:
/// the data's labels must be below the model's output count (exit 2 naming both).
pub fn check_model_fits_data(bytes: &[u8], model: &str, ds: &Dataset) -> Result<()> {
    let i = &ds.train.images;
    let i = if ds.train.is_empty() { &ds.test.images } else { i };
    let classes = model_classes(bytes, [i.c as i64, i.h as i64, i.w as i64]).with_context(|| model.to_string())?;
    check_labels(
        classes,
        &ds.source,
        ds.num_classes,
        &[("train", &ds.train), ("test", &ds.test)],
        model,
    )
}

/// Predicted classes for every image, through the given runtime, in batches.
pub fn predict(
    model: &mut dyn InferenceRuntime,
    images: &Images,
    norm: &Normalization,
    batch: usize,
) -> Result<Vec<i64>> {
    predict_checked(model, images, norm, batch, None).map(|(p, _)| p)
}

/// [`predict`], failing (exit 2) when `max_label` is not a class of the model's output.
fn predict_checked(
    model: &mut dyn InferenceRuntime,
    images: &Images,
    norm: &Normalization,
    batch: usize,
    max_label: Option<i64>,
) -> Result<(Vec<i64>, usize)> {
    let mut preds = Vec::with_capacity(images.n);
    let mut out_classes = 0;
    let mut s = 0;
    while s < images.n {
        // Ctrl-C stops an evaluation between batches (exit 130), as it stops training.
        if crate::signals::is_cancelled() {
            return Err(crate::error::cancelled());
        }
        let k = (images.n - s).min(batch);
        let x = norm.batch(images, s, k);
        let (shape, logits) = model.run(x, &[k as i64, images.c as i64, images.h as i64, images.w as i64])?;
        let classes = *shape.last().context("model output has no dimensions")? as usize;
        out_classes = classes;
        if shape.len() != 2 || shape[0] as usize != k || classes == 0 || logits.len() != k * classes {
            anyhow::bail!("model output has shape {shape:?}; expected [batch, classes]");
        }
        if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
            anyhow::bail!(
                "the model's outputs are not finite ({bad} for images {s}..{}): no metric can be computed; its weights diverged or the input is out of range",
                s + k
            );
        }
        if let Some(max) = max_label {
            if max >= classes as i64 {
                return Err(input_error_hint(
                    format!(
                        "the data has label {max}, but the model has {classes} outputs (classes 0..{})",
                        classes - 1
                    ),
                    "the data and the model must have the same classes",
                ));
            }
        }
        preds.extend(logits.chunks_exact(classes).map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                )
                .0 as i64
        }));
        s += k;
    }
    Ok((preds, out_classes))
}

/// Metrics of one model on one test set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub clean_accuracy: f64,
    pub per_class_accuracy: Vec<Option<f64>>,
    pub attack_success_rate: Option<f64>,
    pub robust_accuracy: Option<f64>,
    /// Per true class: share of its triggered images sent to the attack's label.
    pub per_class_asr: Option<Vec<Option<f64>>>,
    pub n_test: usize,
    /// Triggered images counted for ASR (true label != the attack's label).
    pub n_attack: Option<usize>,
}

/// An attack to measure with: plugin, validated parameters, seed.
#[derive(Debug)]
pub struct AttackSpec<'a> {
    pub plugin: &'a LoadedPlugin,
    pub params: &'a Map<String, serde_json::Value>,
    pub seed: u64,
}

fn share(hits: usize, n: usize) -> Option<f64> {
    (n > 0).then(|| hits as f64 / n as f64)
}

/// Clean accuracy, and with an attack its ASR and robust accuracy, on `bytes` through onnxruntime,
/// or through tract when onnxruntime cannot be loaded (noted on stderr).
pub fn evaluate(
    bytes: &[u8],
    test: &LabeledSet,
    num_classes: usize,
    norm: &Normalization,
    attack: Option<&AttackSpec<'_>>,
) -> Result<Metrics> {
    let mut model = load_runtime(bytes, RuntimeChoice::Auto)?;
    evaluate_with(model.as_mut(), test, num_classes, norm, attack)
}

/// [`evaluate`] on a model already loaded in a runtime.
pub fn evaluate_with(
    model: &mut dyn InferenceRuntime,
    test: &LabeledSet,
    num_classes: usize,
    norm: &Normalization,
    attack: Option<&AttackSpec<'_>>,
) -> Result<Metrics> {
    if test.is_empty() {
        return Err(input_error("the test split is empty: there is nothing to measure"));
    }
    let max_label = test.labels.iter().copied().max();
    let (preds, classes) = predict_checked(model, &test.images, norm, 256, max_label)?;
    if num_classes > classes {
        return Err(input_error_hint(
            format!("the data has {num_classes} classes, but the model has {classes} outputs"),
            "the data and the model must have the same classes",
        ));
    }
    let correct = preds.iter().zip(&test.labels).filter(|(p, y)| p == y).count();
    let per_class = (0..num_classes as i64)
        .map(|k| {
            let idx: Vec<usize> = (0..test.len()).filter(|&i| test.labels[i] == k).collect();
            share(idx.iter().filter(|&&i| preds[i] == k).count(), idx.len())
        })
        .collect();
    let mut m = Metrics {
        clean_accuracy: share(correct, test.len()).unwrap_or(0.0),
        per_class_accuracy: per_class,
        attack_success_rate: None,
        robust_accuracy: None,
        per_class_asr: None,
        n_test: test.len(),
        n_attack: None,
    };
    if let Some(a) = attack {
        let out = a.plugin.call(&CallInput {
            op: Op::Trigger,
            params: a.params,
            seed: a.seed,
            device: "cpu",
            model: None,
            data: Some(test),
            clean: None,
            num_classes,
        })?;
        let triggered = out.images.context("trigger returned no images")?;
        let targets = out.labels.context("trigger returned no labels")?;
        let tp = predict(model, &triggered, norm, 256)?;
        let counted: Vec<usize> = (0..test.len()).filter(|&i| test.labels[i] != targets[i]).collect();
        m.attack_success_rate = share(counted.iter().filter(|&&i| tp[i] == targets[i]).count(), counted.len());
        m.robust_accuracy = share(
            counted.iter().filter(|&&i| tp[i] == test.labels[i]).count(),
            counted.len(),
        );
        m.per_class_asr = Some(
            (0..num_classes as i64)
                .map(|k| {
                    let idx: Vec<&usize> = counted.iter().filter(|&&i| test.labels[i] == k).collect();
                    share(idx.iter().filter(|&&&i| tp[i] == targets[i]).count(), idx.len())
                })
                .collect(),
        );
        m.n_attack = Some(counted.len());
    }
    Ok(m)
}

/// Flagged training samples against the data's poisoned ones: `{found, poisoned, precision,
/// recall}`. Nothing flagged is recall 0 (every poisoned sample is a miss) with precision null;
/// no poisoned sample is recall null.
pub fn precision_recall(found: &[i64], truth: &std::collections::HashSet<i64>) -> serde_json::Value {
    let hits = found.iter().filter(|i| truth.contains(i)).count();
    let ratio = |num: usize, den: usize| {
        if den == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!(num as f64 / den as f64)
        }
    };
    serde_json::json!({
        "precision": ratio(hits, found.len()),
        "recall": ratio(hits, truth.len()),
        "found": found.len(),
        "poisoned": truth.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_flagged_misses_every_poisoned_sample() {
        let truth: std::collections::HashSet<i64> = [1, 2, 3, 4].into_iter().collect();
        let none = precision_recall(&[], &truth);
        assert_eq!(
            (none["precision"].is_null(), none["recall"].as_f64()),
            (true, Some(0.0))
        );
        let some = precision_recall(&[1, 2, 9], &truth);
        assert_eq!(some["precision"].as_f64(), Some(2.0 / 3.0));
        assert_eq!((some["recall"].as_f64(), some["found"].as_u64()), (Some(0.5), Some(3)));
        assert!(precision_recall(&[1], &Default::default())["recall"].is_null());
    }
}
