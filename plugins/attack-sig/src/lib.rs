//! SIG (Barni, Kallas, Tondi, 2019), a clean-label attack: a horizontal sinusoid
//! `delta * sin(2 pi j f / W)` (column `j`, the same on every row and channel) is added to images of
//! the target class only, whose labels stay unchanged. At test time the signal on any image should
//! pull it to the target class.
//!
//! `poison_rate` is a fraction of the whole set (`round(rate * N)` samples), all taken from the
//! target class; when it has fewer samples, all of them are poisoned and the report says so.
//! All-to-all makes no sense for a clean-label attack and is rejected. In the adaptive
//! (slow-poisoning) setting the rate becomes 0.003 and delta is halved.

use audit_attack_common::{common_schema_properties, poison_with, trigger_with, Mode, Pixel, Setup, Stamp};
use audit_sdk::{abi, Attack, Call, DatasetRef, Error, Plugin, PluginInfo, Poisoned, Result, Triggered};
use serde_json::{Map, Value};

#[cfg(test)]
mod tests;

/// JSON Schema of the parameters.
pub const SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    common_schema_properties!(0.1),
    r#","delta":{"type":"number","default":40,"minimum":0,"maximum":255,"description":"Amplitude of the signal in pixel units (0..255)."}"#,
    r#","frequency":{"type":"number","default":6,"minimum":0,"description":"Number of periods of the signal across the image width."}"#,
    r#"}}"#
);

/// The SIG attack.
#[derive(Debug, Default)]
pub struct Sig;

/// The sinusoidal signal, resolved for one image size.
#[derive(Debug, Clone)]
pub struct Signal {
    /// `delta * sin(2 pi j f / W)` for every column `j`, in pixel units.
    columns: Vec<f32>,
    delta: f64,
    frequency: f64,
}

impl Signal {
    /// Reads `delta` and `frequency`; rejects all-to-all.
    pub fn new(setup: &Setup) -> Result<Signal> {
        if setup.common.mode == Mode::AllToAll {
            return Err(Error::invalid(
                "parameter `mode`: SIG is a clean-label attack on the target class; all-to-all is not supported",
            ));
        }
        let delta = setup.params.f64("delta")? * setup.common.weakening();
        let frequency = setup.params.f64("frequency")?;
        let w = setup.dims.w;
        let columns = (0..w)
            .map(|j| (delta * (2.0 * std::f64::consts::PI * j as f64 * frequency / w as f64).sin()) as f32)
            .collect();
        Ok(Signal {
            columns,
            delta,
            frequency,
        })
    }
}

impl Stamp for Signal {
    fn apply<P: Pixel>(&self, _sample: usize, image: &mut [P]) {
        for row in image.chunks_exact_mut(self.columns.len()) {
            for (v, &d) in row.iter_mut().zip(&self.columns) {
                *v = P::from_f32(v.to_f32() + P::from_pixel_units(d));
            }
        }
    }

    fn report(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("delta".into(), self.delta.into());
        m.insert("frequency".into(), self.frequency.into());
        m.insert("clean_label".into(), true.into());
        m
    }
}

impl Plugin for Sig {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "sig",
            version: env!("CARGO_PKG_VERSION"),
            description: "SIG: clean-label attack adding a horizontal sinusoid to target-class training images",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
    }
}

impl Attack for Sig {
    fn poison(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Poisoned> {
        let setup = Setup::new(call, data, SCHEMA)?;
        poison_with(call, data, &setup, &Signal::new(&setup)?, true)
    }

    fn trigger(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Triggered> {
        let setup = Setup::new(call, data, SCHEMA)?;
        trigger_with(call, data, &setup, &Signal::new(&setup)?)
    }
}

audit_sdk::export_plugin!(attack: Sig);
