//! A typed, read-only view of a loaded model's graph: nodes by id with their op class, the
//! producer and the consumers of every value, and the walks the analyses and channel edits share
//! (is a layer downstream of a value; which activation follows a layer). One place knows which
//! ONNX ops keep a channel's index ([`OpClass::keeps_channel`]), so neurons, channel edits and
//! every defense agree on it.

use std::collections::HashSet;

use crate::model::Model;

/// Id of a value (a tensor name) in the graph.
pub type ValueId = usize;
/// Id of a node (its position in execution order).
pub type NodeId = usize;

/// What an op does to the channels of its first input, for walks along a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// A layer whose outputs are neurons: Conv, Gemm, MatMul.
    Layer,
    /// An element-wise activation (Relu, Sigmoid, Clip, ...).
    Activation,
    /// A per-channel normalisation (BatchNormalization, InstanceNormalization).
    Normalization,
    /// Returns its input unchanged at inference (Identity, Dropout).
    PassThrough,
    /// Pooling over space, per channel (MaxPool, AveragePool, the global poolings).
    Pool,
    /// Anything else (Add, Concat, Reshape, ...): a walk must look at the op itself.
    Other,
}

impl OpClass {
    /// The class of an ONNX op type of the default domain.
    pub fn of(op_type: &str) -> OpClass {
        match op_type {
            "Conv" | "Gemm" | "MatMul" => OpClass::Layer,
            "Relu" | "LeakyRelu" | "PRelu" | "Elu" | "Selu" | "Sigmoid" | "Tanh" | "Clip" | "HardSigmoid"
            | "HardSwish" | "Softplus" => OpClass::Activation,
            "BatchNormalization" | "InstanceNormalization" => OpClass::Normalization,
            "Identity" | "Dropout" => OpClass::PassThrough,
            "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" => OpClass::Pool,
            _ => OpClass::Other,
        }
    }

    /// Acts on each channel of its first input separately, so a channel keeps its index.
    pub fn keeps_channel(self) -> bool {
        matches!(
            self,
            OpClass::Activation | OpClass::Normalization | OpClass::PassThrough | OpClass::Pool
        )
    }

    /// May stand between a layer and its activation without changing what the activation means
    /// per channel (a normalisation, an identity).
    pub fn before_activation(self) -> bool {
        matches!(self, OpClass::Normalization | OpClass::PassThrough)
    }
}

/// One node of the graph.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'m> {
    pub id: NodeId,
    pub name: &'m str,
    pub op_type: &'m str,
    pub class: OpClass,
    /// Input values by slot (`None` for an omitted optional input).
    pub inputs: &'m [Option<ValueId>],
    pub outputs: &'m [ValueId],
}

impl NodeView<'_> {
    /// The value in input slot `slot`, if given.
    pub fn input(&self, slot: usize) -> Option<ValueId> {
        self.inputs.get(slot).copied().flatten()
    }
}

/// The graph of a [`Model`], with producer and consumer indexes built once.
#[derive(Debug)]
pub struct Graph<'m> {
    model: &'m Model,
    producers: Vec<Option<NodeId>>,
    consumers: Vec<Vec<(NodeId, usize)>>,
}

impl Model {
    /// A typed view of this model's graph.
    pub fn graph(&self) -> Graph<'_> {
        Graph::new(self)
    }
}

impl<'m> Graph<'m> {
    pub fn new(model: &'m Model) -> Graph<'m> {
        let values = model.value_names.len();
        let mut producers = vec![None; values];
        let mut consumers: Vec<Vec<(NodeId, usize)>> = vec![Vec::new(); values];
        for (ni, n) in model.nodes.iter().enumerate() {
            for &v in &n.outputs {
                producers[v] = Some(ni);
            }
            for (slot, v) in n.inputs.iter().enumerate() {
                if let Some(v) = v {
                    consumers[*v].push((ni, slot));
                }
            }
        }
        Graph {
            model,
            producers,
            consumers,
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.model.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.model.nodes.is_empty()
    }

    /// Node `id` (panics when out of range, like slice indexing).
    pub fn node(&self, id: NodeId) -> NodeView<'m> {
        let n = &self.model.nodes[id];
        NodeView {
            id,
            name: &n.name,
            op_type: &n.op_type,
            class: OpClass::of(&n.op_type),
            inputs: &n.inputs,
            outputs: &n.outputs,
        }
    }

    /// Every node in execution order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeView<'m>> + '_ {
        (0..self.len()).map(|i| self.node(i))
    }

