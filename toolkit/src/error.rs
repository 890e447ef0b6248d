//! Error kinds that decide the exit code, converted once at the edge (`cli::main`).

use std::fmt;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: runtime failure.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: usage or input error.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: `scan` flagged the model.
pub const EXIT_FLAGGED: i32 = 3;
/// Exit code: cancelled by the user (Ctrl-C), whatever was running; nothing was written.
pub const EXIT_CANCELLED: i32 = 130;

/// The command stopped because the user cancelled it: exit code 130.
#[derive(Debug)]
pub struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// A [`Cancelled`] error.
pub fn cancelled() -> anyhow::Error {
    anyhow::Error::new(Cancelled)
}

/// A mistake the user can fix (bad flag, bad file, bad parameter): exit code 2.
#[derive(Debug)]
pub struct InputError {
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for InputError {}

/// Builds an [`InputError`] as an `anyhow::Error`.
pub fn input_error(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError {
        message: message.into(),
        hint: None,
    })
}

/// Builds an [`InputError`] with a hint line.
pub fn input_error_hint(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError {
        message: message.into(),
        hint: Some(hint.into()),
    })
}

/// Maps an error to its exit code by looking through the chain. Any failure after the user
/// cancelled is a cancellation (a plugin or the engine may report it in its own words).
pub fn exit_code(err: &anyhow::Error) -> i32 {
    let cancelled = |c: &(dyn std::error::Error + 'static)| {
        c.is::<Cancelled>()
            || matches!(
                c.downcast_ref::<audit_nn::NnError>(),
                Some(audit_nn::NnError::Cancelled)
            )
    };
    if crate::signals::is_cancelled() || err.chain().any(cancelled) {
        return EXIT_CANCELLED;
    }
    for cause in err.chain() {
        if cause.downcast_ref::<InputError>().is_some() {
            return EXIT_USAGE;
        }
        if let Some(e) = cause.downcast_ref::<crate::plugin::PluginError>() {
            return e.exit_code();
        }
        if cause.downcast_ref::<crate::data::DataError>().is_some() {
            return EXIT_USAGE;
        }
        if let Some(e) = cause.downcast_ref::<audit_nn::NnError>() {
            return match e {
                audit_nn::NnError::Other(_) => EXIT_FAILURE,
                _ => EXIT_USAGE,
            };
        }
    }
    EXIT_FAILURE
}

/// The hint attached anywhere in the chain, if any.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    err.chain()
        .find_map(|c| c.downcast_ref::<InputError>().and_then(|e| e.hint.clone()))
}
