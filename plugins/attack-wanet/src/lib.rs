//! WaNet (Nguyen & Tran, ICLR 2021): the trigger is a small, smooth, fixed warp of the image (see
//! [`warp`]). Poisoned samples get the warp and the target label; "noise mode" cross samples
//! (`cross_ratio` times as many, chosen among the others) get the warp plus per-pixel random noise
//! and keep their labels, so the model learns the exact warp rather than any warp.
//!
//! The warp comes from `grid_seed`, not from the call seed, so `poison` and `trigger` use the same
//! warp. In the adaptive (slow-poisoning) setting the rate becomes 0.003 and strength is halved.

use audit_attack_common::{
    choose, common_schema_properties, poison_with, stamp_in_place, stream, trigger_with, Pixel, Rng, Setup, Stamp,
};
use audit_sdk::{abi, Attack, Call, DatasetRef, Plugin, PluginInfo, Poisoned, Result, Triggered};
use serde_json::{Map, Value};

#[cfg(test)]
mod tests;
pub mod warp;

use warp::{Grid, Sampler};

/// JSON Schema of the parameters.
pub const SCHEMA: &str = concat!(
    r#"{"type":"object","additionalProperties":false,"properties":{"#,
    common_schema_properties!(0.05),
    r#","k":{"type":"integer","default":4,"minimum":2,"description":"Size of the random control grid (k x k) that is upsampled into the warp."}"#,
    r#","strength":{"type":"number","default":0.5,"minimum":0,"description":"Warp strength s: the field is scaled by s / image size in normalised coordinates."}"#,
    r#","grid_seed":{"type":"integer","default":0,"minimum":0,"description":"Seed of the warp field (independent of the run seed, so poison and trigger agree)."}"#,
    r#","cross_ratio":{"type":"number","default":2.0,"minimum":0,"description":"Noise-mode cross samples per poisoned sample; they get a randomly perturbed warp and keep their labels."}"#,
    r#"}}"#
);

/// The WaNet attack.
#[derive(Debug, Default)]
pub struct WaNet;

/// The backdoor warp, resolved for one image size.
#[derive(Debug, Clone)]
pub struct WarpTrigger {
    grid: Grid,
    sampler: Sampler,
    k: usize,
    strength: f64,
    grid_seed: u64,
}

impl WarpTrigger {
    /// Reads `k`, `strength` and `grid_seed` and builds the grid and its bilinear taps.
    pub fn new(setup: &Setup) -> Result<WarpTrigger> {
        let p = &setup.params;
        let k = p.i64("k")?.max(2) as usize;
        let strength = p.f64("strength")? * setup.common.weakening();
        let grid_seed = p.i64("grid_seed")? as u64;
        let grid = Grid::warp(k, strength, grid_seed, setup.dims.h, setup.dims.w);
        let sampler = grid.sampler();
        Ok(WarpTrigger {
            grid,
            sampler,
            k,
            strength,
            grid_seed,
        })
    }
}

impl Stamp for WarpTrigger {
    fn apply<P: Pixel>(&self, _sample: usize, image: &mut [P]) {
        self.sampler.apply(image, &mut Vec::new());
    }

    fn report(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("k".into(), self.k.into());
        m.insert("strength".into(), self.strength.into());
        m.insert("grid_seed".into(), self.grid_seed.into());
        m.insert("upsampling".into(), "bicubic".into());
        m
    }
}

/// Noise mode: the backdoor grid plus fresh per-pixel noise for each sample (seeded by the call
/// seed and the sample index).
struct CrossNoise<'a> {
    grid: &'a Grid,
    seed: u64,
}

impl Stamp for CrossNoise<'_> {
    fn apply<P: Pixel>(&self, sample: usize, image: &mut [P]) {
        let mut rng = Rng::for_item(self.seed, stream::CROSS_NOISE, sample as u64);
        self.grid.with_noise(&mut rng).sampler().apply(image, &mut Vec::new());
    }

    fn report(&self) -> Map<String, Value> {
        Map::new()
    }
}

impl Plugin for WaNet {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "wanet",
            version: env!("CARGO_PKG_VERSION"),
            description:
                "WaNet: a smooth imperceptible warp on poisoned samples, with label-keeping noise-mode cross samples",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_TRAINING_DATA,
        }
    }
}

impl Attack for WaNet {
    fn poison(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Poisoned> {
        let setup = Setup::new(call, data, SCHEMA)?;
        let trigger = WarpTrigger::new(&setup)?;
        let mut poisoned = poison_with(call, data, &setup, &trigger, false)?;

        let cross_ratio = setup.params.f64("cross_ratio")?;
        let wanted = (cross_ratio * poisoned.indices.len() as f64).round() as usize;
        let mut is_poisoned = vec![false; data.len()];
        poisoned.indices.iter().for_each(|&i| is_poisoned[i as usize] = true);
        let others: Vec<usize> = (0..data.len()).filter(|&i| !is_poisoned[i]).collect();
        let n_others = others.len();
        let cross = choose(others, wanted, &mut Rng::stream(call.seed, stream::CROSS_SELECT));
        stamp_in_place(
            call,
            &mut poisoned.images,
            &cross,
            "cross",
            &CrossNoise {
                grid: &trigger.grid,
                seed: call.seed,
            },
        )?;

        if let Value::Object(r) = &mut poisoned.report {
            r.insert("cross_ratio".into(), cross_ratio.into());
            r.insert("n_cross".into(), cross.len().into());
            if cross.len() < wanted {
                let note = format!(
                    "only {n_others} unpoisoned samples are left: all of them are cross samples instead of the {wanted} cross_ratio asks for"
                );
                call.host.warn(&note);
                r.insert("cross_note".into(), note.into());
            }
            r.insert("cross_indices".into(), cross.into());
        }
        Ok(poisoned)
    }

    fn trigger(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Triggered> {
        let setup = Setup::new(call, data, SCHEMA)?;
        trigger_with(call, data, &setup, &WarpTrigger::new(&setup)?)
    }
}

audit_sdk::export_plugin!(attack: WaNet);
