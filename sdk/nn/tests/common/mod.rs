//! Shared helpers of the engine's integration tests: the set-up's Python (torch, onnxruntime).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use audit_nn::tch::Tensor;

/// The venv's Python (scripts/setup creates it).
pub fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.is_file(), "{} missing: run scripts/setup", p.display());
    p
}

/// Runs a Python snippet (or, when `script` is a path, that file) with `args`; returns stdout.
pub fn run_py(script: &str, args: &[&Path]) -> String {
    let mut cmd = Command::new(python());
    if script.ends_with(".py") {
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(script));
    } else {
        cmd.arg("-c").arg(script);
    }
    let out = cmd.args(args).output().expect("python");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// onnxruntime on MODEL with X.npy, compared with REF.npy: prints max|y - ref| / max|ref|.
pub const ORT: &str = r#"
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
y = s.run(None, {s.get_inputs()[0].name: x})[0]
ref = np.load(sys.argv[3])
print(float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)))
"#;

/// max|a - b| / max|b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Writes `model`'s current eval outputs on `x` next to its export and returns onnxruntime's
/// relative difference on the exported bytes.
pub fn ort_parity(dir: &Path, name: &str, bytes: &[u8], x_npy: &Path, ours: &Tensor) -> f64 {
    let model = dir.join(format!("{name}.onnx"));
    std::fs::write(&model, bytes).unwrap();
    let ours_npy = dir.join(format!("{name}.ours.npy"));
    ours.write_npy(&ours_npy).unwrap();
    run_py(ORT, &[&model, x_npy, &ours_npy]).trim().parse().unwrap()
}
