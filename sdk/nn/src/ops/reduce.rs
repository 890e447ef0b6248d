//! Reductions: ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceProd, ReduceL1, ReduceL2,
//! ReduceSumSquare, ReduceLogSum, ReduceLogSumExp (axes as an attribute before ReduceSum-13 and the
//! others' opset 18, as an input after; keepdims; noop_with_empty_axes), ArgMax, ArgMin.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::util::{axes, axis, input, is_float, one, one_tch, opt, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("ReduceMean", |b| build(b, Reduction::Mean));
    m.insert("ReduceSum", |b| build(b, Reduction::Sum));
    m.insert("ReduceMax", |b| build(b, Reduction::Max));
    m.insert("ReduceMin", |b| build(b, Reduction::Min));
    m.insert("ReduceProd", |b| build(b, Reduction::Prod));
    m.insert("ReduceL1", |b| build(b, Reduction::L1));
    m.insert("ReduceL2", |b| build(b, Reduction::L2));
    m.insert("ReduceSumSquare", |b| build(b, Reduction::SumSquare));
    m.insert("ReduceLogSum", |b| build(b, Reduction::LogSum));
    m.insert("ReduceLogSumExp", |b| build(b, Reduction::LogSumExp));
    m.insert("ArgMax", |b| build_arg(b, true));
    m.insert("ArgMin", |b| build_arg(b, false));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduction {
    Mean,
    Sum,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

#[derive(Debug)]
struct Reduce {
    how: Reduction,
    axes: Option<Vec<i64>>,
    keepdims: bool,
    noop_with_empty_axes: bool,
}

fn build(b: &BuildCtx<'_>, how: Reduction) -> Result<Box<dyn Op>, String> {
    let input_since = if how == Reduction::Sum { 13 } else { 18 };
    let list = b.ints("axes")?;
    if list.is_some() && b.opset >= input_since {
        return Err(format!("axes is an input, not an attribute, from opset {input_since}"));
    }
    Ok(Box::new(Reduce {
        how,
        axes: list,
        keepdims: b.int_or("keepdims", 1)? != 0,
        noop_with_empty_axes: b.int_or("noop_with_empty_axes", 0)? != 0,
    }))
}

impl Reduce {
    fn reduce(&self, x: &Tensor, dims: &[i64], keep: bool) -> Result<Tensor, tch::TchError> {
        let kind = x.kind();
        let sum = |t: &Tensor| t.f_sum_dim_intlist(dims, keep, kind);
        match self.how {
            Reduction::Sum => sum(x),
            Reduction::Mean if is_float(kind) => x.f_mean_dim(dims, keep, None),
            Reduction::Mean => x.f_totype(Kind::Double)?.f_mean_dim(dims, keep, None)?.f_totype(kind),
            Reduction::Max => x.f_amax(dims, keep),
            Reduction::Min => x.f_amin(dims, keep),
            Reduction::Prod => {
                let mut y = x.shallow_clone();
                let mut sorted = dims.to_vec();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                for &d in &sorted {
                    y = y.f_prod_dim_int(d, keep, kind)?;
                }
                Ok(y)
            }
            Reduction::L1 => sum(&x.f_abs()?),
            Reduction::L2 => sum(&x.f_square()?)?.f_sqrt()?.f_totype(kind),
            Reduction::SumSquare => sum(&x.f_square()?),
            Reduction::LogSum => sum(x)?.f_log(),
            Reduction::LogSumExp => x.f_logsumexp(dims, keep),
        }
    }
}

impl Reduce {
    fn elementwise(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match self.how {
            Reduction::Sum
            | Reduction::Mean
            | Reduction::Max
            | Reduction::Min
            | Reduction::Prod
            | Reduction::LogSumExp => Ok(x.shallow_clone()),
            Reduction::L1 | Reduction::L2 => x.f_abs(),
            Reduction::SumSquare => x.f_square(),
            Reduction::LogSum => x.f_log(),
        }
    }
}

impl Op for Reduce {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let list = match (&self.axes, opt(inputs, 1)) {
            (Some(a), _) => a.clone(),
            (None, Some(t)) => super::util::ints(t)?,
            (None, None) => vec![],
        };
        if (list.is_empty() && self.noop_with_empty_axes) || x.dim() == 0 {
            // Reducing over no axis (or a scalar) keeps the reduction's element-wise part, as the
            // reference and onnxruntime do: |x| for L1 and L2, x^2 for SumSquare, log x for LogSum.
            return one_tch(self.elementwise(x));
        }
        let r = x.dim() as i64;
        let mut dims = if list.is_empty() {
            (0..r).collect()
        } else {
            axes(&list, r)?
        };
        dims.sort_unstable();
        let s = x.size();
        if matches!(self.how, Reduction::Max | Reduction::Min) && dims.iter().any(|&d| s[d as usize] == 0) {
            // The max (min) of an empty set is the identity of the reduction: the lowest (highest) value.
            let shape: Vec<i64> = (0..r)
                .filter_map(|d| match (dims.contains(&d), self.keepdims) {
                    (false, _) => Some(s[d as usize]),
                    (true, true) => Some(1),
                    (true, false) => None,
                })
                .collect();
            let lowest = self.how == Reduction::Max;
            let opts = (x.kind(), x.device());
            let t = match x.kind() {
                k if is_float(k) => {
                    Tensor::f_full(&shape[..], if lowest { f64::NEG_INFINITY } else { f64::INFINITY }, opts)
                }
                Kind::Bool => Tensor::f_full(&shape[..], i64::from(!lowest), opts),
                Kind::Uint8 => Tensor::f_full(&shape[..], if lowest { 0 } else { u8::MAX as i64 }, opts),
                Kind::Int8 => Tensor::f_full(&shape[..], if lowest { i8::MIN as i64 } else { i8::MAX as i64 }, opts),
                Kind::Int16 => Tensor::f_full(&shape[..], if lowest { i16::MIN as i64 } else { i16::MAX as i64 }, opts),
                Kind::Int => Tensor::f_full(&shape[..], if lowest { i32::MIN as i64 } else { i32::MAX as i64 }, opts),
                _ => Tensor::f_full(&shape[..], if lowest { i64::MIN } else { i64::MAX }, opts),
            };
            return one_tch(t);
        }
        one_tch(self.reduce(x, &dims, self.keepdims))
    }
}

