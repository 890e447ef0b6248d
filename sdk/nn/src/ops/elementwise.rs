//! Element-wise ops: arithmetic (Add, Sub, Mul, Div, Pow, ...), activations (Relu, LeakyRelu, PRelu,
//! Clip, Sigmoid, Elu, HardSwish, ...), variadic Sum/Max/Min/Mean, comparisons and Where, Dropout,
//! Identity.
//!
//! Float math goes through differentiable tch ops only; integer inputs keep their kind (ONNX
//! integer Div truncates toward zero).

use std::collections::HashMap;

use tch::{Kind, TchError, Tensor};

use super::util::{input, is_float, one, one_tch, opt, same_device, scalar, tch_err};
use super::{BuildCtx, Builder, Mode, Op, RunCtx};

type TchResult = Result<Tensor, TchError>;

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("Relu", |_| Ok(Box::new(Relu)));
    m.insert("Add", |_| Ok(Box::new(Add)));
    m.insert("Identity", |_| Ok(Box::new(Identity)));
    // Binary arithmetic (numpy broadcasting).
    m.insert("Sub", |_| Ok(binary("Sub", |a, b| a.f_sub(b))));
    m.insert("Mul", |_| Ok(binary("Mul", |a, b| a.f_mul(b))));
    m.insert("Div", |_| Ok(binary("Div", div)));
    m.insert("Pow", |_| Ok(binary("Pow", |a, b| a.f_pow(b)?.f_totype(a.kind()))));
    m.insert("Equal", |_| Ok(binary("Equal", |a, b| a.f_eq_tensor(b))));
    m.insert("Less", |_| Ok(binary("Less", |a, b| a.f_lt_tensor(b))));
    m.insert("LessOrEqual", |_| Ok(binary("LessOrEqual", |a, b| a.f_le_tensor(b))));
    m.insert("Greater", |_| Ok(binary("Greater", |a, b| a.f_gt_tensor(b))));
    m.insert("GreaterOrEqual", |_| {
        Ok(binary("GreaterOrEqual", |a, b| a.f_ge_tensor(b)))
    });
    m.insert("And", |_| Ok(binary("And", |a, b| a.f_logical_and(b))));
    m.insert("Or", |_| Ok(binary("Or", |a, b| a.f_logical_or(b))));
    m.insert("Xor", |_| Ok(binary("Xor", |a, b| a.f_logical_xor(b))));
    m.insert("Mod", build_mod);
    // Unary math.
    m.insert("Sqrt", |_| Ok(unary("Sqrt", Tensor::f_sqrt)));
    m.insert("Neg", |_| Ok(unary("Neg", Tensor::f_neg)));
    m.insert("Abs", |_| Ok(unary("Abs", Tensor::f_abs)));
    m.insert("Exp", |_| Ok(unary("Exp", Tensor::f_exp)));
    m.insert("Log", |_| Ok(unary("Log", Tensor::f_log)));
    m.insert("Reciprocal", |_| Ok(unary("Reciprocal", Tensor::f_reciprocal)));
    m.insert("Floor", |_| Ok(unary("Floor", Tensor::f_floor)));
    m.insert("Ceil", |_| Ok(unary("Ceil", Tensor::f_ceil)));
    m.insert("Round", |_| Ok(unary("Round", Tensor::f_round)));
    m.insert("Sign", |_| Ok(unary("Sign", Tensor::f_sign)));
    m.insert("Erf", |_| Ok(unary("Erf", Tensor::f_erf)));
    m.insert("Not", |_| Ok(unary("Not", Tensor::f_logical_not)));
    m.insert("Sin", |_| Ok(unary("Sin", Tensor::f_sin)));
    m.insert("Cos", |_| Ok(unary("Cos", Tensor::f_cos)));
    m.insert("Tan", |_| Ok(unary("Tan", Tensor::f_tan)));
    m.insert("Asin", |_| Ok(unary("Asin", Tensor::f_asin)));
    m.insert("Acos", |_| Ok(unary("Acos", Tensor::f_acos)));
    m.insert("Atan", |_| Ok(unary("Atan", Tensor::f_atan)));
    m.insert("Sinh", |_| Ok(unary("Sinh", Tensor::f_sinh)));
    m.insert("Cosh", |_| Ok(unary("Cosh", Tensor::f_cosh)));
    m.insert("Asinh", |_| Ok(unary("Asinh", Tensor::f_asinh)));
    m.insert("Acosh", |_| Ok(unary("Acosh", Tensor::f_acosh)));
    m.insert("Atanh", |_| Ok(unary("Atanh", Tensor::f_atanh)));
    m.insert("IsNaN", |_| Ok(unary("IsNaN", Tensor::f_isnan)));
    m.insert("IsInf", build_isinf);
    // Activations.
    m.insert("Sigmoid", |_| Ok(unary("Sigmoid", Tensor::f_sigmoid)));
    m.insert("Tanh", |_| Ok(unary("Tanh", Tensor::f_tanh)));
    m.insert("Softplus", |_| Ok(unary("Softplus", Tensor::f_softplus)));
    m.insert("Softsign", |_| {
        Ok(unary("Softsign", |x| x.f_div(&x.f_abs()?.f_add_scalar(1.0)?)))
    });
    m.insert("HardSwish", |_| Ok(unary("HardSwish", Tensor::f_hardswish)));
    m.insert("Mish", |_| Ok(unary("Mish", Tensor::f_mish)));
    m.insert("LeakyRelu", build_leaky_relu);
    m.insert("Elu", build_elu);
    m.insert("Celu", build_celu);
    m.insert("Selu", build_selu);
    m.insert("HardSigmoid", build_hard_sigmoid);
    m.insert("Gelu", build_gelu);
    m.insert("PRelu", build_prelu);
    m.insert("Clip", build_clip);
    m.insert("Shrink", build_shrink);
    m.insert("ThresholdedRelu", build_thresholded_relu);
    m.insert("Swish", build_swish);
    // Variadic.
    m.insert("Sum", |_| Ok(Box::new(Variadic::Sum)));
    m.insert("Mean", |_| Ok(Box::new(Variadic::Mean)));
    m.insert("Max", |_| Ok(Box::new(Variadic::Max)));
    m.insert("Min", |_| Ok(Box::new(Variadic::Min)));
    m.insert("Where", |_| Ok(Box::new(Where)));
    m.insert("Dropout", build_dropout);
}

