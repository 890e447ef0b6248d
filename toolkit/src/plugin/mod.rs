//! The plugin host: discovery through manifests, loading with libloading, ABI negotiation and
//! validation, parameter checking, calls with borrowed data, and copying results out before the
//! plugin's `release`.
//!
//! Bundled plugins go through exactly this path; nothing calls their Rust code directly.

mod call;
#[cfg(test)]
mod fuzz;
mod host;
mod loader;
mod manifest;
pub mod schema;
mod stdio;

use std::path::PathBuf;

pub use call::{CallInput, CallOutput, OwnedTensor};
pub use loader::{load, valid_name, LoadedPlugin};
pub use manifest::{
    discover, install, search_dirs, shadowing, unmanaged_libraries, unmanaged_note, Discovered, Manifest,
    MANIFEST_SUFFIX,
};
pub use stdio::StdoutToStderr;

use audit_abi as abi;

/// Plugin kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Attack,
    Detector,
    Defense,
}

impl Kind {
    /// From the ABI code.
    pub fn from_code(code: u32) -> Option<Kind> {
        match code {
            abi::AUDIT_KIND_ATTACK => Some(Kind::Attack),
            abi::AUDIT_KIND_DETECTOR => Some(Kind::Detector),
            abi::AUDIT_KIND_DEFENSE => Some(Kind::Defense),
            _ => None,
        }
    }
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Attack => "attack",
            Kind::Detector => "detector",
            Kind::Defense => "defense",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation a plugin can be asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    Poison,
    Trigger,
    Scan,
    Defend,
}

impl Op {
    /// The ABI code.
    pub fn code(self) -> u32 {
        match self {
            Op::Poison => abi::AUDIT_OP_POISON,
            Op::Trigger => abi::AUDIT_OP_TRIGGER,
            Op::Scan => abi::AUDIT_OP_SCAN,
            Op::Defend => abi::AUDIT_OP_DEFEND,
        }
    }
    /// The kind of plugin that answers it.
    pub fn kind(self) -> Kind {
        match self {
            Op::Poison | Op::Trigger => Kind::Attack,
            Op::Scan => Kind::Detector,
            Op::Defend => Kind::Defense,
        }
    }
}

/// Capability flags, by name, for listings.
pub fn capability_names(caps: u64) -> Vec<&'static str> {
    [
        (abi::AUDIT_CAP_NEEDS_GPU, "needs-gpu"),
        (abi::AUDIT_CAP_NEEDS_CLEAN_DATA, "needs-clean-data"),
        (abi::AUDIT_CAP_NEEDS_TRAINING_DATA, "needs-training-data"),
        (abi::AUDIT_CAP_NEEDS_MODEL, "needs-model"),
        (abi::AUDIT_CAP_USES_CLEAN_DATA, "uses-clean-data"),
    ]
    .into_iter()
    .filter(|(bit, _)| caps & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Why a plugin could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {path}: not a loadable shared library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error("plugin {path}: no `{symbol}` symbol: not an audit plugin (or built against another SDK)", symbol = abi::AUDIT_ENTRY_SYMBOL)]
    NoEntry { path: PathBuf },
    #[error("plugin {path}: speaks plugin ABI v{plugin}, this audit speaks v{host_min}..=v{host_max}; rebuild it against this SDK")]
    AbiMismatch {
        path: PathBuf,
        plugin: u32,
        host_min: u32,
        host_max: u32,
    },
    #[error("plugin {path}: negotiation failed with status {status}")]
    NegotiationFailed { path: PathBuf, status: i32 },
    #[error("plugin {path}: invalid descriptor: {reason}")]
    BadDescriptor { path: PathBuf, reason: String },
    #[error("plugin {path}: {reason}")]
    BadSchema { path: PathBuf, reason: String },
    #[error("plugin {path}: manifest {manifest}: {reason}")]
    BadManifest {
        path: PathBuf,
        manifest: PathBuf,
        reason: String,
    },
    #[error("plugin `{name}` ({path}): {message}")]
    InvalidInput {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("plugin `{name}` ({path}) failed: {message}")]
    Failed {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("plugin `{name}` ({path}) was cancelled")]
    Cancelled { name: String, path: PathBuf },
    #[error("plugin `{name}` ({path}) returned an invalid response: {reason}")]
    BadResponse {
        name: String,
        path: PathBuf,
        reason: String,
    },
}

impl PluginError {
    /// Exit code: 2 for a bad plugin file or bad input, 1 for a failure while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            PluginError::Failed { .. } | PluginError::Cancelled { .. } | PluginError::BadResponse { .. } => {
                crate::error::EXIT_FAILURE
            }
            _ => crate::error::EXIT_USAGE,
        }
    }
}
