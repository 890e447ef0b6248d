//! Models trained and exported by PyTorch (not by us): `audit eval` agrees with onnxruntime's
//! Python API on the same data, and `audit harden` (NONE) hardens a BadNets model whose
//! BatchNormalization the exporter folded into the convolutions, given its poisoned training set
//! as NPZ.

use std::process::Command;

use audit_tests::{audit, python, root, sh};
use serde_json::Value;

#[test]
fn pytorch_badnets_model_evaluates_like_onnxruntime_and_hardens() {
    if !std::path::Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file() {
        panic!("this test needs Fashion-MNIST: run scripts/setup as root");
    }
    let dir = tempfile::tempdir().unwrap();
    let py = python().expect("scripts/setup creates .venv");
    let script = root().join("tests/fixtures/python/train_badnets_fmnist.py");
    sh(Command::new(py)
        .arg(&script)
        .arg(dir.path())
        .args(["--epochs", "2", "--limit", "12000"]));
    let metrics: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).unwrap()).unwrap();
    let model = dir.path().join("badnets_fmnist.onnx");
    let npz = dir.path().join("badnets_fmnist.npz");

    // The exporter folded BatchNormalization: the engine sees only Conv/Gemm neurons.
    let i = audit(&["inspect", model.to_str().unwrap(), "--parity", "--json"])
        .expect_code(0)
        .json();
    let ops: Vec<&str> = i["neuron_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["op_type"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["Conv", "Conv", "Gemm", "Gemm"], "{i:#}");
    assert!(i["parity"]["max_rel_diff"].as_f64().unwrap() < 1e-4);

    // audit eval == onnxruntime's Python API, same test set.
    let e = audit(&[
        "eval",
        model.to_str().unwrap(),
        "--data",
        npz.to_str().unwrap(),
        "--attack",
        "badnets",
        "--json",
    ])
    .expect_code(0)
    .json();
    let acc = e["metrics"]["clean_accuracy"].as_f64().unwrap();
    let asr = e["metrics"]["attack_success_rate"].as_f64().unwrap();
    assert_eq!(
        acc,
        metrics["onnx_acc"].as_f64().unwrap(),
        "clean accuracy vs onnxruntime (Python): {metrics}"
    );
    assert!(
        (asr - metrics["onnx_asr"].as_f64().unwrap()).abs() < 1e-9,
        "ASR {asr} vs {metrics}"
    );
    assert!(asr > 0.9, "the PyTorch BadNets model should be backdoored: {metrics}");

    // NONE on it, through the plugin, with the poisoned set as NPZ.
    let out = dir.path().join("hardened.onnx");
    let h = audit(&[
        "harden",
        model.to_str().unwrap(),
        "--data",
        npz.to_str().unwrap(),
        "--eval-attack",
        "badnets",
        "--param",
        "E2=5",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
    .expect_code(0)
    .json();
    let (acc_after, asr_after) = (
        h["after"]["clean_accuracy"].as_f64().unwrap(),
        h["after"]["attack_success_rate"].as_f64().unwrap(),
    );
    eprintln!(
        "PyTorch model: ACC {acc:.4} ASR {asr:.4} -> ACC {acc_after:.4} ASR {asr_after:.4}; {}",
        h["defense_report"]["dropped_vs_poison_idx"]
    );
    assert!(asr_after <= 0.05, "ASR after NONE {asr_after}");
    assert!(acc_after >= acc - 0.02, "ACC after {acc_after} vs {acc}");
    assert!(h["defense_report"]["dropped_vs_poison_idx"]["recall"].as_f64().unwrap() >= 0.9);
}

/// Trains a backdoored model with PyTorch (the fixture's own trigger, not our plugins), hardens it
/// with NONE's defaults and measures both with the fixture's trigger through onnxruntime.
/// Returns (before, after, harden report).
fn harden_pytorch_fixture(attack: &str) -> (Value, Value, Value) {
    if !std::path::Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file() {
        panic!("this test needs Fashion-MNIST: run scripts/setup as root");
    }
    let dir = tempfile::tempdir().unwrap();
    let py = python().expect("scripts/setup creates .venv");
    let fx = root().join("tests/fixtures/python");
    sh(Command::new(&py)
        .arg(fx.join("train_backdoor_fmnist.py"))
        .arg(dir.path())
        .args(["--attack", attack, "--epochs", "2", "--limit", "12000"]));
    let model = dir.path().join(format!("{attack}-small-cnn.onnx"));
    let npz = dir.path().join(format!("{attack}-small-cnn.npz"));
    let out = dir.path().join("hardened.onnx");
    let h = audit(&[
        "harden",
        model.to_str().unwrap(),
        "--data",
        npz.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ])
    .expect_code(0)
    .json();
    let eval = |m: &std::path::Path| -> Value {
        let o = sh(Command::new(&py).arg(fx.join("eval_backdoor.py")).arg(m).arg(&npz));
        serde_json::from_str(o.trim()).unwrap()
    };
    (eval(&model), eval(&out), h)
}

/// The default NONE removes Blend and WaNet backdoors from PyTorch-trained models: the class-wise
/// split finds the target class's poisoned samples, which the paper's global split misses.
#[test]
fn pytorch_blend_and_wanet_models_are_hardened_by_the_default() {
    for attack in ["blend", "wanet"] {
        let (before, after, h) = harden_pytorch_fixture(attack);
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
        let split = &h["defense_report"]["rounds"][0]["class_split"];
        eprintln!(
            "{attack}: ACC {:.4} ASR {:.4} -> ACC {:.4} ASR {:.4}; suspects {}; class split {split}",
            f(&before, "acc"),
            f(&before, "asr"),
            f(&after, "acc"),
            f(&after, "asr"),
            h["defense_report"]["dropped_vs_poison_idx"]
        );
        assert!(
            f(&before, "asr") > 0.8,
            "{attack}: the fixture should be backdoored: {before}"
        );
        let accepted: Vec<i64> = split
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["accepted"] == true)
            .map(|c| c["class"].as_i64().unwrap())
            .collect();
        assert_eq!(accepted, [0], "{attack}: only the target class is split: {split}");
        assert!(f(&after, "asr") <= 0.15, "{attack}: ASR after NONE {after}");
        assert!(
            f(&after, "acc") >= f(&before, "acc") - 0.02,
            "{attack}: {before} -> {after}"
        );
        let recall = h["defense_report"]["dropped_vs_poison_idx"]["recall"].as_f64().unwrap();
        assert!(recall >= 0.9, "{attack}: recall {recall}");
    }
}