/// A one-input op given by a tch function.
struct Unary {
    name: &'static str,
    f: Box<dyn Fn(&Tensor) -> TchResult + Send + Sync>,
}

impl std::fmt::Debug for Unary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unary({})", self.name)
    }
}

fn unary(name: &'static str, f: impl Fn(&Tensor) -> TchResult + Send + Sync + 'static) -> Box<dyn Op> {
    Box::new(Unary { name, f: Box::new(f) })
}

impl Op for Unary {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        one_tch((self.f)(input(inputs, 0)?))
    }
}

/// A two-input op with numpy broadcasting (done by tch).
struct Binary {
    name: &'static str,
    f: fn(&Tensor, &Tensor) -> TchResult,
}

impl std::fmt::Debug for Binary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Binary({})", self.name)
    }
}

fn binary(name: &'static str, f: fn(&Tensor, &Tensor) -> TchResult) -> Box<dyn Op> {
    Box::new(Binary { name, f })
}

impl Op for Binary {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let ab = same_device(&[input(inputs, 0)?, input(inputs, 1)?]);
        one_tch((self.f)(&ab[0], &ab[1]))
    }
}

/// ONNX Div: true division for floats, truncation toward zero for integers.
fn div(a: &Tensor, b: &Tensor) -> TchResult {
    if is_float(a.kind()) || is_float(b.kind()) {
        a.f_div(b)
    } else {
        a.f_div_tensor_mode(b, "trunc")
    }
}

fn build_mod(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    // fmod=0: the sign of the divisor (Python's %, torch's remainder); fmod=1: C's fmod.
    Ok(if b.int_or("fmod", 0)? != 0 {
        binary("Mod", |a, b| a.f_fmod_tensor(b))
    } else {
        binary("Mod", |a, b| a.f_remainder_tensor(b))
    })
}

fn build_isinf(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let (neg, pos) = (
        b.int_or("detect_negative", 1)? != 0,
        b.int_or("detect_positive", 1)? != 0,
    );
    Ok(unary("IsInf", move |x| match (neg, pos) {
        (true, true) => x.f_isinf(),
        (true, false) => x.f_isneginf(),
        (false, true) => x.f_isposinf(),
        (false, false) => x.f_zeros_like()?.f_totype(Kind::Bool),
    }))
}

