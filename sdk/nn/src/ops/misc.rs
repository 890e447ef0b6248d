//! Less common tensor ops seen in exported classifiers: CumSum, TopK, Trilu, Einsum, GatherND,
//! ScatterND, ScatterElements (the last three as exporters emit them for windowed attention and
//! masks).

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::util::{dim_of, input, ints, one, one_tch, opt, same_device, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("CumSum", build_cumsum);
    m.insert("TopK", build_topk);
    m.insert("Trilu", build_trilu);
    m.insert("Einsum", build_einsum);
    m.insert("GatherND", build_gather_nd);
    m.insert("ScatterND", build_scatter_nd);
    m.insert("ScatterElements", build_scatter_elements);
    m.insert("Scatter", build_scatter_elements);
}

/// The single integer of a scalar (or 1-element) input.
fn single_int(t: &Tensor, what: &str) -> Result<i64, String> {
    match ints(t)?[..] {
        [v] => Ok(v),
        ref v => Err(format!("{what} must have one value, has {v:?}")),
    }
}

#[derive(Debug)]
struct CumSum {
    exclusive: bool,
    reverse: bool,
}

fn build_cumsum(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(CumSum {
        exclusive: b.int_or("exclusive", 0)? != 0,
        reverse: b.int_or("reverse", 0)? != 0,
    }))
}

impl Op for CumSum {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let a = dim_of(x, single_int(input(inputs, 1)?, "CumSum axis")?)? as i64;
        let kind = x.kind();
        let src = if self.reverse {
            x.f_flip([a]).map_err(tch_err)?
        } else {
            x.shallow_clone()
        };
        let mut y = src.f_cumsum(a, kind).map_err(tch_err)?;
        if self.exclusive {
            y = y.f_sub(&src).map_err(tch_err)?;
        }
        one_tch(if self.reverse { y.f_flip([a]) } else { Ok(y) })
    }
}

#[derive(Debug)]
struct TopK {
    axis: i64,
    largest: bool,
    /// Opset 1: k as an attribute.
    k: Option<i64>,
}

fn build_topk(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(TopK {
        axis: b.int_or("axis", -1)?,
        largest: b.int_or("largest", 1)? != 0,
        k: if b.opset < 10 {
            Some(b.int("k")?.ok_or("TopK-1 needs `k`")?)
        } else {
            None
        },
    }))
}

impl Op for TopK {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let a = dim_of(x, self.axis)?;
        let k = match self.k {
            Some(k) => k,
            None => single_int(input(inputs, 1)?, "TopK k")?,
        };
        let d = x.size()[a];
        let a = a as i64;
        if k < 0 || k > d {
            return Err(format!("k = {k} for an axis of size {d}"));
        }
        // Ties: ONNX wants the lower index first, which a stable sort gives (topk does not promise it).
        let (v, i) = x.f_sort_stable(true, a, self.largest).map_err(tch_err)?;
        let (values, idx) = (
            v.f_narrow(a, 0, k).map_err(tch_err)?,
            i.f_narrow(a, 0, k).map_err(tch_err)?,
        );
        Ok(vec![values, idx.f_totype(Kind::Int64).map_err(tch_err)?])
    }
}

#[derive(Debug)]
struct Trilu {
    upper: bool,
}

fn build_trilu(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Trilu {
        upper: b.int_or("upper", 1)? != 0,
    }))
}

impl Op for Trilu {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        if x.dim() < 2 {
            return Err(format!("Trilu input of rank {}", x.dim()));
        }
        let k = match opt(inputs, 1) {
            Some(t) => single_int(t, "Trilu k")?,
            None => 0,
        };
        one_tch(if self.upper { x.f_triu(k) } else { x.f_tril(k) })
    }
}

#[derive(Debug)]
struct Einsum {
    equation: String,
}

fn build_einsum(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let equation: String = b
        .string_or("equation", "")?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if equation.is_empty() {
        return Err("Einsum needs `equation`".into());
    }
    Ok(Box::new(Einsum { equation }))
}

impl Op for Einsum {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let ins: Vec<&Tensor> = inputs
            .iter()
            .map(|t| t.ok_or("an input is omitted"))
            .collect::<Result<_, _>>()?;
        let ins = same_device(&ins);
        let none: Option<&[i64]> = None;
        let y = Tensor::f_einsum(&self.equation, &ins, none).map_err(tch_err)?;
        one(y)
    }
}

