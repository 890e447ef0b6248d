//! Device selection: `cpu`, `cuda` (an error when absent) or `auto` (CUDA when usable).

use std::path::PathBuf;
use std::sync::OnceLock;

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceRequest {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda),
            other => Err(DeviceError::Unknown(other.to_string())),
        }
    }
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}` (use auto, cpu or cuda)")]
    Unknown(String),
    #[error("--device cuda: CUDA is not available ({0})")]
    NoCuda(String),
}

/// The folder of the libtorch this process loaded (read from /proc/self/maps).
pub fn libtorch_dir() -> Option<PathBuf> {
    // Touch libtorch so it is certainly mapped.
    let _ = tch::utils::has_openmp();
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so") || p.contains("/libtorch_cpu.so."))
        .and_then(|p| PathBuf::from(p).parent().map(PathBuf::from))
}

/// Loads libtorch_cuda (once) so that tch can see CUDA devices. Returns why not, when it fails.
fn load_cuda() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dir = libtorch_dir().ok_or("cannot find the loaded libtorch")?;
            let lib = dir.join("libtorch_cuda.so");
            if !lib.is_file() {
                return Err(format!("{} does not exist (a CPU-only libtorch)", lib.display()));
            }
            // SAFETY: loading libtorch's own CUDA library; kept loaded for the process's life.
            let handle = unsafe {
                libloading::os::unix::Library::open(
                    Some(&lib),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            }
            .map_err(|e| format!("loading {}: {e}", lib.display()))?;
            std::mem::forget(handle);
            Ok(())
        })
        .clone()
}

/// Resolves `--device` to a tch device. `auto` picks CUDA when it is usable, else CPU.
pub fn resolve_device(req: DeviceRequest) -> Result<tch::Device, DeviceError> {
    match req {
        DeviceRequest::Cpu => Ok(tch::Device::Cpu),
        DeviceRequest::Cuda | DeviceRequest::Auto => {
            let cuda = load_cuda().and_then(|()| {
                if tch::Cuda::is_available() {
                    Ok(tch::Device::Cuda(0))
                } else {
                    Err("libtorch_cuda loaded, but no CUDA device or driver is visible".to_string())
                }
            });
            match (cuda, req) {
                (Ok(d), _) => Ok(d),
                (Err(_), DeviceRequest::Auto) => Ok(tch::Device::Cpu),
                (Err(why), _) => Err(DeviceError::NoCuda(why)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_runs_and_libtorch_is_found() {
        assert_eq!(resolve_device(DeviceRequest::Cpu).unwrap(), tch::Device::Cpu);
        assert_eq!(crate::smoke_test(tch::Device::Cpu), 45.0);
        let dir = libtorch_dir().expect("libtorch mapped");
        assert!(dir.join("libtorch_cpu.so").is_file());
    }

    #[test]
    fn auto_falls_back_and_cuda_errors_clearly_without_a_gpu() {
        let auto = resolve_device(DeviceRequest::Auto).unwrap();
        if auto == tch::Device::Cpu {
            let e = resolve_device(DeviceRequest::Cuda).unwrap_err().to_string();
            assert!(e.contains("CUDA is not available"), "{e}");
        }
        assert!("gpu".parse::<DeviceRequest>().is_err());
    }
}