fn build_thresholded_relu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 1.0)? as f64;
    Ok(unary("ThresholdedRelu", move |x| {
        x.f_where_self(&x.f_gt(alpha)?, &x.f_zeros_like()?)
    }))
}

fn build_swish(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 1.0)? as f64;
    Ok(unary("Swish", move |x| x.f_mul(&x.f_mul_scalar(alpha)?.f_sigmoid()?)))
}

fn build_leaky_relu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 0.01)? as f64;
    Ok(unary("LeakyRelu", move |x| {
        x.f_where_self(&x.f_ge(0.0)?, &x.f_mul_scalar(alpha)?)
    }))
}

/// `alpha * (exp(min(x, 0) / input_scale...) - 1)` for the negative side, written so that no
/// branch overflows (a `where` over an overflowing branch poisons gradients with NaN).
fn elu_like(x: &Tensor, alpha: f64, inner: f64) -> TchResult {
    x.f_relu()?.f_add(
        &x.f_clamp_max(0.0)?
            .f_mul_scalar(inner)?
            .f_exp()?
            .f_sub_scalar(1.0)?
            .f_mul_scalar(alpha)?,
    )
}

fn build_elu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 1.0)? as f64;
    Ok(unary("Elu", move |x| elu_like(x, alpha, 1.0)))
}

fn build_celu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 1.0)? as f64;
    if alpha == 0.0 {
        return Err("Celu with alpha = 0".into());
    }
    Ok(unary("Celu", move |x| elu_like(x, alpha, 1.0 / alpha)))
}

fn build_selu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 1.673_263_2)? as f64;
    let gamma = b.float_or("gamma", 1.050_701)? as f64;
    Ok(unary("Selu", move |x| elu_like(x, alpha, 1.0)?.f_mul_scalar(gamma)))
}

fn build_hard_sigmoid(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let alpha = b.float_or("alpha", 0.2)? as f64;
    let beta = b.float_or("beta", 0.5)? as f64;
    Ok(unary("HardSigmoid", move |x| {
        x.f_mul_scalar(alpha)?.f_add_scalar(beta)?.f_clamp(0.0, 1.0)
    }))
}

fn build_gelu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let approx = b.string_or("approximate", "none")?;
    match approx.as_str() {
        "none" => Ok(unary("Gelu", |x| x.f_gelu("none"))),
        "tanh" => Ok(unary("Gelu", |x| x.f_gelu("tanh"))),
        other => Err(format!("Gelu approximate=`{other}` is not supported (none, tanh)")),
    }
}

#[derive(Debug)]
struct PRelu {
    /// Opset < 7: a 1-D slope is per channel (dim 1), not numpy-broadcast.
    per_channel: bool,
}

fn build_prelu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(PRelu {
        per_channel: b.opset < 7,
    }))
}

impl Op for PRelu {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let xs = same_device(&[input(inputs, 0)?, input(inputs, 1)?]);
        let (x, slope) = (&xs[0], &xs[1]);
        let (sx, ss) = (x.size(), slope.size());
        // A 1-D slope of C values meant per channel: either old semantics, or it cannot broadcast
        // against the trailing dim (a slope of shape [C] against [N, C, H, W]).
        let channel = ss.len() == 1
            && sx.len() > 2
            && ss[0] > 1
            && ss[0] == sx[1]
            && (self.per_channel || super::util::broadcast_shapes(&sx, &ss).is_err());
        let slope = if channel {
            let mut shape = vec![ss[0]];
            shape.extend(std::iter::repeat_n(1, sx.len() - 2));
            slope.f_reshape(&shape[..]).map_err(tch_err)?
        } else {
            slope.shallow_clone()
        };
        let neg = x.f_mul(&slope).map_err(tch_err)?;
        one_tch(x.f_ge(0.0).and_then(|c| x.f_where_self(&c, &neg)))
    }
}

