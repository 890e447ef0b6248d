//! Shape and data-movement ops: Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice,
//! Gather, GatherElements, Shape, Size, Constant, ConstantOfShape, Cast, CastLike, Pad, Tile,
//! Expand, Range, DepthToSpace, SpaceToDepth.
//!
//! Shapes, axes and indices read from tensors stay Int64 end to end; data moves through tch views
//! and index_select, so gradients flow.

use std::collections::HashMap;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::util::{axes, axis, broadcast_shapes, dim_of, input, ints, one, one_tch, opt, same_device, scalar, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};
use crate::tensor::{kind_of, tensor_from_proto};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("Flatten", build_flatten);
    m.insert("Reshape", build_reshape);
    m.insert("Transpose", build_transpose);
    m.insert("Squeeze", build_squeeze);
    m.insert("Unsqueeze", build_unsqueeze);
    m.insert("Concat", build_concat);
    m.insert("Split", build_split);
    m.insert("Slice", build_slice);
    m.insert("Gather", build_gather);
    m.insert("GatherElements", build_gather_elements);
    m.insert("Shape", build_shape);
    m.insert("Size", |_| Ok(Box::new(Size)));
    m.insert("Constant", build_constant);
    m.insert("ConstantOfShape", build_constant_of_shape);
    m.insert("Cast", build_cast);
    m.insert("CastLike", |_| Ok(Box::new(CastLike)));
    m.insert("Pad", build_pad);
    m.insert("Tile", build_tile);
    m.insert("Expand", |_| Ok(Box::new(Expand)));
    m.insert("Range", |_| Ok(Box::new(Range)));
    m.insert("DepthToSpace", build_depth_to_space);
    m.insert("SpaceToDepth", build_space_to_depth);
}

/// Integer list given by an attribute (older opsets) or else by input `i` (newer ones).
fn attr_or_input(attr: &Option<Vec<i64>>, inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>, String> {
    match (attr, opt(inputs, i)) {
        (Some(v), _) => Ok(Some(v.clone())),
        (None, Some(t)) => Ok(Some(ints(t)?)),
        (None, None) => Ok(None),
    }
}

#[derive(Debug)]
struct Reshape {
    allowzero: bool,
}

fn build_reshape(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    if b.opset < 5 {
        return Err(format!(
            "Reshape-{} (shape as an attribute) is not supported; opset 5+ is",
            b.opset
        ));
    }
    Ok(Box::new(Reshape {
        allowzero: b.int_or("allowzero", 0)? != 0,
    }))
}

/// The target shape of a Reshape: 0 copies the input dim (unless `allowzero`), -1 is inferred.
pub(crate) fn reshape_target(xs: &[i64], shape: &[i64], allowzero: bool) -> Result<Vec<i64>, String> {
    let mut out = shape.to_vec();
    if shape.iter().filter(|&&d| d == -1).count() > 1 || shape.iter().any(|&d| d < -1) {
        return Err(format!("invalid shape {shape:?} (at most one -1, no other negative)"));
    }
    if allowzero {
        if shape.contains(&0) && shape.contains(&-1) {
            return Err(format!("shape {shape:?} has both 0 and -1 with allowzero=1"));
        }
    } else {
        for (i, d) in out.iter_mut().enumerate() {
            if *d == 0 {
                *d = *xs
                    .get(i)
                    .ok_or_else(|| format!("shape {shape:?}: 0 at {i} but the input has rank {}", xs.len()))?;
            }
        }
    }
    let known = out
        .iter()
        .filter(|&&d| d != -1)
        .try_fold(1i64, |p, &d| p.checked_mul(d));
    let known = known.ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let total: i64 = xs.iter().product();
    if let Some(p) = out.iter().position(|&d| d == -1) {
        if known == 0 || total % known != 0 {
            return Err(format!("cannot reshape {xs:?} to {shape:?}"));
        }
        out[p] = total / known;
    } else if known != total {
        return Err(format!("cannot reshape {xs:?} ({total} elements) to {shape:?}"));
    }
    Ok(out)
}

impl Op for Reshape {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let shape = ints(input(inputs, 1)?)?;
        let target = reshape_target(&x.size(), &shape, self.allowzero)?;
        one_tch(x.f_reshape(&target[..]))
    }
}

#[derive(Debug)]
struct Transpose {
    perm: Option<Vec<i64>>,
}

fn build_transpose(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Transpose { perm: b.ints("perm")? }))
}

