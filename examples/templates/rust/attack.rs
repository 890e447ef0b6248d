//! `{{name}}`: an `audit` attack plugin (generated from the Rust attack template).
//!
//! A checkerboard corner-patch backdoor. `poison` stamps a `size` x `size` checkerboard of black
//! and white pixels into the top-left corner of every channel of a `poison_rate` share of the
//! training set, chosen deterministically from the call's seed among the samples whose label is not
//! `target`, and relabels them `target`. `trigger` stamps the same patch on every image it is given
//! and asks the model for `target` on all of them.
//!
//! Replace `stamp` with your own trigger and keep the rest: parameter handling, seeded sample
//! selection, progress and cancellation are what every attack needs.

use audit_sdk::{
    export_plugin, Attack, Call, DatasetRef, Error, Plugin, PluginInfo, Poisoned, Result, Tensor,
    TensorData, Triggered,
};
use serde_json::json;

/// JSON Schema of the parameters. The host validates every call against it and fills the defaults.
const PARAMS_SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    r#""size":{"type":"integer","default":4,"minimum":1,"maximum":64,"description":"Side in pixels of the checkerboard patch in the top-left corner"},"#,
    r#""target":{"type":"integer","default":0,"minimum":0,"description":"Class that triggered images are sent to"},"#,
    r#""poison_rate":{"type":"number","default":0.05,"minimum":0,"maximum":1,"description":"Share of the training set to poison (chosen among samples not already labelled target)"}"#,
    r#"}}"#,
);

/// Samples between two progress reports and cancellation checks.
const STEP: usize = 1024;

/// The plugin. The SDK creates one with `Default` for every call.
#[derive(Debug, Default)]
pub struct Checkerboard;

impl Plugin for Checkerboard {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "{{name}}",
            version: env!("CARGO_PKG_VERSION"),
            description: "Checkerboard corner-patch backdoor: stamps a size x size black/white \
                          checkerboard in the top-left corner and relabels to target",
            params_schema: PARAMS_SCHEMA,
            capabilities: 0,
        }
    }
}

/// The validated parameters of one call.
#[derive(Debug, Clone, Copy)]
struct Settings {
    size: usize,
    target: i64,
    poison_rate: f64,
}

/// An integer parameter, or `default` when the caller left it out.
fn int_param(call: &Call<'_>, key: &str, default: i64) -> Result<i64> {
    if call.params.0.contains_key(key) {
        call.params.i64(key)
    } else {
        Ok(default)
    }
}

/// A number parameter, or `default` when the caller left it out.
fn num_param(call: &Call<'_>, key: &str, default: f64) -> Result<f64> {
    if call.params.0.contains_key(key) {
        call.params.f64(key)
    } else {
        Ok(default)
    }
}

