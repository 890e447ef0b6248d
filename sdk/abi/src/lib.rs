//! The `audit` plugin C ABI, version 1.
//!
//! This crate holds only `#[repr(C)]` types and constants; `sdk/include/audit_plugin.h` is generated
//! from it by cbindgen. Rules that keep the ABI stable:
//!
//! * A plugin exports exactly one function, [`AUDIT_ENTRY_SYMBOL`], with the signature of
//!   [`AuditNegotiateFn`]. That signature never changes.
//! * Every struct starts with `struct_size` (bytes), written by whoever allocates it. Structs and
//!   function tables only ever grow at the end; a reader never touches a field that lies beyond the
//!   `struct_size` it was given. The offsets of every released version are pinned by a test.
//! * Ownership: everything the host passes (request, datasets, model bytes, strings) is borrowed and
//!   valid only for the duration of the call. Everything the plugin writes into an [`AuditResponse`]
//!   is owned by the plugin and stays valid until the host calls the descriptor's `release` on it.
//! * Strings are UTF-8, given as pointer + length, and need not be NUL-terminated.
//! * Failure is a status code (`AUDIT_STATUS_*`) plus a message in `AuditResponse::message`.
#![allow(non_camel_case_types)]

use core::ffi::c_void;

/// ABI version this crate describes.
pub const AUDIT_ABI_VERSION: u32 = 1;
/// Name of the one symbol a plugin exports (an `AuditNegotiateFn`).
pub const AUDIT_ENTRY_SYMBOL: &str = "audit_plugin_negotiate";

/// Success.
pub const AUDIT_STATUS_OK: i32 = 0;
/// The request was invalid (bad parameter, unsupported data shape...). The host exits with code 2.
pub const AUDIT_STATUS_INVALID_INPUT: i32 = 1;
/// The plugin ran and failed. The host exits with code 1.
pub const AUDIT_STATUS_FAILED: i32 = 2;
/// The host asked to cancel (`is_cancelled` returned non-zero) and the plugin stopped.
pub const AUDIT_STATUS_CANCELLED: i32 = 3;
/// The plugin does not implement this operation, or none of the ABI versions the host offers.
pub const AUDIT_STATUS_UNSUPPORTED: i32 = 4;
/// The plugin panicked (Rust) or hit an internal error; the message says where.
pub const AUDIT_STATUS_PANIC: i32 = 5;

/// Plugin kind: poisons training data and stamps triggers.
pub const AUDIT_KIND_ATTACK: u32 = 1;
/// Plugin kind: inspects a model (and data) and returns a verdict.
pub const AUDIT_KIND_DETECTOR: u32 = 2;
/// Plugin kind: returns a hardened model.
pub const AUDIT_KIND_DEFENSE: u32 = 3;

/// Attack operation: training set in, poisoned set plus poisoned indices out.
pub const AUDIT_OP_POISON: u32 = 1;
/// Attack operation: images in, triggered images plus target labels out.
pub const AUDIT_OP_TRIGGER: u32 = 2;
/// Detector operation: model (+ data) in, verdict out (report JSON + suspicious indices).
pub const AUDIT_OP_SCAN: u32 = 3;
/// Defense operation: model + data in, hardened ONNX model + report out.
pub const AUDIT_OP_DEFEND: u32 = 4;

/// Element type of a tensor: unsigned byte (images in 0..255).
pub const AUDIT_DTYPE_U8: u32 = 1;
/// Element type of a tensor: 32-bit float (images in 0..1).
pub const AUDIT_DTYPE_F32: u32 = 2;
/// Element type of a tensor: 64-bit signed integer (labels, indices).
pub const AUDIT_DTYPE_I64: u32 = 3;

/// Capability flag: the plugin needs a CUDA device.
pub const AUDIT_CAP_NEEDS_GPU: u64 = 1;
/// Capability flag: the plugin needs a clean (trusted) data subset in `AuditRequest::clean`.
pub const AUDIT_CAP_NEEDS_CLEAN_DATA: u64 = 1 << 1;
/// Capability flag: the plugin needs the (possibly poisoned) training set in `AuditRequest::data`.
pub const AUDIT_CAP_NEEDS_TRAINING_DATA: u64 = 1 << 2;
/// Capability flag: the plugin needs the model in `AuditRequest::model`.
pub const AUDIT_CAP_NEEDS_MODEL: u64 = 1 << 3;
/// Capability flag: the plugin uses a clean (trusted) subset in `AuditRequest::clean` when the
/// host has one to lend, and runs without it otherwise (`_NEEDS_CLEAN_DATA` makes it required).
/// Hosts older than this flag ignore it and lend nothing.
pub const AUDIT_CAP_USES_CLEAN_DATA: u64 = 1 << 4;

