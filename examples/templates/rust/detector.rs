//! `{{name}}`: an `audit` detector plugin (generated from the Rust detector template).
//!
//! A label-conditioned pixel-outlier detector. It inspects the data, not the model: BadNets-style
//! poisoning adds a bright patch to samples that all carry the target label, so those samples have
//! saturated pixels where their class is, on average, dark.
//!
//! 1. For every class, the per-pixel mean over that class's images (on the 0..255 scale).
//! 2. For every sample, its score: the share of its pixels that are saturated (>= 250) where the
//!    mean of its class is below 127.5. A sample is flagged when its score exceeds `threshold`.
//! 3. A class is a suspected target when its flagged share exceeds `min_share` and exceeds
//!    `outlier_ratio` times the median flagged share of all classes (natural images have some
//!    saturated strokes in every class; set `outlier_ratio` to 0 to drop this condition).
//!
//! The verdict is "backdoored" when some class is suspected. It finds a patch as long as the
//! poisoned samples stay a minority of their target class. Replace `scores` with your own test.

use audit_sdk::{
    export_plugin, Call, DatasetRef, Detector, Dtype, Error, Plugin, PluginInfo, Result, Verdict,
};
use serde_json::json;

/// JSON Schema of the parameters. The host validates every call against it and fills the defaults.
const PARAMS_SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    r#""threshold":{"type":"number","default":0.01,"minimum":0,"maximum":1,"description":"A sample is flagged when more than this share of its pixels are saturated where its class is dark"},"#,
    r#""min_share":{"type":"number","default":0.01,"minimum":0,"maximum":1,"description":"A class is suspected when more than this share of its samples are flagged"},"#,
    r#""outlier_ratio":{"type":"number","default":2,"minimum":0,"maximum":1000,"description":"A suspected class must also have more than this multiple of the median flagged share of all classes (0 turns this off)"}"#,
    r#"}}"#,
);

/// A pixel at least this bright (0..255 scale) is saturated: >= 250, with room for f32 rounding.
const SATURATED: f64 = 249.5;
/// A class mean below this (0.5 * 255) is dark.
const DARK: f64 = 127.5;
/// Samples between two progress reports and cancellation checks.
const STEP: usize = 1024;

/// The plugin. The SDK creates one with `Default` for every call.
#[derive(Debug, Default)]
pub struct PixelOutlier;

