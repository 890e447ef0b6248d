//! The attacks' random streams: one seed drives independent choices through
//! [`Rng::stream`] (the generator itself is the SDK's, `audit_sdk::rng`).

pub use audit_sdk::rng::Rng;

/// Named random streams, so that one seed drives independent choices.
pub mod stream {
    /// Which samples get poisoned.
    pub const SELECT: u64 = 1;
    /// Trigger patterns derived from a pattern seed (blend noise, WaNet field).
    pub const PATTERN: u64 = 2;
    /// WaNet: which samples become noise-mode cross samples.
    pub const CROSS_SELECT: u64 = 3;
    /// WaNet: per-sample noise of the cross samples.
    pub const CROSS_NOISE: u64 = 4;
}
