//! Pooling: MaxPool (pads, auto_pad, dilations, ceil_mode), AveragePool (pads, auto_pad, ceil_mode,
//! count_include_pad), GlobalAveragePool and GlobalMaxPool.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::conv::{apply_padding, Padding};
use super::util::{input, one, one_tch, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("MaxPool", build_maxpool);
    m.insert("AveragePool", build_avgpool);
    m.insert("GlobalAveragePool", |_| Ok(Box::new(GlobalAveragePool)));
    m.insert("GlobalMaxPool", |_| Ok(Box::new(GlobalMaxPool)));
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
struct AvgPool {
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    padding: Padding,
    ceil: bool,
    count_include_pad: bool,
}

fn build_avgpool(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let kernel = b.ints("kernel_shape")?.ok_or("kernel_shape is required")?;
    if !(1..=3).contains(&kernel.len()) {
        return Err(format!("{}-D AveragePool is not supported", kernel.len()));
    }
    if kernel.iter().any(|&k| k < 1) {
        return Err(format!("kernel_shape {kernel:?} must be positive"));
    }
    let strides = b.ints("strides")?;
    if let Some(s) = strides.as_ref().filter(|s| s.iter().any(|&v| v < 1)) {
        return Err(format!("strides {s:?} must be positive"));
    }
    if let Some(d) = b.ints("dilations")? {
        if d.iter().any(|&d| d != 1) {
            return Err(format!("AveragePool dilations {d:?} are not supported"));
        }
    }
    Ok(Box::new(AvgPool {
        padding: Padding::from_attrs(b, Some(kernel.len()))?,
        kernel,
        strides,
        ceil: b.int_or("ceil_mode", 0)? != 0,
        count_include_pad: b.int_or("count_include_pad", 0)? != 0,
    }))
}

/// Window sums (divisor 1) over 2-D or 3-D spatial dims, no implicit padding.
fn window_sums(x: &Tensor, kernel: &[i64], strides: &[i64], ceil: bool) -> Result<Tensor, String> {
    let zeros = vec![0; kernel.len()];
    match kernel.len() {
        2 => x.f_avg_pool2d(kernel, strides, &zeros, ceil, true, 1),
        3 => x.f_avg_pool3d(kernel, strides, &zeros, ceil, true, 1),
        n => return Err(format!("{n}-D window sums")),
    }
    .map_err(tch_err)
}

impl Op for AvgPool {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let n = self.kernel.len();
        let xs = x.size();
        if xs.len() != n + 2 {
            return Err(format!("input of rank {} for a {n}-D kernel", xs.len()));
        }
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; n]);
        if strides.len() != n {
            return Err(format!("strides {strides:?} do not fit a {n}-D kernel"));
        }
        let (begin, end) = self.padding.resolve(&xs[2..], &self.kernel, &strides, &vec![1; n])?;
        // torch's own padding is symmetric and at most half the kernel, and its ceil-mode divisor
        // differs from ONNX's at the far edge: use it only where it agrees.
        let simple = !self.ceil && begin == end && (0..n).all(|i| 2 * begin[i] <= self.kernel[i]);
        if simple {
            let y = match n {
                1 => x.f_avg_pool1d(&self.kernel, &strides, &begin, false, self.count_include_pad),
                2 => x.f_avg_pool2d(&self.kernel, &strides, &begin, false, self.count_include_pad, None),
                _ => x.f_avg_pool3d(&self.kernel, &strides, &begin, false, self.count_include_pad, None),
            };
            return one_tch(y);
        }
        // General case: explicit zero padding, window sums, and a divisor counted by pooling a mask
        // (ones over the input, or over input and pads when count_include_pad).
        let (x2, kernel, strides, begin, end) = if n == 1 {
            (
                x.f_unsqueeze(2).map_err(tch_err)?,
                vec![1, self.kernel[0]],
                vec![1, strides[0]],
                vec![0, begin[0]],
                vec![0, end[0]],
            )
        } else {
            (x.shallow_clone(), self.kernel.clone(), strides, begin, end)
        };
        let m = kernel.len();
        let mut pad = Vec::with_capacity(2 * m);
        for i in (0..m).rev() {
            pad.push(begin[i]);
            pad.push(end[i]);
        }
        let xp = x2.f_constant_pad_nd(&pad[..]).map_err(tch_err)?;
        let sums = window_sums(&xp, &kernel, &strides, self.ceil)?;
        let spatial = &x2.size()[2..];
        let mut mask_shape = vec![1, 1];
        mask_shape.extend(spatial);
        let kind = if super::util::is_float(x.kind()) {
            x.kind()
        } else {
            Kind::Float
        };
        let mask = Tensor::f_ones(&mask_shape[..], (kind, x.device())).map_err(tch_err)?;
        let mask = if self.count_include_pad {
            mask.f_pad(&pad[..], "constant", Some(1.0))
        } else {
            mask.f_constant_pad_nd(&pad[..])
        }
        .map_err(tch_err)?;
        let counts = window_sums(&mask, &kernel, &strides, self.ceil)?;
        let mut y = sums.f_div(&counts).map_err(tch_err)?;
        if self.ceil {
            // ONNX drops a last window that would start in the end padding; torch, seeing the
            // padding as input, keeps it.
            for i in 0..m {
                let (len, k, s) = (spatial[i] + begin[i] + end[i], kernel[i], strides[i]);
                let mut out = (len - k + s - 1).div_euclid(s) + 1;
                if (out - 1) * s >= spatial[i] + begin[i] {
                    out -= 1;
                }
                let dim = 2 + i as i64;
                if y.size()[dim as usize] > out {
                    y = y.f_narrow(dim, 0, out.max(0)).map_err(tch_err)?;
                }
            }
        }
        one_tch(if n == 1 { y.f_squeeze_dim(2) } else { Ok(y) })
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

#[derive(Debug)]
struct GlobalMaxPool;

impl Op for GlobalMaxPool {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        if x.dim() < 3 {
            return Err(format!("input of rank {} has no spatial dims", x.dim()));
        }
        let dims: Vec<i64> = (2..x.dim() as i64).collect();
        one_tch(x.f_amax(&dims[..], true))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{int, ints, node, run_node, t};

    #[test]
    fn average_pool_counts_pads_only_when_asked() {
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 4]);
        let mut n = node("AveragePool", 1);
        n.attribute
            .extend([ints("kernel_shape", &[2]), ints("strides", &[2]), ints("pads", &[1, 1])]);
        assert_eq!(run_node(&n, 11, &[Some(&x)])[0], vec![1.0, 2.5, 4.0]);
        n.attribute.push(int("count_include_pad", 1));
        assert_eq!(run_node(&n, 11, &[Some(&x)])[0], vec![0.5, 2.5, 2.0]);
        // Asymmetric pads and ceil mode take the general path.
        let mut c = node("AveragePool", 1);
        c.attribute
            .extend([ints("kernel_shape", &[3]), ints("strides", &[2]), int("ceil_mode", 1)]);
        assert_eq!(run_node(&c, 11, &[Some(&x)])[0], vec![2.0, 3.5]);
    }
}
