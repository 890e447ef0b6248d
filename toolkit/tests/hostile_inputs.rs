//! Hostile inputs end to end (issue 15): the real binary on models and data built to break it
//! must exit 2 (bad input) or 1 (runtime failure) with a message naming the file, field or op,
//! never panic (101), never read without bound, never write telemetry.

use std::path::{Path, PathBuf};
use std::process::Command;

use audit::data::{write_npz, Images, NpzArray, Pixels};
use audit_nn::prost::Message;
use audit_nn::proto::tensor_proto::{DataLocation, DataType};
use audit_nn::proto::{
    tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", self.stdout, self.stderr))
    }
}

fn audit_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit"));
    cmd.args(args).current_dir(cwd).env_remove("AUDIT_PLUGIN_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn audit");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn audit(cwd: &Path, args: &[&str]) -> Run {
    audit_env(cwd, args, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(if d > 0 {
                                tensor_shape_proto::dimension::Value::DimValue(d)
                            } else {
                                tensor_shape_proto::dimension::Value::DimParam("N".into())
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{}_{output}", op.to_lowercase())),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn floats(name: &str, dims: &[i64], v: Vec<f32>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        data_type: Some(DataType::Float as i32),
        dims: dims.to_vec(),
        float_data: v,
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(audit_nn::proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// x [N,1,4,4] -> Flatten -> Gemm(W [16,10], B [10]) -> y [N,10].
fn gemm_model(w: Vec<f32>, w_rows: i64) -> ModelProto {
    let mut flatten = node("Flatten", &["x"], "f");
    flatten.attribute.push(int_attr("axis", 1));
    graph_model(
        vec![flatten, node("Gemm", &["f", "W", "B"], "y")],
        vec![
            floats("W", &[w_rows, 10], w),
            floats("B", &[10], (0..10).map(|i| i as f32 * 0.01).collect()),
        ],
        vec![value("x", &[0, 1, 4, 4])],
        vec![value("y", &[0, 10])],
    )
}

fn weights() -> Vec<f32> {
    (0..160).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect()
}

fn graph_model(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("hostile-test".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, m: &ModelProto) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

/// An NPZ of `n` 1x4x4 (or `chw`) images in train and test with labels `label(i)`.
fn npz(dir: &Path, name: &str, chw: [usize; 3], n: usize, label: impl Fn(usize) -> i64) -> PathBuf {
    let [c, h, w] = chw;
    let images = Images {
        n,
        c,
        h,
        w,
        pixels: Pixels::U8((0..n * c * h * w).map(|i| (i * 31 % 256) as u8).collect()),
    };
    let labels: Vec<i64> = (0..n).map(label).collect();
    let p = dir.join(name);
    write_npz(
        &p,
        &[
            ("x_train", NpzArray::Images(&images)),
            ("y_train", NpzArray::I64(&labels)),
            ("x_test", NpzArray::Images(&images)),
            ("y_test", NpzArray::I64(&labels)),
        ],
    )
    .unwrap();
    p
}

fn no_source_paths(stderr: &str) {
    assert!(!stderr.contains(".cc:") && !stderr.contains('\u{1b}'), "{stderr}");
}

#[test]
fn finding_3_inspect_parity_survives_huge_dims_bombs_and_missing_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Input dims of 1e5 x 1e5: no seeded batch of that size is built.
    let mut huge = gemm_model(weights(), 16);
    huge.graph.as_mut().unwrap().input = vec![value("x", &[1, 1, 100_000, 100_000])];
    let p = write_model(d, "huge.onnx", &huge);
    let r = audit(d, &["inspect", s(&p), "--parity"]).expect(2);
    assert!(
        r.stderr.contains("more than") && r.stderr.contains("`x`"),
        "{}",
        r.stderr
    );
    // ConstantOfShape asking for 2^60 floats.
    let bomb = graph_model(
        vec![node("ConstantOfShape", &["s"], "c"), node("Add", &["x", "c"], "y")],
        vec![TensorProto {
            name: Some("s".into()),
            data_type: Some(DataType::Int64 as i32),
            dims: vec![4],
            int64_data: vec![1, 1 << 20, 1 << 20, 1 << 20],
            ..Default::default()
        }],
        vec![value("x", &[1, 1, 4, 4])],
        vec![value("y", &[1, 1, 4, 4])],
    );
    let p = write_model(d, "bomb.onnx", &bomb);
    let r = audit(d, &["inspect", s(&p), "--parity", "--json"]).expect(2);
    let err = r.json()["parity"]["error"].as_str().unwrap().to_string();
    assert!(err.contains("ConstantOfShape") && err.contains("refused"), "{err}");
    // No outputs.
    let mut none = gemm_model(weights(), 16);
    none.graph.as_mut().unwrap().output.clear();
    let p = write_model(d, "none.onnx", &none);
    let r = audit(d, &["inspect", s(&p), "--parity"]).expect(2);
    assert!(r.stdout.contains("no output"), "{}", r.stdout);
    assert!(!r.stdout.contains("every op is supported"), "{}", r.stdout);
}

#[test]
fn finding_3_labels_beyond_the_models_outputs_stop_attack_harden_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = write_model(d, "m.onnx", &gemm_model(weights(), 16));
    // Labels up to 19 for a 10-output model.
    let data = npz(d, "d.npz", [1, 4, 4], 40, |i| (i % 20) as i64);
    let out = d.join("o.onnx");
    for args in [
        vec![
            "attack",
            "badnets",
            "--model",
            s(&m),
            "--data",
            s(&data),
            "--out",
            s(&out),
        ],
        vec!["harden", s(&m), "--data", s(&data), "--out", s(&out)],
        vec!["compare", s(&m), "--data", s(&data)],
    ] {
        let r = audit(d, &args).expect(2);
        assert!(
            r.stderr.contains("d.npz") && r.stderr.contains("has 10 outputs") && r.stderr.contains("label 10"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("backtrace"), "{}", r.stderr);
    }
    assert!(!out.exists());
}

/// The Gemm model with every initializer in `weights.bin` beside it.
fn external_model(dir: &Path, w: Vec<f32>) -> PathBuf {
    externalize(dir, gemm_model(w, 16))
}

/// `m` with every float initializer moved to `weights.bin` in `dir`, written as `model.onnx`.
fn externalize(dir: &Path, mut m: ModelProto) -> PathBuf {
    let mut blob = Vec::new();
    for t in &mut m.graph.as_mut().unwrap().initializer {
        if t.data_type() != DataType::Float as i32 {
            continue;
        }
        let raw: Vec<u8> = match t.raw_data.take() {
            Some(r) => r,
            None => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        t.external_data = vec![
            StringStringEntryProto {
                key: Some("location".into()),
                value: Some("weights.bin".into()),
            },
            StringStringEntryProto {
                key: Some("offset".into()),
                value: Some(blob.len().to_string()),
            },
            StringStringEntryProto {
                key: Some("length".into()),
                value: Some(raw.len().to_string()),
            },
        ];
        t.data_location = Some(DataLocation::External as i32);
        t.float_data.clear();
        blob.extend(raw);
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("weights.bin"), blob).unwrap();
    write_model(dir, "model.onnx", &m)
}

fn accuracy(r: &Run) -> f64 {
    r.json()["metrics"]["clean_accuracy"].as_f64().unwrap()
}

#[test]
fn finding_4_external_data_resolves_beside_the_model_not_the_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let models = d.join("models");
    let ext = external_model(&models, weights());
    let plain = write_model(d, "plain.onnx", &gemm_model(weights(), 16));
    let data = npz(d, "d.npz", [1, 4, 4], 60, |i| (i * 7 % 10) as i64);
    // A decoy weights.bin in the working folder, with other weights.
    let cwd = d.join("elsewhere");
    let decoy = external_model(&cwd, weights().iter().map(|v| -v * 3.0).collect());
    let want = accuracy(&audit(d, &["eval", s(&plain), "--data", s(&data), "--json"]).expect(0));
    let decoy_acc = accuracy(&audit(d, &["eval", s(&decoy), "--data", s(&data), "--json"]).expect(0));
    assert_ne!(
        want, decoy_acc,
        "the decoy must measure differently for this test to mean anything"
    );
    for runtime in ["onnxruntime", "tract"] {
        let r = audit(
            &cwd,
            &["eval", s(&ext), "--data", s(&data), "--runtime", runtime, "--json"],
        )
        .expect(0);
        assert_eq!(accuracy(&r), want, "{runtime}: {}", r.stderr);
    }
    // Without its own weights file, the model fails naming it, even with the decoy in the cwd.
    std::fs::remove_file(models.join("weights.bin")).unwrap();
    let r = audit(&cwd, &["eval", s(&ext), "--data", s(&data)]).expect(2);
    assert!(
        r.stderr.contains("weights.bin") && r.stderr.contains("models"),
        "{}",
        r.stderr
    );
}

#[test]
fn finding_15_external_data_models_harden_inspect_and_load_by_bare_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let models = d.join("models");
    let cnn = audit_nn::zoo::build(audit_nn::zoo::Arch::SmallCnn, [1, 8, 8], 10, 1).unwrap();
    externalize(&models, cnn);
    let data = npz(d, "d.npz", [1, 8, 8], 64, |i| (i * 7 % 10) as i64);
    // A bare file name (parent "") resolves in the working folder.
    let r = audit(&models, &["inspect", "model.onnx", "--parity", "--json"]).expect(0);
    assert_eq!(r.json()["parity"]["ok"], true, "{}", r.stdout);
    audit(
        &models,
        &["eval", "model.onnx", "--data", s(&data), "--runtime", "tract"],
    )
    .expect(0);
    let out = d.join("hardened.onnx");
    let r = audit(
        &models,
        &[
            "harden",
            "model.onnx",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--device",
            "cpu",
            "--clean-size",
            "8",
        ],
    );
    let r = r.expect(0);
    assert!(out.is_file(), "{}", r.stderr);
    // The hardened model is self-contained.
    let bytes = std::fs::read(&out).unwrap();
    let proto = ModelProto::decode(&bytes[..]).unwrap();
    assert!(proto
        .graph
        .unwrap()
        .initializer
        .iter()
        .all(|t| t.data_location() != DataLocation::External));
}

#[test]
fn finding_11_class_counts_empty_splits_and_nan_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = write_model(d, "m.onnx", &gemm_model(weights(), 16));
    let npz99 = npz(d, "labels99.npz", [1, 4, 4], 100, |i| i as i64);
    let r = audit(d, &["eval", s(&m), "--data", s(&npz99)]).expect(2);
    assert!(
        r.stderr.contains("label 99") && r.stderr.contains("10 outputs"),
        "{}",
        r.stderr
    );
    // An image folder with 12 classes.
    let folder = d.join("folder");
    for split in ["train", "test"] {
        for k in 0..12 {
            let class = folder.join(split).join(format!("c{k:02}"));
            std::fs::create_dir_all(&class).unwrap();
            image::GrayImage::from_pixel(4, 4, image::Luma([k as u8 * 20]))
                .save(class.join("a.png"))
                .unwrap();
        }
    }
    let r = audit(d, &["eval", s(&m), "--data", s(&folder)]).expect(2);
    assert!(r.stderr.contains("10 outputs"), "{}", r.stderr);
    // An empty test split.
    let data = npz(d, "d.npz", [1, 4, 4], 20, |i| (i % 10) as i64);
    let r = audit(d, &["eval", s(&m), "--data", s(&data), "--limit", "0"]).expect(2);
    assert!(r.stderr.contains("test split is empty"), "{}", r.stderr);
    // NaN weights: no metric.
    let nan = write_model(d, "nan.onnx", &gemm_model(vec![f32::NAN; 160], 16));
    let r = audit(d, &["eval", s(&nan), "--data", s(&data), "--json"]).expect(1);
    assert!(r.stderr.contains("not finite") && r.stdout.is_empty(), "{}", r.stderr);
}

#[test]
fn finding_12_new_ir_versions_load_and_invalid_models_are_diagnosed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = npz(d, "d.npz", [1, 4, 4], 20, |i| (i % 10) as i64);
    let mut ir14 = gemm_model(weights(), 16);
    ir14.ir_version = Some(14);
    let p = write_model(d, "ir14.onnx", &ir14);
    let r = audit(d, &["eval", s(&p), "--data", s(&data), "--runtime", "onnxruntime"]).expect(0);
    assert!(r.stderr.contains("IR version 14"), "{}", r.stderr);

    let mut cases: Vec<(&str, ModelProto, &str)> = Vec::new();
    let mut cycle = gemm_model(weights(), 16);
    cycle.graph.as_mut().unwrap().node[0].input = vec!["y".into()];
    cases.push(("cycle", cycle, "never produced"));
    let mut dangling = gemm_model(weights(), 16);
    dangling.graph.as_mut().unwrap().node[0].input = vec!["z".into()];
    cases.push(("dangling", dangling, "\"z\""));
    let mut unknown = gemm_model(weights(), 16);
    unknown.graph.as_mut().unwrap().node[1].op_type = Some("FooBar".into());
    cases.push(("unknown", unknown, "FooBar"));
    let mut attr = gemm_model(weights(), 16);
    let a = &mut attr.graph.as_mut().unwrap().node[0].attribute[0];
    a.r#type = Some(audit_nn::proto::attribute_proto::AttributeType::String as i32);
    a.i = None;
    a.s = Some(b"one".to_vec());
    cases.push(("attr", attr, "axis"));
    let mut two = gemm_model(weights(), 16);
    two.graph.as_mut().unwrap().input.push(value("x2", &[0, 1, 4, 4]));
    cases.push(("two", two, "2 inputs"));
    cases.push(("shape", gemm_model(weights()[..150].to_vec(), 15), "gemm_y"));
    for (name, m, want) in cases {
        let p = write_model(d, &format!("{name}.onnx"), &m);
        let r = audit(d, &["eval", s(&p), "--data", s(&data)]).expect(2);
        assert!(
            r.stderr.contains(&format!("{name}.onnx")) && r.stderr.contains(want),
            "{name}: {}",
            r.stderr
        );
        no_source_paths(&r.stderr);
    }
}

#[test]
fn finding_14_onnxruntime_writes_no_telemetry_under_home() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let home = d.join("home");
    std::fs::create_dir(&home).unwrap();
    let m = write_model(d, "m.onnx", &gemm_model(weights(), 16));
    let data = npz(d, "d.npz", [1, 4, 4], 20, |i| (i % 10) as i64);
    let r = audit_env(
        d,
        &["eval", s(&m), "--data", s(&data), "--runtime", "onnxruntime", "--json"],
        &[("HOME", s(&home)), ("XDG_CACHE_HOME", s(&home.join(".cache")))],
    )
    .expect(0);
    assert_eq!(r.json()["runtime"], "onnxruntime");
    // onnxruntime's telemetry flushes on a background thread; give it time to show.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let written: Vec<_> = walk(&home);
    assert!(written.is_empty(), "written under $HOME: {written:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn finding_16_endless_and_oversized_inputs_are_refused_with_the_knob() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cap = [("AUDIT_MAX_INPUT_BYTES", "1M")];
    // A device is refused before anything is read (the default limit, no knob needed).
    let r = audit(d, &["inspect", "/dev/zero"]).expect(2);
    assert!(
        r.stderr.contains("/dev/zero") && r.stderr.contains("is a device"),
        "{}",
        r.stderr
    );
    // A model file past the limit is refused from its size, with the knob in the hint.
    let big = d.join("big.onnx");
    std::fs::write(&big, vec![0u8; 2 << 20]).unwrap();
    let r = audit_env(d, &["inspect", s(&big)], &cap).expect(2);
    assert!(
        r.stderr.contains("big.onnx")
            && r.stderr.contains("2097152 bytes")
            && r.stderr.contains("AUDIT_MAX_INPUT_BYTES"),
        "{}",
        r.stderr
    );
    // An NPZ whose arrays inflate past the limit.
    let m = write_model(d, "m.onnx", &gemm_model(weights(), 16));
    let data = npz(d, "big.npz", [1, 4, 4], 40_000, |i| (i % 10) as i64);
    let r = audit_env(d, &["eval", s(&m), "--data", s(&data)], &cap).expect(2);
    assert!(
        r.stderr.contains("big.npz") && r.stderr.contains("AUDIT_MAX_INPUT_BYTES"),
        "{}",
        r.stderr
    );
    audit_env(
        d,
        &["eval", s(&m), "--data", s(&data)],
        &[("AUDIT_MAX_INPUT_BYTES", "64M")],
    )
    .expect(0);
}

#[test]
fn finding_low_inspect_exit_codes_follow_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut unknown = gemm_model(weights(), 16);
    unknown.graph.as_mut().unwrap().node[1].op_type = Some("FooBar".into());
    let p = write_model(d, "unknown.onnx", &unknown);
    let r = audit(d, &["inspect", s(&p)]).expect(2);
    assert!(
        r.stdout.contains("FooBar") && !r.stdout.contains("every op is supported"),
        "{}",
        r.stdout
    );
    // Parity that cannot run (no onnxruntime) is a failure, not a pass.
    let m = write_model(d, "m.onnx", &gemm_model(weights(), 16));
    let r = audit_env(
        d,
        &["inspect", s(&m), "--parity"],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    )
    .expect(1);
    assert!(r.stdout.contains("parity:"), "{}", r.stdout);
    audit(d, &["inspect", s(&m), "--parity"]).expect(0);
}

#[test]
fn preprocessing_std_must_be_positive_for_the_host_and_the_plugins() {
    // One parser (audit_nn::train::Preprocess::parse) for --mean/--std, the host's metadata and
    // the defenses' metadata: a std of 0 would divide every pixel by zero.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain = write_model(d, "plain.onnx", &gemm_model(weights(), 16));
    let mut m = gemm_model(weights(), 16);
    m.metadata_props.push(StringStringEntryProto {
        key: Some("audit.std".into()),
        value: Some("0".into()),
    });
    let zero_std = write_model(d, "m.onnx", &m);
    let data = npz(d, "d.npz", [1, 4, 4], 40, |i| (i % 10) as i64);
    let r = audit(d, &["eval", s(&plain), "--data", s(&data), "--std", "0"]).expect(2);
    assert!(r.stderr.contains("every std must be > 0"), "{}", r.stderr);
    let r = audit(d, &["eval", s(&plain), "--data", s(&data), "--mean", "0.5,x"]).expect(2);
    assert!(r.stderr.contains("audit.mean=`0.5,x`"), "{}", r.stderr);
    let r = audit(d, &["eval", s(&zero_std), "--data", s(&data)]).expect(2);
    assert!(r.stderr.contains("audit.std=`0`"), "{}", r.stderr);
    // `plugins run` lends the model as it is: the defense itself refuses the metadata.
    let r = audit(
        d,
        &[
            "plugins",
            "run",
            "none",
            "--op",
            "defend",
            "--model",
            s(&zero_std),
            "--data",
            s(&data),
        ],
    )
    .expect(2);
    assert!(r.stderr.contains("every std must be > 0"), "{}", r.stderr);
}
