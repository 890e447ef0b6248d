//! ONNX backend conformance: runs the model test cases shipped in the `onnx` wheel of the
//! project's virtual environment (`onnx/backend/test/data/{simple,pytorch-converted,
//! pytorch-operator,light}`) through `Model::load_file` + `forward_with_taps` (eval mode) and
//! compares every output with the reference.
//!
//! The test fails when a case of [`ALLOWLIST`] fails; it prints pass/total per folder over all cases
//! (with the reason of each failure) and writes the same to `target/conformance.json`.
//!
//! Extra case folders in the same layout can be added with `AUDIT_NN_CONFORMANCE_EXTRA=dir1:dir2`;
//! they are reported (under the folder's name), never required. Generators beside this file:
//! `gen_node_data.py` (the wheel's ~1900 single-op node tests, ONNX reference outputs),
//! `gen_ort_cases.py` (older opsets and exporter attribute combinations, onnxruntime outputs),
//! `gen_torch_exports.py` (torchvision classifiers exported by torch.onnx, onnxruntime outputs).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use audit_nn::proto::TensorProto;
use audit_nn::tensor::tensor_from_proto;
use audit_nn::{Mode, Model};
use prost::Message;
use tch::{Kind, Tensor};

/// The one tolerance: |got - want| <= ATOL * scale + RTOL * |want|, where scale is the largest
/// magnitude of the expected output (at least 1). Integer and boolean outputs must match exactly.
const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-4;

/// The wheel's folders that are walked, in report order.
const FOLDERS: &[&str] = &["simple", "pytorch-converted", "pytorch-operator", "light"];

