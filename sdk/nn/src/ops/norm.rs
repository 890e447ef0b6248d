//! Normalisations: BatchNormalization (training, frozen and eval modes), Softmax and LogSoftmax (with the opset < 13 2-D coercion), InstanceNormalization,
//! LayerNormalization, LRN.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::util::{axis, input, one, one_tch, opt, same_device, tch_err};
use super::{BuildCtx, Builder, Mode, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("BatchNormalization", build_bn);
    m.insert("Softmax", |b| build_softmax(b, false));
    m.insert("LogSoftmax", |b| build_softmax(b, true));
    m.insert("InstanceNormalization", build_instance_norm);
    m.insert("LayerNormalization", build_layer_norm);
    m.insert("LRN", build_lrn);
    m.insert("Hardmax", build_hardmax);
    m.insert("GroupNormalization", build_group_norm);
    m.insert("LpNormalization", build_lp_norm);
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
struct Softmax {
    axis: i64,
    /// Opset < 13: the input is seen as 2-D [prod(dims before axis), prod(dims from axis)].
    coerce: bool,
    log: bool,
}

fn build_softmax(b: &BuildCtx<'_>, log: bool) -> Result<Box<dyn Op>, String> {
    let coerce = b.opset < 13;
    Ok(Box::new(Softmax {
        axis: b.int_or("axis", if coerce { 1 } else { -1 })?,
        coerce,
        log,
    }))
}

impl Op for Softmax {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        let r = s.len() as i64;
        let f = |t: &Tensor, dim: i64| {
            if self.log {
                t.f_log_softmax(dim, None)
            } else {
                t.f_softmax(dim, None)
            }
        };
        if r == 0 {
            return one_tch(
                x.f_reshape([1])
                    .and_then(|t| f(&t, 0))
                    .and_then(|t| t.f_reshape([0i64; 0])),
            );
        }
        if !self.coerce {
            return one_tch(f(x, axis(self.axis, r)?));
        }
        let a = if self.axis == r { r } else { axis(self.axis, r)? } as usize;
        let outer: i64 = s[..a].iter().product();
        let inner: i64 = s[a..].iter().product();
        one_tch(
            x.f_reshape([outer, inner])
                .and_then(|t| f(&t, 1))
                .and_then(|t| t.f_reshape(&s[..])),
        )
    }
}

#[derive(Debug)]
struct InstanceNorm {
    epsilon: f64,
}

fn build_instance_norm(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(InstanceNorm {
        epsilon: b.float_or("epsilon", 1e-5)? as f64,
    }))
}

impl Op for InstanceNorm {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?]);
        let (x, scale, bias) = (&t[0], &t[1], &t[2]);
        if x.dim() < 3 {
            return Err(format!("input of rank {} has no spatial dims", x.dim()));
        }
        let none: Option<&Tensor> = None;
        one_tch(x.f_instance_norm(Some(scale), Some(bias), none, none, true, 0.0, self.epsilon, false))
    }
}

#[derive(Debug)]
struct LayerNorm {
    axis: i64,
    epsilon: f64,
    /// Which of the Mean and InvStdDev outputs are wanted.
    stats: bool,
}

fn build_layer_norm(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    Ok(Box::new(LayerNorm {
        axis: b.int_or("axis", -1)?,
        epsilon: b.float_or("epsilon", 1e-5)? as f64,
        stats: b.node.output.iter().skip(1).any(|o| !o.is_empty()),
    }))
}