/// Log level for `AuditHostApi::log`.
pub const AUDIT_LOG_ERROR: u32 = 1;
/// Log level for `AuditHostApi::log`.
pub const AUDIT_LOG_WARN: u32 = 2;
/// Log level for `AuditHostApi::log`.
pub const AUDIT_LOG_INFO: u32 = 3;
/// Log level for `AuditHostApi::log`.
pub const AUDIT_LOG_DEBUG: u32 = 4;

/// Most dimensions a tensor view can have.
pub const AUDIT_MAX_DIMS: usize = 8;

/// A UTF-8 string slice (not necessarily NUL-terminated). `ptr` may be null when `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditStr {
    pub ptr: *const u8,
    pub len: usize,
}

/// A byte slice. `ptr` may be null when `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditBytes {
    pub ptr: *const u8,
    pub len: usize,
}

/// A dense, C-contiguous (row-major) tensor. `byte_len` must equal the product of
/// `shape[..ndim]` times the element size of `dtype`. A tensor with `ndim == 0` and
/// `byte_len == 0` is "absent".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditTensor {
    /// One of `AUDIT_DTYPE_*`.
    pub dtype: u32,
    /// Number of used entries in `shape` (0..=AUDIT_MAX_DIMS).
    pub ndim: u32,
    pub shape: [i64; AUDIT_MAX_DIMS],
    pub data: *const c_void,
    pub byte_len: usize,
}

/// Writes one log line. `ctx` is `AuditHostApi::ctx`.
pub type AuditLogFn = Option<unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const u8, len: usize)>;
/// Reports progress of a phase (`done` out of `total` steps). A new `phase` name starts a new bar.
pub type AuditProgressFn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, phase: *const u8, phase_len: usize, done: u64, total: u64)>;
/// Returns non-zero once the user asked to stop (Ctrl-C); the plugin should then return
/// `AUDIT_STATUS_CANCELLED` soon.
pub type AuditIsCancelledFn = Option<unsafe extern "C" fn(ctx: *mut c_void) -> i32>;

/// Services the host offers to plugins. Owned by the host; valid for the life of the process.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditHostApi {
    pub struct_size: u32,
    /// Lowest ABI version the host speaks.
    pub abi_min: u32,
    /// Highest ABI version the host speaks.
    pub abi_max: u32,
    pub _reserved: u32,
    /// Opaque host state, passed back to every callback.
    pub ctx: *mut c_void,
    pub log: AuditLogFn,
    pub progress: AuditProgressFn,
    pub is_cancelled: AuditIsCancelledFn,
}

/// A labelled image set, borrowed from the host.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditDataset {
    pub struct_size: u32,
    /// Number of classes of the task (labels lie in 0..num_classes).
    pub num_classes: u32,
    /// Images, NCHW, `AUDIT_DTYPE_U8` (0..255) or `AUDIT_DTYPE_F32` (0..1). Absent: ndim 0.
    pub images: AuditTensor,
    /// Labels, shape [N], `AUDIT_DTYPE_I64`.
    pub labels: AuditTensor,
}

/// What the host asks a plugin to do. Borrowed: valid only during `run`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditRequest {
    pub struct_size: u32,
    /// One of `AUDIT_OP_*`.
    pub op: u32,
    /// Host services (same table as given to `audit_plugin_negotiate`).
    pub host: *const AuditHostApi,
    /// Parameters as a JSON object, already validated against the plugin's schema, defaults filled.
    pub params_json: AuditStr,
    /// Seed for every random choice the plugin makes.
    pub seed: u64,
    /// Device the user asked for: "cpu" or "cuda".
    pub device: AuditStr,
    /// ONNX model bytes (scan, defend); empty otherwise.
    pub model: AuditBytes,
    /// poison: the training set; trigger: the images to stamp (labels = true labels);
    /// scan: data to inspect; defend: the training set.
    pub data: AuditDataset,
    /// A clean, trusted subset (when the plugin declares `AUDIT_CAP_NEEDS_CLEAN_DATA`); else absent.
    pub clean: AuditDataset,
}

