//! The op registry: a map from ONNX op type to a builder, filled per op family. A builder reads
//! the node's attributes once (at load time, so a bad attribute fails there) and returns an [`Op`]
//! that runs on tch tensors.

use std::collections::HashMap;
use std::sync::OnceLock;

use tch::Tensor;

use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};

mod conv;
mod elementwise;
mod linear;
mod misc;
mod norm;
mod pool;
mod reduce;
mod resize;
mod shape;

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
        conv::register(&mut m);
        elementwise::register(&mut m);
        linear::register(&mut m);
        misc::register(&mut m);
        norm::register(&mut m);
        pool::register(&mut m);
        reduce::register(&mut m);
        resize::register(&mut m);
        shape::register(&mut m);
        m
    })
}

/// Helpers shared by op families.
pub(crate) mod util {
    use tch::Tensor;

    /// The required input `i`.
    pub fn input<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor, String> {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing required input {i}"))
    }

    /// A 1-D integer tensor's values (shapes, axes, pads given as inputs).
    pub fn ints(t: &Tensor) -> Result<Vec<i64>, String> {
        Vec::<i64>::try_from(t.to_kind(tch::Kind::Int64).flatten(0, -1)).map_err(|e| e.to_string())
    }

    /// The single value of a scalar (or one-element) tensor, as f64.
    pub fn scalar(t: &Tensor) -> Result<f64, String> {
        if t.numel() != 1 {
            return Err(format!("expected a single value, got shape {:?}", t.size()));
        }
        t.f_to_dtype(tch::Kind::Double, false, false)
            .and_then(|t| t.f_flatten(0, -1))
            .and_then(|t| t.f_double_value(&[0]))
            .map_err(|e| e.to_string())
    }

    /// `a` as a dimension index of `x`, which must have at least one dimension.
    pub fn dim_of(x: &Tensor, a: i64) -> Result<usize, String> {
        if x.dim() == 0 {
            return Err("the input is a scalar (rank 0), it has no axis".into());
        }
        axis(a, x.dim() as i64).map(|a| a as usize)
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

    /// Wraps one fallible tch result as the op's single output.
    pub fn one_tch(t: Result<Tensor, tch::TchError>) -> Result<Vec<Tensor>, String> {
        t.map(|t| vec![t]).map_err(|e| e.to_string())
    }

    /// A tch error as the op's message.
    pub fn tch_err(e: tch::TchError) -> String {
        e.to_string()
    }

    /// The optional input `i` (`None` when absent or omitted with an empty name).
    pub fn opt<'a>(inputs: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
        inputs.get(i).copied().flatten()
    }

    /// True for floating-point kinds.
    pub fn is_float(k: tch::Kind) -> bool {
        matches!(
            k,
            tch::Kind::Float | tch::Kind::Double | tch::Kind::Half | tch::Kind::BFloat16
        )
    }

    /// `ts` on one device: unchanged when they already share one, else all moved to the first
    /// non-CPU device (a `Constant` is built on the CPU while the graph may run on a GPU).
    pub fn same_device(ts: &[&Tensor]) -> Vec<Tensor> {
        let first = ts.first().map(|t| t.device());
        if ts.iter().all(|t| Some(t.device()) == first) {
            return ts.iter().map(|t| t.shallow_clone()).collect();
        }
        let dev = ts
            .iter()
            .map(|t| t.device())
            .find(|d| *d != tch::Device::Cpu)
            .unwrap_or(tch::Device::Cpu);
        ts.iter()
            .map(|t| {
                if t.device() == dev {
                    t.shallow_clone()
                } else {
                    t.to_device(dev)
                }
            })
            .collect()
    }