/// Cases we claim to support, per folder: each must pass.
const ALLOWLIST: &[(&str, &[&str])] = &[
    (
        "simple",
        &[
            "test_expand_shape_model1",
            "test_expand_shape_model2",
            "test_expand_shape_model3",
            "test_expand_shape_model4",
            "test_shrink",
            "test_sign_model",
            "test_single_relu_model",
        ],
    ),
    (
        "pytorch-converted",
        &[
            "test_AvgPool1d",
            "test_AvgPool1d_stride",
            "test_AvgPool2d",
            "test_AvgPool2d_stride",
            "test_AvgPool3d",
            "test_AvgPool3d_stride",
            "test_AvgPool3d_stride1_pad0_gpu_input",
            "test_BatchNorm1d_3d_input_eval",
            "test_BatchNorm2d_eval",
            "test_BatchNorm2d_momentum_eval",
            "test_BatchNorm3d_eval",
            "test_BatchNorm3d_momentum_eval",
            "test_ConstantPad2d",
            "test_Conv1d",
            "test_Conv1d_dilated",
            "test_Conv1d_groups",
            "test_Conv1d_pad1",
            "test_Conv1d_pad1size1",
            "test_Conv1d_pad2",
            "test_Conv1d_pad2size1",
            "test_Conv1d_stride",
            "test_Conv2d",
            "test_Conv2d_depthwise",
            "test_Conv2d_depthwise_padded",
            "test_Conv2d_depthwise_strided",
            "test_Conv2d_depthwise_with_multiplier",
            "test_Conv2d_dilated",
            "test_Conv2d_groups",
            "test_Conv2d_groups_thnn",
            "test_Conv2d_no_bias",
            "test_Conv2d_padding",
            "test_Conv2d_strided",
            "test_Conv3d",
            "test_Conv3d_dilated",
            "test_Conv3d_dilated_strided",
            "test_Conv3d_groups",
            "test_Conv3d_no_bias",
            "test_Conv3d_stride",
            "test_Conv3d_stride_padding",
            "test_ConvTranspose2d",
            "test_ConvTranspose2d_no_bias",
            "test_ELU",
            "test_Embedding",
            "test_Embedding_sparse",
            "test_GLU",
            "test_GLU_dim",
            "test_LeakyReLU",
            "test_LeakyReLU_with_negval",
            "test_Linear",
            "test_Linear_no_bias",
            "test_LogSoftmax",
            "test_MaxPool1d",
            "test_MaxPool1d_stride",
            "test_MaxPool1d_stride_padding_dilation",
            "test_MaxPool2d",
            "test_MaxPool2d_stride_padding_dilation",
            "test_MaxPool3d",
            "test_MaxPool3d_stride",
            "test_MaxPool3d_stride_padding",
            "test_PReLU_1d",
            "test_PReLU_1d_multiparam",
            "test_PReLU_2d",
            "test_PReLU_2d_multiparam",
            "test_PReLU_3d",
            "test_PReLU_3d_multiparam",
            "test_PixelShuffle",
            "test_PoissonNLLLLoss_no_reduce",
            "test_ReLU",
            "test_ReflectionPad2d",
            "test_ReplicationPad2d",
            "test_SELU",
            "test_Sigmoid",
            "test_Softmax",
            "test_Softmin",
            "test_Softplus",
            "test_Softsign",
            "test_Tanh",
            "test_ZeroPad2d",
            "test_log_softmax_dim3",
            "test_log_softmax_lastdim",
            "test_softmax_functional_dim3",
            "test_softmax_lastdim",
        ],
    ),
    (
        "pytorch-operator",
        &[
            "test_operator_add_broadcast",
            "test_operator_add_size1_broadcast",
            "test_operator_add_size1_right_broadcast",
            "test_operator_add_size1_singleton_broadcast",
            "test_operator_addconstant",
            "test_operator_addmm",
            "test_operator_basic",
            "test_operator_chunk",
            "test_operator_clip",
            "test_operator_concat2",
            "test_operator_conv",
            "test_operator_convtranspose",
            "test_operator_exp",
            "test_operator_flatten",
            "test_operator_index",
            "test_operator_max",
            "test_operator_maxpool",
            "test_operator_min",
            "test_operator_mm",
            "test_operator_non_float_params",
            "test_operator_pad",
            "test_operator_params",
            "test_operator_permute2",
            "test_operator_pow",
            "test_operator_reduced_mean",
            "test_operator_reduced_mean_keepdim",
            "test_operator_reduced_sum",
            "test_operator_reduced_sum_keepdim",
            "test_operator_repeat",
            "test_operator_repeat_dim_overflow",
            "test_operator_selu",
            "test_operator_sqrt",
            "test_operator_symbolic_override",
            "test_operator_symbolic_override_nested",
            "test_operator_view",
        ],
    ),
    (
        "light",
        &[
            "light_bvlc_alexnet",
            "light_densenet121",
            "light_inception_v1",
            "light_inception_v2",
            "light_resnet50",
            "light_shufflenet",
            "light_squeezenet",
            "light_vgg19",
            "light_zfnet512",
        ],
    ),
];

/// Each case's result, by case name.
type Outcomes = BTreeMap<String, Result<(), String>>;

/// One case: a model and its data sets of (inputs, expected outputs) files. An empty input list
/// for `light` cases means "generate", as the ONNX runner does.
struct Case {
    name: String,
    model: PathBuf,
    data: Vec<(Vec<PathBuf>, Vec<PathBuf>)>,
    generate_inputs: bool,
}

fn wheel_data_dir() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root above sdk/nn")
        .join(".venv");
    let lib = venv.join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/onnx/backend/test/data"))
            .find(|p| p.is_dir())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the ONNX backend test data was not found under {}/python3.*/site-packages/onnx/backend/test/data; \
             create the project's virtual environment (.venv with the `onnx` wheel) first",
            lib.display()
        )
    })
}

