//! MatMul (numpy semantics, batched and broadcasting) and ConvTranspose (groups, dilations, pads,
//! output_padding, output_shape, auto_pad).

use std::collections::HashMap;

use tch::Tensor;

use super::util::{input, one_tch, opt, same_device, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("MatMul", |_| Ok(Box::new(MatMul)));
    m.insert("ConvTranspose", build_conv_transpose);
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
