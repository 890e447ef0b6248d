//! Linear layers: Gemm (alpha, beta, transA, transB) and MatMul (numpy semantics, batched and
//! broadcasting).

use std::collections::HashMap;

use tch::Tensor;

use super::util::{input, one, one_tch, same_device};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("Gemm", build_gemm);
    m.insert("MatMul", |_| Ok(Box::new(MatMul)));
}

#[derive(Debug)]
struct MatMul;

impl Op for MatMul {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?]);
        if t[0].dim() == 0 || t[1].dim() == 0 {
            return Err("MatMul of a scalar".into());
        }
        one_tch(t[0].f_matmul(&t[1]))
    }
}

#[derive(Debug)]
struct Gemm {
    alpha: f64,
    beta: f64,
    trans_a: bool,
    trans_b: bool,
}

fn build_gemm(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(Gemm {
        alpha: b.float_or("alpha", 1.0)? as f64,
        beta: b.float_or("beta", 1.0)? as f64,
        trans_a: b.int_or("transA", 0)? != 0,
        trans_b: b.int_or("transB", 0)? != 0,
    }))
}

impl Op for Gemm {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let a = input(inputs, 0)?;
        let b = input(inputs, 1)?;
        let a = if self.trans_a { a.tr() } else { a.shallow_clone() };
        let b = if self.trans_b { b.tr() } else { b.shallow_clone() };
        if a.dim() != 2 || b.dim() != 2 || a.size()[1] != b.size()[0] {
            return Err(format!("cannot multiply {:?} by {:?}", a.size(), b.size()));
        }
        let c = inputs.get(2).copied().flatten();
        if let (Some(c), true) = (c, self.alpha == 1.0 && self.beta == 1.0) {
            return c.f_addmm(&a, &b).map(|t| vec![t]).map_err(|e| e.to_string());
        }
        let mut y = a.mm(&b);
        if self.alpha != 1.0 {
            y *= self.alpha;
        }
        if let Some(c) = c {
            y += c * self.beta;
        }
        one(y)
    }
}