/// Numbered files `prefix_<i>.pb` of a folder, in order.
fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let i = name.strip_prefix(prefix)?.strip_suffix(".pb")?.parse().ok()?;
                    Some((i, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Cases of a folder laid out as `<case>/model.onnx` + `<case>/test_data_set_*/`.
fn model_dir_cases(dir: &Path) -> Vec<Case> {
    sorted_entries(dir)
        .into_iter()
        .filter(|p| p.join("model.onnx").is_file())
        .map(|p| {
            let data = sorted_entries(&p)
                .into_iter()
                .filter(|d| {
                    d.is_dir()
                        && d.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_"))
                })
                .map(|d| (numbered(&d, "input_"), numbered(&d, "output_")))
                .collect();
            Case {
                name: p.file_name().unwrap().to_string_lossy().into_owned(),
                model: p.join("model.onnx"),
                data,
                generate_inputs: false,
            }
        })
        .collect()
}

/// The `light` folder: `light_X.onnx` + `light_X_output_<i>.pb`; inputs are generated.
fn light_cases(dir: &Path) -> Vec<Case> {
    sorted_entries(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let outputs = numbered(dir, &format!("{stem}_output_"));
            Case {
                name: stem,
                model: p.clone(),
                data: vec![(vec![], outputs)],
                generate_inputs: true,
            }
        })
        .collect()
}

fn read_tensor(path: &Path) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let proto =
        TensorProto::decode(bytes.as_slice()).map_err(|e| format!("{}: not a TensorProto: {e}", path.display()))?;
    tensor_from_proto(&proto, path.parent()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The ONNX runner's dummy input for `light` models: arange(n) / n in the input's shape (unknown
/// dims as 1), float only.
fn dummy_input(model: &Model, i: usize) -> Result<Tensor, String> {
    let info = &model.inputs[i];
    if info.elem_type != 1 {
        return Err(format!("input `{}` is not float; cannot generate it", info.name));
    }
    let shape: Vec<i64> = info.dims.iter().map(|d| d.unwrap_or(1)).collect();
    let n: i64 = shape.iter().product();
    Ok((Tensor::arange(n, (Kind::Double, tch::Device::Cpu)) / n as f64)
        .to_kind(Kind::Float)
        .reshape(&shape[..]))
}

/// Compares one output; `Err` says how it differs.
fn compare(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.size() != want.size() {
        return Err(format!("shape {:?}, expected {:?}", got.size(), want.size()));
    }
    if got.kind() != want.kind() {
        return Err(format!("element type {:?}, expected {:?}", got.kind(), want.kind()));
    }
    let g = got.to_device(tch::Device::Cpu).to_kind(Kind::Double).flatten(0, -1);
    let w = want.to_kind(Kind::Double).flatten(0, -1);
    let (g, w) = (
        Vec::<f64>::try_from(&g).map_err(|e| e.to_string())?,
        Vec::<f64>::try_from(&w).map_err(|e| e.to_string())?,
    );
    let exact = !matches!(want.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
    let scale = w.iter().filter(|v| v.is_finite()).fold(1.0f64, |m, v| m.max(v.abs()));
    let mut worst: Option<(usize, f64)> = None;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = if exact {
            a == b
        } else if b.is_nan() {
            a.is_nan()
        } else if b.is_infinite() {
            a == b
        } else {
            (a - b).abs() <= ATOL * scale + RTOL * b.abs()
        };
        if !ok {
            let d = if a.is_finite() { (a - b).abs() } else { f64::INFINITY };
            if worst.is_none_or(|(_, m)| d > m) {
                worst = Some((i, d));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, d)) => Err(format!(
            "value {} at flat index {i} vs expected {} (|diff| {d:.3e}, scale {scale:.3e})",
            g[i], w[i]
        )),
    }
}

fn run_case(case: &Case) -> Result<(), String> {
    let model = Model::load_file(&case.model).map_err(|e| format!("load: {e}"))?;
    if case.data.is_empty() {
        return Err("no test data".into());
    }
    for (k, (ins, outs)) in case.data.iter().enumerate() {
        let inputs: Vec<Tensor> = if case.generate_inputs {
            (0..model.inputs.len())
                .map(|i| dummy_input(&model, i))
                .collect::<Result<_, _>>()?
        } else {
            ins.iter().map(|p| read_tensor(p)).collect::<Result<_, _>>()?
        };
        let wants: Vec<Tensor> = outs.iter().map(|p| read_tensor(p)).collect::<Result<_, _>>()?;
        if wants.is_empty() {
            return Err(format!("data set {k}: no expected outputs"));
        }
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let (gots, _) =
            tch::no_grad(|| model.forward_with_taps(&refs, Mode::Eval, &[])).map_err(|e| format!("run: {e}"))?;
        if gots.len() != wants.len() {
            return Err(format!(
                "data set {k}: {} outputs, expected {}",
                gots.len(),
                wants.len()
            ));
        }
        for (j, (g, w)) in gots.iter().zip(&wants).enumerate() {
            compare(g, w).map_err(|e| format!("data set {k}, output {j}: {e}"))?;
        }
    }
    Ok(())
}

/// Runs a case, turning a panic into a failure.
fn run_guarded(case: &Case) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| run_case(case))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("panic: {}", msg.unwrap_or_default()))
        }
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn onnx_backend_conformance() {
    let data = wheel_data_dir();
    let mut folders: Vec<(String, Vec<Case>)> = FOLDERS
        .iter()
        .map(|&f| {
            let dir = data.join(f);
            assert!(dir.is_dir(), "missing ONNX test folder {}", dir.display());
            (
                f.to_string(),
                if f == "light" {
                    light_cases(&dir)
                } else {
                    model_dir_cases(&dir)
                },
            )
        })
        .collect();
    if let Ok(extra) = std::env::var("AUDIT_NN_CONFORMANCE_EXTRA") {
        for dir in extra.split(':').filter(|s| !s.is_empty()) {
            let p = PathBuf::from(dir);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.to_string());
            folders.push((name, model_dir_cases(&p)));
        }
    }

    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut results: Vec<(String, Outcomes)> = Vec::new();
    for (folder, cases) in &folders {
        let mut r = BTreeMap::new();
        for case in cases {
            r.insert(case.name.clone(), run_guarded(case));
        }
        results.push((folder.clone(), r));
    }
    std::panic::set_hook(quiet);

    // Report.
    let mut json = String::from("{\n  \"tolerance\": {\"rtol\": ");
    json.push_str(&format!("{RTOL:e}, \"atol\": {ATOL:e}}},\n  \"folders\": {{\n"));
    let mut allowlisted_failures = Vec::new();
    for (fi, (folder, r)) in results.iter().enumerate() {
        let passed = r.values().filter(|v| v.is_ok()).count();
        println!("conformance {folder}: {passed}/{} passed", r.len());
        for (name, res) in r {
            if let Err(e) = res {
                println!("  FAIL {name}: {e}");
            }
        }
        let allow: &[&str] = ALLOWLIST
            .iter()
            .find(|(f, _)| f == folder)
            .map(|(_, l)| *l)
            .unwrap_or(&[]);
        for name in allow {
            match r.get(*name) {
                None => allowlisted_failures.push(format!("{folder}/{name}: allowlisted but not found")),
                Some(Err(e)) => allowlisted_failures.push(format!("{folder}/{name}: {e}")),
                Some(Ok(())) => {}
            }
        }
        json.push_str(&format!(
            "    {}: {{\"passed\": {passed}, \"total\": {}, \"allowlisted\": {}, \"failures\": {{",
            json_str(folder),
            r.len(),
            allow.len()
        ));
        let fails: Vec<String> = r
            .iter()
            .filter_map(|(n, res)| {
                res.as_ref()
                    .err()
                    .map(|e| format!("\n      {}: {}", json_str(n), json_str(e)))
            })
            .collect();
        json.push_str(&fails.join(","));
        json.push_str(if fails.is_empty() { "}}" } else { "\n    }}" });
        json.push_str(if fi + 1 < results.len() { ",\n" } else { "\n" });
    }
    json.push_str("  }\n}\n");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root above sdk/nn");
    let out = root.join("target/conformance.json");
    if let Err(e) = std::fs::create_dir_all(out.parent().unwrap()).and_then(|_| std::fs::write(&out, &json)) {
        println!("could not write {}: {e}", out.display());
    } else {
        println!("wrote {}", out.display());
    }
    assert!(
        allowlisted_failures.is_empty(),
        "allowlisted cases failed:\n{}",
        allowlisted_failures.join("\n")
    );
}