/// What a plugin answers. The host allocates it zeroed and sets `struct_size`; the plugin fills
/// the fields (all owned by the plugin) and the host hands it back to `release` when done.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditResponse {
    pub struct_size: u32,
    pub _reserved: u32,
    /// On failure: why (required). On success: optional warning.
    pub message: AuditStr,
    /// A JSON object: the plugin's report. For detectors it must hold `"backdoored": bool`.
    pub report_json: AuditStr,
    /// defend: the hardened ONNX model.
    pub model: AuditBytes,
    /// poison: the whole poisoned set's images; trigger: the triggered images (same shape as input).
    pub images: AuditTensor,
    /// poison: labels after poisoning; trigger: the label the attack wants for each image.
    pub labels: AuditTensor,
    /// poison: poisoned sample indices; scan: suspicious samples; defend: samples it dropped.
    pub indices: AuditTensor,
    /// Plugin-private state for `release`; the host never reads it.
    pub plugin_state: *mut c_void,
}

/// Runs an operation. Returns an `AUDIT_STATUS_*` code.
pub type AuditRunFn = Option<unsafe extern "C" fn(request: *const AuditRequest, response: *mut AuditResponse) -> i32>;
/// Frees everything the plugin put into `response` during `run`.
pub type AuditReleaseFn = Option<unsafe extern "C" fn(response: *mut AuditResponse)>;

/// Describes a plugin. Owned by the plugin, valid for the life of the process.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditPluginDescriptor {
    pub struct_size: u32,
    /// One of `AUDIT_KIND_*`.
    pub kind: u32,
    /// Short unique name, `[a-z0-9-]+`.
    pub name: AuditStr,
    /// The plugin's own version (semver).
    pub version: AuditStr,
    /// One line.
    pub description: AuditStr,
    /// JSON Schema (an object schema with `properties`) of the parameters, with defaults.
    pub params_schema: AuditStr,
    /// Free text: toolchain, tch/libtorch version the plugin was built with.
    pub build_info: AuditStr,
    /// `AUDIT_CAP_*` flags.
    pub capabilities: u64,
    pub run: AuditRunFn,
    pub release: AuditReleaseFn,
}

/// The plugin's answer to negotiation. The host allocates it and sets `struct_size`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AuditNegotiation {
    pub struct_size: u32,
    /// The ABI version the plugin picked (or, when it returns `AUDIT_STATUS_UNSUPPORTED`, the one it speaks).
    pub abi_version: u32,
    pub descriptor: *const AuditPluginDescriptor,
}

/// Signature of `audit_plugin_negotiate`, the only exported symbol. Returns `AUDIT_STATUS_OK` and
/// fills `out`, or `AUDIT_STATUS_UNSUPPORTED` when it speaks none of `host.abi_min..=host.abi_max`.
pub type AuditNegotiateFn = unsafe extern "C" fn(host: *const AuditHostApi, out: *mut AuditNegotiation) -> i32;

impl AuditStr {
    /// An empty string.
    pub const EMPTY: AuditStr = AuditStr {
        ptr: core::ptr::null(),
        len: 0,
    };

    /// Borrows a Rust string (the caller keeps it alive while the view is used).
    pub const fn from_str(s: &str) -> AuditStr {
        AuditStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }
}

impl AuditBytes {
    /// An empty slice.
    pub const EMPTY: AuditBytes = AuditBytes {
        ptr: core::ptr::null(),
        len: 0,
    };
}

impl AuditTensor {
    /// An absent tensor.
    pub const ABSENT: AuditTensor = AuditTensor {
        dtype: 0,
        ndim: 0,
        shape: [0; AUDIT_MAX_DIMS],
        data: core::ptr::null(),
        byte_len: 0,
    };
}

impl AuditDataset {
    /// An absent dataset.
    pub const ABSENT: AuditDataset = AuditDataset {
        struct_size: core::mem::size_of::<AuditDataset>() as u32,
        num_classes: 0,
        images: AuditTensor::ABSENT,
        labels: AuditTensor::ABSENT,
    };
}

