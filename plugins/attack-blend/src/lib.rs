//! Blend (Chen et al., 2017): every poisoned image becomes `(1 - alpha) * image + alpha * pattern`,
//! with alpha 0.2 and a fixed pattern: seeded uniform noise, a checkerboard, or a PGM/PPM file.
//!
//! The noise pattern comes from `pattern_seed`, not from the call seed, so `poison` and `trigger`
//! stamp the same pattern. In the adaptive (slow-poisoning) setting the rate becomes 0.003 and
//! alpha is halved.

use audit_attack_common::{common_schema_properties, poison_with, trigger_with, Pixel, Setup, Stamp};
use audit_sdk::{abi, Attack, Call, DatasetRef, Error, Plugin, PluginInfo, Poisoned, Result, Triggered};
use serde::Deserialize;
use serde_json::{Map, Value};

pub mod pattern;
#[cfg(test)]
mod tests;

/// JSON Schema of the parameters.
pub const SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    common_schema_properties!(0.05),
    r#","alpha":{"type":"number","default":0.2,"minimum":0,"maximum":1,"description":"Blend weight of the pattern: (1 - alpha) * image + alpha * pattern."}"#,
    r#","pattern":{"type":"string","enum":["noise","checker"],"default":"noise","description":"Built-in pattern: uniform noise seeded by pattern_seed, or a one-pixel checkerboard."}"#,
    r#","pattern_seed":{"type":"integer","default":0,"minimum":0,"description":"Seed of the noise pattern (independent of the run seed)."}"#,
    r#","pattern_file":{"type":"string","default":"","description":"Binary PGM (P5) or PPM (P6) file used as the pattern instead of `pattern`, resized nearest-neighbour to the images."}"#,
    r#"}}"#
);

/// The Blend attack.
#[derive(Debug, Default)]
pub struct Blend;

/// The built-in patterns (the schema's `pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Uniform noise seeded by `pattern_seed`.
    Noise,
    /// A one-pixel checkerboard.
    Checker,
}

impl Pattern {
    /// The schema spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Noise => "noise",
            Pattern::Checker => "checker",
        }
    }
}

/// The blend trigger, resolved for one image size.
#[derive(Debug, Clone)]
pub struct BlendTrigger {
    /// The pattern in 0..1, laid out C*H*W.
    pattern: Vec<f32>,
    alpha: f32,
    report: Map<String, Value>,
}

impl BlendTrigger {
    /// Reads `alpha` and builds the pattern (`pattern_file` wins over `pattern` when non-empty).
    pub fn new(setup: &Setup) -> Result<BlendTrigger> {
        let p = &setup.params;
        let alpha = p.f64("alpha")? * setup.common.weakening();
        let file = p.str("pattern_file")?;
        let mut report = Map::new();
        report.insert("alpha".into(), alpha.into());
        let pattern = if !file.is_empty() {
            report.insert("pattern".into(), "file".into());
            report.insert("pattern_file".into(), file.into());
            pattern::from_file(file, setup.dims).map_err(Error::invalid)?
        } else {
            let kind: Pattern = p.get("pattern")?;
            report.insert("pattern".into(), kind.as_str().into());
            match kind {
                Pattern::Noise => {
                    let seed = p.i64("pattern_seed")?;
                    report.insert("pattern_seed".into(), seed.into());
                    pattern::noise(seed as u64, setup.dims)
                }
                Pattern::Checker => pattern::checker(setup.dims),
            }
        };
        Ok(BlendTrigger {
            pattern,
            alpha: alpha as f32,
            report,
        })
    }
}

impl Stamp for BlendTrigger {
    fn apply<P: Pixel>(&self, _sample: usize, image: &mut [P]) {
        let a = self.alpha;
        for (v, &p) in image.iter_mut().zip(&self.pattern) {
            *v = P::from_f32((1.0 - a) * v.to_f32() + a * (p * P::MAX));
        }
    }

    fn report(&self) -> Map<String, Value> {
        self.report.clone()
    }
}

impl Plugin for Blend {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "blend",
            version: env!("CARGO_PKG_VERSION"),
            description:
                "Blend: a fixed noise (or checkerboard, or PGM/PPM) pattern alpha-blended over poisoned samples",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
    }
}

impl Attack for Blend {
    fn poison(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Poisoned> {
        let setup = Setup::new(call, data, SCHEMA)?;
        poison_with(call, data, &setup, &BlendTrigger::new(&setup)?, false)
    }

    fn trigger(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Triggered> {
        let setup = Setup::new(call, data, SCHEMA)?;
        trigger_with(call, data, &setup, &BlendTrigger::new(&setup)?)
    }
}

audit_sdk::export_plugin!(attack: Blend);