impl Op for Transpose {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let r = x.dim() as i64;
        let perm = match &self.perm {
            Some(p) => {
                let p = axes(p, r)?;
                if p.len() as i64 != r {
                    return Err(format!("perm {p:?} does not fit rank {r}"));
                }
                p
            }
            None => (0..r).rev().collect(),
        };
        one_tch(x.f_permute(&perm[..]))
    }
}

#[derive(Debug)]
struct Squeeze {
    axes: Option<Vec<i64>>,
}

fn build_squeeze(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Squeeze { axes: b.ints("axes")? }))
}

impl Op for Squeeze {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        match attr_or_input(&self.axes, inputs, 1)? {
            None => one_tch(x.f_squeeze()),
            Some(list) if list.is_empty() => one_tch(x.f_squeeze()),
            Some(_) if s.is_empty() => Err("cannot squeeze an axis of a scalar".into()),
            Some(list) => {
                let list = axes(&list, s.len() as i64)?;
                if let Some(a) = list.iter().find(|&&a| s[a as usize] != 1) {
                    return Err(format!(
                        "cannot squeeze axis {a} of size {} (shape {s:?})",
                        s[*a as usize]
                    ));
                }
                one_tch(x.f_squeeze_dims(&list[..]))
            }
        }
    }
}

#[derive(Debug)]
struct Unsqueeze {
    axes: Option<Vec<i64>>,
}

fn build_unsqueeze(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let list = b.ints("axes")?;
    if b.opset < 13 && list.is_none() {
        return Err("Unsqueeze needs the `axes` attribute before opset 13".into());
    }
    Ok(Box::new(Unsqueeze { axes: list }))
}

impl Op for Unsqueeze {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let list = attr_or_input(&self.axes, inputs, 1)?.ok_or("Unsqueeze needs axes (input 1)")?;
        let mut list = axes(&list, x.dim() as i64 + list.len() as i64)?;
        list.sort_unstable();
        let mut y = x.shallow_clone();
        for a in list {
            y = y.f_unsqueeze(a).map_err(tch_err)?;
        }
        one(y)
    }
}

#[derive(Debug)]
struct Concat {
    axis: i64,
}

fn build_concat(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let a = match b.int("axis")? {
        Some(a) => a,
        None if b.opset < 4 => 1,
        None => return Err("Concat needs the `axis` attribute".into()),
    };
    Ok(Box::new(Concat { axis: a }))
}

impl Op for Concat {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let ins: Vec<&Tensor> = inputs
            .iter()
            .map(|t| t.ok_or("an input is omitted"))
            .collect::<Result<_, _>>()?;
        let first = ins.first().ok_or("no inputs")?;
        let a = axis(self.axis, first.dim() as i64)?;
        let ins = same_device(&ins);
        one_tch(Tensor::f_cat(&ins, a))
    }
}

#[derive(Debug)]
struct Split {
    axis: i64,
    split: Option<Vec<i64>>,
    /// Opset 18+: number of outputs when no split is given.
    num_outputs: Option<i64>,
    outputs: usize,
}

fn build_split(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let num_outputs = b.int("num_outputs")?;
    if let Some(n) = num_outputs {
        if n < 1 {
            return Err(format!("num_outputs {n} must be positive"));
        }
    }
    Ok(Box::new(Split {
        axis: b.int_or("axis", 0)?,
        split: b.ints("split")?,
        num_outputs,
        outputs: b.node.output.len(),
    }))
}

/// Sizes of `n` near-equal chunks of `d` (the last one smaller when `d` does not divide).
pub(crate) fn equal_split(d: i64, n: i64) -> Result<Vec<i64>, String> {
    if n < 1 {
        return Err("split into no outputs".into());
    }
    let chunk = (d + n - 1) / n;
    let last = d - chunk * (n - 1);
    if last < 0 {
        return Err(format!("cannot split a dimension of {d} into {n} outputs"));
    }
    let mut v = vec![chunk; n as usize - 1];
    v.push(last);
    Ok(v)
}

impl Op for Split {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let a = dim_of(x, self.axis)?;
        let d = x.size()[a];
        let sizes = match attr_or_input(&self.split, inputs, 1)? {
            Some(s) if !s.is_empty() => s,
            _ => equal_split(d, self.num_outputs.unwrap_or(self.outputs as i64))?,
        };
        if sizes.iter().sum::<i64>() != d || sizes.iter().any(|&s| s < 0) {
            return Err(format!("split {sizes:?} does not add up to dimension {a} of size {d}"));
        }
        if sizes.len() != self.outputs {
            return Err(format!(
                "split {sizes:?} gives {} parts for {} outputs",
                sizes.len(),
                self.outputs
            ));
        }
        x.f_split_with_sizes(&sizes[..], a as i64).map_err(tch_err)
    }
}