fn build_shrink(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let lambd = b.float_or("lambd", 0.5)? as f64;
    let bias = b.float_or("bias", 0.0)? as f64;
    // x - bias above lambd, x + bias below -lambd, 0 between.
    Ok(unary("Shrink", move |x| {
        let zero = x.f_zeros_like()?;
        let up = x.f_sub_scalar(bias)?.f_totype(x.kind())?;
        let down = x.f_add_scalar(bias)?.f_totype(x.kind())?;
        up.f_where_self(&x.f_gt(lambd)?, &down.f_where_self(&x.f_lt(-lambd)?, &zero)?)
    }))
}

#[derive(Debug)]
struct Clip {
    /// Opset < 11: bounds as attributes.
    min: Option<f64>,
    max: Option<f64>,
}

fn build_clip(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let get = |name: &str| -> Result<Option<f64>, String> {
        if b.has(name) {
            Ok(Some(b.float_or(name, 0.0)? as f64))
        } else {
            Ok(None)
        }
    };
    if b.opset >= 11 && (b.has("min") || b.has("max")) {
        return Err(format!("Clip-{} takes min/max as inputs, not attributes", b.opset));
    }
    Ok(Box::new(Clip {
        min: get("min")?,
        max: get("max")?,
    }))
}

impl Op for Clip {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let bound = |attr: Option<f64>, i: usize| -> Result<Option<Tensor>, String> {
            let t = match (attr, opt(inputs, i)) {
                (Some(v), _) => Tensor::f_from_slice(&[v])
                    .map_err(tch_err)?
                    .f_reshape([0i64; 0])
                    .map_err(tch_err)?,
                (None, Some(t)) => {
                    if t.numel() != 1 {
                        return Err(format!(
                            "Clip bound (input {i}) must be a scalar, has shape {:?}",
                            t.size()
                        ));
                    }
                    t.f_reshape([0i64; 0]).map_err(tch_err)?
                }
                (None, None) => return Ok(None),
            };
            Ok(Some(
                t.f_to_device(x.device())
                    .map_err(tch_err)?
                    .f_totype(x.kind())
                    .map_err(tch_err)?,
            ))
        };
        let (lo, hi) = (bound(self.min, 1)?, bound(self.max, 2)?);
        if lo.is_none() && hi.is_none() {
            return one(x.shallow_clone());
        }
        one_tch(x.f_clamp_tensor(lo, hi))
    }
}

#[derive(Debug)]
enum Variadic {
    Sum,
    Mean,
    Max,
    Min,
}

impl Op for Variadic {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let ins: Vec<&Tensor> = inputs
            .iter()
            .map(|t| t.ok_or("an input is omitted"))
            .collect::<Result<_, _>>()?;
        if ins.is_empty() {
            return Err("no inputs".into());
        }
        let ins = same_device(&ins);
        let mut acc = ins[0].shallow_clone();
        for t in &ins[1..] {
            acc = match self {
                Variadic::Sum | Variadic::Mean => acc.f_add(t),
                Variadic::Max => acc.f_maximum(t),
                Variadic::Min => acc.f_minimum(t),
            }
            .map_err(tch_err)?;
        }
        if matches!(self, Variadic::Mean) && ins.len() > 1 {
            acc = acc.f_div_scalar(ins.len() as f64).map_err(tch_err)?;
        }
        one(acc)
    }
}

#[derive(Debug)]
struct Where;

impl Op for Where {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?]);
        let cond = t[0].f_totype(Kind::Bool).map_err(tch_err)?;
        one_tch(t[1].f_where_self(&cond, &t[2]))
    }
}

#[derive(Debug)]
struct Dropout {
    /// Opset < 12: the ratio attribute (from 12 on, input 1).
    ratio: Option<f64>,
    /// Whether the mask output is wanted.
    mask: bool,
}

fn build_dropout(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let ratio = if b.opset < 12 {
        Some(b.float_or("ratio", 0.5)? as f64)
    } else {
        None
    };
    Ok(Box::new(Dropout {
        ratio,
        mask: b.node.output.get(1).is_some_and(|o| !o.is_empty()),
    }))
}