impl Plugin for PixelOutlier {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "{{name}}",
            version: env!("CARGO_PKG_VERSION"),
            description: "Label-conditioned pixel outliers: inspects the data, not the model, \
                          and flags classes whose samples carry bright patches (BadNets-style)",
            params_schema: PARAMS_SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
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

/// A pixel type of an image tensor: u8 (0..255) or f32 (0..1).
trait Pixel: Copy {
    /// The value on the 0..255 scale.
    fn level(self) -> f64;
}

impl Pixel for u8 {
    fn level(self) -> f64 {
        f64::from(self)
    }
}

impl Pixel for f32 {
    fn level(self) -> f64 {
        f64::from(self) * 255.0
    }
}

/// Steps 1 and 2: the score of every sample.
fn scores<P: Pixel>(
    call: &Call<'_>,
    pixels: &[P],
    labels: &[i64],
    num_classes: usize,
) -> Result<Vec<f64>> {
    let n = labels.len();
    let per_image = pixels.len().checked_div(n).unwrap_or(0);
    if per_image == 0 {
        return Ok(vec![0.0; n]);
    }
    let cells = num_classes
        .checked_mul(per_image)
        .ok_or_else(|| Error::invalid("too many classes for this image size"))?;
    let image = |i: usize| &pixels[i * per_image..(i + 1) * per_image];

    let mut means = vec![0.0f64; cells];
    let mut counts = vec![0usize; num_classes];
    for (i, &label) in labels.iter().enumerate() {
        if i % STEP == 0 {
            call.host.check_cancelled()?;
            call.host.progress("class means", i as u64, n as u64);
        }
        let c = label as usize;
        counts[c] += 1;
        for (m, &v) in means[c * per_image..(c + 1) * per_image]
            .iter_mut()
            .zip(image(i))
        {
            *m += v.level();
        }
    }
    for (class_means, &count) in means.chunks_exact_mut(per_image).zip(&counts) {
        for m in class_means {
            *m /= count.max(1) as f64;
        }
    }
    call.host.progress("class means", n as u64, n as u64);

    let mut out = Vec::with_capacity(n);
    for (i, &label) in labels.iter().enumerate() {
        if i % STEP == 0 {
            call.host.check_cancelled()?;
            call.host.progress("scores", i as u64, n as u64);
        }
        let c = label as usize;
        let class_means = &means[c * per_image..(c + 1) * per_image];
        let hits = image(i)
            .iter()
            .zip(class_means)
            .filter(|&(&v, &m)| v.level() >= SATURATED && m < DARK)
            .count();
        out.push(hits as f64 / per_image as f64);
    }
    call.host.progress("scores", n as u64, n as u64);
    Ok(out)
}

/// The median of `values` (0 when empty).
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

impl Detector for PixelOutlier {
    fn scan(
        &self,
        call: &Call<'_>,
        _model: &[u8],
        data: Option<&DatasetRef<'_>>,
    ) -> Result<Verdict> {
        let data = data.ok_or_else(|| {
            Error::invalid("this detector inspects data, not the model: pass the training data")
        })?;
        let threshold = num_param(call, "threshold", 0.01)?;
        let min_share = num_param(call, "min_share", 0.01)?;
        let outlier_ratio = num_param(call, "outlier_ratio", 2.0)?;
        let k = data.num_classes;

        let scores = match data.images.dtype {
            Dtype::U8 => scores(call, data.images.as_u8()?, data.labels, k)?,
            Dtype::F32 => scores(call, data.images.as_f32()?, data.labels, k)?,
            Dtype::I64 => return Err(Error::invalid("images must be u8 or f32")),
        };

        // Step 3: flagged samples, per-class shares, suspected classes.
        let mut samples_per_class = vec![0u64; k];
        let mut flagged_per_class = vec![0u64; k];
        let mut suspicious = Vec::new();
        for (i, (&score, &label)) in scores.iter().zip(data.labels).enumerate() {
            samples_per_class[label as usize] += 1;
            if score > threshold {
                flagged_per_class[label as usize] += 1;
                suspicious.push(i as i64);
            }
        }
        let shares: Vec<f64> = flagged_per_class
            .iter()
            .zip(&samples_per_class)
            .map(|(&f, &n)| if n == 0 { 0.0 } else { f as f64 / n as f64 })
            .collect();
        let median_share = median(
            (0..k)
                .filter(|&c| samples_per_class[c] > 0)
                .map(|c| shares[c])
                .collect(),
        );
        let target_classes: Vec<i64> = (0..k)
            .filter(|&c| {
                samples_per_class[c] > 0
                    && shares[c] > min_share
                    && shares[c] > outlier_ratio * median_share
            })
            .map(|c| c as i64)
            .collect();
        let flagged = suspicious.len();
        call.host.info(&format!(
            "{flagged} of {} samples flagged; suspected classes: {target_classes:?}",
            data.len()
        ));

        Ok(Verdict {
            backdoored: !target_classes.is_empty(),
            target_classes,
            suspicious,
            details: json!({
                "inspects": "data",
                "threshold": threshold,
                "min_share": min_share,
                "outlier_ratio": outlier_ratio,
                "samples": data.len(),
                "flagged": flagged,
                "samples_per_class": samples_per_class,
                "flagged_per_class": flagged_per_class,
                "flagged_share_per_class": shares,
                "median_share": median_share,
            }),
        })
    }
}

export_plugin!(detector: PixelOutlier);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
