//! Resize (opset 10: X and scales; 11+: X, roi, scales, sizes) and Upsample (opset 7-9).
//!
//! Interpolation is separable, so it runs one axis at a time: the source coordinate of every
//! output position is computed as a small tensor, then the input is gathered with index_select at
//! the neighbouring positions (clamped to the edge, as the ONNX reference does) and blended with
//! the mode's weights. Everything is a tch op on whole tensors, so gradients reach the input.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::util::{axes, input, ints, is_float, one, opt, tch_err};
use super::{BuildCtx, Builder, Op, RunCtx};

pub(super) fn register(m: &mut HashMap<&'static str, Builder>) {
    m.insert("Resize", build_resize);
    m.insert("Upsample", build_upsample);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// Resize-10 and Upsample (as onnxruntime runs them): floor when upsampling, ceil when
    /// downsampling.
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Interp {
    Nearest(Nearest),
    Linear,
    Cubic { a: f64, exclude_outside: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
    TfCropAndResize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aspect {
    Stretch,
    NotLarger,
    NotSmaller,
}

#[derive(Debug)]
struct Resize {
    interp: Interp,
    coord: Coord,
    extrapolation: f64,
    axes: Option<Vec<i64>>,
    aspect: Aspect,
    /// Resize-10 / Upsample-9: inputs are (X, scales).
    legacy_inputs: bool,
    /// Upsample-7: scales as an attribute.
    scales_attr: Option<Vec<f32>>,
}

fn mode_of(b: &BuildCtx<'_>, legacy: bool) -> Result<Interp, String> {
    let mode = b.string_or("mode", "nearest")?;
    Ok(match mode.as_str() {
        "nearest" => Interp::Nearest(if legacy {
            Nearest::Legacy
        } else {
            match b.string_or("nearest_mode", "round_prefer_floor")?.as_str() {
                "round_prefer_floor" => Nearest::RoundPreferFloor,
                "round_prefer_ceil" => Nearest::RoundPreferCeil,
                "floor" => Nearest::Floor,
                "ceil" => Nearest::Ceil,
                other => return Err(format!("nearest_mode `{other}` is not supported")),
            }
        }),
        "linear" | "bilinear" | "trilinear" => Interp::Linear,
        "cubic" if !legacy => Interp::Cubic {
            a: b.float_or("cubic_coeff_a", -0.75)? as f64,
            exclude_outside: b.int_or("exclude_outside", 0)? != 0,
        },
        other => return Err(format!("mode `{other}` is not supported")),
    })
}

fn build_resize(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    let legacy = b.opset < 11;
    let interp = mode_of(b, legacy)?;
    let coord = if legacy {
        Coord::Asymmetric
    } else {
        match b.string_or("coordinate_transformation_mode", "half_pixel")?.as_str() {
            "half_pixel" => Coord::HalfPixel,
            "half_pixel_symmetric" => Coord::HalfPixelSymmetric,
            "pytorch_half_pixel" => Coord::PytorchHalfPixel,
            "align_corners" => Coord::AlignCorners,
            "asymmetric" => Coord::Asymmetric,
            "tf_half_pixel_for_nn" => Coord::TfHalfPixelForNn,
            "tf_crop_and_resize" => Coord::TfCropAndResize,
            other => return Err(format!("coordinate_transformation_mode `{other}` is not supported")),
        }
    };
    if b.int_or("antialias", 0)? != 0 && !matches!(interp, Interp::Nearest(_)) {
        return Err("antialias=1 is not supported".into());
    }
    let aspect = match b.string_or("keep_aspect_ratio_policy", "stretch")?.as_str() {
        "stretch" => Aspect::Stretch,
        "not_larger" => Aspect::NotLarger,
        "not_smaller" => Aspect::NotSmaller,
        other => return Err(format!("keep_aspect_ratio_policy `{other}` is not supported")),
    };
    Ok(Box::new(Resize {
        interp,
        coord,
        extrapolation: b.float_or("extrapolation_value", 0.0)? as f64,
        axes: b.ints("axes")?,
        aspect,
        legacy_inputs: legacy,
        scales_attr: None,
    }))
}

fn build_upsample(b: &BuildCtx<'_>) -> Result<Box<dyn Op>, String> {
    if b.opset < 7 {
        return Err(format!("Upsample-{} is not supported; opset 7+ is", b.opset));
    }
    let scales_attr = if b.opset < 9 {
        Some(b.floats("scales")?.ok_or("Upsample-7 needs `scales`")?)
    } else {
        None
    };
    Ok(Box::new(Resize {
        interp: mode_of(b, true)?,
        coord: Coord::Asymmetric,
        extrapolation: 0.0,
        axes: None,
        aspect: Aspect::Stretch,
        legacy_inputs: true,
        scales_attr,
    }))
}

/// Floats of a tensor.
fn floats(t: &Tensor) -> Result<Vec<f64>, String> {
    Vec::<f64>::try_from(
        t.f_totype(Kind::Double)
            .and_then(|t| t.f_flatten(0, -1))
            .map_err(tch_err)?,
    )
    .map_err(tch_err)
}

impl Resize {
    /// Source coordinates of the `out` output positions along an axis of length `len`, in f32
    /// arithmetic as onnxruntime computes them (a tie like 2.5 must stay a tie). Also returns the
    /// mask of positions to extrapolate (tf_crop_and_resize). Where the ONNX reference and
    /// onnxruntime differ (align_corners with a non-integral `scale * len`, pytorch_half_pixel with
    /// one output), this follows onnxruntime, which is also PyTorch's meaning.
    fn source(
        &self,
        y: &Tensor,
        len: i64,
        out: i64,
        scale: f32,
        roi: (f32, f32),
    ) -> Result<(Tensor, Option<Tensor>), tch::TchError> {
        let lenf = len as f32;
        let outf = out as f32;
        let s = scale as f64;
        let x = match self.coord {
            Coord::AlignCorners | Coord::PytorchHalfPixel if out == 1 => y.f_zeros_like()?,
            Coord::AlignCorners => y.f_mul_scalar((lenf - 1.0) as f64)?.f_div_scalar((outf - 1.0) as f64)?,
            Coord::Asymmetric => y.f_div_scalar(s)?,
            Coord::HalfPixel | Coord::PytorchHalfPixel => y.f_add_scalar(0.5)?.f_div_scalar(s)?.f_sub_scalar(0.5)?,
            Coord::HalfPixelSymmetric => {
                let offset = lenf / 2.0 * (1.0 - outf / (scale * lenf));
                y.f_add_scalar(0.5)?
                    .f_div_scalar(s)?
                    .f_add_scalar((offset - 0.5) as f64)?
            }
            Coord::TfHalfPixelForNn => y.f_add_scalar(0.5)?.f_div_scalar(s)?,
            Coord::TfCropAndResize => {
                let x = if out == 1 {
                    y.f_full_like(((roi.0 + roi.1) * 0.5 * (lenf - 1.0)) as f64)?
                } else {
                    y.f_mul_scalar(((roi.1 - roi.0) * (lenf - 1.0)) as f64)?
                        .f_div_scalar((outf - 1.0) as f64)?
                        .f_add_scalar((roi.0 * (lenf - 1.0)) as f64)?
                };
                let outside = x.f_lt(0.0)?.f_logical_or(&x.f_gt((lenf - 1.0) as f64)?)?;
                return Ok((x, Some(outside)));
            }
        };
        Ok((x, None))
    }

    /// Resizes `x` along `a` to `out` positions.
    fn axis(&self, x: &Tensor, a: usize, out: i64, scale: f32, roi: (f32, f32)) -> Result<Tensor, tch::TchError> {
        let len = x.size()[a];
        let dev = x.device();
        let y = Tensor::f_arange(out, (Kind::Float, dev))?;
        let (src, outside) = self.source(&y, len, out, scale, roi)?;
        let clamp = |i: &Tensor| i.f_clamp(0, len - 1);
        // Weights shaped to broadcast along axis `a`.
        let mut wshape = vec![1i64; x.dim()];
        wshape[a] = out;
        let kind = x.kind();
        let weight = |w: &Tensor| w.f_totype(kind)?.f_reshape(&wshape[..]);
        let result = match self.interp {
            Interp::Nearest(mode) => {
                let idx = match mode {
                    Nearest::RoundPreferFloor => src.f_sub_scalar(0.5)?.f_ceil()?,
                    Nearest::RoundPreferCeil => src.f_add_scalar(0.5)?.f_floor()?,
                    Nearest::Floor => src.f_floor()?,
                    Nearest::Ceil => src.f_ceil()?,
                    Nearest::Legacy if scale < 1.0 => src.f_ceil()?,
                    Nearest::Legacy => src.f_floor()?,
                };
                x.f_index_select(a as i64, &clamp(&idx.f_totype(Kind::Int64)?)?)?
            }
            Interp::Linear => {
                let fl = src.f_floor()?;
                let w1 = src.f_sub(&fl)?;
                let i0 = fl.f_totype(Kind::Int64)?;
                let x0 = x.f_index_select(a as i64, &clamp(&i0)?)?;
                let x1 = x.f_index_select(a as i64, &clamp(&i0.f_add_scalar(1)?)?)?;
                let w0 = w1.f_neg()?.f_add_scalar(1.0)?;
                x0.f_mul(&weight(&w0)?)?.f_add(&x1.f_mul(&weight(&w1)?)?)?
            }
            Interp::Cubic { a: ca, exclude_outside } => {
                let fl = src.f_floor()?;
                let t = src.f_sub(&fl)?;
                let i0 = fl.f_totype(Kind::Int64)?;
                // Keys' cubic kernel at distances 1 + t, t, 1 - t, 2 - t.
                let far = |d: &Tensor| -> Result<Tensor, tch::TchError> {
                    // A*d^3 - 5A*d^2 + 8A*d - 4A for 1 <= d < 2
                    d.f_mul_scalar(ca)?
                        .f_sub_scalar(5.0 * ca)?
                        .f_mul(d)?
                        .f_add_scalar(8.0 * ca)?
                        .f_mul(d)?
                        .f_sub_scalar(4.0 * ca)
                };
                let near = |d: &Tensor| -> Result<Tensor, tch::TchError> {
                    // (A+2)*d^3 - (A+3)*d^2 + 1 for d <= 1
                    d.f_mul_scalar(ca + 2.0)?
                        .f_sub_scalar(ca + 3.0)?
                        .f_mul(d)?
                        .f_mul(d)?
                        .f_add_scalar(1.0)
                };
                let one_minus = t.f_neg()?.f_add_scalar(1.0)?;
                let mut coeffs = [
                    far(&t.f_add_scalar(1.0)?)?,
                    near(&t)?,
                    near(&one_minus)?,
                    far(&one_minus.f_add_scalar(1.0)?)?,
                ];
                let idxs: Vec<Tensor> = (-1..3).map(|k| i0.f_add_scalar(k)).collect::<Result<_, _>>()?;
                if exclude_outside {
                    for (c, i) in coeffs.iter_mut().zip(&idxs) {
                        let inside = i.f_ge(0)?.f_logical_and(&i.f_lt(len)?)?.f_totype(Kind::Float)?;
                        *c = c.f_mul(&inside)?;
                    }
                    let total = coeffs[0].f_add(&coeffs[1])?.f_add(&coeffs[2])?.f_add(&coeffs[3])?;
                    for c in coeffs.iter_mut() {
                        *c = c.f_div(&total)?;
                    }
                }
                let mut acc: Option<Tensor> = None;
                for (c, i) in coeffs.iter().zip(&idxs) {
                    let term = x.f_index_select(a as i64, &clamp(i)?)?.f_mul(&weight(c)?)?;
                    acc = Some(match acc {
                        None => term,
                        Some(s) => s.f_add(&term)?,
                    });
                }
                acc.expect("four taps")
            }
        };
        match outside {
            Some(mask) => {
                let mask = mask.f_reshape(&wshape[..])?;
                let fill = result.f_full_like(self.extrapolation)?;
                fill.f_where_self(&mask, &result)
            }
            None => Ok(result),
        }
    }
}

impl Op for Resize {
    fn run(&self, _ctx: &RunCtx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let x = input(inputs, 0)?;
        let shape = x.size();
        let r = shape.len();
        let nonempty = |i: usize| opt(inputs, i).filter(|t| t.numel() > 0);
        let (roi, scales, sizes) = if self.legacy_inputs {
            let scales = match &self.scales_attr {
                Some(s) => s.iter().map(|&v| v as f64).collect(),
                None => floats(input(inputs, 1)?)?,
            };
            (None, Some(scales), None)
        } else {
            (
                nonempty(1).map(floats).transpose()?,
                nonempty(2).map(floats).transpose()?,
                nonempty(3).map(ints).transpose()?,
            )
        };
        let list: Vec<usize> = match &self.axes {
            Some(a) => axes(a, r as i64)?.into_iter().map(|a| a as usize).collect(),
            None => (0..r).collect(),
        };
        let k = list.len();
        let mut out: Vec<i64> = shape.clone();
        let mut scale = vec![1.0f32; r];
        match (sizes, scales) {
            (Some(sz), _) => {
                if sz.len() != k {
                    return Err(format!("sizes {sz:?} do not fit {k} axes"));
                }
                for (j, &a) in list.iter().enumerate() {
                    scale[a] = sz[j] as f32 / shape[a] as f32;
                    out[a] = sz[j];
                }
                if self.aspect != Aspect::Stretch {
                    let pick = list.iter().map(|&a| scale[a]);
                    let s = if self.aspect == Aspect::NotLarger {
                        pick.fold(f32::INFINITY, f32::min)
                    } else {
                        pick.fold(0.0, f32::max)
                    };
                    for &a in &list {
                        scale[a] = s;
                        out[a] = (s * shape[a] as f32 + 0.5) as i64;
                    }
                }
            }
            (None, Some(sc)) => {
                if sc.len() != k {
                    return Err(format!("scales {sc:?} do not fit {k} axes"));
                }
                for (j, &a) in list.iter().enumerate() {
                    if sc[j] <= 0.0 {
                        return Err(format!("scale {} must be positive", sc[j]));
                    }
                    scale[a] = sc[j] as f32;
                    out[a] = (scale[a] * shape[a] as f32).floor() as i64;
                }
            }
            (None, None) => return Err("Resize needs scales or sizes".into()),
        }
        crate::limits::check_tensor_alloc(&out, 4)?;
        let roi_of = |j: usize| -> (f32, f32) {
            match &roi {
                Some(v) if v.len() == 2 * k => (v[j] as f32, v[j + k] as f32),
                Some(v) if v.len() == 2 * r => (v[list[j]] as f32, v[list[j] + r] as f32),
                _ => (0.0, 1.0),
            }
        };
        if self.coord == Coord::TfCropAndResize && roi.as_ref().is_none_or(|v| v.len() != 2 * k && v.len() != 2 * r) {
            return Err("tf_crop_and_resize needs a roi of 2 x axes values".into());
        }
        let src_kind = x.kind();
        let mut y = if is_float(src_kind) {
            x.shallow_clone()
        } else {
            x.f_totype(Kind::Float).map_err(tch_err)?
        };
        for (j, &a) in list.iter().enumerate() {
            let roi_a = roi_of(j);
            let identity =
                out[a] == shape[a] && scale[a] == 1.0 && (self.coord != Coord::TfCropAndResize || roi_a == (0.0, 1.0));
            if identity {
                continue;
            }
            if shape[a] == 0 || out[a] < 0 {
                return Err(format!("cannot resize axis {a} of size {} to {}", shape[a], out[a]));
            }
            y = self.axis(&y, a, out[a], scale[a], roi_a).map_err(tch_err)?;
        }
        if !is_float(src_kind) {
            y = y.f_round().and_then(|t| t.f_totype(src_kind)).map_err(tch_err)?;
        }
        one(y)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests_util::{float, int, node, run_node, string, t};

    fn resize(attrs: &[(&str, &str)], scales: &[f32], x: &tch::Tensor, opset: i64) -> Vec<f64> {
        let mut n = node("Resize", 3);
        for (k, v) in attrs {
            n.attribute.push(string(k, v));
        }
        let s = t(scales, &[scales.len() as i64]);
        run_node(&n, opset, &[Some(x), None, Some(&s)]).remove(0)
    }

    #[test]
    fn resize_modes_and_coordinate_transforms() {
        let x = t(&[1.0, 2.0], &[1, 1, 1, 2]);
        let sc = [1.0, 1.0, 1.0, 2.0];
        // Nearest, half_pixel, round_prefer_floor (the default): sources -0.25, 0.25, 0.75, 1.25.
        assert_eq!(resize(&[], &sc, &x, 13), vec![1.0, 1.0, 2.0, 2.0]);
        // Ties (asymmetric x2: sources 0, .5, 1, 1.5) go down by default, up with round_prefer_ceil.
        let asym = ("coordinate_transformation_mode", "asymmetric");
        assert_eq!(resize(&[asym], &sc, &x, 13), vec![1.0, 1.0, 2.0, 2.0]);
        assert_eq!(
            resize(&[asym, ("nearest_mode", "round_prefer_ceil")], &sc, &x, 13),
            vec![1.0, 2.0, 2.0, 2.0]
        );
        // Linear, half_pixel: 1, 1.25, 1.75, 2.
        assert_eq!(resize(&[("mode", "linear")], &sc, &x, 13), vec![1.0, 1.25, 1.75, 2.0]);
        // Linear, asymmetric: sources 0, .5, 1, 1.5.
        let y = resize(
            &[("mode", "linear"), ("coordinate_transformation_mode", "asymmetric")],
            &sc,
            &x,
            13,
        );
        assert_eq!(y, vec![1.0, 1.5, 2.0, 2.0]);
        // Linear, align_corners: 1, 4/3, 5/3, 2.
        let y = resize(
            &[("mode", "linear"), ("coordinate_transformation_mode", "align_corners")],
            &sc,
            &x,
            13,
        );
        assert!(
            y.iter()
                .zip([1.0, 4.0 / 3.0, 5.0 / 3.0, 2.0])
                .all(|(a, b)| (a - b).abs() < 1e-6),
            "{y:?}"
        );
        // Nearest floor vs ceil, asymmetric, x3: sources 0, 1/3, 2/3, 1, 4/3, 5/3.
        let sc3 = [1.0, 1.0, 1.0, 3.0];
        let base = [("coordinate_transformation_mode", "asymmetric")];
        let y = resize(&[base[0], ("nearest_mode", "ceil")], &sc3, &x, 13);
        assert_eq!(y, vec![1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
        let y = resize(&[base[0], ("nearest_mode", "floor")], &sc3, &x, 13);
        assert_eq!(y, vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        // Opset 10: (X, scales), asymmetric nearest.
        let mut n = node("Resize", 2);
        n.attribute.push(string("mode", "nearest"));
        let s = t(&sc, &[4]);
        assert_eq!(run_node(&n, 10, &[Some(&x), Some(&s)])[0], vec![1.0, 1.0, 2.0, 2.0]);
        // Cubic upsampling keeps constants constant.
        let c = t(&[3.0, 3.0, 3.0], &[1, 3]);
        let mut n = node("Resize", 3);
        n.attribute.extend([
            string("mode", "cubic"),
            float("cubic_coeff_a", -0.5),
            int("exclude_outside", 1),
        ]);
        let s = t(&[1.0, 2.0], &[2]);
        assert!(run_node(&n, 13, &[Some(&c), None, Some(&s)])[0]
            .iter()
            .all(|v| (v - 3.0).abs() < 1e-6));
    }
}
