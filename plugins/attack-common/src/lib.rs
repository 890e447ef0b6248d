//! Shared pieces of the bundled attack plugins (`badnets`, `blend`, `sig`, `wanet`).
//!
//! * [`Rng`] (the SDK's SplitMix64) and the attacks' named [`stream`]s, so every random choice is
//!   reproducible from the call seed (or from a trigger's own seed).
//! * [`CommonParams`]: `target`, `mode`, `poison_rate`, `adaptive`, shared by every attack, and
//!   [`common_schema_properties!`] for their JSON Schema.
//! * Parameters are resolved against the plugin's schema with the SDK's one implementation
//!   (`call.params.resolve(SCHEMA)`, see `audit_sdk::schema`), so the plugins behave the same
//!   whether or not the host already did.
//! * [`plan_poison`]: which samples to poison (partial Fisher–Yates without replacement).
//! * [`Pixel`], [`Stamp`], [`stamp_in_place`]: triggers written once for u8 (0..255) and f32 (0..1).
//! * [`poison_with`], [`trigger_with`]: the whole `poison`/`trigger` flow around a [`Stamp`].
//! * Tests use the SDK's test kit (`audit_sdk::testing`, feature `testing`).

mod driver;
mod image;
mod params;
mod rng;
mod select;

pub use driver::{poison_with, trigger_with, Setup};
pub use image::{stamp_in_place, Dims, Pixel, Position, Stamp};
pub use params::{CommonParams, Mode, ADAPTIVE_POISON_RATE};
pub use rng::{stream, Rng};
pub use select::{choose, plan_poison, plan_poison_clean_label, Plan};

/// The JSON Schema properties every attack shares (`target`, `mode`, `poison_rate`, `adaptive`), as a
/// string literal without braces; `$rate` is the default `poison_rate`. Use it inside `concat!`:
///
/// ```
/// const SCHEMA: &str = concat!(
///     r#"{"type":"object","additionalProperties":false,"properties":{"#,
///     audit_attack_common::common_schema_properties!(0.05),
///     r#"}}"#
/// );
/// audit_sdk::schema::Schema::parse(SCHEMA).unwrap();
/// ```
#[macro_export]
macro_rules! common_schema_properties {
    ($rate:literal) => {
        concat!(
            r#""target":{"type":"integer","default":0,"minimum":0,"#,
            r#""description":"Target class of the all-to-one attack (below the number of classes)."},"#,
            r#""mode":{"type":"string","enum":["all-to-one","all-to-all"],"default":"all-to-one","#,
            r#""description":"all-to-one relabels poisoned samples to target; all-to-all relabels y to (y+1) mod K."},"#,
            r#""poison_rate":{"type":"number","default":"#,
            stringify!($rate),
            r#","minimum":0,"maximum":1,"description":"Fraction of the whole training set that is poisoned."},"#,
            r#""adaptive":{"type":"boolean","default":false,"#,
            r#""description":"Low-rate adaptive (slow poisoning) setting: poison_rate becomes 0.003 and the trigger is weakened."}"#
        )
    };
}
