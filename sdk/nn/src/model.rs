//! An ONNX model loaded for libtorch: the graph as runnable nodes, initializers as tensors
//! (trainable parameters or constants), forward passes with taps.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use prost::Message;
use tch::{Device, Kind, Tensor};

use crate::error::{NnError, Result};
use crate::ops::{registry, BuildCtx, Mode, Op, RunCtx};
use crate::proto::{ModelProto, NodeProto};
use crate::tensor::tensor_from_proto;

/// Ops whose listed inputs are weights: (op type, input positions that become trainable).
const WEIGHT_INPUTS: &[(&str, &[usize])] = &[
    ("Conv", &[1, 2]),
    ("ConvTranspose", &[1, 2]),
    ("Gemm", &[1, 2]),
    ("MatMul", &[0, 1]),
    ("BatchNormalization", &[1, 2]),
    ("InstanceNormalization", &[1, 2]),
    ("LayerNormalization", &[1, 2]),
    ("PRelu", &[1]),
];

/// What an initializer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// A weight or bias: trained.
    Trainable,
    /// A BatchNormalization running mean or variance: updated in train mode, not by gradients.
    BnStat,
    /// Anything else (shapes, axes, constants): never changes.
    Constant,
}

/// One initializer.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub role: ParamRole,
    /// ONNX element type it is stored with (restored on export).
    pub data_type: i32,
    pub tensor: Tensor,
    pub(crate) value: usize,
}

/// A graph input or output.
#[derive(Debug, Clone)]
pub struct IoInfo {
    pub name: String,
    pub elem_type: i32,
    /// Dimensions; `None` for symbolic or unknown.
    pub dims: Vec<Option<i64>>,
}

#[derive(Debug)]
pub(crate) struct Node {
    /// Index of the node in the proto graph.
    pub proto_index: usize,
    pub name: String,
    pub op_type: String,
    pub op: Box<dyn Op>,
    pub inputs: Vec<Option<usize>>,
    pub outputs: Vec<usize>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    /// The original model, kept to export the same graph.
    pub proto: ModelProto,
    /// Opset of the default domain.
    pub opset: i64,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub params: Vec<Param>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) value_names: Vec<String>,
    pub(crate) value_ids: HashMap<String, usize>,
    pub(crate) input_ids: Vec<usize>,
    pub(crate) output_ids: Vec<usize>,
    pub device: Device,
}

/// An op that the engine cannot run, found while inspecting.
#[derive(Debug, Clone)]
pub struct UnsupportedNode {
    pub op_type: String,
    pub node: String,
    pub domain: String,
    pub reason: String,
}

/// Parses ONNX bytes (clean error, never a panic).
pub fn parse(bytes: &[u8]) -> Result<ModelProto> {
    let proto = ModelProto::decode(bytes).map_err(|e| NnError::Parse(format!("protobuf decode failed: {e}")))?;
    if proto.graph.is_none() {
        return Err(NnError::Parse("the model has no graph".into()));
    }
    Ok(proto)
}

thread_local! {
    /// Set while an op runs under [`guarded`]: its panics are turned into errors, not printed.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs one op with a safety net: a panic inside it (a libtorch error that a tch call without
/// the `f_` prefix unwraps) becomes the op's error, and the panic message is not printed.
/// Ops return errors for what they check; this catches what they do not.
pub(crate) fn guarded<T>(f: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    match result {
        Ok(r) => r,
        Err(payload) => Err(panic_text(payload.as_ref())),
    }
}

/// The first line of a panic's message, libtorch's own text when it carries one.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown failure");
    match text.split_once("Torch(\"") {
        Some((_, t)) => {
            let first = t.split("\\n").next().unwrap_or(t);
            let first = first.lines().next().unwrap_or(first).trim_end_matches("\")");
            format!("libtorch rejected it: {first}")
        }
        None => format!("internal error: {}", text.lines().next().unwrap_or(text)),
    }
}

/// The folder a model file's external data is resolved against: its parent, `.` for a bare
/// file name.
pub fn model_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Protobuf's limit on one message: a model (with its weights inlined) must stay below it.
pub const MAX_PROTO_BYTES: u64 = i32::MAX as u64;