/// Slice-1's attributes: starts, ends, axes.
type SliceAttrs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>);

#[derive(Debug)]
struct Slice {
    /// Opset < 10: starts, ends, axes as attributes.
    attrs: Option<SliceAttrs>,
}

fn build_slice(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    if b.opset < 10 {
        let starts = b.ints("starts")?.ok_or("Slice-1 needs `starts`")?;
        let ends = b.ints("ends")?.ok_or("Slice-1 needs `ends`")?;
        return Ok(Box::new(Slice {
            attrs: Some((starts, ends, b.ints("axes")?)),
        }));
    }
    Ok(Box::new(Slice { attrs: None }))
}

/// Slices `x` along `a` from `start` to `end` (exclusive) by `step`, with ONNX clamping: negative
/// indices count from the end, out-of-range ones (INT_MAX, INT_MIN) are clamped, negative steps
/// walk backwards.
pub(crate) fn slice_axis(x: &Tensor, a: i64, start: i64, end: i64, step: i64) -> Result<Tensor, String> {
    if step == 0 {
        return Err("slice step 0".into());
    }
    // -i64::MIN does not exist; any step past the axis length behaves the same.
    let step = step.max(-i64::MAX);
    let d = x.size()[a as usize];
    let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (start, end) = (norm(start), norm(end));
    if step > 0 {
        let (s, e) = (start.clamp(0, d), end.clamp(0, d));
        x.f_slice(a, s, e.max(s), step).map_err(tch_err)
    } else {
        let (s, e) = (start.clamp(0, (d - 1).max(0)), end.clamp(-1, d - 1));
        let n = if d > 0 && s > e {
            (s - e + (-step) - 1) / (-step)
        } else {
            0
        };
        if n == 0 {
            return x.f_narrow(a, 0, 0).map_err(tch_err);
        }
        let low = s + (n - 1) * step;
        x.f_slice(a, low, s + 1, -step)
            .and_then(|t| t.f_flip([a]))
            .map_err(tch_err)
    }
}

impl Op for Slice {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let (starts, ends, list, steps) = match &self.attrs {
            Some((s, e, a)) => (s.clone(), e.clone(), a.clone(), None),
            None => (
                ints(input(inputs, 1)?)?,
                ints(input(inputs, 2)?)?,
                opt(inputs, 3).map(ints).transpose()?,
                opt(inputs, 4).map(ints).transpose()?,
            ),
        };
        let r = x.dim() as i64;
        if r == 0 && !starts.is_empty() {
            return Err("cannot slice a scalar".into());
        }
        let list = match list {
            Some(l) => axes(&l, r)?,
            None => (0..starts.len() as i64).collect(),
        };
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || list.len() != starts.len() || steps.len() != starts.len() {
            return Err(format!(
                "starts {starts:?}, ends {ends:?}, axes {list:?}, steps {steps:?} differ in length"
            ));
        }
        let mut y = x.shallow_clone();
        for i in 0..starts.len() {
            y = slice_axis(&y, list[i], starts[i], ends[i], steps[i])?;
        }
        one(y)
    }
}

/// Int64 indices with negative values wrapped against `d`, checked to lie in `[0, d)` (an
/// out-of-range index must be an error, not a device-side assert).
pub(crate) fn wrap_indices(idx: &Tensor, d: i64) -> Result<Tensor, String> {
    if !matches!(
        idx.kind(),
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        return Err(format!("indices must be integers, are {:?}", idx.kind()));
    }
    let idx = idx.f_totype(Kind::Int64).map_err(tch_err)?;
    let neg = idx
        .f_lt(0)
        .and_then(|n| n.f_totype(Kind::Int64))
        .and_then(|n| n.f_mul_scalar(d))
        .map_err(tch_err)?;
    let idx = idx.f_add(&neg).map_err(tch_err)?;
    if idx.numel() > 0 {
        let (lo, hi) = (
            idx.f_min().map_err(tch_err)?.int64_value(&[]),
            idx.f_max().map_err(tch_err)?.int64_value(&[]),
        );
        if lo < 0 || hi >= d {
            return Err(format!(
                "index out of range [{}, {d}): saw {}",
                -d,
                if lo < 0 { lo - d } else { hi }
            ));
        }
    }
    Ok(idx)
}

#[derive(Debug)]
struct Gather {
    axis: i64,
}

fn build_gather(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Gather {
        axis: b.int_or("axis", 0)?,
    }))
}

