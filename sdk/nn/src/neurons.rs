//! Neurons (output channels of a Conv, units of a hidden Gemm/MatMul, measured before
//! normalization and activation) and channel edits: reset (zero now, free to regrow) or mask
//! (kept at zero while training) a neuron's producer row and bias, a BatchNormalization on its
//! path, and the matching input slice of its consumers through per-channel ops (activations,
//! pooling, BN, Flatten/Reshape into Gemm).

use std::collections::{HashMap, HashSet};

use tch::{no_grad, Kind, Tensor};

use crate::error::{NnError, Result};
use crate::graph::OpClass;
use crate::model::{Model, ParamRole};
use crate::ops::Mode;

/// What kind of layer produces the neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Conv,
    /// Gemm: the weight is [out, in] when `trans_b`, else [in, out].
    Gemm {
        trans_b: bool,
    },
    /// MatMul with the weight as second input, [in, out].
    MatMul,
}

/// A layer whose outputs are neurons.
#[derive(Debug, Clone)]
pub struct Layer {
    pub node: String,
    /// Id of the node in [`Model::graph`].
    pub node_id: usize,
    pub op_type: String,
    pub kind: LayerKind,
    /// Value id of the layer's output (pre-normalization, pre-activation).
    pub value: usize,
    pub value_name: String,
    /// Value id of the layer's data input (for the output layer: the penultimate features).
    pub input: Option<usize>,
    pub channels: i64,
    /// Index of the weight in `model.params`.
    pub weight: usize,
    /// Index of the bias in `model.params`, if any.
    pub bias: Option<usize>,
    /// True for the layer that produces the logits (not monitored by analyses).
    pub is_output: bool,
}

/// A block of a parameter to zero: for each listed dim, a [start, end) range.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub param: usize,
    pub ranges: Vec<(i64, i64, i64)>,
}

impl Model {
    fn param_index(&self, value: usize) -> Option<usize> {
        self.params
            .iter()
            .position(|p| p.value == value && p.role != ParamRole::Constant)
    }

    fn node_attr_int(&self, node_idx: usize, name: &str) -> Option<i64> {
        let g = self.proto.graph.as_ref()?;
        g.node[self.nodes[node_idx].proto_index]
            .attribute
            .iter()
            .find(|a| a.name() == name)
            .map(|a| a.i())
    }

    /// Every layer with neurons, in execution order. The layer whose output reaches the graph
    /// output without passing another such layer is marked `is_output`.
    pub fn layers(&self) -> Vec<Layer> {
        let mut out = Vec::new();
        for (ni, n) in self.nodes.iter().enumerate() {
            let (kind, w_slot) = match n.op_type.as_str() {
                "Conv" => (LayerKind::Conv, 1),
                "Gemm" => (
                    LayerKind::Gemm {
                        trans_b: self.node_attr_int(ni, "transB").unwrap_or(0) != 0,
                    },
                    1,
                ),
                "MatMul" => (LayerKind::MatMul, 1),
                _ => continue,
            };
            let Some(weight) = n
                .inputs
                .get(w_slot)
                .copied()
                .flatten()
                .and_then(|v| self.param_index(v))
            else {
                continue;
            };
            let ws = self.params[weight].tensor.size();
            let channels = match kind {
                LayerKind::Conv => ws[0],
                LayerKind::Gemm { trans_b: true } => ws[0],
                LayerKind::Gemm { trans_b: false } | LayerKind::MatMul if ws.len() == 2 => ws[1],
                _ => continue,
            };
            let bias = n.inputs.get(2).copied().flatten().and_then(|v| self.param_index(v));
            let value = n.outputs[0];
            let input = n.inputs.first().copied().flatten();
            out.push(Layer {
                node: n.name.clone(),
                node_id: ni,
                op_type: n.op_type.clone(),
                kind,
                value,
                value_name: self.value_names[value].clone(),
                input,
                channels,
                weight,
                bias,
                is_output: false,
            });
        }
        // The output layer: the last layer from which no other layer is reachable.
        // A Conv can be the output layer too: NiN-style models end with a conv that produces the
        // class maps (then a global pooling). Such a conv is never a neuron layer.
        let graph = self.graph();
        let layer_nodes: HashSet<usize> = out.iter().map(|l| l.node_id).collect();
        for l in &mut out {
            l.is_output = !graph.reaches(l.value, &layer_nodes);
        }
        out
    }

