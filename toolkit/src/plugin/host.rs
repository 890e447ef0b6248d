//! The host services table given to every plugin: log, progress, is_cancelled.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use audit_abi as abi;

use crate::progress::Progress;

/// State behind the table's `ctx`.
#[derive(Debug, Default)]
pub(crate) struct HostState {
    /// Name of the plugin currently running (for log prefixes and bar labels).
    pub current: Mutex<String>,
    pub progress: Progress,
}

struct Table(abi::AuditHostApi);
// SAFETY: the table is immutable after creation and `ctx` points at a 'static, Sync HostState.
unsafe impl Sync for Table {}
// SAFETY: as above.
unsafe impl Send for Table {}

static STATE: OnceLock<HostState> = OnceLock::new();
static TABLE: OnceLock<Table> = OnceLock::new();

pub(crate) fn state() -> &'static HostState {
    STATE.get_or_init(HostState::default)
}

fn current() -> String {
    state().current.lock().map(|s| s.clone()).unwrap_or_default()
}

unsafe fn text<'a>(ptr: *const u8, len: usize) -> std::borrow::Cow<'a, str> {
    if ptr.is_null() || len == 0 {
        return "".into();
    }
    // SAFETY: the plugin lends `len` bytes for the duration of the callback.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr, len.min(1 << 20)) })
}

unsafe extern "C" fn log(_ctx: *mut c_void, level: u32, msg: *const u8, len: usize) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see `text`.
        let msg = unsafe { text(msg, len) };
        let level = match level {
            abi::AUDIT_LOG_ERROR => "error",
            abi::AUDIT_LOG_WARN => "warning",
            abi::AUDIT_LOG_INFO => "info",
            _ => "debug",
        };
        if level == "debug" && std::env::var_os("AUDIT_DEBUG").is_none() {
            return;
        }
        state().progress.println(&format!("[{}] {level}: {msg}", current()));
    }));
}

unsafe extern "C" fn progress_cb(_ctx: *mut c_void, phase: *const u8, phase_len: usize, done: u64, total: u64) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see `text`.
        let phase = unsafe { text(phase, phase_len) };
        state().progress.update(&current(), &phase, done, total);
    }));
}

unsafe extern "C" fn is_cancelled(_ctx: *mut c_void) -> i32 {
    i32::from(crate::signals::is_cancelled())
}

/// The host table (one per process).
pub(crate) fn api() -> &'static abi::AuditHostApi {
    &TABLE
        .get_or_init(|| {
            Table(abi::AuditHostApi {
                struct_size: std::mem::size_of::<abi::AuditHostApi>() as u32,
                abi_min: abi::AUDIT_ABI_VERSION,
                abi_max: abi::AUDIT_ABI_VERSION,
                _reserved: 0,
                ctx: state() as *const HostState as *mut c_void,
                log: Some(log),
                progress: Some(progress_cb),
                is_cancelled: Some(is_cancelled),
            })
        })
        .0
}