impl Op for Gather {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?]);
        let (x, idx) = (&t[0], &t[1]);
        let xs = x.size();
        let a = axis(self.axis, xs.len() as i64)? as usize;
        if xs.is_empty() {
            return Err("Gather on a scalar".into());
        }
        let idx = wrap_indices(idx, xs[a])?;
        let mut shape = xs[..a].to_vec();
        shape.extend(idx.size());
        shape.extend(&xs[a + 1..]);
        let flat = idx.f_flatten(0, -1).map_err(tch_err)?;
        one_tch(x.f_index_select(a as i64, &flat).and_then(|y| y.f_reshape(&shape[..])))
    }
}

#[derive(Debug)]
struct GatherElements {
    axis: i64,
}

fn build_gather_elements(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(GatherElements {
        axis: b.int_or("axis", 0)?,
    }))
}

impl Op for GatherElements {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?]);
        let (x, idx) = (&t[0], &t[1]);
        let a = dim_of(x, self.axis)?;
        if idx.dim() != x.dim() {
            return Err(format!("indices of rank {} for data of rank {}", idx.dim(), x.dim()));
        }
        let idx = wrap_indices(idx, x.size()[a])?;
        one_tch(x.f_gather(a as i64, &idx, false))
    }
}

#[derive(Debug)]
struct ShapeOp {
    start: i64,
    end: Option<i64>,
}

fn build_shape(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(ShapeOp {
        start: b.int_or("start", 0)?,
        end: b.int("end")?,
    }))
}

impl Op for ShapeOp {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        let r = s.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let (a, e) = (clamp(self.start), clamp(self.end.unwrap_or(r)));
        let dims = if a < e { &s[a..e] } else { &s[0..0] };
        one_tch(Tensor::f_from_slice(dims).and_then(|t| t.f_to_device(x.device())))
    }
}

#[derive(Debug)]
struct Size;

impl Op for Size {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        one_tch(Tensor::f_scalar_tensor(x.numel() as i64, (Kind::Int64, x.device())))
    }
}

/// A constant tensor held by an op (a tch tensor is Send but not Sync).
#[derive(Debug)]
struct Constant {
    value: Mutex<Tensor>,
}

fn build_constant(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let value = if let Some(t) = b.tensor("value") {
        tensor_from_proto(t, None).map_err(|e| format!("Constant value: {e}"))?
    } else if b.has("value_float") {
        Tensor::f_scalar_tensor(b.float_or("value_float", 0.0)? as f64, (Kind::Float, Device::Cpu)).map_err(tch_err)?
    } else if b.has("value_floats") {
        Tensor::f_from_slice(&b.floats("value_floats")?.unwrap_or_default()).map_err(tch_err)?
    } else if let Some(v) = b.int("value_int")? {
        Tensor::f_scalar_tensor(v, (Kind::Int64, Device::Cpu)).map_err(tch_err)?
    } else if b.has("value_ints") {
        Tensor::f_from_slice(&b.ints("value_ints")?.unwrap_or_default()).map_err(tch_err)?
    } else if b.has("sparse_value") {
        return Err("Constant with a sparse_value is not supported".into());
    } else if b.has("value_string") || b.has("value_strings") {
        return Err("Constant with string values is not supported".into());
    } else {
        return Err("Constant without a value attribute".into());
    };
    Ok(Box::new(Constant {
        value: Mutex::new(value),
    }))
}

impl Op for Constant {
    fn run(&self, _ctx: &RunCtx, _inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = self.value.lock().map_err(|_| "Constant lock poisoned".to_string())?;
        one(t.shallow_clone())
    }
}

/// A fill value kept exact for integers.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Int(i64),
    Float(f64),
}

#[derive(Debug)]
struct ConstantOfShape {
    kind: Kind,
    value: Fill,
}

fn build_constant_of_shape(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let (kind, value) = match b.tensor("value") {
        None => (Kind::Float, Fill::Float(0.0)),
        Some(p) => {
            let t = tensor_from_proto(p, None).map_err(|e| format!("ConstantOfShape value: {e}"))?;
            if t.numel() != 1 {
                return Err(format!(
                    "ConstantOfShape value must have one element, has {}",
                    t.numel()
                ));
            }
            let t = t.f_flatten(0, -1).map_err(tch_err)?;
            let v = if super::util::is_float(t.kind()) {
                Fill::Float(t.double_value(&[0]))
            } else {
                Fill::Int(t.f_totype(Kind::Int64).map_err(tch_err)?.int64_value(&[0]))
            };
            (t.kind(), v)
        }
    };
    Ok(Box::new(ConstantOfShape { kind, value }))
}

