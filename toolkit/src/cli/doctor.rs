//! `audit doctor`: what this installation has: runtimes, devices, plugins, data.

use anyhow::Result;
use serde_json::json;

use super::GlobalArgs;
use crate::error::{EXIT_FAILURE, EXIT_OK};
use crate::{plugin, runtime};

pub fn run(global: &GlobalArgs, json: bool) -> Result<i32> {
    let libtorch_dir = audit_nn::libtorch_dir();
    let smoke = audit_nn::smoke_test_cpu();
    let device = audit_nn::resolve_device(audit_nn::DeviceRequest::Auto).map(|d| format!("{d:?}").to_lowercase());
    let ort = runtime::init_ort();
    let dirs = plugin::search_dirs(&global.plugin_dirs);
    let found = plugin::discover(&dirs);
    let unmanaged = plugin::unmanaged_libraries(&dirs);
    for lib in &unmanaged {
        eprintln!("{}", plugin::unmanaged_note(lib));
    }
    let problems: Vec<serde_json::Value> = found
        .iter()
        .filter_map(|d| {
            d.problem()
                .map(|p| json!({"manifest": d.manifest_path.display().to_string(), "problem": p}))
        })
        .collect();
    let fmnist = std::path::Path::new(crate::data::FASHION_MNIST_DIR)
        .join("train-images-idx3-ubyte.gz")
        .is_file();
    let ok = smoke == 45.0 && ort.is_ok();
    let doc = json!({
        "schema_version": 1,
        "audit_version": env!("CARGO_PKG_VERSION"),
        "plugin_abi_version": audit_abi::AUDIT_ABI_VERSION,
        "libtorch": {
            "version": runtime::torch_version(),
            "dir": libtorch_dir.map(|d| d.display().to_string()),
            "smoke_test_ok": smoke == 45.0,
        },
        "device_auto": device.as_ref().ok(),
        "onnxruntime": {
            "version": runtime::ort_version(),
            "library": runtime::ort_dylib().map(|p| p.display().to_string()),
            "ok": ort.is_ok(),
            "error": ort.as_ref().err().map(|e| format!("{e:#}")),
        },
        "plugin_dirs": dirs.iter().map(|(d, from)| json!({"dir": d.display().to_string(), "from": from})).collect::<Vec<_>>(),
        "plugins_found": found.len(),
        "plugin_problems": problems,
        "unmanaged_libraries": unmanaged.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "fashion_mnist": fmnist,
        "ok": ok,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let yes = |b: bool| if b { "ok" } else { "MISSING" };
        println!(
            "audit {} (plugin ABI v{})",
            env!("CARGO_PKG_VERSION"),
            audit_abi::AUDIT_ABI_VERSION
        );
        println!(
            "libtorch     {} at {} [{}]",
            runtime::torch_version(),
            doc["libtorch"]["dir"].as_str().unwrap_or("?"),
            yes(smoke == 45.0)
        );
        println!(
            "onnxruntime  {} at {} [{}]",
            runtime::ort_version(),
            doc["onnxruntime"]["library"].as_str().unwrap_or("?"),
            yes(ort.is_ok())
        );
        if let Err(e) = &ort {
            println!("             {e:#}");
        }
        println!("device auto  {}", device.unwrap_or_else(|e| e.to_string()));
        println!(
            "plugins      {} manifest(s) in {}",
            found.len(),
            dirs.iter()
                .map(|(d, _)| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for d in &found {
            if let Some(p) = d.problem() {
                println!("             {}: {p}", d.manifest_path.display());
            }
        }
        for lib in &unmanaged {
            println!(
                "             {}: no manifest: run audit plugins install {}",
                lib.display(),
                lib.display()
            );
        }
        println!(
            "data         Fashion-MNIST {}",
            if fmnist {
                "installed"
            } else {
                "not installed (synthetic fallback)"
            }
        );
    }
    Ok(if ok { EXIT_OK } else { EXIT_FAILURE })
}