impl Op for LayerNorm {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let mut ins = vec![input(inputs, 0)?, input(inputs, 1)?];
        ins.extend(opt(inputs, 2));
        let t = same_device(&ins);
        let (x, scale, bias) = (&t[0], &t[1], t.get(2));
        let s = x.size();
        let a = axis(self.axis, s.len() as i64)? as usize;
        let norm_shape = &s[a..];
        // torch's fused kernel wants weight and bias of exactly the normalised shape; ONNX lets them
        // broadcast, so apply them after when they differ.
        let fits = |t: &Tensor| t.size()[..] == norm_shape[..];
        let fused = fits(scale) && bias.is_none_or(fits);
        let mut y = if fused {
            x.f_layer_norm(norm_shape, Some(scale), bias, self.epsilon, true)
                .map_err(tch_err)?
        } else {
            let none: Option<&Tensor> = None;
            let y = x
                .f_layer_norm(norm_shape, none, none, self.epsilon, true)
                .map_err(tch_err)?;
            y.f_mul(scale).map_err(tch_err)?
        };
        if let (false, Some(b)) = (fused, bias) {
            y = y.f_add(b).map_err(tch_err)?;
        }
        if !self.stats {
            return one(y);
        }
        let dims: Vec<i64> = (a as i64..s.len() as i64).collect();
        let xf = x.f_totype(Kind::Float).map_err(tch_err)?;
        let mean = xf.f_mean_dim(&dims[..], true, None).map_err(tch_err)?;
        let var = xf.f_var_dim(&dims[..], false, true).map_err(tch_err)?;
        let inv = var
            .f_add_scalar(self.epsilon)
            .and_then(|v| v.f_rsqrt())
            .map_err(tch_err)?;
        Ok(vec![y, mean, inv])
    }
}

#[derive(Debug)]
struct Lrn {
    size: i64,
    alpha: f64,
    beta: f64,
    bias: f64,
}

fn build_lrn(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let size = b.int("size")?.ok_or("LRN needs `size`")?;
    if size < 1 {
        return Err(format!("LRN size {size}"));
    }
    Ok(Box::new(Lrn {
        size,
        alpha: b.float_or("alpha", 1e-4)? as f64,
        beta: b.float_or("beta", 0.75)? as f64,
        bias: b.float_or("bias", 1.0)? as f64,
    }))
}

impl Op for Lrn {
    /// ONNX: `square_sum[c] = sum(x[i]^2)` over `c - floor((size-1)/2) <= i <= c + ceil((size-1)/2)`
    /// (clipped to the channels), `y = x / (bias + alpha / size * square_sum) ^ beta`.
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        if s.len() < 2 {
            return Err(format!("LRN input of rank {}", s.len()));
        }
        let rest: i64 = s[2..].iter().product();
        let (lo, hi) = ((self.size - 1) / 2, (self.size - 1) - (self.size - 1) / 2);
        let sq = x
            .f_square()
            .and_then(|q| q.f_reshape([s[0], 1, s[1], rest]))
            .map_err(tch_err)?;
        let sums = sq
            .f_constant_pad_nd([0, 0, lo, hi])
            .and_then(|p| p.f_avg_pool2d([self.size, 1], [1, 1], [0, 0], false, true, 1))
            .and_then(|p| p.f_reshape(&s[..]))
            .map_err(tch_err)?;
        let denom = sums
            .f_mul_scalar(self.alpha / self.size as f64)
            .and_then(|d| d.f_add_scalar(self.bias))
            .and_then(|d| d.f_pow_tensor_scalar(self.beta))
            .map_err(tch_err)?;
        one_tch(x.f_div(&denom))
    }
}

#[derive(Debug)]
struct Hardmax {
    axis: i64,
    coerce: bool,
}

fn build_hardmax(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let coerce = b.opset < 13;
    Ok(Box::new(Hardmax {
        axis: b.int_or("axis", if coerce { 1 } else { -1 })?,
        coerce,
    }))
}

impl Op for Hardmax {
    /// One-hot of the first maximum along the axis (the 2-D coerced view before opset 13).
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let s = x.size();
        let r = s.len() as i64;
        let (view, dim) = if self.coerce {
            let a = if self.axis == r { r } else { axis(self.axis, r)? } as usize;
            let outer: i64 = s[..a].iter().product();
            let inner: i64 = s[a..].iter().product();
            (x.f_reshape([outer, inner]).map_err(tch_err)?, 1)
        } else {
            (x.shallow_clone(), axis(self.axis, r)?)
        };
        let idx = view.f_argmax(dim, true).map_err(tch_err)?;
        let y = view
            .f_zeros_like()
            .and_then(|z| z.f_scatter_value(dim, &idx, 1))
            .map_err(tch_err)?;
        one_tch(y.f_reshape(&s[..]))
    }
}

#[derive(Debug)]
struct GroupNorm {
    groups: i64,
    epsilon: f64,
}

