//! WaNet's warping field and bilinear sampling, in plain Rust on flat slices.
//!
//! Follows the reference implementation of Nguyen & Tran (ICLR 2021): a random field of shape
//! `[2, k, k]`, uniform in (-1, 1), divided by its mean absolute value, upsampled **bicubically**
//! (PyTorch `interpolate(mode="bicubic", align_corners=True)`, cubic coefficient A = -0.75) to
//! `H x W`, added to the identity grid scaled by `strength / size`, clamped to [-1, 1], and applied
//! with `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)`.
//!
//! Channel 0 of the field moves the x (column) coordinate, channel 1 the y (row) coordinate. The
//! reference code divides both by the image height (its images are square); here x is divided by W
//! and y by H, which is the same for square images.

use audit_attack_common::{stream, Pixel, Rng};

/// The control field: `2 * k * k` values (x offsets, then y offsets, row-major), uniform in
/// (-1, 1) and divided by their mean absolute value. Seeded by `seed` alone.
pub fn control_field(k: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::stream(seed, stream::PATTERN);
    let mut field: Vec<f64> = (0..2 * k * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mean_abs = field.iter().map(|v| v.abs()).sum::<f64>() / field.len() as f64;
    if mean_abs > 0.0 {
        field.iter_mut().for_each(|v| *v /= mean_abs);
    }
    field
}

/// PyTorch's cubic convolution weights (A = -0.75) for the 4 taps around a fractional offset `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Source position and cubic weights of every output index for an `align_corners=True` resize
/// from `from` to `to` samples.
fn cubic_taps(from: usize, to: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = if to > 1 {
        (from - 1) as f64 / (to - 1) as f64
    } else {
        0.0
    };
    (0..to)
        .map(|o| {
            let real = scale * o as f64;
            let base = real.floor();
            let idx = std::array::from_fn(|i| (base as i64 - 1 + i as i64).clamp(0, from as i64 - 1) as usize);
            (idx, cubic_weights(real - base))
        })
        .collect()
}

/// Bicubic upsampling (align corners, border-clamped taps) of one `k x k` plane to `h x w`.
pub fn upsample_bicubic(plane: &[f64], k: usize, h: usize, w: usize) -> Vec<f64> {
    let (rows, cols) = (cubic_taps(k, h), cubic_taps(k, w));
    let mut out = Vec::with_capacity(h * w);
    for (ry, wy) in &rows {
        for (cx, wx) in &cols {
            let mut v = 0.0;
            for (r, a) in ry.iter().zip(wy) {
                for (c, b) in cx.iter().zip(wx) {
                    v += a * b * plane[r * k + c];
                }
            }
            out.push(v);
        }
    }
    out
}

/// A sampling grid: for every output pixel, the normalised source position in [-1, 1]
/// (-1 is the centre of the first pixel, 1 the centre of the last: align_corners=True).
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// x (column) coordinates, row-major, `h * w`.
    pub x: Vec<f64>,
    /// y (row) coordinates, row-major, `h * w`.
    pub y: Vec<f64>,
}

fn linspace(i: usize, n: usize) -> f64 {
    if n > 1 {
        -1.0 + 2.0 * i as f64 / (n - 1) as f64
    } else {
        -1.0
    }
}

impl Grid {
    /// The identity grid.
    pub fn identity(h: usize, w: usize) -> Grid {
        let x = (0..h * w).map(|p| linspace(p % w, w)).collect();
        let y = (0..h * w).map(|p| linspace(p / w, h)).collect();
        Grid { h, w, x, y }
    }

    /// WaNet's backdoor grid: identity + `strength` * upsampled control field / size, clamped.
    pub fn warp(k: usize, strength: f64, seed: u64, h: usize, w: usize) -> Grid {
        let field = control_field(k, seed);
        let fx = upsample_bicubic(&field[..k * k], k, h, w);
        let fy = upsample_bicubic(&field[k * k..], k, h, w);
        let mut g = Grid::identity(h, w);
        for (x, f) in g.x.iter_mut().zip(&fx) {
            *x = (*x + strength * f / w as f64).clamp(-1.0, 1.0);
        }
        for (y, f) in g.y.iter_mut().zip(&fy) {
            *y = (*y + strength * f / h as f64).clamp(-1.0, 1.0);
        }
        g
    }

    /// WaNet's noise mode: this grid plus independent uniform(-1, 1) / size noise on every pixel
    /// and axis, clamped.
    pub fn with_noise(&self, rng: &mut Rng) -> Grid {
        let mut g = self.clone();
        for (x, y) in g.x.iter_mut().zip(g.y.iter_mut()) {
            *x = (*x + rng.uniform(-1.0, 1.0) / self.w as f64).clamp(-1.0, 1.0);
            *y = (*y + rng.uniform(-1.0, 1.0) / self.h as f64).clamp(-1.0, 1.0);
        }
        g
    }

    /// Precomputes the bilinear taps of this grid.
    pub fn sampler(&self) -> Sampler {
        // Source coordinate and (lower index, upper index, upper weight) along one axis. Positions
        // within 1e-9 of a pixel centre are snapped to it, so the identity grid copies exactly.
        fn axis(g: f64, n: usize) -> (usize, usize, f64) {
            let mut s = (g + 1.0) / 2.0 * (n - 1) as f64;
            if (s - s.round()).abs() < 1e-9 {
                s = s.round();
            }
            let s = s.clamp(0.0, (n - 1) as f64);
            let lo = s.floor() as usize;
            let t = s - lo as f64;
            // zeros padding: a tap beyond the border gets no weight (t is 0 there anyway).
            if lo + 1 < n {
                (lo, lo + 1, t)
            } else {
                (lo, lo, 0.0)
            }
        }
        let taps = self
            .x
            .iter()
            .zip(&self.y)
            .map(|(&gx, &gy)| {
                let (x0, x1, tx) = axis(gx, self.w);
                let (y0, y1, ty) = axis(gy, self.h);
                let idx = [y0 * self.w + x0, y0 * self.w + x1, y1 * self.w + x0, y1 * self.w + x1];
                let wt = [(1.0 - ty) * (1.0 - tx), (1.0 - ty) * tx, ty * (1.0 - tx), ty * tx];
                (idx.map(|i| i as u32), wt.map(|v| v as f32))
            })
            .collect();
        Sampler {
            plane: self.h * self.w,
            taps,
        }
    }
}

/// Bilinear taps of a grid: four source offsets and weights per output pixel, computed once and
/// applied to every channel of every image.
#[derive(Debug, Clone)]
pub struct Sampler {
    plane: usize,
    taps: Vec<([u32; 4], [f32; 4])>,
}

impl Sampler {
    /// Warps `image` (C*H*W) in place; `scratch` is reused between calls.
    pub fn apply<P: Pixel>(&self, image: &mut [P], scratch: &mut Vec<f32>) {
        for plane in image.chunks_exact_mut(self.plane) {
            scratch.clear();
            scratch.extend(plane.iter().map(|v| v.to_f32()));
            for (out, (idx, wt)) in plane.iter_mut().zip(&self.taps) {
                let v = wt[0] * scratch[idx[0] as usize]
                    + wt[1] * scratch[idx[1] as usize]
                    + wt[2] * scratch[idx[2] as usize]
                    + wt[3] * scratch[idx[3] as usize];
                *out = P::from_f32(v);
            }
        }
    }
}