/// Linear positions, in `data` viewed as `[prod(shape[..b + k]), shape[b + k..]...]`, of the
/// index tuples in the last dim of `idx` (k = its size), the first `b` dims being batch dims.
fn linear_positions(shape: &[i64], idx: &Tensor, b: usize) -> Result<Tensor, String> {
    let q = idx.size();
    let k = *q.last().ok_or("indices must have rank >= 1")? as usize;
    if b + k > shape.len() || q.len() < b + 1 || q[..b] != shape[..b] {
        return Err(format!(
            "indices of shape {q:?} do not fit data of shape {shape:?} with batch_dims {b}"
        ));
    }
    let mut lin = Tensor::f_zeros(&q[..q.len() - 1], (Kind::Int64, idx.device())).map_err(tch_err)?;
    let mut stride = 1i64;
    for i in (0..k).rev() {
        let col = idx.f_select(-1, i as i64).map_err(tch_err)?;
        let col = super::shape::wrap_indices(&col, shape[b + i])?;
        lin = lin
            .f_add(&col.f_mul_scalar(stride).map_err(tch_err)?)
            .map_err(tch_err)?;
        stride *= shape[b + i];
    }
    if b > 0 {
        // Offset each batch element by its position among the batch dims.
        let nb: i64 = shape[..b].iter().product();
        let mut bshape = shape[..b].to_vec();
        bshape.extend(std::iter::repeat_n(1, q.len() - 1 - b));
        let batch = Tensor::f_arange(nb, (Kind::Int64, idx.device()))
            .and_then(|t| t.f_reshape(&bshape[..]))
            .map_err(tch_err)?;
        lin = lin
            .f_add(&batch.f_mul_scalar(stride).map_err(tch_err)?)
            .map_err(tch_err)?;
    }
    Ok(lin)
}

/// `x` viewed as `[prod(shape[..n]), shape[n..]...]`.
fn rows(x: &Tensor, n: usize) -> Result<Tensor, String> {
    let s = x.size();
    let mut v = vec![s[..n].iter().product::<i64>()];
    v.extend(&s[n..]);
    x.f_reshape(&v[..]).map_err(tch_err)
}

#[derive(Debug)]
struct GatherNd {
    batch_dims: usize,
}

fn build_gather_nd(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let bd = b.int_or("batch_dims", 0)?;
    if bd < 0 {
        return Err(format!("batch_dims {bd}"));
    }
    Ok(Box::new(GatherNd {
        batch_dims: bd as usize,
    }))
}

impl Op for GatherNd {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?]);
        let (x, idx) = (&t[0], &t[1]);
        let (s, q) = (x.size(), idx.size());
        let lin = linear_positions(&s, idx, self.batch_dims)?;
        let k = *q.last().unwrap_or(&0) as usize;
        let mut out = q[..q.len() - 1].to_vec();
        out.extend(&s[self.batch_dims + k..]);
        let flat = lin.f_flatten(0, -1).map_err(tch_err)?;
        one_tch(
            rows(x, self.batch_dims + k)?
                .f_index_select(0, &flat)
                .and_then(|y| y.f_reshape(&out[..])),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScatterReduce {
    None,
    Add,
    Mul,
    Max,
    Min,
}

fn scatter_reduction(b: &BuildCtx<'_>) -> Result<ScatterReduce, String> {
    Ok(match b.string_or("reduction", "none")?.as_str() {
        "none" => ScatterReduce::None,
        "add" => ScatterReduce::Add,
        "mul" => ScatterReduce::Mul,
        "max" => ScatterReduce::Max,
        "min" => ScatterReduce::Min,
        other => return Err(format!("reduction `{other}` is not supported")),
    })
}

#[derive(Debug)]
struct ScatterNd {
    reduction: ScatterReduce,
}

fn build_scatter_nd(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(ScatterNd {
        reduction: scatter_reduction(b)?,
    }))
}

