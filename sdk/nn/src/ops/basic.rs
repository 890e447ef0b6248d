//! The core CNN ops: Conv, BatchNormalization, Gemm, MaxPool, GlobalAveragePool, Relu, Flatten,
//! Add, Identity.

use std::collections::HashMap;

use tch::Tensor;

use super::util::{axis, input, one};
use super::{BuildCtx, Builder, Mode, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("Conv", build_conv);
    m.insert("BatchNormalization", build_bn);
    m.insert("Gemm", build_gemm);
    m.insert("MaxPool", build_maxpool);
    m.insert("Relu", |_| Ok(Box::new(Relu)));
    m.insert("Flatten", build_flatten);
    m.insert("Add", |_| Ok(Box::new(Add)));
    m.insert("Identity", |_| Ok(Box::new(Identity)));
    m.insert("GlobalAveragePool", |_| Ok(Box::new(GlobalAveragePool)));
}

/// Padding as ONNX describes it: explicit begin/end pads or an auto_pad rule.
#[derive(Debug, Clone)]
pub(crate) enum Padding {
    Explicit { begin: Vec<i64>, end: Vec<i64> },
    SameUpper,
    SameLower,
}

impl Padding {
    pub(crate) fn from_attrs(b: &BuildCtx<'_>, spatial: Option<usize>) -> Result<Padding, String> {
        let auto = b.string_or("auto_pad", "NOTSET")?;
        match auto.as_str() {
            "SAME_UPPER" => Ok(Padding::SameUpper),
            "SAME_LOWER" => Ok(Padding::SameLower),
            "VALID" => Ok(Padding::Explicit {
                begin: vec![0; spatial.unwrap_or(0)],
                end: vec![0; spatial.unwrap_or(0)],
            }),
            "NOTSET" | "" => {
                let pads = b.ints("pads")?.unwrap_or_default();
                if pads.len() % 2 != 0 {
                    return Err(format!("pads {pads:?} has an odd length"));
                }
                let h = pads.len() / 2;
                Ok(Padding::Explicit {
                    begin: pads[..h].to_vec(),
                    end: pads[h..].to_vec(),
                })
            }
            other => Err(format!("unknown auto_pad {other}")),
        }
    }

    /// (begin, end) pads for an input of spatial size `size`.
    pub(crate) fn resolve(
        &self,
        size: &[i64],
        kernel: &[i64],
        strides: &[i64],
        dilations: &[i64],
    ) -> Result<(Vec<i64>, Vec<i64>), String> {
        let n = size.len();
        for (what, v) in [("kernel_shape", kernel), ("strides", strides), ("dilations", dilations)] {
            if v.len() != n {
                return Err(format!("{what} {v:?} does not fit {n} spatial dimension(s)"));
            }
            if v.iter().any(|&x| x <= 0 || x > 1 << 20) {
                return Err(format!("{what} {v:?} must be positive"));
            }
        }
        if let Padding::Explicit { begin, end } = self {
            if begin.iter().chain(end).any(|p| p.unsigned_abs() > 1 << 20) {
                return Err(format!("pads {begin:?} {end:?} are absurd"));
            }
        }
        Ok(match self {
            Padding::Explicit { begin, end } => {
                let get = |v: &Vec<i64>, i: usize| v.get(i).copied().unwrap_or(0);
                (
                    (0..n).map(|i| get(begin, i)).collect(),
                    (0..n).map(|i| get(end, i)).collect(),
                )
            }
            Padding::SameUpper | Padding::SameLower => {
                let mut b = vec![0; n];
                let mut e = vec![0; n];
                for i in 0..n {
                    let out = (size[i] + strides[i] - 1) / strides[i];
                    let total = ((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i]).max(0);
                    let small = total / 2;
                    if matches!(self, Padding::SameUpper) {
                        b[i] = small;
                        e[i] = total - small;
                    } else {
                        b[i] = total - small;
                        e[i] = small;
                    }
                }
                (b, e)
            }
        })
    }
}