impl Op for ConstantOfShape {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let s = input(inputs, 0)?;
        let shape = ints(s)?;
        if let Some(d) = shape.iter().find(|&&d| d < 0) {
            return Err(format!("negative dimension {d} in {shape:?}"));
        }
        crate::limits::check_tensor_alloc(&shape, self.kind.elt_size_in_bytes())?;
        let opts = (self.kind, s.device());
        one_tch(match self.value {
            Fill::Int(v) => Tensor::f_full(&shape[..], v, opts),
            Fill::Float(v) => Tensor::f_full(&shape[..], v, opts),
        })
    }
}

#[derive(Debug)]
struct Cast {
    kind: Kind,
}

fn build_cast(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let to = b.int("to")?.ok_or("Cast needs `to`")?;
    let kind = kind_of(to as i32).ok_or_else(|| format!("Cast to element type {to} is not supported"))?;
    Ok(Box::new(Cast { kind }))
}

impl Op for Cast {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        one_tch(input(inputs, 0)?.f_totype(self.kind))
    }
}

#[derive(Debug)]
struct CastLike;

impl Op for CastLike {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        one_tch(input(inputs, 0)?.f_totype(input(inputs, 1)?.kind()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

#[derive(Debug)]
struct Pad {
    mode: PadMode,
    /// Opset < 11: pads and value as attributes.
    pads: Option<Vec<i64>>,
    value: f64,
}

fn build_pad(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let mode = match b.string_or("mode", "constant")?.as_str() {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        other => return Err(format!("Pad mode `{other}` is not supported")),
    };
    let pads = if b.opset < 11 {
        Some(
            b.ints("pads")?
                .or(b.ints("paddings")?)
                .ok_or("Pad needs the `pads` attribute before opset 11")?,
        )
    } else {
        None
    };
    Ok(Box::new(Pad {
        mode,
        pads,
        value: b.float_or("value", 0.0)? as f64,
    }))
}

/// Gathers `x` along `a` at positions `-begin .. d + end`, mapped into range by `mode`.
fn pad_by_index(x: &Tensor, a: i64, begin: i64, end: i64, mode: PadMode) -> Result<Tensor, String> {
    let d = x.size()[a as usize];
    if d == 0 {
        return Err(format!("cannot {mode:?}-pad an empty axis {a}"));
    }
    let idx = Tensor::f_arange_start(-begin, d + end, (Kind::Int64, x.device())).map_err(tch_err)?;
    let idx = match mode {
        PadMode::Edge => idx.f_clamp(0, d - 1),
        PadMode::Wrap => idx.f_remainder(d),
        PadMode::Reflect if d == 1 => idx.f_zeros_like(),
        PadMode::Reflect => {
            let period = 2 * (d - 1);
            idx.f_remainder(period).and_then(|m| {
                let mirrored = m.f_neg()?.f_add_scalar(period)?;
                m.f_where_self(&m.f_lt(d)?, &mirrored)
            })
        }
        PadMode::Constant => unreachable!("constant padding does not gather"),
    }
    .map_err(tch_err)?;
    x.f_index_select(a, &idx).map_err(tch_err)
}

impl Op for Pad {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let r = x.dim() as i64;
        let (pads, value) = match &self.pads {
            Some(p) => (p.clone(), self.value),
            None => (
                ints(input(inputs, 1)?)?,
                opt(inputs, 2)
                    .filter(|t| t.numel() > 0)
                    .map(scalar)
                    .transpose()?
                    .unwrap_or(0.0),
            ),
        };
        let list = match opt(inputs, 3) {
            Some(t) => axes(&ints(t)?, r)?,
            None => (0..r).collect(),
        };
        if pads.len() != 2 * list.len() {
            return Err(format!("pads {pads:?} do not fit {} axes", list.len()));
        }
        let mut begin = vec![0; r as usize];
        let mut end = vec![0; r as usize];
        for (k, &a) in list.iter().enumerate() {
            begin[a as usize] = pads[k];
            end[a as usize] = pads[k + list.len()];
        }
        let padded: Vec<i64> = x
            .size()
            .iter()
            .enumerate()
            .map(|(i, &d)| d.saturating_add(begin[i]).saturating_add(end[i]).max(0))
            .collect();
        crate::limits::check_tensor_alloc(&padded, x.kind().elt_size_in_bytes())?;
        if self.mode == PadMode::Constant {
            let first = match (0..r as usize).find(|&i| begin[i] != 0 || end[i] != 0) {
                Some(f) => f,
                None => return one(x.shallow_clone()),
            };
            let mut pad = Vec::new();
            for i in (first..r as usize).rev() {
                pad.push(begin[i]);
                pad.push(end[i]);
            }
            return one_tch(x.f_pad(&pad[..], "constant", Some(value)));
        }
        let mut y = x.shallow_clone();
        for a in 0..r as usize {
            // Negative pads crop: the index map starts inside the axis, where every mode is the identity.
            if begin[a] != 0 || end[a] != 0 {
                y = pad_by_index(&y, a as i64, begin[a], end[a], self.mode)?;
            }
        }
        one(y)
    }
}

#[derive(Debug)]
struct Tile;

fn build_tile(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    if b.node.input.len() > 2 {
        return Err("Tile-1 (tiles and axis inputs) is not supported; opset 6+ is".into());
    }
    Ok(Box::new(Tile))
}

impl Op for Tile {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let reps = ints(input(inputs, 1)?)?;
        if reps.len() != x.dim() || reps.iter().any(|&r| r < 0) {
            return Err(format!("repeats {reps:?} do not fit rank {}", x.dim()));
        }
        let out: Vec<i64> = x.size().iter().zip(&reps).map(|(&d, &r)| d.saturating_mul(r)).collect();
        crate::limits::check_tensor_alloc(&out, x.kind().elt_size_in_bytes())?;
        one_tch(x.f_repeat(&reps[..]))
    }
}

#[derive(Debug)]
struct Expand;

impl Op for Expand {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let shape = ints(input(inputs, 1)?)?;
        let out = broadcast_shapes(&x.size(), &shape)?;
        // The expanded view is free, but whatever consumes it materialises it.
        crate::limits::check_tensor_alloc(&out, x.kind().elt_size_in_bytes())?;
        one_tch(x.f_expand(&out[..], false))
    }
}

