//! `audit`: audit image classifiers for backdoors and harden them.
//!
//! The library behind the `audit` binary: command line ([`cli`]), plugin host ([`plugin`]),
//! datasets ([`data`]). Bundled attacks, detectors and defenses are plugins loaded from disk
//! through the C ABI (`audit-abi`); nothing here calls their Rust code directly.

pub mod cli;
pub mod data;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod infer;
pub mod output;
pub mod plugin;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod signals;
