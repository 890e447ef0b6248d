//! Convolutions: Conv and ConvTranspose (groups, dilations, pads, auto_pad; ConvTranspose's
//! output_padding and output_shape), and the ONNX padding rules the pooling ops share.

use std::collections::HashMap;

use tch::Tensor;

use super::util::{input, opt, same_device, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("Conv", build_conv);
    m.insert("ConvTranspose", build_conv_transpose);
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

#[derive(Debug)]
struct ConvTranspose {
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    group: i64,
    pads: Option<Vec<i64>>,
    auto_pad: AutoPad,
    output_padding: Option<Vec<i64>>,
    output_shape: Option<Vec<i64>>,
    kernel_shape: Option<Vec<i64>>,
}

fn build_conv_transpose(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let auto_pad = match b.string_or("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        other => return Err(format!("unknown auto_pad {other}")),
    };
    let pads = b.ints("pads")?;
    if pads.as_ref().is_some_and(|p| p.len() % 2 != 0) {
        return Err(format!("pads {pads:?} has an odd length"));
    }
    let group = b.int_or("group", 1)?;
    if group < 1 {
        return Err(format!("group {group}"));
    }
    let strides = b.ints("strides")?;
    let dilations = b.ints("dilations")?;
    for (name, v) in [("strides", &strides), ("dilations", &dilations)] {
        if let Some(v) = v.as_ref().filter(|v| v.iter().any(|&x| x < 1)) {
            return Err(format!("{name} {v:?} must be positive"));
        }
    }
    Ok(Box::new(ConvTranspose {
        strides,
        dilations,
        group,
        pads,
        auto_pad,
        output_padding: b.ints("output_padding")?,
        output_shape: b.ints("output_shape")?,
        kernel_shape: b.ints("kernel_shape")?,
    }))
}

impl ConvTranspose {
    /// (begin, end) pads per spatial dim, following the ONNX formulas.
    fn pads(
        &self,
        input: &[i64],
        kernel: &[i64],
        strides: &[i64],
        dil: &[i64],
        outpad: &[i64],
    ) -> (Vec<i64>, Vec<i64>) {
        let n = input.len();
        let full: Vec<i64> = (0..n)
            .map(|i| strides[i] * (input[i] - 1) + outpad[i] + (kernel[i] - 1) * dil[i] + 1)
            .collect();
        let target: Option<Vec<i64>> = match (&self.output_shape, self.auto_pad) {
            (Some(s), _) => Some(s[s.len().saturating_sub(n)..].to_vec()),
            (None, AutoPad::SameUpper | AutoPad::SameLower) => Some((0..n).map(|i| input[i] * strides[i]).collect()),
            _ => None,
        };
        match target {
            Some(out) => {
                let mut b = vec![0; n];
                let mut e = vec![0; n];
                for i in 0..n {
                    let total = full[i] - out.get(i).copied().unwrap_or(full[i]);
                    let half = total.div_euclid(2);
                    if self.auto_pad == AutoPad::SameUpper {
                        (b[i], e[i]) = (half, total - half);
                    } else {
                        (b[i], e[i]) = (total - half, half);
                    }
                }
                (b, e)
            }
            None if self.auto_pad == AutoPad::Valid => (vec![0; n], vec![0; n]),
            None => {
                let p = self.pads.clone().unwrap_or_else(|| vec![0; 2 * n]);
                let get = |i: usize| p.get(i).copied().unwrap_or(0);
                (
                    (0..n).map(get).collect(),
                    (0..n).map(|i| get(i + p.len() / 2)).collect(),
                )
            }
        }
    }
}

impl Op for ConvTranspose {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let mut ins = vec![input(inputs, 0)?, input(inputs, 1)?];
        ins.extend(opt(inputs, 2));
        let t = same_device(&ins);
        let (x, w, bias) = (&t[0], &t[1], t.get(2));
        let (xs, ws) = (x.size(), w.size());
        if xs.len() < 3 || xs.len() != ws.len() {
            return Err(format!("input of shape {xs:?} does not fit weight of shape {ws:?}"));
        }
        if xs[1] != ws[0] {
            return Err(format!("input has {} channels, weight expects {}", xs[1], ws[0]));
        }
        let n = xs.len() - 2;
        let kernel = ws[2..].to_vec();
        if let Some(k) = &self.kernel_shape {
            if k[..] != kernel[..] {
                return Err(format!("kernel_shape {k:?} differs from the weight's {kernel:?}"));
            }
        }
        let ones = vec![1; n];
        let strides = self.strides.clone().unwrap_or_else(|| ones.clone());
        let dil = self.dilations.clone().unwrap_or_else(|| ones.clone());
        let outpad = self.output_padding.clone().unwrap_or_else(|| vec![0; n]);
        if strides.len() != n || dil.len() != n || outpad.len() != n {
            return Err(format!(
                "strides {strides:?}, dilations {dil:?}, output_padding {outpad:?} do not fit {n}-D"
            ));
        }
        let (begin, end) = self.pads(&xs[2..], &kernel, &strides, &dil, &outpad);
        let zeros = vec![0; n];
        let none: Option<&Tensor> = None;
        let full = match n {
            1 => x.f_conv_transpose1d(w, none, &strides, &zeros, &zeros, self.group, &dil),
            2 => x.f_conv_transpose2d(w, none, &strides, &zeros, &zeros, self.group, &dil),
            3 => x.f_conv_transpose3d(w, none, &strides, &zeros, &zeros, self.group, &dil),
            _ => return Err(format!("{n}-D ConvTranspose is not supported")),
        }
        .map_err(tch_err)?;
        // The full result covers (in-1)*s + (k-1)*d + 1; ONNX removes `begin` at the front and
        // `end - output_padding` at the back (a negative amount extends with zeros).
        let mut pad = Vec::with_capacity(2 * n);
        for i in (0..n).rev() {
            pad.push(-begin[i]);
            pad.push(outpad[i] - end[i]);
        }
        let mut y = if pad.iter().all(|&p| p == 0) {
            full
        } else {
            full.f_constant_pad_nd(&pad[..]).map_err(tch_err)?
        };
        if let Some(b) = bias {
            let mut shape = vec![1, b.numel() as i64];
            shape.extend(std::iter::repeat_n(1, n));
            y = y.f_add(&b.f_reshape(&shape[..]).map_err(tch_err)?).map_err(tch_err)?;
        }
        Ok(vec![y])
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{ints, node, run_tensors, t, values};

    #[test]
    fn conv_transpose_pads_and_output_padding() {
        // 1-D: x = [1, 2], w = [1, 1, 1], stride 2 -> full = [1, 1, 3, 2, 2] (length 5).
        let x = t(&[1.0, 2.0], &[1, 1, 2]);
        let w = t(&[1.0, 1.0, 1.0], &[1, 1, 3]);
        let mut n = node("ConvTranspose", 2);
        n.attribute.push(ints("strides", &[2]));
        assert_eq!(
            values(&run_tensors(&n, 13, &[Some(&x), Some(&w)])[0]),
            vec![1.0, 1.0, 3.0, 2.0, 2.0]
        );
        let mut p = n.clone();
        p.attribute
            .extend([ints("pads", &[1, 1]), ints("output_padding", &[1])]);
        assert_eq!(
            values(&run_tensors(&p, 13, &[Some(&x), Some(&w)])[0]),
            vec![1.0, 3.0, 2.0, 2.0]
        );
        let mut o = n.clone();
        o.attribute.push(ints("output_shape", &[6]));
        assert_eq!(
            values(&run_tensors(&o, 13, &[Some(&x), Some(&w)])[0]),
            vec![1.0, 1.0, 3.0, 2.0, 2.0, 0.0]
        );
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