    /// Shapes of every value for one forward pass of `sample` (eval mode).
    pub fn value_shapes(&self, sample: &Tensor) -> Result<HashMap<usize, Vec<i64>>> {
        let all: Vec<usize> = (0..self.value_names.len())
            .filter(|&v| !self.input_ids.contains(&v))
            .collect();
        let computed: HashSet<usize> = self.nodes.iter().flat_map(|n| n.outputs.iter().copied()).collect();
        let taps: Vec<usize> = all.into_iter().filter(|v| computed.contains(v)).collect();
        let (_, vals) = no_grad(|| self.forward_with_taps(&[sample], Mode::Eval, &taps))?;
        Ok(taps.into_iter().zip(vals).map(|(v, t)| (v, t.size())).collect())
    }

    /// The parameter blocks that carry neuron `c` of `layer`. `shapes` comes from
    /// [`Model::value_shapes`] (needed to find the columns of a Gemm after Flatten).
    pub fn neuron_slices(&self, layer: &Layer, c: i64, shapes: &HashMap<usize, Vec<i64>>) -> Result<Vec<Slice>> {
        if c < 0 || c >= layer.channels {
            return Err(NnError::Other(format!(
                "neuron {c} out of range 0..{} of layer {}",
                layer.channels, layer.node
            )));
        }
        let mut slices = Vec::new();
        let producer_dim = match layer.kind {
            LayerKind::Conv | LayerKind::Gemm { trans_b: true } => 0,
            LayerKind::Gemm { trans_b: false } | LayerKind::MatMul => 1,
        };
        slices.push(Slice {
            param: layer.weight,
            ranges: vec![(producer_dim, c, c + 1)],
        });
        if let Some(b) = layer.bias {
            if self.params[b].tensor.dim() == 1 {
                slices.push(Slice {
                    param: b,
                    ranges: vec![(0, c, c + 1)],
                });
            }
        }
        // Walk forward through per-channel ops; track the flattened block size once flattened, and
        // whether a residual Add was crossed: the channel then continues into the next block (its
        // first conv's input slice is zeroed, as NONE's reference does), and the walk stops at
        // the following residual Add, where the skip path of the next block joins.
        let graph = self.graph();
        let mut stack: Vec<(usize, Option<i64>, bool)> = vec![(layer.value, None, false)];
        let mut seen = HashSet::new();
        while let Some((v, block, crossed)) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            for &(ni, slot) in graph.consumers(v) {
                let n = &self.nodes[ni];
                let input_param = |s: usize| n.inputs.get(s).copied().flatten().and_then(|v| self.param_index(v));
                match (n.op_type.as_str(), block) {
                    ("BatchNormalization", None) if slot == 0 => {
                        for s in [1, 2] {
                            if let Some(p) = input_param(s) {
                                slices.push(Slice {
                                    param: p,
                                    ranges: vec![(0, c, c + 1)],
                                });
                            }
                        }
                        stack.push((n.outputs[0], None, crossed));
                    }
                    (op, None) if OpClass::of(op).keeps_channel() && slot == 0 => {
                        stack.push((n.outputs[0], None, crossed))
                    }
                    ("Add", None) => {
                        // MatMul + Add(bias) pattern: a 1-D bias parameter of this width.
                        let other = 1 - slot.min(1);
                        match input_param(other) {
                            Some(p) if self.params[p].tensor.size() == vec![layer.channels] => {
                                slices.push(Slice {
                                    param: p,
                                    ranges: vec![(0, c, c + 1)],
                                });
                                stack.push((n.outputs[0], None, crossed));
                            }
                            Some(_) => {}
                            // A residual Add of two activations of the same shape.
                            None if !crossed && n.inputs.len() == 2 && self.same_shape(n, shapes) => {
                                stack.push((n.outputs[0], None, true))
                            }
                            None => {}
                        }
                    }
                    ("Flatten" | "Reshape", None) if slot == 0 => {
                        let shape = shapes
                            .get(&v)
                            .ok_or_else(|| NnError::Other(format!("no shape for value {}", self.value_names[v])))?;
                        let out_shape = shapes.get(&n.outputs[0]).cloned().unwrap_or_default();
                        if shape.len() >= 2 && out_shape.len() == 2 {
                            let per: i64 = shape[2..].iter().product();
                            stack.push((n.outputs[0], Some(per), crossed));
                        }
                    }
                    ("Conv", None) if slot == 0 => {
                        let Some(w) = input_param(1) else { continue };
                        let ws = self.params[w].tensor.size();
                        let groups = self.node_attr_int(ni, "group").unwrap_or(1).max(1);
                        let cin_per = ws[1];
                        let cout_per = ws[0] / groups;
                        let g = c / cin_per;
                        slices.push(Slice {
                            param: w,
                            ranges: vec![(0, g * cout_per, (g + 1) * cout_per), (1, c % cin_per, c % cin_per + 1)],
                        });
                    }
                    ("Gemm", Some(per)) | ("MatMul", Some(per)) if slot == 0 => {
                        let Some(w) = input_param(1) else { continue };
                        let trans_b = n.op_type == "Gemm" && self.node_attr_int(ni, "transB").unwrap_or(0) != 0;
                        let dim = if trans_b { 1 } else { 0 };
                        slices.push(Slice {
                            param: w,
                            ranges: vec![(dim, c * per, (c + 1) * per)],
                        });
                    }
                    ("Gemm", None) | ("MatMul", None) if slot == 0 => {
                        let Some(w) = input_param(1) else { continue };
                        let trans_b = n.op_type == "Gemm" && self.node_attr_int(ni, "transB").unwrap_or(0) != 0;
                        let dim = if trans_b { 1 } else { 0 };
                        slices.push(Slice {
                            param: w,
                            ranges: vec![(dim, c, c + 1)],
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(slices)
    }

    /// True when the node's inputs all have one known shape (no broadcasting).
    fn same_shape(&self, n: &crate::model::Node, shapes: &HashMap<usize, Vec<i64>>) -> bool {
        let mut it = n.inputs.iter().map(|i| i.and_then(|v| shapes.get(&v)));
        match it.next().flatten() {
            Some(first) => it.all(|s| s == Some(first)),
            None => false,
        }
    }

    /// Zeroes the given blocks in place (the tensors stay the same, so optimisers keep working).
    pub fn zero_slices(&self, slices: &[Slice]) {
        no_grad(|| {
            for s in slices {
                let mut t = self.params[s.param].tensor.shallow_clone();
                for &(dim, a, b) in &s.ranges {
                    t = t.narrow(dim, a, b - a);
                }
                let _ = t.zero_();
            }
        });
    }

    /// Masks (ones with zeros at the blocks), one per touched parameter, for `Trainer::add_mask`.
    pub fn masks_for(&self, slices: &[Slice]) -> Vec<(usize, Tensor)> {
        let mut masks: HashMap<usize, Tensor> = HashMap::new();
        for s in slices {
            let p = &self.params[s.param].tensor;
            let m = masks
                .entry(s.param)
                .or_insert_with(|| Tensor::ones_like(p).to_kind(Kind::Float));
            let mut t = m.shallow_clone();
            for &(dim, a, b) in &s.ranges {
                t = t.narrow(dim, a, b - a);
            }
            let _ = t.zero_();
        }
        let mut v: Vec<(usize, Tensor)> = masks.into_iter().collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }

    /// Resets neurons `channels` of `layer`: zeroes their producer rows and biases, BN on the path
    /// and consumers' input slices. Returns the blocks zeroed.
    pub fn reset_neurons(
        &self,
        layer: &Layer,
        channels: &[i64],
        shapes: &HashMap<usize, Vec<i64>>,
    ) -> Result<Vec<Slice>> {
        let mut all = Vec::new();
        for &c in channels {
            all.extend(self.neuron_slices(layer, c, shapes)?);
        }
        self.zero_slices(&all);
        Ok(all)
    }
}

/// What one pass over a dataset collected: softmax probabilities and, per layer, each
/// channel's spatial maximum (or the unit's value for dense layers), all on the device.
#[derive(Debug)]
pub struct Activations {
    /// [N, K].
    pub probs: Tensor,
    /// One [N, C_l] tensor per requested layer.
    pub channel_max: Vec<Tensor>,
    /// One [N, C_l] tensor per requested layer: spatial means.
    pub channel_mean: Vec<Tensor>,
    /// [N, D]: the requested feature value (e.g. the penultimate features, the output layer's
    /// input), flattened per sample; None when none was requested.
    pub features: Option<Tensor>,
}

impl Model {
    /// One eval-mode pass over `data` (no augmentation) collecting softmax outputs and the
    /// per-channel spatial maxima and means of `layers`' outputs (pre-normalization, pre-activation).
    pub fn collect_activations(
        &self,
        data: &crate::train::DeviceData,
        pre: &crate::train::Preprocess,
        layers: &[Layer],
        batch: i64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Activations> {
        self.collect_activations_and_features(data, pre, layers, None, batch, progress)
    }

    /// As [`Model::collect_activations`], and also the value `features` (a value id), flattened
    /// to [N, D] per sample: NONE's class-wise split reads the penultimate features this way.
    pub fn collect_activations_and_features(
        &self,
        data: &crate::train::DeviceData,
        pre: &crate::train::Preprocess,
        layers: &[Layer],
        features: Option<usize>,
        batch: i64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Activations> {
        let mut taps: Vec<usize> = layers.iter().map(|l| l.value).collect();
        taps.extend(features);
        let mut feats: Vec<Tensor> = Vec::new();
        let n = data.len();
        let steps = ((n + batch - 1) / batch.max(1)) as u64;
        let mut probs: Vec<Tensor> = Vec::new();
        let mut maxs: Vec<Vec<Tensor>> = (0..layers.len()).map(|_| Vec::new()).collect();
        let mut means: Vec<Vec<Tensor>> = (0..layers.len()).map(|_| Vec::new()).collect();
        no_grad(|| -> Result<()> {
            let mut s = 0;
            let mut step = 0;
            while s < n {
                let k = (n - s).min(batch);
                let x = pre.apply(&data.x.narrow(0, s, k));
                let (outs, vals) = self.forward_with_taps(&[&x], Mode::Eval, &taps)?;
                probs.push(outs[0].softmax(-1, Kind::Float));
                for (i, v) in vals.iter().enumerate() {
                    let v = v.to_kind(Kind::Float);
                    if i == layers.len() {
                        feats.push(v.flatten(1, -1));
                        continue;
                    }
                    let (mx, mn) = if v.dim() > 2 {
                        let flat = v.flatten(2, -1);
                        (
                            flat.amax([2], false),
                            flat.mean_dim([2i64].as_slice(), false, Kind::Float),
                        )
                    } else {
                        (v.shallow_clone(), v.shallow_clone())
                    };
                    maxs[i].push(mx);
                    means[i].push(mn);
                }
                s += k;
                step += 1;
                progress(step, steps);
            }
            Ok(())
        })?;
        Ok(Activations {
            probs: Tensor::cat(&probs, 0),
            channel_max: maxs.iter().map(|v| Tensor::cat(v, 0)).collect(),
            channel_mean: means.iter().map(|v| Tensor::cat(v, 0)).collect(),
            features: (!feats.is_empty()).then(|| Tensor::cat(&feats, 0)),
        })
    }
}
