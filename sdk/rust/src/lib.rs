//! `audit-sdk`: write `audit` plugins in safe Rust.
//!
//! Implement one of [`Attack`], [`Detector`] or [`Defense`] on a `Default` type, describe it with
//! [`PluginInfo`], and export it:
//!
//! ```ignore
//! #[derive(Default)]
//! struct MyAttack;
//! impl audit_sdk::Plugin for MyAttack { fn info() -> audit_sdk::PluginInfo { /* ... */ } }
//! impl audit_sdk::Attack for MyAttack { /* poison, trigger */ }
//! audit_sdk::export_plugin!(attack: MyAttack);
//! ```
//!
//! The macro exports `audit_plugin_negotiate`, negotiates ABI v1, converts the borrowed C views
//! into [`TensorRef`]/[`DatasetRef`], catches panics at the boundary (they become
//! `AUDIT_STATUS_PANIC` with the panic message) and owns every buffer it hands back until the
//! host calls `release`.

mod data;
mod host;
mod params;
#[doc(hidden)]
pub mod rng;
pub mod runtime;
pub mod schema;
#[cfg(feature = "testing")]
pub mod testing;

pub use audit_abi as abi;
pub use data::{DatasetRef, Dtype, Tensor, TensorData, TensorRef};
pub use host::Host;
pub use params::Params;
pub use serde_json;

use serde_json::Value;

/// Status of a failed call, mapped onto `AUDIT_STATUS_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Bad parameters or data: the user can fix it (host exit code 2).
    InvalidInput,
    /// The plugin failed while running (host exit code 1).
    Failed,
    /// The user cancelled.
    Cancelled,
    /// The operation is not implemented by this plugin.
    Unsupported,
}

impl Status {
    /// The ABI status code.
    pub fn code(self) -> i32 {
        match self {
            Status::InvalidInput => abi::AUDIT_STATUS_INVALID_INPUT,
            Status::Failed => abi::AUDIT_STATUS_FAILED,
            Status::Cancelled => abi::AUDIT_STATUS_CANCELLED,
            Status::Unsupported => abi::AUDIT_STATUS_UNSUPPORTED,
        }
    }
}

/// A plugin error: a status and a message for the user.
#[derive(Debug, Clone)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl Error {
    /// Bad parameters or data.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error {
            status: Status::InvalidInput,
            message: message.into(),
        }
    }
    /// A failure while running.
    pub fn failed(message: impl Into<String>) -> Self {
        Error {
            status: Status::Failed,
            message: message.into(),
        }
    }
    /// The user cancelled.
    pub fn cancelled() -> Self {
        Error {
            status: Status::Cancelled,
            message: "cancelled by the user".into(),
        }
    }
    /// Not implemented.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error {
            status: Status::Unsupported,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Result of a plugin call.
pub type Result<T> = std::result::Result<T, Error>;

/// What a plugin says about itself. The strings must be `'static` (they live in the descriptor).
#[derive(Debug, Clone)]
pub struct PluginInfo {
    /// Unique short name, `[a-z0-9-]+` (for example `badnets`).
    pub name: &'static str,
    /// The plugin's version (semver), usually `env!("CARGO_PKG_VERSION")`.
    pub version: &'static str,
    /// One line.
    pub description: &'static str,
    /// JSON Schema of the parameters:
    /// `{"type":"object","additionalProperties":false,"properties":{...}}`; each property has a
    /// `type` (number, integer, boolean, string), a `default`, a `description`, and optionally
    /// `minimum`/`maximum`/`enum`. The rules are in [`schema`]; test it with [`schema::Schema::parse`].
    pub params_schema: &'static str,
    /// `AUDIT_CAP_*` flags.
    pub capabilities: u64,
}

/// Everything a call receives besides its data.
#[derive(Debug)]
pub struct Call<'a> {
    /// Host services: logging, progress, cancellation.
    pub host: Host<'a>,
    /// Validated parameters.
    pub params: Params,
    /// Seed for every random choice.
    pub seed: u64,
    /// "cpu" or "cuda".
    pub device: &'a str,
}

/// The output of [`Attack::poison`].
#[derive(Debug)]
pub struct Poisoned {
    /// The whole training set after poisoning (same shape as the input).
    pub images: Tensor,
    /// Labels after poisoning.
    pub labels: Vec<i64>,
    /// Indices of the samples that were changed.
    pub indices: Vec<i64>,
    /// Free-form report (JSON object).
    pub report: Value,
}

/// The output of [`Attack::trigger`].
#[derive(Debug)]
pub struct Triggered {
    /// The triggered images (same shape as the input).
    pub images: Tensor,
    /// The label the attack wants the model to give each image.
    pub target_labels: Vec<i64>,
    /// Free-form report (JSON object).
    pub report: Value,
}