/// Most values a Range may produce (as for a tensor read from a file).
const MAX_RANGE: i64 = 1 << 32;

#[derive(Debug)]
struct Range;

impl Op for Range {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let start = input(inputs, 0)?;
        let (limit, delta) = (input(inputs, 1)?, input(inputs, 2)?);
        let kind = start.kind();
        let dev = start.device();
        if super::util::is_float(kind) {
            let (s, l, d) = (scalar(start)?, scalar(limit)?, scalar(delta)?);
            if d == 0.0 {
                return Err("Range delta 0".into());
            }
            let n = ((l - s) / d).ceil().max(0.0);
            if n.is_nan() || n > MAX_RANGE as f64 {
                return Err(format!("Range of {n} values"));
            }
            let n = n as i64;
            crate::limits::check_tensor_alloc(&[n], 8)?;
            let t = Tensor::f_arange(n, (Kind::Double, dev)).map_err(tch_err)?;
            one_tch(
                t.f_mul_scalar(d)
                    .and_then(|t| t.f_add_scalar(s))
                    .and_then(|t| t.f_totype(kind)),
            )
        } else {
            let [s, l, d] = [start, limit, delta].map(|t| ints(t).ok().and_then(|v| v.first().copied()).unwrap_or(0));
            if d == 0 {
                return Err("Range delta 0".into());
            }
            let n = ((l as f64 - s as f64) / d as f64).ceil().max(0.0) as i64;
            if n > MAX_RANGE {
                return Err(format!("Range of {n} values"));
            }
            crate::limits::check_tensor_alloc(&[n], 8)?;
            let t = Tensor::f_arange(n, (Kind::Int64, dev)).map_err(tch_err)?;
            one_tch(
                t.f_mul_scalar(d)
                    .and_then(|t| t.f_add_scalar(s))
                    .and_then(|t| t.f_totype(kind)),
            )
        }
    }
}

#[derive(Debug)]
struct DepthToSpace {
    block: i64,
    crd: bool,
}

fn build_depth_to_space(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let block = b.int("blocksize")?.ok_or("DepthToSpace needs `blocksize`")?;
    let crd = match b.string_or("mode", "DCR")?.as_str() {
        "DCR" => false,
        "CRD" => true,
        other => return Err(format!("DepthToSpace mode `{other}` is not supported")),
    };
    if block < 1 {
        return Err(format!("blocksize {block}"));
    }
    Ok(Box::new(DepthToSpace { block, crd }))
}

impl Op for DepthToSpace {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        let bs = self.block;
        if s.len() != 4 || s[1] % (bs * bs) != 0 {
            return Err(format!("input {s:?} does not fit blocksize {bs}"));
        }
        let (n, c, h, w) = (s[0], s[1] / (bs * bs), s[2], s[3]);
        let (shape, perm) = if self.crd {
            ([n, c, bs, bs, h, w], [0, 1, 4, 2, 5, 3])
        } else {
            ([n, bs, bs, c, h, w], [0, 3, 4, 1, 5, 2])
        };
        one_tch(
            x.f_reshape(shape)
                .and_then(|t| t.f_permute(perm))
                .and_then(|t| t.f_reshape([n, c, h * bs, w * bs])),
        )
    }
}