/// Size in bytes of one element of `dtype`, or 0 for an unknown dtype.
pub const fn dtype_size(dtype: u32) -> usize {
    match dtype {
        AUDIT_DTYPE_U8 => 1,
        AUDIT_DTYPE_F32 => 4,
        AUDIT_DTYPE_I64 => 8,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    /// Pins the layout of ABI v1 on 64-bit targets. A change here breaks every released plugin:
    /// append fields at the end instead, and never edit these numbers.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn abi_v1_layout_is_pinned() {
        assert_eq!(size_of::<AuditStr>(), 16);
        assert_eq!(size_of::<AuditBytes>(), 16);

        assert_eq!(offset_of!(AuditTensor, dtype), 0);
        assert_eq!(offset_of!(AuditTensor, ndim), 4);
        assert_eq!(offset_of!(AuditTensor, shape), 8);
        assert_eq!(offset_of!(AuditTensor, data), 72);
        assert_eq!(offset_of!(AuditTensor, byte_len), 80);
        assert_eq!(size_of::<AuditTensor>(), 88);

        assert_eq!(offset_of!(AuditHostApi, struct_size), 0);
        assert_eq!(offset_of!(AuditHostApi, abi_min), 4);
        assert_eq!(offset_of!(AuditHostApi, abi_max), 8);
        assert_eq!(offset_of!(AuditHostApi, ctx), 16);
        assert_eq!(offset_of!(AuditHostApi, log), 24);
        assert_eq!(offset_of!(AuditHostApi, progress), 32);
        assert_eq!(offset_of!(AuditHostApi, is_cancelled), 40);
        assert_eq!(size_of::<AuditHostApi>(), 48);

        assert_eq!(offset_of!(AuditDataset, struct_size), 0);
        assert_eq!(offset_of!(AuditDataset, num_classes), 4);
        assert_eq!(offset_of!(AuditDataset, images), 8);
        assert_eq!(offset_of!(AuditDataset, labels), 96);
        assert_eq!(size_of::<AuditDataset>(), 184);

        assert_eq!(offset_of!(AuditRequest, struct_size), 0);
        assert_eq!(offset_of!(AuditRequest, op), 4);
        assert_eq!(offset_of!(AuditRequest, host), 8);
        assert_eq!(offset_of!(AuditRequest, params_json), 16);
        assert_eq!(offset_of!(AuditRequest, seed), 32);
        assert_eq!(offset_of!(AuditRequest, device), 40);
        assert_eq!(offset_of!(AuditRequest, model), 56);
        assert_eq!(offset_of!(AuditRequest, data), 72);
        assert_eq!(offset_of!(AuditRequest, clean), 256);
        assert_eq!(size_of::<AuditRequest>(), 440);

        assert_eq!(offset_of!(AuditResponse, struct_size), 0);
        assert_eq!(offset_of!(AuditResponse, message), 8);
        assert_eq!(offset_of!(AuditResponse, report_json), 24);
        assert_eq!(offset_of!(AuditResponse, model), 40);
        assert_eq!(offset_of!(AuditResponse, images), 56);
        assert_eq!(offset_of!(AuditResponse, labels), 144);
        assert_eq!(offset_of!(AuditResponse, indices), 232);
        assert_eq!(offset_of!(AuditResponse, plugin_state), 320);
        assert_eq!(size_of::<AuditResponse>(), 328);

        assert_eq!(offset_of!(AuditPluginDescriptor, struct_size), 0);
        assert_eq!(offset_of!(AuditPluginDescriptor, kind), 4);
        assert_eq!(offset_of!(AuditPluginDescriptor, name), 8);
        assert_eq!(offset_of!(AuditPluginDescriptor, version), 24);
        assert_eq!(offset_of!(AuditPluginDescriptor, description), 40);
        assert_eq!(offset_of!(AuditPluginDescriptor, params_schema), 56);
        assert_eq!(offset_of!(AuditPluginDescriptor, build_info), 72);
        assert_eq!(offset_of!(AuditPluginDescriptor, capabilities), 88);
        assert_eq!(offset_of!(AuditPluginDescriptor, run), 96);
        assert_eq!(offset_of!(AuditPluginDescriptor, release), 104);
        assert_eq!(size_of::<AuditPluginDescriptor>(), 112);

        assert_eq!(offset_of!(AuditNegotiation, struct_size), 0);
        assert_eq!(offset_of!(AuditNegotiation, abi_version), 4);
        assert_eq!(offset_of!(AuditNegotiation, descriptor), 8);
        assert_eq!(size_of::<AuditNegotiation>(), 16);
    }

    #[test]
    fn constants_of_v1_are_pinned() {
        assert_eq!(AUDIT_ABI_VERSION, 1);
        assert_eq!(AUDIT_ENTRY_SYMBOL, "audit_plugin_negotiate");
        assert_eq!([AUDIT_KIND_ATTACK, AUDIT_KIND_DETECTOR, AUDIT_KIND_DEFENSE], [1, 2, 3]);
        assert_eq!(
            [AUDIT_OP_POISON, AUDIT_OP_TRIGGER, AUDIT_OP_SCAN, AUDIT_OP_DEFEND],
            [1, 2, 3, 4]
        );
        assert_eq!(
            [
                dtype_size(AUDIT_DTYPE_U8),
                dtype_size(AUDIT_DTYPE_F32),
                dtype_size(AUDIT_DTYPE_I64)
            ],
            [1, 4, 8]
        );
        assert_eq!(dtype_size(99), 0);
    }
}
