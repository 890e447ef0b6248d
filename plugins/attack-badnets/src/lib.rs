//! BadNets (Gu, Dolan-Gavitt, Garg, 2017): a solid square patch, by default a 3x3 white square in the
//! bottom-right corner, stamped on a fraction of the training set, which is relabelled to the target.
//!
//! In the adaptive (slow-poisoning) setting the rate becomes 0.003 and the patch is blended at half
//! intensity: `0.5 * color + 0.5 * pixel`.

use audit_attack_common::{common_schema_properties, poison_with, trigger_with, Dims, Pixel, Position, Setup, Stamp};
use audit_sdk::{abi, Attack, Call, DatasetRef, Error, Plugin, PluginInfo, Poisoned, Result, Triggered};
use serde_json::{Map, Value};

#[cfg(test)]
mod tests;

/// JSON Schema of the parameters.
pub const SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    common_schema_properties!(0.05),
    r#","patch_size":{"type":"integer","default":3,"minimum":1,"description":"Side of the square patch in pixels (must fit in the image)."}"#,
    r#","position":{"type":"string","enum":["bottom-right","bottom-left","top-right","top-left","center"],"default":"bottom-right","description":"Where the patch sits."}"#,
    r#","color":{"type":"integer","default":255,"minimum":0,"maximum":255,"description":"Value of the patch in every channel, in pixel units (0..255; f32 images get color/255)."}"#,
    r#"}}"#
);

/// The BadNets attack.
#[derive(Debug, Default)]
pub struct BadNets;

/// The patch trigger, resolved for one image size.
#[derive(Debug, Clone)]
pub struct Patch {
    dims: Dims,
    size: usize,
    position: Position,
    row: usize,
    col: usize,
    color: u8,
    intensity: f32,
}

impl Patch {
    /// Reads `patch_size`, `position`, `color` and checks that the patch fits.
    pub fn new(setup: &Setup) -> Result<Patch> {
        let p = &setup.params;
        let dims = setup.dims;
        // `Setup::new` resolved the schema, which bounds them (patch_size >= 1, color 0..=255).
        let size = p.i64("patch_size")?.max(1) as usize;
        if size > dims.h || size > dims.w {
            return Err(Error::invalid(format!(
                "parameter `patch_size` is {size} but the images are {}x{}: the patch must fit",
                dims.h, dims.w
            )));
        }
        let color = p.i64("color")?.clamp(0, 255) as u8;
        let position: Position = p.get("position")?;
        let (row, col) = position.origin(size, dims.h, dims.w);
        Ok(Patch {
            dims,
            size,
            position,
            row,
            col,
            color,
            intensity: setup.common.weakening() as f32,
        })
    }
}

impl Stamp for Patch {
    fn apply<P: Pixel>(&self, _sample: usize, image: &mut [P]) {
        let Dims { c, h, w } = self.dims;
        let color = P::from_pixel_units(f32::from(self.color));
        let a = self.intensity;
        for ch in 0..c {
            for y in self.row..self.row + self.size {
                let line = (ch * h + y) * w;
                for v in &mut image[line + self.col..line + self.col + self.size] {
                    *v = P::from_f32(a * color + (1.0 - a) * v.to_f32());
                }
            }
        }
    }

    fn report(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("patch_size".into(), self.size.into());
        m.insert("position".into(), self.position.as_str().into());
        m.insert("patch_origin".into(), serde_json::json!([self.row, self.col]));
        m.insert("color".into(), self.color.into());
        m.insert("patch_intensity".into(), f64::from(self.intensity).into());
        m
    }
}

impl Plugin for BadNets {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "badnets",
            version: env!("CARGO_PKG_VERSION"),
            description: "BadNets: a solid square patch (default 3x3 white, bottom-right) on poisoned samples",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
    }
}

impl Attack for BadNets {
    fn poison(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Poisoned> {
        let setup = Setup::new(call, data, SCHEMA)?;
        poison_with(call, data, &setup, &Patch::new(&setup)?, false)
    }

    fn trigger(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Triggered> {
        let setup = Setup::new(call, data, SCHEMA)?;
        trigger_with(call, data, &setup, &Patch::new(&setup)?)
    }
}

audit_sdk::export_plugin!(attack: BadNets);
