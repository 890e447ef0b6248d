//! Helpers shared by the bundled defense plugins (rlib only: a plugin links it; it exports no
//! plugin entry point): engine errors as plugin errors, datasets on the device, the model's
//! preprocessing metadata, a check that data fits the model, the fine-tuning epoch loop, and the
//! graph walk from a layer to the activation after it.

use std::collections::{HashMap, HashSet};

use audit_nn::tch::{self, Device};
use audit_nn::train::{Augment, DeviceData, Hooks, Preprocess, Trainer};
use audit_nn::Model;
use audit_sdk::{Call, DatasetRef, Error, Result};
use serde_json::{json, Value};

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

/// Random crop (padding 4) and horizontal flip when `on` (CIFAR-style data), else none.
pub fn augment(on: bool) -> Augment {
    if on {
        Augment {
            crop_padding: 4,
            flip: true,
        }
    } else {
        Augment::default()
    }
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

/// Trains `epochs` epochs with progress, logs and cancellation from the host (checked between
/// epochs and between batches). One report entry per epoch.
pub fn train_epochs(
    call: &Call<'_>,
    model: &Model,
    trainer: &mut Trainer,
    data: &DeviceData,
    pre: &Preprocess,
    epochs: usize,
) -> Result<Vec<Value>> {
    let host = call.host;
    let mut log = Vec::with_capacity(epochs);
    for e in 0..epochs {
        host.check_cancelled()?;
        let label = format!("fine-tune epoch {}/{epochs}", e + 1);
        let mut hooks = Hooks {
            progress: Box::new(|_, d, t| host.progress(&label, d, t)),
            cancelled: Box::new(|| host.is_cancelled()),
        };
        let stats = trainer.epoch(model, data, pre, &mut hooks).map_err(nn_err)?;
        host.info(&format!(
            "{label}: loss {:.4}, train accuracy {:.4} ({:.1}s)",
            stats.loss, stats.accuracy, stats.seconds
        ));
        log.push(
            json!({"epoch": e + 1, "loss": stats.loss, "train_accuracy": stats.accuracy, "seconds": stats.seconds}),
        );
    }
    host.check_cancelled()?;
    Ok(log)
}

/// Ops a channel passes through unchanged in index when looking for the activation after a conv.
pub const PASS_THROUGH: &[&str] = &["BatchNormalization", "Identity", "Dropout"];
/// Element-wise activations whose output is the "post-activation" value.
pub const ACTIVATIONS: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
];

/// Node graph by value name, for finding layers and the activations after them: (name, op type,
/// inputs, outputs) per node and the consumers of each value.
pub struct Graph {
    pub nodes: Vec<(String, String, Vec<String>, Vec<String>)>,
    consumers: HashMap<String, Vec<usize>>,
}

impl Graph {
    pub fn new(model: &Model) -> Graph {
        let nodes = model.node_summaries();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for v in n.2.iter().filter(|v| !v.is_empty()) {
                consumers.entry(v.clone()).or_default().push(i);
            }
        }
        Graph { nodes, consumers }
    }

    pub fn consumers_of(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether any of `layer_nodes` is reachable downstream of `value`.
    pub fn reaches(&self, value: &str, layer_nodes: &HashSet<&str>) -> bool {
        let mut stack = vec![value.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) {
                continue;
            }
            for &ni in self.consumers_of(&v) {
                let n = &self.nodes[ni];
                if layer_nodes.contains(n.0.as_str()) {
                    return true;
                }
                stack.extend(n.3.iter().cloned());
            }
        }
        false
    }

    /// From a layer's output, follows a single-consumer chain through per-channel pass-through ops
    /// to the first activation: (its output, true), or (the last value reached, false).
    pub fn activation_after(&self, value: &str) -> (String, bool) {
        let mut v = value.to_string();
        loop {
            let cons = self.consumers_of(&v);
            if cons.len() != 1 {
                return (v, false);
            }
            let n = &self.nodes[cons[0]];
            if n.2.first() != Some(&v) || n.3.is_empty() {
                return (v, false);
            }
            if ACTIVATIONS.contains(&n.1.as_str()) {
                return (n.3[0].clone(), true);
            }
            if !PASS_THROUGH.contains(&n.1.as_str()) {
                return (v, false);
            }
            v = n.3[0].clone();
        }
    }
}