    /// The node named `name`.
    pub fn node_named(&self, name: &str) -> Option<NodeView<'m>> {
        self.nodes().find(|n| n.name == name)
    }

    /// The name of value `v`.
    pub fn value_name(&self, v: ValueId) -> &'m str {
        &self.model.value_names[v]
    }

    /// The id of the value named `name`.
    pub fn value(&self, name: &str) -> Option<ValueId> {
        self.model.value_id(name)
    }

    /// The node that computes `v` (`None` for graph inputs and initializers).
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        self.producers.get(v).copied().flatten()
    }

    /// The nodes that read `v`, with the input slot they read it in.
    pub fn consumers(&self, v: ValueId) -> &[(NodeId, usize)] {
        self.consumers.get(v).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether any node of `targets` is reachable downstream of value `v`. The walk does not
    /// continue past a target.
    pub fn reaches(&self, v: ValueId, targets: &HashSet<NodeId>) -> bool {
        let mut stack = vec![v];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            for &(ni, _) in self.consumers(v) {
                if targets.contains(&ni) {
                    return true;
                }
                stack.extend(self.model.nodes[ni].outputs.iter().copied());
            }
        }
        false
    }

    /// From a layer's output `v`, follows a chain of single consumers that read it as their first
    /// input through ops that may stand before an activation ([`OpClass::before_activation`]) to
    /// the first activation: `(its output, true)`, or `(the last value reached, false)`.
    pub fn activation_after(&self, v: ValueId) -> (ValueId, bool) {
        let mut v = v;
        loop {
            let [(ni, 0)] = self.consumers(v) else {
                return (v, false);
            };
            let n = self.node(*ni);
            let Some(&out) = n.outputs.first() else {
                return (v, false);
            };
            match n.class {
                OpClass::Activation => return (out, true),
                c if c.before_activation() => v = out,
                _ => return (v, false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{self, Arch};

    #[test]
    fn op_classes_cover_the_channel_walks() {
        assert_eq!(OpClass::of("Conv"), OpClass::Layer);
        assert_eq!(OpClass::of("Relu"), OpClass::Activation);
        assert_eq!(OpClass::of("BatchNormalization"), OpClass::Normalization);
        assert_eq!(OpClass::of("Dropout"), OpClass::PassThrough);
        assert_eq!(OpClass::of("GlobalAveragePool"), OpClass::Pool);
        assert_eq!(OpClass::of("Add"), OpClass::Other);
        assert!(OpClass::Pool.keeps_channel() && !OpClass::Pool.before_activation());
        assert!(OpClass::Normalization.before_activation());
        assert!(!OpClass::Other.keeps_channel() && !OpClass::Layer.keeps_channel());
    }

    #[test]
    fn producers_consumers_and_walks_on_a_zoo_model() {
        let proto = zoo::build(Arch::SmallCnn, [1, 8, 8], 3, 1).expect("zoo model");
        let model = Model::load(&zoo::to_bytes(&proto), None).expect("model loads");
        let g = model.graph();
        assert!(!g.is_empty());
        // Every node's outputs are produced by it; every input it reads lists it as a consumer.
        for n in g.nodes() {
            for &o in n.outputs {
                assert_eq!(g.producer(o), Some(n.id));
            }
            for (slot, v) in n.inputs.iter().enumerate() {
                if let Some(v) = v {
                    assert!(g.consumers(*v).contains(&(n.id, slot)));
                }
            }
        }
        let layers = model.layers();
        let first = layers.iter().find(|l| l.op_type == "Conv").expect("a conv");
        let (act, found) = g.activation_after(first.value);
        assert!(found, "a Relu follows the first conv of the small CNN");
        let producer = g.node(g.producer(act).unwrap());
        assert_eq!(producer.class, OpClass::Activation);
        // The first conv reaches the output layer; the output layer reaches no other layer.
        let output = layers.iter().find(|l| l.is_output).expect("an output layer");
        let out_node: HashSet<NodeId> = [g.node_named(&output.node).unwrap().id].into();
        assert!(g.reaches(first.value, &out_node));
        assert!(!g.reaches(output.value, &out_node));
        assert_eq!(g.value(g.value_name(act)), Some(act));
    }
}