/// Reads a model file for every consumer (engine, onnxruntime, tract, plugins): at most
/// [`crate::limits::max_input_bytes`] bytes, and when tensors keep their data in external files,
/// those are read once, resolved beside the model file (never the current folder; locations that
/// leave the model's folder are refused), and inlined, so the bytes returned are self-contained.
/// A model without external data is returned byte for byte. Bytes that do not parse are returned
/// as they are, for the caller's parser to report.
pub fn read_model_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = crate::limits::read_file(path).map_err(|e| NnError::Parse(format!("{}: {e}", path.display())))?;
    with_external_data_inlined(bytes, model_dir(path))
}

/// The bytes of a model read from a file in `dir`, with any external data inlined (see
/// [`read_model_file`]); unchanged when there is none or when they do not parse.
pub fn with_external_data_inlined(bytes: Vec<u8>, dir: &Path) -> Result<Vec<u8>> {
    let Ok(mut proto) = ModelProto::decode(&bytes[..]) else {
        return Ok(bytes);
    };
    if !inline_external_data(&mut proto, dir)? {
        return Ok(bytes);
    }
    let len = proto.encoded_len() as u64;
    if len > MAX_PROTO_BYTES {
        return Err(NnError::Parse(format!(
            "with its external data inlined the model would be {len} bytes, past protobuf's 2 GiB limit for one model"
        )));
    }
    Ok(proto.encode_to_vec())
}

/// Replaces every external-data tensor of the graph (initializers and node attributes) by its
/// raw data, read from `base_dir`. Returns whether anything was inlined.
pub fn inline_external_data(proto: &mut ModelProto, base_dir: &Path) -> Result<bool> {
    use crate::proto::tensor_proto::DataLocation;
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(false);
    };
    let mut total: u64 = 0;
    let mut changed = false;
    let mut inline = |t: &mut crate::proto::TensorProto| -> Result<()> {
        if t.data_location() != DataLocation::External {
            return Ok(());
        }
        let raw = crate::tensor::external_data(t, base_dir)?;
        total += raw.len() as u64;
        if total > MAX_PROTO_BYTES {
            return Err(NnError::tensor(
                t.name(),
                "the model's external data passes protobuf's 2 GiB limit for one model once inlined",
            ));
        }
        t.raw_data = Some(raw);
        t.external_data.clear();
        t.data_location = None;
        changed = true;
        Ok(())
    };
    for t in &mut graph.initializer {
        inline(t)?;
    }
    for node in &mut graph.node {
        for a in &mut node.attribute {
            if let Some(t) = a.t.as_mut() {
                inline(t)?;
            }
            for t in &mut a.tensors {
                inline(t)?;
            }
        }
    }
    Ok(changed)
}

/// Opset of the default ONNX domain.
pub fn default_opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
        .map(|o| o.version())
        .unwrap_or(0)
}

fn io_info(v: &crate::proto::ValueInfoProto) -> IoInfo {
    let (elem_type, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(crate::proto::type_proto::Value::TensorType(t)) => {
            let dims = t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(crate::proto::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => Some(v),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (t.elem_type(), dims)
        }
        _ => (0, vec![]),
    };
    IoInfo {
        name: v.name().to_string(),
        elem_type,
        dims,
    }
}

/// A node's name, or `#index` when the exporter left it unnamed.
pub fn node_label(node: &NodeProto, index: usize) -> String {
    if node.name().is_empty() {
        format!("#{index}")
    } else {
        node.name().to_string()
    }
}

/// Every node the engine cannot build, in one pass (for `audit inspect`).
pub fn unsupported_nodes(proto: &ModelProto) -> Vec<UnsupportedNode> {
    let opset = default_opset(proto);
    let reg = registry();
    let mut out = Vec::new();
    for (i, node) in proto
        .graph
        .as_ref()
        .map(|g| g.node.clone())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let domain = node.domain().to_string();
        let reason = if !(domain.is_empty() || domain == "ai.onnx") {
            Some(format!("domain `{domain}` is not supported"))
        } else {
            match reg.get(node.op_type()) {
                None => Some("no builder for this op".to_string()),
                Some(build) => guarded(|| build(&BuildCtx { node, opset }).map(|_| ())).err(),
            }
        };
        if let Some(reason) = reason {
            out.push(UnsupportedNode {
                op_type: node.op_type().to_string(),
                node: node_label(node, i),
                domain,
                reason,
            });
        }
    }
    out
}

impl Model {
    /// Loads a model from a file (external data resolved beside it, see [`read_model_file`]).
    pub fn load_file(path: &Path) -> Result<Model> {
        let bytes = read_model_file(path)?;
        Model::load(&bytes, Some(model_dir(path)))
    }

