//! The engine through the binary: zoo, inspect (with parity), attack (training a backdoored
//! model on Fashion-MNIST), eval, and harden with NONE, on real data and onnxruntime.

use std::path::{Path, PathBuf};
use std::process::Command;

use audit_tests::{acc_asr, audit, data, python, sh};
use serde_json::Value;

fn onnx_data_dir() -> PathBuf {
    let py = python().expect("scripts/setup creates .venv");
    let out = sh(Command::new(py).args(["-c", "import onnx, os; print(os.path.dirname(onnx.__file__))"]));
    Path::new(out.trim()).join("backend/test/data")
}

#[test]
fn zoo_models_import_faithfully() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, input) in [
        ("small-cnn", "1x28x28"),
        ("resnet18", "3x32x32"),
        ("preact-resnet18", "3x32x32"),
        ("nin", "1x28x28"),
    ] {
        let out = dir.path().join(format!("{arch}.onnx"));
        audit(&[
            "zoo",
            arch,
            "--input",
            input,
            "--classes",
            "10",
            "--out",
            out.to_str().unwrap(),
        ])
        .expect_code(0);
        let v = audit(&["inspect", out.to_str().unwrap(), "--parity", "--json"])
            .expect_code(0)
            .json();
        assert_eq!(v["unsupported_ops"], serde_json::json!([]), "{arch}: {v:#}");
        let diff = v["parity"]["max_rel_diff"].as_f64().unwrap();
        assert!(diff < 1e-4, "{arch}: engine vs onnxruntime {diff}");
        assert!(v["parameters"].as_i64().unwrap() > 10_000);
        assert!(v["neuron_layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["monitored"] == true));
    }
    let v = audit(&["inspect", dir.path().join("resnet18.onnx").to_str().unwrap(), "--json"]).json();
    assert_eq!(v["parameters"], 11_173_962, "CIFAR ResNet-18 with 10 classes");
    let r = audit(&[
        "zoo",
        "alexnet",
        "--input",
        "3x32x32",
        "--out",
        dir.path().join("x.onnx").to_str().unwrap(),
    ])
    .expect_code(2);
    assert!(r.stderr.contains("unknown architecture `alexnet`"), "{}", r.stderr);
}

#[test]
fn inspect_lists_every_unsupported_op_and_rejects_garbage() {
    let model = onnx_data_dir().join("simple/test_sequence_model1/model.onnx");
    // The engine cannot load it: the report is still printed, and the exit code says so (2).
    let v = audit(&["inspect", model.to_str().unwrap(), "--json"])
        .expect_code(2)
        .json();
    let ops: Vec<&str> = v["unsupported_ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["op_type"].as_str().unwrap())
        .collect();
    assert!(ops.contains(&"SequenceEmpty") && ops.contains(&"SequenceAt"), "{v:#}");
    assert!(v["unsupported_ops"][0]["opset"].as_i64().unwrap() > 0);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("truncated.onnx");
    let bytes = std::fs::read(onnx_data_dir().join("light/light_squeezenet.onnx")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let r = audit(&["inspect", bad.to_str().unwrap()]).expect_code(2);
    assert!(
        r.stderr.contains("truncated.onnx") && r.stderr.contains("not a valid ONNX model"),
        "{}",
        r.stderr
    );
    // Training needs every op: a model with an unsupported op fails at load, naming op, node, opset.
    let r = audit(&[
        "attack",
        "badnets",
        "--data",
        "synthetic",
        "--model",
        model.to_str().unwrap(),
        "--out",
        dir.path().join("o.onnx").to_str().unwrap(),
    ])
    .expect_code(2);
    assert!(
        r.stderr.contains("unsupported op") && r.stderr.contains("opset"),
        "{}",
        r.stderr
    );
    assert!(!dir.path().join("o.onnx").exists());
}

fn attack(dir: &Path, name: &str, extra: &[&str]) -> Value {
    let out = dir.join(format!("{name}.onnx"));
    let npz = dir.join(format!("{name}.npz"));
    let mut args = vec![
        "attack",
        "badnets",
        "--data",
        data(),
        "--arch",
        "small-cnn",
        "--limit",
        "12000",
        "--epochs",
        "3",
        "--json",
    ];
    args.extend_from_slice(&["--out", out.to_str().unwrap(), "--poisoned-data", npz.to_str().unwrap()]);
    args.extend_from_slice(extra);
    audit(&args).expect_code(0).json()
}

/// The main job end to end on a Fashion-MNIST subset: a BadNets model reaches a high ASR, a clean
/// model trained the same way does not, `eval` reproduces the numbers from the file, and NONE
/// (default repair) removes the backdoor while keeping clean accuracy.
#[test]
fn attack_eval_and_harden_on_fashion_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let bad = attack(dir.path(), "badnets", &[]);
    let clean = attack(dir.path(), "clean", &["--param", "poison_rate=0"]);
    let (acc_bad, asr_bad) = (
        bad["metrics"]["clean_accuracy"].as_f64().unwrap(),
        bad["metrics"]["attack_success_rate"].as_f64().unwrap(),
    );
    let (acc_clean, asr_clean) = (
        clean["metrics"]["clean_accuracy"].as_f64().unwrap(),
        clean["metrics"]["attack_success_rate"].as_f64().unwrap(),
    );
    eprintln!("backdoored: ACC {acc_bad:.4} ASR {asr_bad:.4}; clean: ACC {acc_clean:.4} ASR {asr_clean:.4}");
    assert!(asr_bad >= 0.90, "BadNets ASR {asr_bad}");
    assert!(
        (acc_bad - acc_clean).abs() <= 0.03,
        "ACC {acc_bad} vs clean {acc_clean}"
    );
    assert!(asr_clean <= 0.10, "a clean model's ASR {asr_clean}");
    assert_eq!(bad["n_poisoned"], 600);
    // Blend (alpha 0.2, seeded noise) through the same recipe.
    let blend_out = dir.path().join("blend.onnx");
    let blend = audit(&[
        "attack",
        "blend",
        "--data",
        data(),
        "--arch",
        "small-cnn",
        "--limit",
        "12000",
        "--epochs",
        "3",
        "--json",
        "--out",
        blend_out.to_str().unwrap(),
        "--poisoned-data",
        dir.path().join("blend.npz").to_str().unwrap(),
    ])
    .expect_code(0)
    .json();
    let (acc_blend, asr_blend) = (
        blend["metrics"]["clean_accuracy"].as_f64().unwrap(),
        blend["metrics"]["attack_success_rate"].as_f64().unwrap(),
    );
    eprintln!("blend: ACC {acc_blend:.4} ASR {asr_blend:.4}");
    assert!(asr_blend >= 0.90, "Blend ASR {asr_blend}");
    assert!(
        (acc_blend - acc_clean).abs() <= 0.03,
        "Blend ACC {acc_blend} vs clean {acc_clean}"
    );

    // eval on the file gives the same numbers as attack reported.
    let model = dir.path().join("badnets.onnx");
    let e = audit(&[
        "eval",
        model.to_str().unwrap(),
        "--data",
        data(),
        "--attack",
        "badnets",
        "--json",
    ])
    .expect_code(0)
    .json();
    assert_eq!(e["metrics"]["clean_accuracy"], bad["metrics"]["clean_accuracy"]);
    assert_eq!(
        e["metrics"]["attack_success_rate"],
        bad["metrics"]["attack_success_rate"]
    );
    assert_eq!(e["runtime"], "onnxruntime");
    assert_eq!(e["model"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(e["metrics"]["per_class_accuracy"].as_array().unwrap().len(), 10);

    // NONE with its default repair.
    let hardened = dir.path().join("badnets.hardened.onnx");
    let npz = dir.path().join("badnets.npz");
    let report = dir.path().join("report.md");
    let h = audit(&[
        "harden",
        model.to_str().unwrap(),
        "--data",
        npz.to_str().unwrap(),
        "--eval-attack",
        "badnets",
        "--param",
        "E2=3",
        "--json",
        "--report",
        report.to_str().unwrap(),
    ])
    .expect_code(0)
    .json();
    assert_eq!(
        h["output"],
        hardened.to_str().unwrap(),
        "default output beside the input"
    );
    assert_eq!(h["defense"], "none");
    let (acc_after, asr_after) = acc_asr(&h["after"]);
    eprintln!(
        "hardened: ACC {acc_after:.4} ASR {asr_after:.4}; report {:#}",
        h["defense_report"]["dropped_vs_poison_idx"]
    );
    assert!(asr_after <= 0.05, "ASR after NONE {asr_after}");
    assert!(acc_after >= acc_bad - 0.02, "ACC after {acc_after} vs before {acc_bad}");
    let pr = &h["defense_report"]["dropped_vs_poison_idx"];
    assert!(pr["recall"].as_f64().unwrap() >= 0.9, "{pr}");
    let round = &h["defense_report"]["rounds"][0];
    assert!(round["suspects_vs_poison_idx"]["recall"].as_f64().is_some(), "{round}");
    assert!(round.get("suspects").is_none(), "raw suspect lists are summarised");
    let md = std::fs::read_to_string(&report).unwrap();
    assert!(md.contains("| undefended |") && md.contains("| none |"), "{md}");
    assert!(
        md.contains(
            h["after"]["clean_accuracy"]
                .as_f64()
                .map(|a| format!("{a:.4}"))
                .unwrap()
                .as_str()
        ),
        "{md}"
    );

    // Same graph; never overwrites the input or an existing output without --force.
    let a = audit(&["inspect", hardened.to_str().unwrap(), "--json"]).json();
    let b = audit(&["inspect", model.to_str().unwrap(), "--json"]).json();
    assert_eq!(a["nodes"], b["nodes"]);
    assert_eq!(a["metadata"]["audit.defense"], "none");
    let before = std::fs::read(&hardened).unwrap();
    let r = audit(&["harden", model.to_str().unwrap(), "--data", npz.to_str().unwrap()]).expect_code(2);
    assert!(
        r.stderr.contains("already exists") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&hardened).unwrap(), before);
    let r = audit(&[
        "harden",
        model.to_str().unwrap(),
        "--data",
        npz.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--force",
    ])
    .expect_code(2);
    assert!(r.stderr.contains("refusing to overwrite an input"), "{}", r.stderr);
    let r = audit(&[
        "harden",
        model.to_str().unwrap(),
        "--data",
        npz.to_str().unwrap(),
        "--param",
        "target=1",
        "--eval-attack",
        "badnets",
    ])
    .expect_code(2);
    assert!(
        r.stderr.contains("unknown parameter `target`") && r.stderr.contains("--attack-param"),
        "{}",
        r.stderr
    );

    // NONE's default on the Blend model: the paper's split misses Blend; the class-wise split
    // (leave-class-out probes, then a trigger detector) finds its poisoned samples.
    let h = audit(&[
        "harden",
        blend_out.to_str().unwrap(),
        "--data",
        dir.path().join("blend.npz").to_str().unwrap(),
        "--eval-attack",
        "blend",
        "--param",
        "E2=3",
        "--json",
    ])
    .expect_code(0)
    .json();
    let (acc_after, asr_after) = acc_asr(&h["after"]);
    let split = &h["defense_report"]["rounds"][0]["class_split"];
    eprintln!(
        "Blend hardened: ACC {acc_blend:.4} -> {acc_after:.4}, ASR {asr_blend:.4} -> {asr_after:.4}; split {split:#}"
    );
    let accepted: Vec<i64> = split
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["accepted"] == true)
        .map(|c| c["class"].as_i64().unwrap())
        .collect();
    assert_eq!(accepted, [0], "the target class, and only it, is detected");
    assert!(asr_after <= 0.05, "Blend ASR after NONE {asr_after}");
    assert!(
        acc_after >= acc_blend - 0.02,
        "ACC after {acc_after} vs before {acc_blend}"
    );
    let pr = &h["defense_report"]["dropped_vs_poison_idx"];
    assert!(pr["recall"].as_f64().unwrap() >= 0.9, "{pr}");
}