#[derive(Debug)]
struct Arg {
    max: bool,
    axis: i64,
    keepdims: bool,
    last: bool,
}

fn build_arg(b: &BuildCtx<'_>, max: bool) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Arg {
        max,
        axis: b.int_or("axis", 0)?,
        keepdims: b.int_or("keepdims", 1)? != 0,
        last: b.int_or("select_last_index", 0)? != 0,
    }))
}

impl Op for Arg {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let a = axis(self.axis, x.dim() as i64)?;
        let d = x.size().get(a as usize).copied().unwrap_or(1);
        let src = if self.last {
            x.f_flip([a]).map_err(tch_err)?
        } else {
            x.shallow_clone()
        };
        let idx = if self.max {
            src.f_argmax(a, self.keepdims)
        } else {
            src.f_argmin(a, self.keepdims)
        }
        .map_err(tch_err)?;
        if self.last {
            return one_tch(idx.f_neg().and_then(|t| t.f_add_scalar(d - 1)));
        }
        one(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{build_err, i, int, ints, node, run_tensors, t, values};

    #[test]
    fn reduce_axes_attribute_input_and_noop() {
        let x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let mut n = node("ReduceMean", 1);
        n.attribute.extend([ints("axes", &[-1]), int("keepdims", 0)]);
        let y = run_tensors(&n, 13, &[Some(&x)]);
        assert_eq!((y[0].size(), values(&y[0])), (vec![2], vec![2.0, 5.0]));
        assert!(build_err(&n, 18).contains("input"));
        let a = i(&[0], &[1]);
        let y = run_tensors(&node("ReduceSum", 2), 13, &[Some(&x), Some(&a)]);
        assert_eq!((y[0].size(), values(&y[0])), (vec![1, 3], vec![5.0, 7.0, 9.0]));
        let y = run_tensors(&node("ReduceMax", 1), 18, &[Some(&x)]);
        assert_eq!((y[0].size(), values(&y[0])), (vec![1, 1], vec![6.0]));
        let mut noop = node("ReduceSum", 1);
        noop.attribute.push(int("noop_with_empty_axes", 1));
        assert_eq!(run_tensors(&noop, 13, &[Some(&x)])[0].size(), vec![2, 3]);
    }
}
