//! What the trigger-reverse-engineering detectors (Neural Cleanse, ABS) share: the tanh
//! parametrisation of masks and patterns, the stamp, the seeded order of clean batches, and the
//! report images (PNG, base64, the host's `images` convention).

use audit_nn::tch::{self, Kind, Tensor};
use audit_sdk::rng::Rng;
use audit_sdk::{Error, Result};
use serde_json::{json, Value};

/// `[0, 1]` from the unconstrained tanh space.
pub fn squash(v: &Tensor) -> Tensor {
    v.tanh() / 2.0 + 0.5
}

/// `(1 - m) * x + m * p` for every trigger and image: masks [T, 1, H, W], patterns
/// [T, C, H, W], images [B, C, H, W] -> [T * B, C, H, W] (trigger-major).
pub fn stamp(mask: &Tensor, pattern: &Tensor, x: &Tensor) -> Tensor {
    let s = x.size();
    let t = mask.size()[0];
    let out = (-mask + 1.0).unsqueeze(1) * x.unsqueeze(0) + (mask * pattern).unsqueeze(1);
    out.view([t * s[0], s[1], s[2], s[3]])
}

/// The clean-batch order: `steps` batches of `b` indices into `n` images, consecutive slices of
/// seeded shuffles of 0..n (a new shuffle whenever one is used up). [steps * b]
pub fn batch_order(n: usize, b: usize, steps: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(steps * b);
    let mut perm: Vec<i64> = (0..n as i64).collect();
    let mut at = n;
    while out.len() < steps * b {
        if at == n {
            for i in (1..n).rev() {
                perm.swap(i, rng.below(i + 1));
            }
            at = 0;
        }
        out.push(perm[at]);
        at += 1;
    }
    out
}

/// A [C, H, W] image in [0, 1] as PNG: greyscale for 1 channel, RGB for 3, else the channel mean.
pub fn png(img: &Tensor) -> Result<Vec<u8>> {
    let s = img.size();
    let img = if s[0] == 1 || s[0] == 3 {
        img.shallow_clone()
    } else {
        img.mean_dim(0, true, Kind::Float)
    };
    let (c, h, w) = (img.size()[0], s[1], s[2]);
    let bytes = Vec::<u8>::try_from(
        (img.to_device(tch::Device::Cpu).to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous()
            .view([-1]),
    )
    .map_err(|e| Error::failed(e.to_string()))?;
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(if c == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| Error::failed(format!("PNG: {e}")))?;
    writer
        .write_image_data(&bytes)
        .map_err(|e| Error::failed(format!("PNG: {e}")))?;
    writer.finish().map_err(|e| Error::failed(format!("PNG: {e}")))?;
    Ok(out)
}

/// A report image (the host's `images` convention: caption and base64 PNG).
pub fn report_image(caption: String, img: &Tensor) -> Result<Value> {
    use base64ct::Encoding;
    Ok(json!({"caption": caption, "png_base64": base64ct::Base64::encode_string(&png(img)?)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_walk_through_seeded_shuffles() {
        let order = batch_order(5, 2, 5, 7);
        assert_eq!(order.len(), 10);
        let mut first: Vec<i64> = order[..5].to_vec();
        first.sort_unstable();
        assert_eq!(first, vec![0, 1, 2, 3, 4], "each shuffle is a permutation");
        assert_eq!(order, batch_order(5, 2, 5, 7));
        assert_ne!(order, batch_order(5, 2, 5, 8));
    }

    #[test]
    fn stamps_and_images() {
        let x = Tensor::zeros([2, 1, 2, 2], (Kind::Float, tch::Device::Cpu));
        let m = Tensor::ones([1, 1, 2, 2], (Kind::Float, tch::Device::Cpu));
        let p = Tensor::ones([1, 1, 2, 2], (Kind::Float, tch::Device::Cpu)) * 0.5;
        let s = stamp(&m, &p, &x);
        assert_eq!(s.size(), [2, 1, 2, 2]);
        assert!((s.mean(Kind::Float).double_value(&[]) - 0.5).abs() < 1e-6);
        assert!((squash(&Tensor::from_slice(&[0.0f32])).double_value(&[0]) - 0.5).abs() < 1e-7);
        let bytes = png(&p.squeeze_dim(0)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let v = report_image("mask".into(), &p.squeeze_dim(0)).unwrap();
        assert_eq!(v["caption"], "mask");
        assert!(v["png_base64"].as_str().unwrap().starts_with("iVBOR"));
    }
}
