//! Host services as seen by a plugin.

use crate::{abi, Error, Result};

/// The host's services (logging, progress, cancellation). Copy it freely within a call.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    api: Option<&'a abi::AuditHostApi>,
}

impl<'a> Host<'a> {
    /// Wraps the host table (`None`: calls are no-ops, for unit tests).
    pub fn new(api: Option<&'a abi::AuditHostApi>) -> Self {
        Host { api }
    }

    /// Writes a log line at `level` (`AUDIT_LOG_*`).
    pub fn log(&self, level: u32, msg: &str) {
        if let Some(f) = self.api.and_then(|a| a.log) {
            // SAFETY: the host keeps its table and ctx valid; msg is borrowed for the call.
            unsafe { f(self.api.unwrap().ctx, level, msg.as_ptr(), msg.len()) }
        }
    }
    /// Info log line.
    pub fn info(&self, msg: &str) {
        self.log(abi::AUDIT_LOG_INFO, msg)
    }
    /// Warning log line.
    pub fn warn(&self, msg: &str) {
        self.log(abi::AUDIT_LOG_WARN, msg)
    }
    /// Reports progress of `phase`: `done` of `total`.
    pub fn progress(&self, phase: &str, done: u64, total: u64) {
        if let Some(f) = self.api.and_then(|a| a.progress) {
            // SAFETY: as in `log`.
            unsafe { f(self.api.unwrap().ctx, phase.as_ptr(), phase.len(), done, total) }
        }
    }
    /// True once the user asked to stop.
    pub fn is_cancelled(&self) -> bool {
        match self.api.and_then(|a| a.is_cancelled) {
            // SAFETY: as in `log`.
            Some(f) => unsafe { f(self.api.unwrap().ctx) != 0 },
            None => false,
        }
    }
    /// `Err(cancelled)` once the user asked to stop; call it between steps.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::cancelled())
        } else {
            Ok(())
        }
    }
}