#[derive(Debug)]
struct SpaceToDepth {
    block: i64,
    crd: bool,
}

fn build_space_to_depth(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let block = b.int("blocksize")?.ok_or("SpaceToDepth needs `blocksize`")?;
    if block < 1 {
        return Err(format!("blocksize {block}"));
    }
    let crd = match b.string_or("mode", "DCR")?.as_str() {
        "DCR" => false,
        "CRD" => true,
        other => return Err(format!("SpaceToDepth mode `{other}` is not supported")),
    };
    Ok(Box::new(SpaceToDepth { block, crd }))
}

impl Op for SpaceToDepth {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        let bs = self.block;
        if s.len() != 4 || s[2] % bs != 0 || s[3] % bs != 0 {
            return Err(format!("input {s:?} does not fit blocksize {bs}"));
        }
        let (n, c, h, w) = (s[0], s[1], s[2] / bs, s[3] / bs);
        one_tch(
            x.f_reshape([n, c, h, bs, w, bs])
                .and_then(|t| {
                    t.f_permute(if self.crd {
                        [0, 1, 3, 5, 2, 4]
                    } else {
                        [0, 3, 5, 1, 2, 4]
                    })
                })
                .and_then(|t| t.f_reshape([n, c * bs * bs, h, w])),
        )
    }
}

#[derive(Debug)]
struct Flatten {
    axis: i64,
}

fn build_flatten(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Flatten {
        axis: b.int_or("axis", 1)?,
    }))
}