    /// Numpy (multidirectional) broadcast of two shapes.
    pub fn broadcast_shapes(a: &[i64], b: &[i64]) -> Result<Vec<i64>, String> {
        let n = a.len().max(b.len());
        let get = |s: &[i64], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
        (0..n)
            .map(|i| match (get(a, i), get(b, i)) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
            })
            .collect()
    }

    /// Normalises a list of possibly negative axes against `rank`, rejecting duplicates.
    pub fn axes(list: &[i64], rank: i64) -> Result<Vec<i64>, String> {
        let mut out = Vec::with_capacity(list.len());
        for &a in list {
            let r = axis(a, rank)?;
            if out.contains(&r) {
                return Err(format!("axis {a} repeated in {list:?}"));
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// Helpers for the op unit tests: hand-built nodes run on small tensors.
#[cfg(test)]
pub(crate) mod tests_util {
    use tch::{Kind, Tensor};

    use super::{registry, BuildCtx, Mode, RunCtx};
    use crate::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto};

    /// A node of `op` with inputs `x0..x{n-1}` and one output.
    pub fn node(op: &str, n_inputs: usize) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: (0..n_inputs).map(|i| format!("x{i}")).collect(),
            output: vec!["y".into()],
            ..Default::default()
        }
    }

    pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        }
    }
    pub fn int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(v),
            ..Default::default()
        }
    }
    pub fn float(name: &str, v: f32) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Float as i32),
            f: Some(v),
            ..Default::default()
        }
    }
    pub fn string(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::String as i32),
            s: Some(v.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    /// A float tensor of `shape`.
    pub fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }
    /// An Int64 tensor of `shape`.
    pub fn i(v: &[i64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }

    /// Builds and runs `node` in eval mode at `opset`; returns the full output tensors.
    pub fn run_tensors(node: &NodeProto, opset: i64, inputs: &[Option<&Tensor>]) -> Vec<Tensor> {
        let build = registry().get(node.op_type()).expect("registered op");
        let op = build(&BuildCtx { node, opset }).expect("builds");
        op.run(&RunCtx { mode: Mode::Eval }, inputs).expect("runs")
    }

    /// As [`run_tensors`], each output flattened to f64 values.
    pub fn run_node(node: &NodeProto, opset: i64, inputs: &[Option<&Tensor>]) -> Vec<Vec<f64>> {
        run_tensors(node, opset, inputs).iter().map(values).collect()
    }

    /// The values of a tensor as f64.
    pub fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("values")
    }

    /// The error a node gives at build time.
    pub fn build_err(node: &NodeProto, opset: i64) -> String {
        let build = registry().get(node.op_type()).expect("registered op");
        build(&BuildCtx { node, opset }).expect_err("should not build")
    }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    use super::tests_util::{i, int, ints, node, string, t};
    use super::{registry, BuildCtx, Mode, RunCtx};
    use crate::proto::NodeProto;

    fn run(n: &NodeProto, opset: i64, mode: Mode, inputs: &[Option<&Tensor>]) -> Vec<Tensor> {
        let op = registry()[n.op_type()](&BuildCtx { node: n, opset }).unwrap();
        op.run(&RunCtx { mode }, inputs).unwrap()
    }

    /// Data-movement and interpolation ops pass gradients back to their float input.
    #[test]
    fn ops_keep_gradients() {
        let mut resize = node("Resize", 3);
        resize.attribute.push(string("mode", "linear"));
        let mut pad = node("Pad", 2);
        pad.attribute.push(string("mode", "reflect"));
        let mut pool = node("AveragePool", 1);
        pool.attribute.extend([
            ints("kernel_shape", &[2, 2]),
            ints("pads", &[0, 0, 1, 1]),
            int("ceil_mode", 1),
        ]);
        let mut gather = node("Gather", 2);
        gather.attribute.push(int("axis", 2));
        // Each op with its inputs after the data.
        let cases: Vec<(NodeProto, Vec<Option<Tensor>>)> = vec![
            (resize, vec![None, Some(t(&[1.0, 1.0, 1.5, 2.0], &[4]))]),
            (pad, vec![Some(i(&[0, 0, 1, 2, 0, 0, 1, 2], &[8]))]),
            (
                node("Slice", 5),
                vec![
                    Some(i(&[-1], &[1])),
                    Some(i(&[i64::MIN], &[1])),
                    Some(i(&[3], &[1])),
                    Some(i(&[-2], &[1])),
                ],
            ),
            (pool, vec![]),
            (gather, vec![Some(i(&[1, -1], &[2]))]),
        ];
        for (n, rest) in cases {
            let x = Tensor::arange(24, (Kind::Float, tch::Device::Cpu))
                .reshape([1, 2, 3, 4])
                .set_requires_grad(true);
            let mut ins = vec![Some(&x)];
            ins.extend(rest.iter().map(Option::as_ref));
            let y = run(&n, 13, Mode::Train, &ins).remove(0);
            y.sum(Kind::Float).backward();
            let total = x.grad().sum(Kind::Float).double_value(&[]);
            assert!(
                total.is_finite() && total > 0.0,
                "{}: gradient sum {total}",
                n.op_type()
            );
        }
    }

    #[test]
    fn dropout_is_the_identity_in_eval_and_drops_in_train() {
        let x = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
        let mut n = node("Dropout", 1);
        n.output.push("mask".into());
        n.attribute.push(super::tests_util::float("ratio", 0.5));
        let y = run(&n, 11, Mode::Eval, &[Some(&x)]);
        assert!(y[0].equal(&x) && y[1].kind() == Kind::Bool);
        let y = run(&n, 11, Mode::Train, &[Some(&x)]);
        let kept = y[1].to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
        assert!((300.0..700.0).contains(&kept), "{kept}");
        // Kept values are scaled by 1 / (1 - ratio).
        assert_eq!(y[0].sum(Kind::Float).double_value(&[]), 2.0 * kept);
        // Frozen-BN fine-tuning keeps the identity.
        assert!(run(&n, 11, Mode::TrainFrozenBn, &[Some(&x)])[0].equal(&x));
        // Opset 12+: the ratio is an input.
        let r = t(&[0.25], &[]);
        let mut n12 = node("Dropout", 2);
        n12.output.push("mask".into());
        let y = run(&n12, 13, Mode::Train, &[Some(&x), Some(&r)]);
        let kept = y[1].to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
        assert!((650.0..850.0).contains(&kept), "{kept}");
    }

    #[test]
    fn bad_attributes_fail_at_build_time() {
        use super::tests_util::build_err;
        let mut r = node("Resize", 3);
        r.attribute.push(string("mode", "area"));
        assert!(build_err(&r, 13).contains("mode `area`"));
        let mut r = node("Resize", 3);
        r.attribute.push(string("coordinate_transformation_mode", "weird"));
        assert!(build_err(&r, 13).contains("coordinate_transformation_mode"));
        let mut p = node("Pad", 2);
        p.attribute.push(string("mode", "mirror"));
        assert!(build_err(&p, 13).contains("mirror"));
        let mut a = node("AveragePool", 1);
        a.attribute
            .extend([ints("kernel_shape", &[2, 2]), ints("dilations", &[2, 2])]);
        assert!(build_err(&a, 19).contains("dilations"));
        let mut s = node("ReduceMean", 1);
        s.attribute.push(ints("axes", &[1]));
        assert!(build_err(&s, 18).contains("axes"));
        assert!(build_err(&node("Slice", 1), 9).contains("starts"));
    }
}
