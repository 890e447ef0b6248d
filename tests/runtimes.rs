//! The two inference runtimes through the binary: onnxruntime and tract (pure Rust) agree on a
//! trained BadNets model's metrics, tract is the second opinion in `inspect --parity` (on the zoo
//! and on torchvision exports), and `--runtime auto` falls back to tract when onnxruntime's library
//! cannot be loaded, while `--runtime onnxruntime` then fails clearly.

use std::path::Path;
use std::process::Command;

use audit_tests::{audit, audit_bin, data, python, root, sh};
use serde_json::Value;

/// Two runtimes may round a logit differently; at most one flipped prediction per 1000 images.
const METRIC_SLACK: f64 = 0.001;

fn zoo(arch: &str, input: &str, out: &Path) {
    audit(&["zoo", arch, "--input", input, "--out", out.to_str().unwrap()]).expect_code(0);
}

/// `audit ARGS` with extra environment variables; returns (exit code, stdout, stderr).
fn audit_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(audit_bin())
        .args(args)
        .current_dir(root())
        .env_remove("AUDIT_PLUGIN_PATH")
        .env_remove("LD_LIBRARY_PATH")
        .envs(env.iter().copied())
        .output()
        .expect("spawn audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn metric(v: &Value, key: &str) -> f64 {
    v["metrics"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("metrics.{key} missing: {v:#}"))
}