impl Settings {
    /// Reads the parameters and checks what the schema cannot know (the number of classes).
    fn new(call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Settings> {
        let size = int_param(call, "size", 4)?;
        if !(1..=64).contains(&size) {
            return Err(Error::invalid(format!(
                "parameter `size` must lie in 1..=64, got {size}"
            )));
        }
        let target = int_param(call, "target", 0)?;
        if target < 0 || target as usize >= data.num_classes {
            return Err(Error::invalid(format!(
                "parameter `target` = {target} is not a class of this dataset (0..{})",
                data.num_classes
            )));
        }
        let poison_rate = num_param(call, "poison_rate", 0.05)?;
        if !(0.0..=1.0).contains(&poison_rate) {
            return Err(Error::invalid(format!(
                "parameter `poison_rate` must lie in 0..=1, got {poison_rate}"
            )));
        }
        Ok(Settings {
            size: size as usize,
            target,
            poison_rate,
        })
    }
}

/// SplitMix64: a tiny, good-enough generator for choosing samples (same sequence as the C template).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Picks `k` of `candidates` without replacement (partial Fisher–Yates driven by `seed`) and
/// returns them sorted.
fn choose(mut candidates: Vec<usize>, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let n = candidates.len();
    let k = k.min(n);
    for i in 0..k {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        candidates.swap(i, j);
    }
    candidates.truncate(k);
    candidates.sort_unstable();
    candidates
}

/// A pixel type of an image tensor: u8 (0..255) or f32 (0..1).
trait Pixel: Copy {
    const WHITE: Self;
    const BLACK: Self;
}

impl Pixel for u8 {
    const WHITE: u8 = 255;
    const BLACK: u8 = 0;
}

impl Pixel for f32 {
    const WHITE: f32 = 1.0;
    const BLACK: f32 = 0.0;
}

/// Stamps the checkerboard (white where `x + y` is even) on image `i` of an NCHW buffer.
fn stamp<P: Pixel>(pixels: &mut [P], (c, h, w): (usize, usize, usize), i: usize, size: usize) {
    let plane = h * w;
    if plane == 0 {
        return;
    }
    let (sh, sw) = (size.min(h), size.min(w));
    let image = &mut pixels[i * c * plane..(i + 1) * c * plane];
    for channel in image.chunks_exact_mut(plane) {
        for y in 0..sh {
            for (x, px) in channel[y * w..y * w + sw].iter_mut().enumerate() {
                *px = if (x + y) % 2 == 0 { P::WHITE } else { P::BLACK };
            }
        }
    }
}

/// Stamps samples `which` of `images`, reporting progress and honouring cancellation.
fn stamp_all(
    call: &Call<'_>,
    phase: &str,
    images: &mut Tensor,
    chw: (usize, usize, usize),
    which: &[usize],
    size: usize,
) -> Result<()> {
    let total = which.len() as u64;
    for (done, &i) in which.iter().enumerate() {
        if done % STEP == 0 {
            call.host.check_cancelled()?;
            call.host.progress(phase, done as u64, total);
        }
        match &mut images.data {
            TensorData::U8(v) => stamp(v, chw, i, size),
            TensorData::F32(v) => stamp(v, chw, i, size),
            TensorData::I64(_) => return Err(Error::invalid("images must be u8 or f32")),
        }
    }
    call.host.progress(phase, total, total);
    Ok(())
}

impl Attack for Checkerboard {
    fn poison(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Poisoned> {
        let s = Settings::new(call, data)?;
        let candidates: Vec<usize> = data
            .labels
            .iter()
            .enumerate()
            .filter(|&(_, &label)| label != s.target)
            .map(|(i, _)| i)
            .collect();
        let requested = (s.poison_rate * data.len() as f64 + 0.5) as usize;
        if requested > candidates.len() {
            call.host.warn(&format!(
                "poison_rate asks for {requested} samples but only {} are not labelled {}",
                candidates.len(),
                s.target
            ));
        }
        let chosen = choose(candidates, requested, call.seed);

        let mut images = data.images.to_owned();
        stamp_all(call, "poison", &mut images, data.chw(), &chosen, s.size)?;
        let mut labels = data.labels.to_vec();
        for &i in &chosen {
            labels[i] = s.target;
        }
        call.host.info(&format!(
            "poisoned {} of {} samples",
            chosen.len(),
            data.len()
        ));
        Ok(Poisoned {
            images,
            labels,
            indices: chosen.iter().map(|&i| i as i64).collect(),
            report: json!({
                "target": s.target,
                "size": s.size,
                "poison_rate": s.poison_rate,
                "poisoned": chosen.len(),
            }),
        })
    }

    fn trigger(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Triggered> {
        let s = Settings::new(call, data)?;
        let all: Vec<usize> = (0..data.len()).collect();
        let mut images = data.images.to_owned();
        stamp_all(call, "trigger", &mut images, data.chw(), &all, s.size)?;
        Ok(Triggered {
            images,
            target_labels: vec![s.target; data.len()],
            report: json!({ "target": s.target, "size": s.size, "triggered": data.len() }),
        })
    }
}

export_plugin!(attack: Checkerboard);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_is_deterministic_sorted_and_capped() {
        let a = choose((0..100).collect(), 10, 42);
        assert_eq!(a, choose((0..100).collect(), 10, 42));
        assert_ne!(a, choose((0..100).collect(), 10, 43));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(choose(vec![3, 1], 5, 0), vec![1, 3]);
    }

    #[test]
    fn stamp_draws_a_checkerboard_in_the_corner() {
        let mut px = vec![7u8; 2 * 5 * 5];
        stamp(&mut px, (1, 5, 5), 1, 2);
        assert_eq!(&px[25..32], &[255, 0, 7, 7, 7, 0, 255]);
        assert!(px[..25].iter().all(|&v| v == 7));
    }
}