/// Pads `x`'s spatial dims when begin != end; returns the padded input and the symmetric padding
/// left for the kernel call.
pub(crate) fn apply_padding(x: &Tensor, begin: &[i64], end: &[i64], value: f64) -> Result<(Tensor, Vec<i64>), String> {
    if begin == end {
        return Ok((x.shallow_clone(), begin.to_vec()));
    }
    let padded: Vec<i64> = x
        .size()
        .iter()
        .rev()
        .zip(begin.iter().rev().zip(end.iter().rev()))
        .map(|(&d, (&b, &e))| d.saturating_add(b).saturating_add(e))
        .collect();
    if padded.iter().any(|&d| d < 0) || begin.iter().chain(end).any(|&p| p.unsigned_abs() > 1 << 31) {
        return Err(format!(
            "pads {begin:?} / {end:?} do not fit the input shape {:?}",
            x.size()
        ));
    }
    crate::limits::check_tensor_alloc(&padded, x.kind().elt_size_in_bytes())?;
    // constant_pad_nd takes (last_begin, last_end, prev_begin, prev_end, ...).
    let mut pad = Vec::with_capacity(begin.len() * 2);
    for i in (0..begin.len()).rev() {
        pad.push(begin[i]);
        pad.push(end[i]);
    }
    let y = x.f_pad(&pad, "constant", Some(value)).map_err(|e| e.to_string())?;
    Ok((y, vec![0; begin.len()]))
}

#[derive(Debug)]
struct Conv {
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    group: i64,
    padding: Padding,
}

fn build_conv(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let kernel = b.ints("kernel_shape")?;
    Ok(Box::new(Conv {
        strides: b.ints("strides")?,
        dilations: b.ints("dilations")?,
        group: b.int_or("group", 1)?,
        padding: Padding::from_attrs(b, kernel.as_ref().map(Vec::len))?,
    }))
}

impl Op for Conv {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let w = input(inputs, 1)?;
        let bias = inputs.get(2).copied().flatten();
        let xs = x.size();
        let ws = w.size();
        if xs.len() < 3 || xs.len() != ws.len() {
            return Err(format!("input of shape {xs:?} does not fit weight of shape {ws:?}"));
        }
        let n = xs.len() - 2;
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; n]);
        let dil = self.dilations.clone().unwrap_or_else(|| vec![1; n]);
        let (begin, end) = self.padding.resolve(&xs[2..], &ws[2..], &strides, &dil)?;
        let (x, pad) = apply_padding(x, &begin, &end, 0.0)?;
        if xs[1] != ws[1] * self.group {
            return Err(format!(
                "input has {} channels, weight expects {} x group {}",
                xs[1], ws[1], self.group
            ));
        }
        x.f_convolution(w, bias, &strides, &pad, &dil, false, vec![0; n], self.group)
            .map(|t| vec![t])
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug)]
struct BatchNorm {
    epsilon: f64,
    momentum: f64,
}

fn build_bn(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    if b.node.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err("BatchNormalization with training outputs (running mean/var) is not supported".into());
    }
    Ok(Box::new(BatchNorm {
        epsilon: b.float_or("epsilon", 1e-5)? as f64,
        momentum: b.float_or("momentum", 0.9)? as f64,
    }))
}