#[test]
fn onnxruntime_and_tract_agree_on_a_badnets_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("B.onnx");
    let m = model.to_str().unwrap();
    let data = data();
    audit(&[
        "attack",
        "badnets",
        "--data",
        data,
        "--arch",
        "small-cnn",
        "--limit",
        "3000",
        "--epochs",
        "1",
        "--out",
        m,
        "--json",
    ])
    .expect_code(0);
    let eval = |runtime: &str| {
        audit(&[
            "eval",
            m,
            "--data",
            data,
            "--runtime",
            runtime,
            "--attack",
            "badnets",
            "--json",
        ])
        .expect_code(0)
        .json()
    };
    let ort = eval("onnxruntime");
    let tract = eval("tract");
    assert_eq!(ort["runtime"], "onnxruntime", "{ort:#}");
    assert_eq!(tract["runtime"], "tract", "{tract:#}");
    assert_eq!(ort["n_test"], tract["n_test"]);
    // The full test set is not a multiple of the batch (256): the last, smaller batch runs too.
    assert!(ort["n_test"].as_u64().unwrap() % 256 != 0, "{ort:#}");
    assert_eq!(ort["metrics"]["n_attack"], tract["metrics"]["n_attack"]);
    for key in ["clean_accuracy", "attack_success_rate", "robust_accuracy"] {
        let (a, b) = (metric(&ort, key), metric(&tract, key));
        assert!(
            (a - b).abs() <= METRIC_SLACK,
            "{key}: onnxruntime {a} vs tract {b}\n{ort:#}\n{tract:#}"
        );
        if a != b {
            eprintln!(
                "note: {key} differs by {:.4} (a float difference flipped a prediction)",
                a - b
            );
        }
    }
    assert!(
        metric(&ort, "clean_accuracy") > 0.5,
        "the model should have learned something: {ort:#}"
    );
    for v in [&ort, &tract] {
        assert!(v["seconds"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn inspect_parity_reports_tract_as_second_opinion() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, input) in [
        ("small-cnn", "1x28x28"),
        ("nin", "1x28x28"),
        ("vgg11", "3x32x32"),
        ("resnet18", "3x32x32"),
        ("preact-resnet18", "3x32x32"),
    ] {
        let model = dir.path().join(format!("{arch}.onnx"));
        zoo(arch, input, &model);
        let v = audit(&["inspect", model.to_str().unwrap(), "--parity", "--json"])
            .expect_code(0)
            .json();
        let p = &v["parity"];
        assert_eq!(p["runtime"], "onnxruntime", "{arch}: {v:#}");
        let ort = p["max_rel_diff"].as_f64().unwrap();
        let tract = p["tract"]["max_rel_diff"]
            .as_f64()
            .unwrap_or_else(|| panic!("{arch}: no tract parity: {p:#}"));
        assert!(ort < 1e-4, "{arch}: engine vs onnxruntime {ort}");
        assert!(tract < 1e-4, "{arch}: engine vs tract {tract}");
        assert_eq!(p["tract"]["ok"], true, "{arch}: {p:#}");
    }
    // The text form names both.
    let r = audit(&[
        "inspect",
        dir.path().join("small-cnn.onnx").to_str().unwrap(),
        "--parity",
    ])
    .expect_code(0);
    assert!(
        r.stdout.contains("parity vs onnxruntime") && r.stdout.contains("parity vs tract"),
        "{}",
        r.stdout
    );
}

#[test]
fn tract_runs_torchvision_exports() {
    let Some(py) = python() else {
        panic!("scripts/setup creates .venv with torch and torchvision");
    };
    let dir = tempfile::tempdir().unwrap();
    let script = root().join("tests/fixtures/python/export_torchvision.py");
    for (sub, extra) in [("folded", None), ("bn", Some("--keep-bn"))] {
        let out = dir.path().join(sub);
        let mut cmd = Command::new(&py);
        cmd.arg(&script).arg(&out).args(["--opsets", "13", "18"]);
        cmd.args(extra);
        sh(&mut cmd);
        for model in ["resnet18", "vgg11_bn", "mobilenet_v2"] {
            for opset in [13, 18] {
                let path = out.join(format!("{model}_opset{opset}.onnx"));
                let v = audit(&["inspect", path.to_str().unwrap(), "--parity", "--json"])
                    .expect_code(0)
                    .json();
                let t = &v["parity"]["tract"];
                let diff = t["max_rel_diff"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{sub}/{model} opset {opset}: tract could not run it: {t:#}"));
                assert!(diff < 1e-4, "{sub}/{model} opset {opset}: engine vs tract {diff}");
            }
        }
    }
}

#[test]
fn auto_falls_back_to_tract_without_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("M.onnx");
    zoo("small-cnn", "1x28x28", &model);
    let m = model.to_str().unwrap();
    let no_ort = [("ORT_DYLIB_PATH", "/nonexistent")];
    let data = data();
    // 300 images: one batch of 256 and a last one of 44.
    let eval = |runtime: &str, json: bool| {
        let mut args = vec!["eval", m, "--data", data, "--limit", "300", "--runtime", runtime];
        if json {
            args.push("--json");
        }
        audit_env(&args, &no_ort)
    };

    let (code, stdout, stderr) = eval("auto", true);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(v["runtime"], "tract", "{v:#}");
    assert_eq!(v["n_test"], 300);
    assert!(
        stderr.contains("onnxruntime is not available") && stderr.contains("using tract"),
        "the fallback is announced on stderr: {stderr}"
    );
    // The default is auto; the text form names the runtime.
    let (code, stdout, stderr) = audit_env(&["eval", m, "--data", data, "--limit", "300"], &no_ort);
    assert_eq!(code, 0, "stderr:\n{stderr}");
    assert!(stdout.contains("tract"), "{stdout}");

    let (code, stdout, stderr) = eval("onnxruntime", true);
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("onnxruntime is not available") && stderr.contains("/nonexistent"),
        "{stderr}"
    );

    // tract alone needs no onnxruntime, and gives the same predictions as auto did.
    let (code, stdout, stderr) = eval("tract", true);
    assert_eq!(code, 0, "stderr:\n{stderr}");
    let t: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(t["metrics"], v["metrics"]);
    assert!(
        !stderr.contains("using tract"),
        "no fallback note when tract is asked for: {stderr}"
    );

    // An unknown runtime is a usage error.
    let (code, _, stderr) = eval("torch", false);
    assert_eq!(code, 2, "{stderr}");
}
