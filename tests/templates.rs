//! Plugin templates and examples: `audit plugins new` writes a project for every language and
//! kind; each builds with the commands its README gives, installs, loads and runs for real.

use std::path::{Path, PathBuf};
use std::process::Command;

use audit_tests::{audit, compile_c, data, python, root, sh, target_dir};
use serde_json::Value;

/// Shared cargo target folder for the generated Rust projects (so audit-sdk builds once).
fn template_target() -> PathBuf {
    target_dir().join("template-builds")
}

fn build_rust(project: &Path) -> PathBuf {
    sh(Command::new("cargo")
        .args(["build", "--release", "--quiet"])
        .current_dir(project)
        .env("CARGO_TARGET_DIR", template_target()));
    template_target().join("release")
}

fn install(lib: &Path, plugin_dir: &Path) {
    audit(&[
        "plugins",
        "install",
        "--force",
        "--dir",
        plugin_dir.to_str().unwrap(),
        lib.to_str().unwrap(),
    ])
    .expect_code(0);
}

fn run_json(plugin_dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--plugin-dir", plugin_dir.to_str().unwrap(), "plugins", "run"];
    a.extend_from_slice(args);
    a.push("--json");
    audit(&a).expect_code(0).json()
}

/// A real ONNX model shipped by the `onnx` wheel that scripts/setup installs.
fn some_onnx_model() -> PathBuf {
    let py = python().expect("scripts/setup creates .venv");
    let out = sh(Command::new(py).args(["-c", "import onnx, os; print(os.path.dirname(onnx.__file__))"]));
    let p = Path::new(out.trim()).join("backend/test/data/light/light_squeezenet.onnx");
    assert!(p.is_file(), "{} missing from the onnx wheel", p.display());
    p
}

/// Poisons a Fashion-MNIST subset with the bundled BadNets and returns the NPZ path.
fn poisoned_npz(dir: &Path) -> PathBuf {
    let out = dir.join("badnets.npz");
    let out_s = out.to_str().unwrap();
    let args = [
        "plugins",
        "run",
        "badnets",
        "--op",
        "poison",
        "--data",
        data(),
        "--limit",
        "3000",
        "--force",
        "--out",
        out_s,
    ];
    audit(&args).expect_code(0);
    out
}

fn exercise(kind: &str, name: &str, plugin_dir: &Path, work: &Path) {
    match kind {
        "attack" => {
            let v = run_json(
                plugin_dir,
                &[name, "--op", "poison", "--data", data(), "--limit", "1000"],
            );
            let n = v["indices"].as_array().unwrap().len();
            assert_eq!(n, 50, "{name}: 5% of 1000: {v:#}");
            assert_eq!(v["changed_labels"].as_u64().unwrap() as usize, n, "{v:#}");
            let v = run_json(
                plugin_dir,
                &[name, "--op", "trigger", "--data", data(), "--limit", "100"],
            );
            assert!(v["changed_images"].as_u64().unwrap() >= 90, "{v:#}");
        }
        "detector" => {
            let npz = poisoned_npz(work);
            let v = run_json(plugin_dir, &[name, "--data", npz.to_str().unwrap()]);
            assert_eq!(
                v["report"]["backdoored"], true,
                "{name} missed BadNets poisoning: {v:#}"
            );
            assert_eq!(v["report"]["target_classes"], serde_json::json!([0]), "{v:#}");
            let flagged: std::collections::HashSet<i64> = v["indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_i64().unwrap())
                .collect();
            assert!(
                flagged.len() >= 100,
                "{name}: flagged {} of 150 poisoned",
                flagged.len()
            );
        }
        "defense" => {
            let model = some_onnx_model();
            let out = work.join(format!("{name}.hardened.onnx"));
            let v = run_json(
                plugin_dir,
                &[
                    name,
                    "--model",
                    model.to_str().unwrap(),
                    "--data",
                    "synthetic",
                    "--limit",
                    "64",
                    "--out",
                    out.to_str().unwrap(),
                ],
            );
            assert_eq!(v["report"]["changed"], false, "{v:#}");
            assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&model).unwrap());
        }
        _ => unreachable!(),
    }
}

#[test]
fn every_template_builds_loads_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin_dir = tmp.path().join("plugins");
    for lang in ["rust", "c"] {
        for kind in ["attack", "detector", "defense"] {
            let name = format!("my-{kind}-{lang}");
            let project = tmp.path().join(&name);
            audit(&[
                "plugins",
                "new",
                &name,
                "--kind",
                kind,
                "--lang",
                lang,
                "--out",
                project.to_str().unwrap(),
            ])
            .expect_code(0);
            let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
            let lib_file = format!("libaudit_plugin_{}.so", name.replace('-', "_"));
            let lib = if lang == "rust" {
                assert!(readme.contains("cargo build --release"), "{readme}");
                build_rust(&project).join(&lib_file)
            } else {
                assert!(readme.contains("make"), "{readme}");
                sh(Command::new("make").arg("-C").arg(&project));
                project.join(&lib_file)
            };
            assert!(lib.is_file(), "{} not built", lib.display());
            install(&lib, &plugin_dir);
            let info = audit(&[
                "--plugin-dir",
                plugin_dir.to_str().unwrap(),
                "plugins",
                "info",
                &name,
                "--json",
            ])
            .expect_code(0)
            .json();
            assert_eq!(info["kind"], kind);
            assert_eq!(info["abi_version"], 1);
            exercise(kind, &name, &plugin_dir, tmp.path());
        }
    }
    // A second `new` into the same folder refuses.
    let again = tmp.path().join("my-attack-rust");
    let r = audit(&[
        "plugins",
        "new",
        "my-attack-rust",
        "--kind",
        "attack",
        "--out",
        again.to_str().unwrap(),
    ])
    .expect_code(2);
    assert!(r.stderr.contains("not empty"), "{}", r.stderr);
}

#[test]
fn committed_examples_build_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let plugin_dir = tmp.path().join("plugins");
    let lib = build_rust(&root().join("examples/rust-plugin")).join("libaudit_plugin_checkerboard.so");
    install(&lib, &plugin_dir);
    exercise("attack", "checkerboard", &plugin_dir, tmp.path());
    let c = compile_c(
        &root().join("examples/c-plugin/plugin.c"),
        &tmp.path().join("libaudit_plugin_c_pixel_outlier.so"),
        &[],
    );
    install(&c, &plugin_dir);
    exercise("detector", "c-pixel-outlier", &plugin_dir, tmp.path());
}