impl Op for ScatterNd {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?]);
        let (x, idx, upd) = (&t[0], &t[1], &t[2]);
        let (s, q) = (x.size(), idx.size());
        let k = *q.last().ok_or("indices must have rank >= 1")? as usize;
        let lin = linear_positions(&s, idx, 0)?.f_flatten(0, -1).map_err(tch_err)?;
        let data = rows(x, k)?;
        let mut ushape = vec![lin.numel() as i64];
        ushape.extend(&s[k..]);
        let upd = upd
            .f_reshape(&ushape[..])
            .and_then(|u| u.f_totype(x.kind()))
            .map_err(tch_err)?;
        let y = match self.reduction {
            ScatterReduce::None => data.f_index_copy(0, &lin, &upd),
            ScatterReduce::Add => data.f_index_add(0, &lin, &upd),
            ScatterReduce::Mul => data.f_index_reduce(0, &lin, &upd, "prod", true),
            ScatterReduce::Max => data.f_index_reduce(0, &lin, &upd, "amax", true),
            ScatterReduce::Min => data.f_index_reduce(0, &lin, &upd, "amin", true),
        };
        one_tch(y.and_then(|y| y.f_reshape(&s[..])))
    }
}

#[derive(Debug)]
struct ScatterElements {
    axis: i64,
    reduction: ScatterReduce,
}

fn build_scatter_elements(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(ScatterElements {
        axis: b.int_or("axis", 0)?,
        reduction: scatter_reduction(b)?,
    }))
}

impl Op for ScatterElements {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?]);
        let (x, idx, upd) = (&t[0], &t[1], &t[2]);
        let a = dim_of(x, self.axis)?;
        if idx.dim() != x.dim() || idx.size() != upd.size() {
            return Err(format!(
                "indices {:?} and updates {:?} do not fit data {:?}",
                idx.size(),
                upd.size(),
                x.size()
            ));
        }
        let idx = super::shape::wrap_indices(idx, x.size()[a])?;
        let a = a as i64;
        let upd = upd.f_totype(x.kind()).map_err(tch_err)?;
        let how = match self.reduction {
            ScatterReduce::None => return one_tch(x.f_scatter(a, &idx, &upd)),
            ScatterReduce::Add => return one_tch(x.f_scatter_add(a, &idx, &upd)),
            ScatterReduce::Mul => "prod",
            ScatterReduce::Max => "amax",
            ScatterReduce::Min => "amin",
        };
        // tch has no scatter_reduce.two: reduce into the flattened data at linear positions.
        let (s, q) = (x.size(), idx.size());
        let mut lin = Tensor::f_zeros(&q[..], (Kind::Int64, x.device())).map_err(tch_err)?;
        let mut stride = 1i64;
        for d in (0..s.len()).rev() {
            let pos = if d as i64 == a {
                idx.shallow_clone()
            } else {
                let mut shape = vec![1i64; q.len()];
                shape[d] = q[d];
                Tensor::f_arange(q[d], (Kind::Int64, x.device()))
                    .and_then(|t| t.f_reshape(&shape[..]))
                    .map_err(tch_err)?
            };
            lin = lin
                .f_add(&pos.f_mul_scalar(stride).map_err(tch_err)?)
                .map_err(tch_err)?;
            stride *= s[d];
        }
        let flat = x.f_flatten(0, -1).map_err(tch_err)?;
        let (lin, upd) = (
            lin.f_flatten(0, -1).map_err(tch_err)?,
            upd.f_flatten(0, -1).map_err(tch_err)?,
        );
        one_tch(
            flat.f_index_reduce(0, &lin, &upd, how, true)
                .and_then(|y| y.f_reshape(&s[..])),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{i, int, node, run_node, t};

    #[test]
    fn cumsum_exclusive_reverse_and_topk() {
        let x = t(&[1.0, 2.0, 3.0], &[3]);
        let a = i(&[0], &[]);
        let mut n = node("CumSum", 2);
        assert_eq!(run_node(&n, 14, &[Some(&x), Some(&a)])[0], vec![1.0, 3.0, 6.0]);
        n.attribute.extend([int("exclusive", 1), int("reverse", 1)]);
        assert_eq!(run_node(&n, 14, &[Some(&x), Some(&a)])[0], vec![5.0, 3.0, 0.0]);
        let x = t(&[1.0, 3.0, 3.0, 2.0], &[4]);
        let k = i(&[2], &[1]);
        let mut n = node("TopK", 2);
        n.output = vec!["v".into(), "i".into()];
        let y = run_node(&n, 11, &[Some(&x), Some(&k)]);
        assert_eq!(y, vec![vec![3.0, 3.0], vec![1.0, 2.0]]);
    }
}
