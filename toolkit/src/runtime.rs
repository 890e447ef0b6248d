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

/// onnxruntime's switch for its telemetry, set by [`ort_env`] before the library starts.
pub const TELEMETRY_ENV: &str = "ORT_DISABLE_TELEMETRY";

/// The onnxruntime environment, created once (loading the library), telemetry off.
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
        // onnxruntime's telemetry (1.31 keeps a local database under ~/.cache with the binary's
        // path, a device id, graph names and error texts) is off: the variable stops it before
        // the environment starts, `with_telemetry(false)` disables its events after.
        if std::env::var_os(TELEMETRY_ENV).is_none() {
            std::env::set_var(TELEMETRY_ENV, "1");
        }
        let env = ort::init_from(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        // onnxruntime's own log lines carry its source paths and ANSI colours: print warnings and
        // errors ourselves, cleaned, and nothing below.
        let logger: ort::logging::LoggerFunction = std::sync::Arc::new(|level, _category, _id, _location, message| {
            use ort::logging::LogLevel;
            if matches!(level, LogLevel::Warning | LogLevel::Error | LogLevel::Fatal) {
                eprintln!("onnxruntime: {}", crate::infer::clean_runtime_message(message));
            }
        });
        env.with_name("audit")
            .with_telemetry(false)
            .with_logger(logger)
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

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod peak_tests {
    #[test]
    fn peak_rss_grows_with_touched_memory() {
        let before = super::peak_rss_bytes().expect("Linux VmHWM");
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let after = super::peak_rss_bytes().unwrap();
        assert!(after >= before && after >= 64 << 20, "{before} -> {after}");
    }
}
