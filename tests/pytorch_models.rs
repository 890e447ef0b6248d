//! Models trained and exported by PyTorch (not by us): `audit eval` agrees with onnxruntime's
//! Python API on the same data, and `audit harden` (NONE) hardens a BadNets model whose
//! BatchNormalization the exporter folded into the convolutions, given its poisoned training set
//! as NPZ.

use std::process::Command;

use audit_tests::{acc_asr, audit, python, root, sh};
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
    let (acc_after, asr_after) = acc_asr(&h["after"]);
    eprintln!(
        "PyTorch model: ACC {acc:.4} ASR {asr:.4} -> ACC {acc_after:.4} ASR {asr_after:.4}; {}",
        h["defense_report"]["dropped_vs_poison_idx"]
    );
    assert!(asr_after <= 0.05, "ASR after NONE {asr_after}");
    assert!(acc_after >= acc - 0.02, "ACC after {acc_after} vs {acc}");
    assert!(h["defense_report"]["dropped_vs_poison_idx"]["recall"].as_f64().unwrap() >= 0.9);
}
