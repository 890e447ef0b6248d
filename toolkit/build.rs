//! Embeds where the set-up put libtorch and onnxruntime, so `target/release/audit` runs without
//! environment variables: an rpath to libtorch's folder, and the onnxruntime library path as a
//! compile-time constant (ORT_DYLIB_PATH overrides it at run time).

use std::path::PathBuf;

fn main() {
    let venv = std::env::var("AUDIT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("../.venv"));
    let env_file = venv.join("audit-paths.env");
    println!("cargo:rerun-if-changed={}", env_file.display());
    println!("cargo:rerun-if-env-changed=AUDIT_VENV");
    let text = std::fs::read_to_string(&env_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/setup (make build does) before building audit",
            env_file.display()
        )
    });
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "LIBTORCH_LIB" => {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{value}");
                println!("cargo:rustc-env=AUDIT_LIBTORCH_LIB={value}");
            }
            "TORCH_VERSION" => println!("cargo:rustc-env=AUDIT_TORCH_VERSION={value}"),
            "ORT_LIB" => println!("cargo:rustc-env=AUDIT_ORT_DYLIB={value}"),
            "ORT_VERSION" => println!("cargo:rustc-env=AUDIT_ORT_VERSION={value}"),
            _ => {}
        }
    }
}
