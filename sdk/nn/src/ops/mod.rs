//! The op registry: a map from ONNX op type to a builder, filled per op family. A builder reads
//! the node's attributes once (at load time, so a bad attribute fails there) and returns an [`Op`]
//! that runs on tch tensors.

use std::collections::HashMap;
use std::sync::OnceLock;

use tch::Tensor;

use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};

mod basic;

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inference: BatchNormalization uses running statistics, Dropout is the identity.
    Eval,
    /// Training: BatchNormalization uses batch statistics and updates its running statistics.
    Train,
    /// Training with BatchNormalization frozen: running statistics used and kept fixed (affine
    /// parameters still train).
    TrainFrozenBn,
}

impl Mode {
    /// True when gradients will be taken (Train or TrainFrozenBn).
    pub fn training(self) -> bool {
        self != Mode::Eval
    }
}

/// Context of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct RunCtx {
    pub mode: Mode,
}

/// A runnable op. `inputs` follow the node's input list (`None` for an omitted optional input).
pub trait Op: std::fmt::Debug + Send + Sync {
    /// Runs the op. The error is a message; the caller adds the node name and op type.
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String>;
}

/// What a builder sees.
#[derive(Debug)]
pub struct BuildCtx<'a> {
    pub node: &'a NodeProto,
    /// The opset version of the default domain.
    pub opset: i64,
}

impl BuildCtx<'_> {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name() == name)
    }

    /// An INT attribute.
    pub fn int(&self, name: &str) -> Result<Option<i64>, String> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::Int || a.i.is_some() => Ok(Some(a.i())),
            Some(a) => Err(format!("attribute `{name}` should be an int, is {:?}", a.r#type())),
        }
    }
    /// An INT attribute with a default.
    pub fn int_or(&self, name: &str, default: i64) -> Result<i64, String> {
        Ok(self.int(name)?.unwrap_or(default))
    }
    /// A FLOAT attribute with a default.
    pub fn float_or(&self, name: &str, default: f32) -> Result<f32, String> {
        match self.attr(name) {
            None => Ok(default),
            Some(a) if a.r#type() == AttributeType::Float || a.f.is_some() => Ok(a.f()),
            Some(a) => Err(format!("attribute `{name}` should be a float, is {:?}", a.r#type())),
        }
    }
    /// An INTS attribute.
    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, String> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) if a.r#type() == AttributeType::Ints || !a.ints.is_empty() => Ok(Some(a.ints.clone())),
            Some(a) => Err(format!("attribute `{name}` should be ints, is {:?}", a.r#type())),
        }
    }
    /// A FLOATS attribute.
    pub fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, String> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) => Ok(Some(a.floats.clone())),
        }
    }
    /// A STRING attribute with a default.
    pub fn string_or(&self, name: &str, default: &str) -> Result<String, String> {
        match self.attr(name) {
            None => Ok(default.to_string()),
            Some(a) => String::from_utf8(a.s().to_vec()).map_err(|_| format!("attribute `{name}` is not UTF-8")),
        }
    }
    /// A TENSOR attribute.
    pub fn tensor(&self, name: &str) -> Option<&crate::proto::TensorProto> {
        self.attr(name).and_then(|a| a.t.as_ref())
    }
    /// Any attribute present?
    pub fn has(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }
}

/// Builds an op from a node.
pub type Builder = fn(&BuildCtx<'_>) -> Result<Box<dyn Op>, String>;

/// The registry: op type -> builder.
pub fn registry() -> &'static HashMap<&'static str, Builder> {
    static REG: OnceLock<HashMap<&'static str, Builder>> = OnceLock::new();
    REG.get_or_init(|| {
        let mut m: HashMap<&'static str, Builder> = HashMap::new();
        basic::register(&mut m);
        m
    })
}

/// Helpers shared by op families.
pub(crate) mod util {
    use tch::Tensor;

    /// The required input `i`.
    pub fn input<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor, String> {
        inputs.get(i).copied().flatten().ok_or_else(|| format!("missing required input {i}"))
    }

    /// A 1-D integer tensor's values (shapes, axes, pads given as inputs).
    pub fn ints(t: &Tensor) -> Result<Vec<i64>, String> {
        Vec::<i64>::try_from(t.to_kind(tch::Kind::Int64).flatten(0, -1)).map_err(|e| e.to_string())
    }

    /// A scalar float from a tensor.
    pub fn scalar(t: &Tensor) -> f64 {
        t.to_kind(tch::Kind::Double).flatten(0, -1).double_value(&[0])
    }

    /// Normalises a possibly negative axis against `rank`.
    pub fn axis(a: i64, rank: i64) -> Result<i64, String> {
        let r = if a < 0 { a + rank } else { a };
        if (0..rank.max(1)).contains(&r) {
            Ok(r)
        } else {
            Err(format!("axis {a} out of range for rank {rank}"))
        }
    }

    /// Wraps one output.
    pub fn one(t: Tensor) -> Result<Vec<Tensor>, String> {
        Ok(vec![t])
    }
}