impl Op for Flatten {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        let a = if self.axis == s.len() as i64 {
            s.len() as i64
        } else {
            axis(self.axis, s.len() as i64)?
        } as usize;
        let outer: i64 = s[..a].iter().product();
        let inner: i64 = s[a..].iter().product();
        one(x.reshape([outer, inner]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{build_err, i, int, ints as iattr, node, run_node, run_tensors, string, t};
    use super::*;

    #[test]
    fn slice_negative_steps_and_clamping() {
        let x = i(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], &[10]);
        let n = node("Slice", 5);
        let case = |s: i64, e: i64, st: i64| {
            let (s, e, a, st) = (i(&[s], &[1]), i(&[e], &[1]), i(&[0], &[1]), i(&[st], &[1]));
            run_node(&n, 13, &[Some(&x), Some(&s), Some(&e), Some(&a), Some(&st)]).remove(0)
        };
        assert_eq!(
            case(-1, i64::MIN, -1),
            vec![9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
        );
        assert_eq!(case(8, 1, -3), vec![8.0, 5.0, 2.0]);
        assert_eq!(case(20, 0, -4), vec![9.0, 5.0, 1.0]);
        assert_eq!(case(1, i64::MAX, 4), vec![1.0, 5.0, 9.0]);
        assert_eq!(case(5, 2, 1), Vec::<f64>::new());
        assert_eq!(case(2, 5, -1), Vec::<f64>::new());
        // Opset 1: attributes.
        let mut n1 = node("Slice", 1);
        n1.attribute
            .extend([iattr("starts", &[1]), iattr("ends", &[-1]), iattr("axes", &[0])]);
        assert_eq!(
            run_node(&n1, 9, &[Some(&x)])[0],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        );
    }

    #[test]
    fn reshape_zero_and_minus_one() {
        assert_eq!(reshape_target(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(reshape_target(&[2, 3, 4], &[-1, 0, 2], false).unwrap(), vec![4, 3, 2]);
        assert_eq!(reshape_target(&[0, 3], &[3, 0], true).unwrap(), vec![3, 0]);
        assert!(reshape_target(&[2, 3], &[0, -1], true)
            .unwrap_err()
            .contains("allowzero"));
        assert!(reshape_target(&[2, 3], &[-1, -1], false).is_err());
        assert!(reshape_target(&[2, 3], &[4, -1], false).is_err());
        let x = t(&[1.0; 24], &[2, 3, 4]);
        let shape = i(&[0, -1], &[2]);
        let y = run_tensors(&node("Reshape", 2), 14, &[Some(&x), Some(&shape)]);
        assert_eq!(y[0].size(), vec![2, 12]);
    }

    #[test]
    fn pad_reflect_edge_and_constant() {
        let x = t(&[1.0, 2.0, 3.0], &[1, 3]);
        let pads = i(&[0, 2, 0, 3], &[4]);
        let mut n = node("Pad", 2);
        n.attribute.push(string("mode", "reflect"));
        assert_eq!(
            run_node(&n, 13, &[Some(&x), Some(&pads)])[0],
            vec![3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0, 2.0]
        );
        n.attribute[0] = string("mode", "edge");
        assert_eq!(
            run_node(&n, 13, &[Some(&x), Some(&pads)])[0],
            vec![1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
        );
        // Opset 2: pads attribute, constant value, negative pad crops.
        let mut n = node("Pad", 1);
        n.attribute.extend([
            iattr("pads", &[0, 1, 0, -1]),
            super::super::tests_util::float("value", 9.0),
        ]);
        assert_eq!(run_node(&n, 2, &[Some(&x)])[0], vec![9.0, 1.0, 2.0]);
        // Opset 18: axes input, constant_value input.
        let (pads, v, a) = (i(&[1, 1], &[2]), t(&[7.0], &[]), i(&[-1], &[1]));
        let y = run_node(&node("Pad", 4), 18, &[Some(&x), Some(&pads), Some(&v), Some(&a)]);
        assert_eq!(y[0], vec![7.0, 1.0, 2.0, 3.0, 7.0]);
    }

    #[test]
    fn split_variants() {
        let x = t(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[7]);
        let mut n = node("Split", 1);
        n.output = vec!["a".into(), "b".into(), "c".into()];
        // Equal split by output count (last part smaller).
        let y = run_node(&n, 13, &[Some(&x)]);
        assert_eq!(y, vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0], vec![6.0]]);
        // Opset < 13: split attribute.
        let mut a = n.clone();
        a.attribute.push(iattr("split", &[1, 2, 4]));
        assert_eq!(run_node(&a, 11, &[Some(&x)])[2], vec![3.0, 4.0, 5.0, 6.0]);
        // Opset 13: split input.
        let mut b = n.clone();
        b.input.push("s".into());
        let s = i(&[5, 1, 1], &[3]);
        assert_eq!(run_node(&b, 13, &[Some(&x), Some(&s)])[0].len(), 5);
        // Opset 18: num_outputs.
        let mut c = n.clone();
        c.attribute.push(int("num_outputs", 3));
        assert_eq!(run_node(&c, 18, &[Some(&x)])[1], vec![3.0, 4.0, 5.0]);
        let bad = i(&[5, 1, 2], &[3]);
        let op = (registry_builder("Split"))(&BuildCtx { node: &b, opset: 13 }).unwrap();
        let e = op
            .run(
                &RunCtx {
                    mode: super::super::Mode::Eval,
                },
                &[Some(&x), Some(&bad)],
            )
            .unwrap_err();
        assert!(e.contains("does not add up"), "{e}");
    }

    fn registry_builder(op: &str) -> Builder {
        *super::super::registry().get(op).unwrap()
    }

    #[test]
    fn gather_scalar_index_reduces_rank_and_wraps_negatives() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let mut n = node("Gather", 2);
        n.attribute.push(int("axis", 1));
        let idx = i(&[-1], &[]);
        let y = run_tensors(&n, 13, &[Some(&x), Some(&idx)]);
        assert_eq!(y[0].size(), vec![2]);
        assert_eq!(super::super::tests_util::values(&y[0]), vec![3.0, 6.0]);
        let idx = i(&[3], &[1]);
        let op = registry_builder("Gather")(&BuildCtx { node: &n, opset: 13 }).unwrap();
        assert!(op
            .run(
                &RunCtx {
                    mode: super::super::Mode::Eval
                },
                &[Some(&x), Some(&idx)]
            )
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn unsqueeze_squeeze_and_bad_attributes() {
        let x = t(&[1.0, 2.0], &[2]);
        let mut n = node("Unsqueeze", 1);
        n.attribute.push(iattr("axes", &[0, -1]));
        assert_eq!(run_tensors(&n, 11, &[Some(&x)])[0].size(), vec![1, 2, 1]);
        assert!(build_err(&node("Unsqueeze", 1), 11).contains("axes"));
        let a = i(&[2, 0], &[2]);
        assert_eq!(
            run_tensors(&node("Unsqueeze", 2), 13, &[Some(&x), Some(&a)])[0].size(),
            vec![1, 2, 1]
        );
        let y = t(&[1.0, 2.0], &[1, 2, 1]);
        assert_eq!(run_tensors(&node("Squeeze", 1), 13, &[Some(&y)])[0].size(), vec![2]);
        let mut c = node("Cast", 1);
        c.attribute.push(int("to", 8));
        assert!(build_err(&c, 13).contains("not supported"));
    }
}