impl Op for Dropout {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let ratio = match (self.ratio, opt(inputs, 1)) {
            (Some(r), _) => r,
            (None, Some(t)) => scalar(t)?,
            (None, None) => 0.5,
        };
        if !(0.0..=1.0).contains(&ratio) {
            return Err(format!("Dropout ratio {ratio} is outside [0, 1]"));
        }
        // Eval (and frozen-BN fine-tuning): the identity, whatever the training_mode input says.
        if ctx.mode != Mode::Train || ratio == 0.0 {
            let mut out = vec![x.shallow_clone()];
            if self.mask {
                out.push(x.f_ones_like().and_then(|t| t.f_totype(Kind::Bool)).map_err(tch_err)?);
            }
            return Ok(out);
        }
        let keep = x.f_rand_like().and_then(|r| r.f_ge(ratio)).map_err(tch_err)?;
        let y = if ratio >= 1.0 {
            x.f_zeros_like().map_err(tch_err)?
        } else {
            x.f_mul(&keep)
                .and_then(|t| t.f_div_scalar(1.0 - ratio))
                .map_err(tch_err)?
        };
        Ok(if self.mask { vec![y, keep] } else { vec![y] })
    }
}

#[derive(Debug)]
struct Relu;

impl Op for Relu {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        one(input(inputs, 0)?.relu())
    }
}

#[derive(Debug)]
struct Add;

impl Op for Add {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        input(inputs, 0)?
            .f_add(input(inputs, 1)?)
            .map(|t| vec![t])
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug)]
struct Identity;

impl Op for Identity {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        one(input(inputs, 0)?.shallow_clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{node, run_node, t};
    use super::*;
    use crate::proto::AttributeProto;

    #[test]
    fn clip_reads_attributes_before_11_and_inputs_after() {
        let x = t(&[-2.0, -0.5, 0.5, 2.0], &[4]);
        let mut n = node("Clip", 1);
        n.attribute.push(AttributeProto {
            name: Some("min".into()),
            f: Some(-1.0),
            ..Default::default()
        });
        assert_eq!(run_node(&n, 6, &[Some(&x)])[0], vec![-1.0, -0.5, 0.5, 2.0]);
        let n = node("Clip", 3);
        let (lo, hi) = (t(&[0.0], &[]), t(&[1.0], &[]));
        assert_eq!(
            run_node(&n, 13, &[Some(&x), Some(&lo), Some(&hi)])[0],
            vec![0.0, 0.0, 0.5, 1.0]
        );
        assert_eq!(
            run_node(&n, 13, &[Some(&x), None, Some(&hi)])[0],
            vec![-2.0, -0.5, 0.5, 1.0]
        );
        assert_eq!(run_node(&n, 13, &[Some(&x)])[0], vec![-2.0, -0.5, 0.5, 2.0]);
        // An attribute at opset 11+ is a build error, not a silent no-op.
        let mut bad = node("Clip", 1);
        bad.attribute.push(AttributeProto {
            name: Some("max".into()),
            f: Some(1.0),
            ..Default::default()
        });
        assert!(build_clip(&BuildCtx { node: &bad, opset: 13 })
            .unwrap_err()
            .contains("attributes"));
    }

    #[test]
    fn integer_div_truncates_and_prelu_is_per_channel() {
        let a = Tensor::from_slice(&[7i64, -7]);
        let b = Tensor::from_slice(&[2i64, 2]);
        let y = run_node(&node("Div", 2), 13, &[Some(&a), Some(&b)]);
        assert_eq!(y[0], vec![3.0, -3.0]);
        let x = t(&[-1.0, -1.0, 1.0, -2.0], &[1, 2, 2, 1]);
        let slope = t(&[0.5, 0.25], &[2]);
        let y = run_node(&node("PRelu", 2), 6, &[Some(&x), Some(&slope)]);
        assert_eq!(y[0], vec![-0.5, -0.5, 1.0, -0.5]);
    }

    #[test]
    fn elu_gradient_is_finite_for_large_inputs() {
        let x = t(&[-1.0, 100.0], &[2]).set_requires_grad(true);
        let op = build_elu(&BuildCtx {
            node: &node("Elu", 1),
            opset: 13,
        })
        .unwrap();
        let y = op.run(&RunCtx { mode: Mode::Train }, &[Some(&x)]).unwrap().remove(0);
        y.sum(Kind::Float).backward();
        let g = Vec::<f32>::try_from(x.grad()).unwrap();
        assert!((g[0] - (-1f32).exp()).abs() < 1e-6 && g[1] == 1.0, "{g:?}");
    }
}