    /// Loads a model from bytes. Fails at load time, naming op, node and opset, when any op is
    /// unsupported.
    pub fn load(bytes: &[u8], base_dir: Option<&Path>) -> Result<Model> {
        let proto = parse(bytes)?;
        Model::from_proto(proto, base_dir)
    }

    /// Builds the runnable graph of a parsed model.
    pub fn from_proto(proto: ModelProto, base_dir: Option<&Path>) -> Result<Model> {
        let opset = default_opset(&proto);
        let unsupported = unsupported_nodes(&proto);
        if let Some(first) = unsupported.first() {
            if first.reason == "no builder for this op" || first.reason.starts_with("domain") {
                return Err(NnError::Unsupported {
                    op_type: first.op_type.clone(),
                    node: first.node.clone(),
                    opset,
                    more: unsupported.len() - 1,
                });
            }
            return Err(NnError::node(&first.node, &first.op_type, &first.reason));
        }
        let graph = proto
            .graph
            .clone()
            .ok_or_else(|| NnError::Parse("the model has no graph".into()))?;
        let mut value_ids: HashMap<String, usize> = HashMap::new();
        let mut value_names: Vec<String> = Vec::new();
        let id = |name: &str, value_ids: &mut HashMap<String, usize>, value_names: &mut Vec<String>| -> usize {
            *value_ids.entry(name.to_string()).or_insert_with(|| {
                value_names.push(name.to_string());
                value_names.len() - 1
            })
        };

        // Which initializers feed weight inputs, and BN statistics.
        let init_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        // Exporters sometimes share one initializer between layers through Identity nodes: look
        // through them to the initializer.
        let identity_src: HashMap<&str, &str> = graph
            .node
            .iter()
            .filter(|n| n.op_type() == "Identity" && n.input.len() == 1 && n.output.len() == 1)
            .map(|n| (n.output[0].as_str(), n.input[0].as_str()))
            .collect();
        let source = |name: &str| -> Option<String> {
            let mut cur = name;
            for _ in 0..16 {
                if init_names.contains(cur) {
                    return Some(cur.to_string());
                }
                cur = identity_src.get(cur)?;
            }
            None
        };
        let mut roles: HashMap<String, ParamRole> = HashMap::new();
        for node in &graph.node {
            if let Some((_, slots)) = WEIGHT_INPUTS.iter().find(|(op, _)| *op == node.op_type()) {
                for &s in *slots {
                    if let Some(name) = node.input.get(s).and_then(|n| source(n)) {
                        roles.insert(name, ParamRole::Trainable);
                    }
                }
            }
            if node.op_type() == "BatchNormalization" {
                for s in [3, 4] {
                    if let Some(name) = node.input.get(s).and_then(|n| source(n)) {
                        roles.insert(name, ParamRole::BnStat);
                    }
                }
            }
        }

        let mut params = Vec::with_capacity(graph.initializer.len());
        for t in &graph.initializer {
            let tensor = tensor_from_proto(t, base_dir)?;
            let mut role = roles.get(t.name()).copied().unwrap_or(ParamRole::Constant);
            if role == ParamRole::Trainable && !matches!(tensor.kind(), Kind::Float | Kind::Double | Kind::Half) {
                role = ParamRole::Constant;
            }
            let tensor = if role == ParamRole::Constant {
                tensor
            } else {
                tensor.to_kind(Kind::Float)
            };
            let value = id(t.name(), &mut value_ids, &mut value_names);
            params.push(Param {
                name: t.name().to_string(),
                role,
                data_type: t.data_type(),
                tensor,
                value,
            });
        }

        let inputs: Vec<IoInfo> = graph
            .input
            .iter()
            .filter(|i| !init_names.contains(i.name()))
            .map(io_info)
            .collect();
        let outputs: Vec<IoInfo> = graph.output.iter().map(io_info).collect();
        if inputs.is_empty() {
            return Err(NnError::Parse("the graph has no input besides its initializers".into()));
        }
        if outputs.is_empty() {
            return Err(NnError::Parse("the graph has no output".into()));
        }
        let input_ids: Vec<usize> = inputs
            .iter()
            .map(|i| id(&i.name, &mut value_ids, &mut value_names))
            .collect();

        let order = topo_order(
            &graph.node,
            &graph
                .initializer
                .iter()
                .map(|t| t.name().to_string())
                .chain(inputs.iter().map(|i| i.name.clone()))
                .collect(),
        )?;
        let reg = registry();
        let mut nodes = Vec::with_capacity(graph.node.len());
        for &i in &order {
            let node = &graph.node[i];
            let build = reg.get(node.op_type()).expect("checked above");
            let op = guarded(|| build(&BuildCtx { node, opset }))
                .map_err(|m| NnError::node(node.name(), node.op_type(), m))?;
            let ins = node
                .input
                .iter()
                .map(|n| {
                    if n.is_empty() {
                        None
                    } else {
                        Some(id(n, &mut value_ids, &mut value_names))
                    }
                })
                .collect();
            let outs = node
                .output
                .iter()
                .map(|n| id(n, &mut value_ids, &mut value_names))
                .collect();
            nodes.push(Node {
                proto_index: i,
                name: node_label(node, i),
                op_type: node.op_type().to_string(),
                op,
                inputs: ins,
                outputs: outs,
            });
        }
        let output_ids = outputs
            .iter()
            .map(|o| {
                value_ids
                    .get(&o.name)
                    .copied()
                    .ok_or_else(|| NnError::Parse(format!("graph output `{}` is never produced", o.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut model = Model {
            proto,
            opset,
            inputs,
            outputs,
            params,
            nodes,
            value_names,
            value_ids,
            input_ids,
            output_ids,
            device: Device::Cpu,
        };
        model.set_trainable(true);
        Ok(model)
    }

    /// Moves every tensor to `device`.
    pub fn to_device(&mut self, device: Device) {
        for p in &mut self.params {
            let t = p.tensor.to_device(device).detach();
            p.tensor = if p.role == ParamRole::Trainable {
                t.set_requires_grad(true)
            } else {
                t
            };
        }
        self.device = device;
    }

    /// Turns gradient tracking of the trainable parameters on or off.
    pub fn set_trainable(&mut self, on: bool) {
        for p in self.params.iter().filter(|p| p.role == ParamRole::Trainable) {
            // In place: optimisers hold these very tensors.
            let _ = p.tensor.set_requires_grad(on);
        }
    }

    /// The trainable parameters (weights and biases), in initializer order.
    pub fn trainable(&self) -> Vec<&Tensor> {
        self.params
            .iter()
            .filter(|p| p.role == ParamRole::Trainable)
            .map(|p| &p.tensor)
            .collect()
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> i64 {
        self.trainable().iter().map(|t| t.numel() as i64).sum()
    }

    /// Id of a value (node output, input or initializer) by name.
    pub fn value_id(&self, name: &str) -> Option<usize> {
        self.value_ids.get(name).copied()
    }

    /// Runs the graph on `input` (the first graph input). Returns the graph outputs and the
    /// values of `taps` (value ids), in order.
    pub fn forward_with_taps(
        &self,
        inputs: &[&Tensor],
        mode: Mode,
        taps: &[usize],
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        self.run_graph(inputs, mode, taps, |_, _| None)
    }

    /// As [`Model::forward_with_taps`], and every value a node computes is first shown to `edit`
    /// (its value id and tensor, in execution order): when it returns a tensor, that tensor
    /// replaces the value for the rest of the pass (the nodes that read it, the taps, the
    /// outputs). A replacement may change the batch size (the nodes after it then run on the new
    /// batch, which must agree with every other value they read). ABS's stimulation sets one
    /// channel of a layer's output to chosen values this way and runs the rest of the graph.
    pub fn forward_with_edits(
        &self,
        inputs: &[&Tensor],
        mode: Mode,
        taps: &[usize],
        edit: &mut dyn FnMut(usize, &Tensor) -> Option<Tensor>,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        self.run_graph(inputs, mode, taps, edit)
    }

    /// The forward pass of both methods above (generic, so the taps-only pass pays nothing for
    /// the edit hook).
    fn run_graph<F: FnMut(usize, &Tensor) -> Option<Tensor>>(
        &self,
        inputs: &[&Tensor],
        mode: Mode,
        taps: &[usize],
        mut edit: F,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        if inputs.len() != self.input_ids.len() {
            return Err(NnError::Other(format!(
                "the model takes {} input(s), got {}",
                self.input_ids.len(),
                inputs.len()
            )));
        }
        let mut env: Vec<Option<Tensor>> = (0..self.value_names.len()).map(|_| None).collect();
        for p in &self.params {
            env[p.value] = Some(p.tensor.shallow_clone());
        }
        for (&id, t) in self.input_ids.iter().zip(inputs) {
            env[id] = Some(t.shallow_clone());
        }
        let ctx = RunCtx { mode };
        for node in &self.nodes {
            let args: Vec<Option<&Tensor>> = node.inputs.iter().map(|i| i.and_then(|i| env[i].as_ref())).collect();
            if let Some(pos) = node
                .inputs
                .iter()
                .zip(&args)
                .position(|(i, a)| i.is_some() && a.is_none())
            {
                return Err(NnError::node(
                    &node.name,
                    &node.op_type,
                    format!("input {pos} is never computed"),
                ));
            }
            let outs = guarded(|| node.op.run(&ctx, &args)).map_err(|m| NnError::node(&node.name, &node.op_type, m))?;
            if outs.len() < node.outputs.iter().len().min(1) {
                return Err(NnError::node(&node.name, &node.op_type, "produced no output"));
            }
            let constant = node.op_type == "Constant";
            for (&o, t) in node.outputs.iter().zip(outs) {
                // Constants are created on the CPU; the graph runs on the model's device.
                let t = if constant && t.device() != self.device {
                    t.to_device(self.device)
                } else {
                    t
                };
                env[o] = Some(edit(o, &t).unwrap_or(t));
            }
        }
        let take = |id: usize| {
            env[id]
                .as_ref()
                .map(Tensor::shallow_clone)
                .ok_or_else(|| NnError::Other(format!("value `{}` was not computed", self.value_names[id])))
        };
        let outs = self.output_ids.iter().map(|&i| take(i)).collect::<Result<Vec<_>>>()?;
        let taps = taps.iter().map(|&i| take(i)).collect::<Result<Vec<_>>>()?;
        Ok((outs, taps))
    }

    /// Runs the graph and returns its first output (the logits of a classifier).
    pub fn forward(&self, input: &Tensor, mode: Mode) -> Result<Tensor> {
        let (mut outs, _) = self.forward_with_taps(&[input], mode, &[])?;
        Ok(outs.swap_remove(0))
    }
}

/// Execution order: ONNX requires topological order, but we sort anyway (Kahn) and reject cycles.
fn topo_order(nodes: &[NodeProto], available: &HashSet<String>) -> Result<Vec<usize>> {
    let mut ready: HashSet<String> = available.clone();
    let mut done = vec![false; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    loop {
        let mut progressed = false;
        for (i, n) in nodes.iter().enumerate() {
            if done[i] || !n.input.iter().all(|x| x.is_empty() || ready.contains(x)) {
                continue;
            }
            done[i] = true;
            progressed = true;
            order.push(i);
            ready.extend(n.output.iter().cloned());
        }
        if order.len() == nodes.len() {
            return Ok(order);
        }
        if !progressed {
            let Some((stuck_index, stuck)) = nodes.iter().enumerate().find(|(i, _)| !done[*i]) else {
                return Ok(order);
            };
            let missing: Vec<&String> = stuck
                .input
                .iter()
                .filter(|x| !x.is_empty() && !ready.contains(*x))
                .collect();
            return Err(NnError::node(
                &node_label(stuck, stuck_index),
                stuck.op_type(),
                format!("inputs {missing:?} are never produced (or the graph has a cycle)"),
            ));
        }
    }
}

impl Model {
    /// Eval-mode outputs (first graph output) for a float batch given as a flat slice and shape,
    /// on the model's device; returns the output's shape and values. For parity checks against
    /// other runtimes without handing tensors across crates.
    pub fn predict_f32(&self, x: &[f32], shape: &[i64]) -> Result<(Vec<i64>, Vec<f32>)> {
        let t = Tensor::f_from_slice(x)?.f_reshape(shape)?.to_device(self.device);
        let y = tch::no_grad(|| self.forward(&t, Mode::Eval))?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let s = y.size();
        Ok((
            s,
            Vec::<f32>::try_from(y.flatten(0, -1)).map_err(|e| NnError::Other(e.to_string()))?,
        ))
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;
    use crate::proto::tensor_proto::{DataLocation, DataType};
    use crate::proto::{
        tensor_shape_proto, type_proto, GraphProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
        TensorShapeProto, TypeProto, ValueInfoProto,
    };

    fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(DataType::Float as i32),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, outputs: Vec<ValueInfoProto>) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: vec![value("x", &[1, 4])],
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("{op}_node")),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn ints(name: &str, v: &[i64]) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            data_type: Some(DataType::Int64 as i32),
            dims: vec![v.len() as i64],
            int64_data: v.to_vec(),
            ..Default::default()
        }
    }

    /// y = x + b, with b (4 floats) stored in `w.bin` beside the model.
    fn external_model(dir: &Path, values: [f32; 4]) -> std::path::PathBuf {
        let b = TensorProto {
            name: Some("b".into()),
            data_type: Some(DataType::Float as i32),
            dims: vec![4],
            data_location: Some(DataLocation::External as i32),
            external_data: vec![StringStringEntryProto {
                key: Some("location".into()),
                value: Some("w.bin".into()),
            }],
            ..Default::default()
        };
        let m = model(vec![node("Add", &["x", "b"], "y")], vec![b], vec![value("y", &[1, 4])]);
        std::fs::write(
            dir.join("w.bin"),
            values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        )
        .unwrap();
        let p = dir.join("m.onnx");
        std::fs::write(&p, m.encode_to_vec()).unwrap();
        p
    }

    #[test]
    fn finding_4_external_data_resolves_beside_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = external_model(dir.path(), [1.0, 2.0, 3.0, 4.0]);
        let bytes = read_model_file(&p).unwrap();
        let proto = parse(&bytes).unwrap();
        let b = &proto.graph.as_ref().unwrap().initializer[0];
        assert_eq!(b.data_location(), DataLocation::Default, "inlined");
        assert!(b.external_data.is_empty());
        // The inlined bytes load without any folder: every consumer gets the same weights.
        let m = Model::load(&bytes, None).unwrap();
        let (_, y) = m.predict_f32(&[0.0; 4], &[1, 4]).unwrap();
        assert_eq!(y, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            Model::load_file(&p).unwrap().predict_f32(&[0.0; 4], &[1, 4]).unwrap().1,
            y
        );
        // A model without external data comes back byte for byte.
        let plain = dir.path().join("plain.onnx");
        std::fs::write(&plain, &bytes).unwrap();
        assert_eq!(read_model_file(&plain).unwrap(), bytes);
        // A location leaving the folder is still refused.
        let mut evil = parse(&std::fs::read(&p).unwrap()).unwrap();
        evil.graph.as_mut().unwrap().initializer[0].external_data[0].value = Some("../w.bin".into());
        let e = with_external_data_inlined(evil.encode_to_vec(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused"), "{e}");
    }

    #[test]
    fn finding_15_a_bare_file_name_resolves_in_the_current_folder() {
        assert_eq!(model_dir(Path::new("model.onnx")), Path::new("."));
        assert_eq!(model_dir(Path::new("a/model.onnx")), Path::new("a"));
    }

    #[test]
    fn finding_3_a_model_without_outputs_is_refused() {
        let m = model(vec![node("Relu", &["x"], "y")], vec![], vec![]);
        let e = Model::load(&m.encode_to_vec(), None).unwrap_err();
        assert!(
            matches!(e, NnError::Parse(_)) && e.to_string().contains("no output"),
            "{e}"
        );
    }

    #[test]
    fn finding_3_constant_of_shape_bomb_is_an_error_not_an_allocation() {
        let m = model(
            vec![node("ConstantOfShape", &["s"], "c"), node("Add", &["x", "c"], "y")],
            vec![ints("s", &[1 << 20, 1 << 20, 1 << 20])],
            vec![value("y", &[1, 4])],
        );
        let model = Model::load(&m.encode_to_vec(), None).unwrap();
        let e = model.predict_f32(&[0.0; 4], &[1, 4]).unwrap_err().to_string();
        assert!(e.contains("ConstantOfShape") && e.contains("refused"), "{e}");
        let m = model_tile();
        let e = Model::load(&m.encode_to_vec(), None)
            .unwrap()
            .predict_f32(&[0.0; 4], &[1, 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Tile") && e.contains("refused"), "{e}");
    }

    fn model_tile() -> ModelProto {
        model(
            vec![node("Tile", &["x", "r"], "y")],
            vec![ints("r", &[1 << 30, 1 << 30])],
            vec![value("y", &[1, 4])],
        )
    }

    #[test]
    fn finding_low_external_length_message_gives_the_right_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = external_model(dir.path(), [1.0; 4]);
        let mut m = parse(&std::fs::read(&p).unwrap()).unwrap();
        m.graph.as_mut().unwrap().initializer[0]
            .external_data
            .push(StringStringEntryProto {
                key: Some("length".into()),
                value: Some("8".into()),
            });
        let e = with_external_data_inlined(m.encode_to_vec(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("length field says 8 bytes") && e.contains("need 16"), "{e}");
        let mut m = parse(&std::fs::read(&p).unwrap()).unwrap();
        m.graph.as_mut().unwrap().initializer[0]
            .external_data
            .push(StringStringEntryProto {
                key: Some("offset".into()),
                value: Some("8".into()),
            });
        let e = with_external_data_inlined(m.encode_to_vec(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 16 bytes at offset 8 (up to byte 24), but the file has 16 bytes"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    #[test]
    fn fuzz_found_libtorch_panics_in_ops_become_errors() {
        let e = guarded::<()>(|| {
            let _ = Tensor::zeros([2], (Kind::Float, Device::Cpu)).pad([i64::MIN, 0], "constant", Some(0.0));
            Ok(())
        })
        .unwrap_err();
        assert!(
            e.starts_with("libtorch rejected it: ") && !e.contains("Exception raised"),
            "{e}"
        );
        assert_eq!(guarded(|| Ok::<_, String>(3)), Ok(3));
        assert_eq!(guarded::<()>(|| Err("plain".into())), Err("plain".into()));
        // A panic outside the guard still panics (the hook is only quiet inside it).
        assert!(std::panic::catch_unwind(|| panic!("outside")).is_err());
    }
}

#[cfg(test)]
mod edit_tests {
    use super::*;
    use crate::zoo::{self, Arch};

    /// `forward_with_edits` without an edit is `forward_with_taps`; an edit replaces the value
    /// for the nodes that read it, the taps and the outputs; a replacement may change the batch.
    #[test]
    fn edits_replace_a_value_for_the_rest_of_the_pass() {
        let proto = zoo::build(Arch::SmallCnn, [1, 8, 8], 3, 1).expect("zoo model");
        let model = Model::load(&zoo::to_bytes(&proto), None).expect("model loads");
        let layers = model.layers();
        let hidden = layers.iter().find(|l| l.op_type == "Gemm" && !l.is_output).unwrap();
        let output = layers.iter().find(|l| l.is_output).unwrap();
        // The hidden layer's activation: the output layer's input.
        let (act, found) = model.graph().activation_after(hidden.value);
        assert!(found && Some(act) == output.input);
        tch::manual_seed(0);
        let x = Tensor::rand([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let (plain, taps) = model.forward_with_taps(&[&x], Mode::Eval, &[act]).unwrap();
        let mut seen = Vec::new();
        let (same, same_taps) = model
            .forward_with_edits(&[&x], Mode::Eval, &[act], &mut |v, _| {
                seen.push(v);
                None
            })
            .unwrap();
        assert!(plain[0].equal(&same[0]) && taps[0].equal(&same_taps[0]));
        assert!(
            seen.contains(&act) && seen.contains(&hidden.value),
            "every computed value is shown"
        );
        // Zero the hidden activation: the logits are the output layer's bias alone.
        let (outs, taps) = model
            .forward_with_edits(&[&x], Mode::Eval, &[act], &mut |v, t| {
                (v == act).then(|| t.zeros_like())
            })
            .unwrap();
        let bias = &model.params[output.bias.unwrap()].tensor;
        assert!(outs[0].allclose(&bias.unsqueeze(0).expand([2, 3], false), 1e-6, 1e-6, false));
        assert_eq!(
            taps[0].abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "taps see the edit"
        );
        assert!(
            !plain[0].allclose(&outs[0], 1e-6, 1e-6, false),
            "the edit changed the logits"
        );
        // A replacement with three copies of the batch runs the rest of the graph on six rows.
        let (outs, _) = model
            .forward_with_edits(&[&x], Mode::Eval, &[], &mut |v, t| {
                (v == hidden.value).then(|| t.repeat([3, 1]))
            })
            .unwrap();
        assert_eq!(outs[0].size(), [6, 3]);
        assert!(outs[0].narrow(0, 4, 2).allclose(&plain[0], 1e-6, 1e-6, false));
    }
}