impl Op for BatchNorm {
    fn run(&self, ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let (scale, bias, mean, var) = (
            input(inputs, 1)?,
            input(inputs, 2)?,
            input(inputs, 3)?,
            input(inputs, 4)?,
        );
        if ctx.mode == Mode::TrainFrozenBn {
            // Frozen statistics with trainable affine parameters: an explicit per-channel affine map
            // (libtorch's eval-mode batch_norm backward is several times slower on CPU).
            let c = scale.size()[0];
            let mut shape = vec![1i64; x.dim()];
            if shape.len() < 2 {
                return Err(format!("input of rank {} has no channel dim", x.dim()));
            }
            shape[1] = c;
            let inv = (var.detach() + self.epsilon).rsqrt();
            let a = (scale * &inv).view(shape.as_slice());
            let b = (bias - mean.detach() * scale * &inv).view(shape.as_slice());
            return one(x * a + b);
        }
        let training = ctx.mode == Mode::Train;
        // ONNX: running = running * momentum + batch * (1 - momentum); torch's momentum is the other weight.
        x.f_batch_norm(
            Some(scale),
            Some(bias),
            Some(mean),
            Some(var),
            training,
            1.0 - self.momentum,
            self.epsilon,
            true,
        )
        .map(|t| vec![t])
        .map_err(|e| e.to_string())
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

#[derive(Debug)]
struct MaxPool {
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    ceil: bool,
    padding: Padding,
}

fn build_maxpool(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    if b.node.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err("MaxPool with an Indices output is not supported".into());
    }
    let kernel = b.ints("kernel_shape")?.ok_or("kernel_shape is required")?;
    if b.int_or("storage_order", 0)? != 0 {
        return Err("storage_order=1 is not supported".into());
    }
    Ok(Box::new(MaxPool {
        padding: Padding::from_attrs(b, Some(kernel.len()))?,
        kernel,
        strides: b.ints("strides")?,
        dilations: b.ints("dilations")?,
        ceil: b.int_or("ceil_mode", 0)? != 0,
    }))
}

impl Op for MaxPool {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let n = self.kernel.len();
        let xs = x.size();
        if xs.len() != n + 2 {
            return Err(format!("input of rank {} for a {n}-D kernel", xs.len()));
        }
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; n]);
        let dil = self.dilations.clone().unwrap_or_else(|| vec![1; n]);
        let (begin, end) = self.padding.resolve(&xs[2..], &self.kernel, &strides, &dil)?;
        // torch pads at most half the (dilated) kernel itself; ONNX allows more: pad explicitly then.
        let within_half = (0..n).all(|i| 2 * begin[i].max(end[i]) <= dil[i] * (self.kernel[i] - 1) + 1);
        let (x, pad) = if within_half {
            apply_padding(x, &begin, &end, f64::NEG_INFINITY)?
        } else {
            let mut p = Vec::with_capacity(2 * n);
            for i in (0..n).rev() {
                p.push(begin[i]);
                p.push(end[i]);
            }
            (
                x.f_pad(&p[..], "constant", Some(f64::NEG_INFINITY))
                    .map_err(|e| e.to_string())?,
                vec![0; n],
            )
        };
        let y = match n {
            1 => x.f_max_pool1d(&self.kernel, &strides, &pad, &dil, self.ceil),
            2 => x.f_max_pool2d(&self.kernel, &strides, &pad, &dil, self.ceil),
            3 => x.f_max_pool3d(&self.kernel, &strides, &pad, &dil, self.ceil),
            _ => return Err(format!("{n}-D MaxPool is not supported")),
        };
        y.map(|t| vec![t]).map_err(|e| e.to_string())
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

#[derive(Debug)]
struct GlobalAveragePool;

impl Op for GlobalAveragePool {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        if x.dim() < 3 {
            return Err(format!("input of rank {} has no spatial dims", x.dim()));
        }
        let dims: Vec<i64> = (2..x.dim() as i64).collect();
        one(x.mean_dim(&dims[..], true, x.kind()))
    }
}

#[cfg(test)]
mod pad_tests {
    use super::*;

    #[test]
    fn fuzz_found_pads_of_i64_min_are_an_error_not_a_panic() {
        let x = Tensor::zeros([1, 1, 4, 4], (tch::Kind::Float, tch::Device::Cpu));
        let e = apply_padding(&x, &[i64::MIN, 0], &[0, 0], 0.0).unwrap_err();
        assert!(e.contains("do not fit"), "{e}");
        let (y, _) = apply_padding(&x, &[1, 1], &[0, 0], 0.0).unwrap();
        assert_eq!(y.size(), [1, 1, 5, 5]);
    }
}