fn build_group_norm(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let groups = b.int("num_groups")?.ok_or("GroupNormalization needs `num_groups`")?;
    if groups < 1 {
        return Err(format!("num_groups {groups}"));
    }
    Ok(Box::new(GroupNorm {
        groups,
        epsilon: b.float_or("epsilon", 1e-5)? as f64,
    }))
}

impl Op for GroupNorm {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = same_device(&[input(inputs, 0)?, input(inputs, 1)?, input(inputs, 2)?]);
        let (x, scale, bias) = (&t[0], &t[1], &t[2]);
        let c = *x.size().get(1).ok_or("GroupNormalization input of rank < 2")?;
        if c % self.groups != 0 {
            return Err(format!("{c} channels do not split into {} groups", self.groups));
        }
        // Opset 18 gives one scale and bias per group, opset 21 one per channel.
        let per_channel = |p: &Tensor| -> Result<Tensor, String> {
            match p.numel() as i64 {
                n if n == c => Ok(p.f_flatten(0, -1).map_err(tch_err)?),
                n if n == self.groups => p
                    .f_flatten(0, -1)
                    .and_then(|p| p.f_repeat_interleave_self_int(c / self.groups, 0, None))
                    .map_err(tch_err),
                n => Err(format!(
                    "scale/bias of {n} values for {c} channels in {} groups",
                    self.groups
                )),
            }
        };
        let (w, b) = (per_channel(scale)?, per_channel(bias)?);
        one_tch(x.f_group_norm(self.groups, Some(&w), Some(&b), self.epsilon, true))
    }
}

#[derive(Debug)]
struct LpNorm {
    axis: i64,
    p: i64,
}

fn build_lp_norm(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let p = b.int_or("p", 2)?;
    if p != 1 && p != 2 {
        return Err(format!("LpNormalization p = {p} (1 or 2 supported)"));
    }
    Ok(Box::new(LpNorm {
        axis: b.int_or("axis", -1)?,
        p,
    }))
}

impl Op for LpNorm {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let a = axis(self.axis, x.dim() as i64)?;
        let norm = if self.p == 1 {
            x.f_abs().and_then(|t| t.f_sum_dim_intlist(&[a][..], true, None))
        } else {
            x.f_square()
                .and_then(|t| t.f_sum_dim_intlist(&[a][..], true, None))
                .and_then(|t| t.f_sqrt())
        }
        .map_err(tch_err)?;
        // A zero norm leaves the (zero) vector as it is.
        let safe = norm
            .f_eq(0.0)
            .and_then(|z| norm.f_ones_like()?.f_where_self(&z, &norm))
            .map_err(tch_err)?;
        one_tch(x.f_div(&safe))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{int, node, run_node, t};

    #[test]
    fn softmax_before_13_coerces_to_2d() {
        // Shape [1, 2, 2]: at opset 11 with axis 1 the softmax runs over all 4 values; at 13 over
        // dim 1 only.
        let x = t(&[0.0, 0.0, 0.0, 0.0], &[1, 2, 2]);
        let mut n = node("Softmax", 1);
        n.attribute.push(int("axis", 1));
        assert_eq!(run_node(&n, 11, &[Some(&x)])[0], vec![0.25; 4]);
        assert_eq!(run_node(&n, 13, &[Some(&x)])[0], vec![0.5; 4]);
        // Default axis: 1 before 13 (coerced), -1 after.
        let x = t(&[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], &[1, 2, 3]);
        let y11 = run_node(&node("Softmax", 1), 11, &[Some(&x)]).remove(0);
        let y13 = run_node(&node("Softmax", 1), 13, &[Some(&x)]).remove(0);
        assert!((y11[0] - 1.0 / 6.0).abs() < 1e-6 && (y13[0] - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn lrn_follows_the_onnx_window() {
        // size 2: window of channel c is [c, c+1] (floor((2-1)/2) = 0 before, ceil = 1 after).
        let x = t(&[1.0, 2.0, 3.0], &[1, 3, 1, 1]);
        let mut n = node("LRN", 1);
        n.attribute.extend([
            int("size", 2),
            super::super::tests_util::float("alpha", 2.0),
            super::super::tests_util::float("beta", 1.0),
        ]);
        let y = run_node(&n, 13, &[Some(&x)]).remove(0);
        let want = [1.0 / (1.0 + 5.0), 2.0 / (1.0 + 13.0), 3.0 / (1.0 + 9.0)];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
