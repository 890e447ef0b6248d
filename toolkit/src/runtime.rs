//! The native runtimes `audit` uses: libtorch (through audit-nn, linked with an rpath) and
//! onnxruntime (loaded at run time from the set-up's library; `ORT_DYLIB_PATH` overrides).

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};

/// The onnxruntime shared library: `ORT_DYLIB_PATH` when set, else the path embedded at build time.
pub fn ort_dylib() -> Option<PathBuf> {
    std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).or_else(|| {
        option_env!("AUDIT_ORT_DYLIB")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

/// The onnxruntime environment, created once (loading the library).
pub fn ort_env() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = ort_dylib().ok_or("no onnxruntime library known: run scripts/setup or set ORT_DYLIB_PATH")?;
        if !path.is_file() {
            return Err(format!(
                "{} does not exist: run scripts/setup or set ORT_DYLIB_PATH",
                path.display()
            ));
        }
        let env = ort::init_from(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        env.with_name("audit")
            .build()
            .map_err(|e| format!("starting onnxruntime: {e}"))
    })
    .as_ref()
    .map_err(|e| anyhow!(e.clone()))
}

/// Loads onnxruntime once; returns its build information string.
pub fn init_ort() -> Result<&'static str> {
    ort_env()?;
    Ok(ort::info())
}

/// The libtorch version the build was set up with.
pub fn torch_version() -> &'static str {
    option_env!("AUDIT_TORCH_VERSION").unwrap_or("unknown")
}

/// The onnxruntime version the build was set up with.
pub fn ort_version() -> &'static str {
    option_env!("AUDIT_ORT_VERSION").unwrap_or("unknown")
}