/// The output of [`Detector::scan`].
#[derive(Debug)]
pub struct Verdict {
    /// Whether the detector believes the model (or data) is backdoored.
    pub backdoored: bool,
    /// Suspected target classes.
    pub target_classes: Vec<i64>,
    /// Indices of suspicious samples in the scanned data.
    pub suspicious: Vec<i64>,
    /// Scores and anything else (JSON object, merged into the report).
    pub details: Value,
}

/// The output of [`Defense::defend`].
#[derive(Debug)]
pub struct Hardened {
    /// The hardened ONNX model.
    pub model: Vec<u8>,
    /// Training samples the defense dropped as suspects.
    pub dropped: Vec<i64>,
    /// Report (JSON object).
    pub report: Value,
}

/// Common to every plugin: how it describes itself.
pub trait Plugin: Default {
    /// Name, version, schema, capabilities.
    fn info() -> PluginInfo;
}

/// An attack: poisons a training set and stamps triggers on test images.
pub trait Attack: Plugin {
    /// Poisons `data` (the training set). Deterministic for a given seed.
    fn poison(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Poisoned>;
    /// Stamps the trigger on `data.images`; `data.labels` are the true labels.
    fn trigger(&self, call: &Call<'_>, data: &DatasetRef<'_>) -> Result<Triggered>;
}

/// A detector: inspects a model and data.
pub trait Detector: Plugin {
    /// Scans `model` (ONNX bytes) with `data`.
    fn scan(&self, call: &Call<'_>, model: &[u8], data: Option<&DatasetRef<'_>>) -> Result<Verdict>;

    /// Scans with the clean subset too: the host lends `clean` (a trusted, held-out set) only to a
    /// detector that declares `AUDIT_CAP_NEEDS_CLEAN_DATA`. The export macro calls this; the
    /// default ignores `clean` and calls [`Detector::scan`], so a detector that needs no clean data
    /// implements `scan` alone.
    fn scan_with_clean(
        &self,
        call: &Call<'_>,
        model: &[u8],
        data: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Verdict> {
        let _ = clean;
        self.scan(call, model, data)
    }
}

/// A defense: returns a hardened model.
pub trait Defense: Plugin {
    /// Hardens `model` (ONNX bytes) using the training set and/or a clean subset.
    fn defend(
        &self,
        call: &Call<'_>,
        model: &[u8],
        train: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened>;
}

/// Exports a plugin type through the C ABI: `export_plugin!(attack: T)`,
/// `export_plugin!(detector: T)` or `export_plugin!(defense: T)`.
#[macro_export]
macro_rules! export_plugin {
    (attack: $ty:ty) => {
        $crate::__export_plugin!(
            $ty,
            $crate::abi::AUDIT_KIND_ATTACK,
            $crate::runtime::dispatch_attack::<$ty>
        );
    };
    (detector: $ty:ty) => {
        $crate::__export_plugin!(
            $ty,
            $crate::abi::AUDIT_KIND_DETECTOR,
            $crate::runtime::dispatch_detector::<$ty>
        );
    };
    (defense: $ty:ty) => {
        $crate::__export_plugin!(
            $ty,
            $crate::abi::AUDIT_KIND_DEFENSE,
            $crate::runtime::dispatch_defense::<$ty>
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($ty:ty, $kind:expr, $dispatch:expr) => {
        static __AUDIT_DESCRIPTOR: ::std::sync::OnceLock<$crate::runtime::Descriptor> = ::std::sync::OnceLock::new();

        unsafe extern "C" fn __audit_run(
            request: *const $crate::abi::AuditRequest,
            response: *mut $crate::abi::AuditResponse,
        ) -> i32 {
            // SAFETY: the host passes a valid request and a zeroed response (ABI contract).
            unsafe { $crate::runtime::run(request, response, $dispatch) }
        }

        unsafe extern "C" fn __audit_release(response: *mut $crate::abi::AuditResponse) {
            // SAFETY: `response` was filled by `__audit_run` (ABI contract).
            unsafe { $crate::runtime::release(response) }
        }

        /// The plugin's entry point (ABI v1).
        ///
        /// # Safety
        /// `host` and `out` must be valid pointers, as the ABI describes.
        #[no_mangle]
        pub unsafe extern "C" fn audit_plugin_negotiate(
            host: *const $crate::abi::AuditHostApi,
            out: *mut $crate::abi::AuditNegotiation,
        ) -> i32 {
            let init = || {
                __AUDIT_DESCRIPTOR.get_or_init(|| {
                    $crate::runtime::Descriptor::new(
                        <$ty as $crate::Plugin>::info(),
                        $kind,
                        Some(__audit_run),
                        Some(__audit_release),
                    )
                })
            };
            let Ok(descriptor) = ::std::panic::catch_unwind(init) else {
                return $crate::abi::AUDIT_STATUS_PANIC;
            };
            // SAFETY: forwarded from the caller.
            unsafe { $crate::runtime::negotiate(host, out, descriptor) }
        }
    };
}
