//! The model zoo: every architecture builds at Fashion-MNIST (1x28x28) and CIFAR (3x32x32) sizes,
//! loads in the engine, runs, has the parameter count of its PyTorch reference, is deterministic
//! for a seed, and agrees with onnxruntime (run through the venv's Python) to 1e-4 relative.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use audit_nn::proto::ModelProto;
use audit_nn::zoo::{self, Arch};
use audit_nn::{Mode, Model, ParamRole};
use tch::{Kind, Tensor};

const SIZES: [[i64; 3]; 2] = [[1, 28, 28], [3, 32, 32]];
const CLASSES: i64 = 10;

/// Trainable parameters of the PyTorch reference implementations with 10 classes, at 1x28x28 and
/// 3x32x32 (`sum(p.numel() for p in model.parameters())`; ResNet-18 and PreAct-ResNet-18 are
/// kuangliu's / BackdoorBench's CIFAR models, VGG is kuangliu's CIFAR VGG with BN).
fn expected_params(arch: Arch) -> [i64; 2] {
    match arch {
        Arch::SmallCnn => [421_834, 545_290],
        Arch::Nin => [960_202, 969_802],
        Arch::Vgg11 => [9_229_962, 9_231_114],
        Arch::Vgg16 => [14_727_114, 14_728_266],
        Arch::Resnet18 => [11_172_810, 11_173_962],
        Arch::PreactResnet18 => [11_169_994, 11_171_146],
    }
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.is_file(), "{} missing: run scripts/setup", p.display());
    p
}

fn parity_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/python/ort_parity.py")
}

/// A seeded batch in [0, 1) (an LCG, so no global torch RNG state is touched).
fn batch(shape: &[i64], seed: u64) -> (Vec<f32>, Tensor) {
    let n: i64 = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let t = Tensor::from_slice(&data).reshape(shape);
    (data, t)
}

/// Writes a float32 C-order .npy file.
fn write_npy(path: &Path, shape: &[i64], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    f.write_all(&bytes).unwrap();
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

/// Structure every zoo model must have.
fn check_structure(arch: Arch, input: [i64; 3], m: &ModelProto) {
    let tag = format!("{arch} {input:?}");
    assert_eq!(m.ir_version, Some(8), "{tag}");
    assert_eq!(audit_nn::model::default_opset(m), 17, "{tag}");
    assert_eq!(m.producer_name(), "audit", "{tag}");
    let g = m.graph.as_ref().unwrap();
    let allowed = [
        "Conv",
        "BatchNormalization",
        "Gemm",
        "MaxPool",
        "GlobalAveragePool",
        "Relu",
        "Flatten",
        "Add",
    ];
    let mut names = HashSet::new();
    for n in &g.node {
        assert!(allowed.contains(&n.op_type()), "{tag}: op {}", n.op_type());
        assert!(
            !n.name().is_empty() && names.insert(n.name().to_string()),
            "{tag}: node name `{}`",
            n.name()
        );
    }
    assert!(
        g.node.iter().any(|n| n.op_type() == "BatchNormalization"),
        "{tag}: BN must be kept"
    );
    for t in &g.initializer {
        assert!(
            t.raw_data.is_some() && t.float_data.is_empty(),
            "{tag}: {} is not raw data",
            t.name()
        );
        assert_eq!(t.data_type(), 1, "{tag}: {} is not float", t.name());
    }
    assert_eq!(g.input.len(), 1);
    assert_eq!(g.input[0].name(), "input");
    assert_eq!(g.output.len(), 1);
    assert_eq!(g.output[0].name(), "logits");
}

#[test]
fn every_arch_builds_loads_runs_and_matches_onnxruntime() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let mut summary = Vec::new();
    for arch in Arch::ALL {
        for (s, input) in SIZES.into_iter().enumerate() {
            let tag = format!("{arch} {}x{}x{}", input[0], input[1], input[2]);
            let t0 = std::time::Instant::now();
            let proto = zoo::build(arch, input, CLASSES, 42).unwrap_or_else(|e| panic!("{tag}: {e}"));
            check_structure(arch, input, &proto);
            let count = zoo::param_count(&proto);
            assert_eq!(count, expected_params(arch)[s], "{tag}: parameter count");
            let bytes = zoo::to_bytes(&proto);
            let model = Model::load(&bytes, None).unwrap_or_else(|e| panic!("{tag}: load: {e}"));
            assert_eq!(
                model.parameter_count(),
                count,
                "{tag}: the engine sees other trainable parameters"
            );
            assert_eq!(
                model.inputs[0].dims,
                vec![None, Some(input[0]), Some(input[1]), Some(input[2])],
                "{tag}"
            );
            let stats = model.params.iter().filter(|p| p.role == ParamRole::BnStat).count();
            assert!(stats > 0 && stats % 2 == 0, "{tag}: {stats} BN statistics");

            let shape = [2, input[0], input[1], input[2]];
            let (data, x) = batch(&shape, 7 + s as u64);
            let y = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap_or_else(|e| panic!("{tag}: forward: {e}"));
            assert_eq!(y.size(), vec![2, CLASSES], "{tag}");
            let out = to_vec(&y);
            assert!(out.iter().all(|v| v.is_finite()), "{tag}: {out:?}");
            assert!(out.iter().any(|&v| v != out[0]), "{tag}: constant logits {out:?}");

            let stem = format!("{arch}_{}x{}x{}", input[0], input[1], input[2]);
            std::fs::write(dir.path().join(format!("{stem}.onnx")), &bytes).unwrap();
            write_npy(&dir.path().join(format!("{stem}.input.npy")), &shape, &data);
            write_npy(&dir.path().join(format!("{stem}.engine.npy")), &[2, CLASSES], &out);

            if s == 1 {
                // BN statistics away from 0/1: a train-mode pass updates them; the engine's export
                // must then still agree with onnxruntime in eval mode.
                let (_, xb) = batch(&[8, input[0], input[1], input[2]], 11);
                let _ = tch::no_grad(|| model.forward(&xb, Mode::Train))
                    .unwrap_or_else(|e| panic!("{tag}: train forward: {e}"));
                let exported = model.export(&[]).unwrap_or_else(|e| panic!("{tag}: export: {e}"));
                let y = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap();
                let trained = to_vec(&y);
                assert_ne!(
                    out, trained,
                    "{tag}: the train-mode pass left the BN statistics unchanged"
                );
                let stem = format!("{stem}_bnstats");
                std::fs::write(dir.path().join(format!("{stem}.onnx")), &exported).unwrap();
                write_npy(&dir.path().join(format!("{stem}.input.npy")), &shape, &data);
                write_npy(&dir.path().join(format!("{stem}.engine.npy")), &[2, CLASSES], &trained);
            }
            summary.push(format!(
                "{tag}: {count} params, {} bytes, {:.2?}",
                bytes.len(),
                t0.elapsed()
            ));
        }
    }
    eprintln!("{}", summary.join("\n"));

    let out = Command::new(python())
        .arg(parity_script())
        .arg(dir.path())
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "onnxruntime parity failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both sizes, plus the 3x32x32 models exported after a train-mode pass.
    let expected = Arch::ALL.len() * (SIZES.len() + 1);
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\"ok\": true")).count(),
        expected,
        "{stdout}"
    );
}

#[test]
fn deterministic_for_a_seed_and_different_across_seeds() {
    for arch in Arch::ALL {
        let a = zoo::to_bytes(&zoo::build(arch, [3, 32, 32], CLASSES, 1).unwrap());
        let b = zoo::to_bytes(&zoo::build(arch, [3, 32, 32], CLASSES, 1).unwrap());
        assert!(a == b, "{arch}: same seed, different bytes");
        let c = zoo::build(arch, [3, 32, 32], CLASSES, 2).unwrap();
        let a = zoo::build(arch, [3, 32, 32], CLASSES, 1).unwrap();
        let (ga, gc) = (a.graph.as_ref().unwrap(), c.graph.as_ref().unwrap());
        assert_eq!(ga.node, gc.node, "{arch}: the seed must not change the graph");
        for (ta, tc) in ga.initializer.iter().zip(&gc.initializer) {
            assert_eq!((ta.name(), &ta.dims), (tc.name(), &tc.dims));
            let is_stat_or_bn = ta
                .raw_data
                .as_ref()
                .unwrap()
                .chunks(4)
                .all(|c| c == 0f32.to_le_bytes() || c == 1f32.to_le_bytes());
            if is_stat_or_bn {
                assert_eq!(
                    ta.raw_data,
                    tc.raw_data,
                    "{arch}: {} (a BN constant) depends on the seed",
                    ta.name()
                );
            } else {
                assert_ne!(
                    ta.raw_data,
                    tc.raw_data,
                    "{arch}: {} does not depend on the seed",
                    ta.name()
                );
            }
        }
    }
}

#[test]
fn initialisation_follows_pytorch_defaults() {
    let m = zoo::build(Arch::Resnet18, [3, 32, 32], CLASSES, 3).unwrap();
    let g = m.graph.as_ref().unwrap();
    let get = |name: &str| {
        let t = g
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("no initializer {name}"));
        let v: Vec<f32> = t
            .raw_data
            .as_ref()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.dims.clone(), v)
    };
    // kaiming_uniform(a = sqrt(5)) on fan_in = 64 * 3 * 3: uniform in +-1/24, std 1/(24 sqrt 3).
    let (dims, w) = get("layer1.0.conv1.weight");
    assert_eq!(dims, vec![64, 64, 3, 3]);
    let bound = 1.0 / (64.0f32 * 9.0).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound), "outside +-{bound}");
    let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max > 0.99 * bound, "max {max}, bound {bound}");
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let std = (w.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / w.len() as f32).sqrt();
    assert!(
        mean.abs() < 1e-3 && (std - bound / 3f32.sqrt()).abs() < 1e-3 * bound * 10.0,
        "mean {mean} std {std}"
    );
    let (dims, w) = get("fc.weight");
    assert_eq!(dims, vec![10, 512]);
    assert!(w.iter().all(|v| v.abs() <= 1.0 / 512f32.sqrt()));
    let (_, b) = get("fc.bias");
    assert!(b.iter().all(|v| v.abs() <= 1.0 / 512f32.sqrt()) && b.iter().any(|&v| v != 0.0));
    for (name, value) in [
        ("layer1.0.bn1.weight", 1.0),
        ("layer1.0.bn1.bias", 0.0),
        ("layer1.0.bn1.running_mean", 0.0),
        ("layer1.0.bn1.running_var", 1.0),
    ] {
        let (dims, v) = get(name);
        assert_eq!(dims, vec![64]);
        assert!(v.iter().all(|&x| x == value), "{name}");
    }
    let bn = g.node.iter().find(|n| n.op_type() == "BatchNormalization").unwrap();
    let attr = |k: &str| bn.attribute.iter().find(|a| a.name() == k).map(|a| a.f()).unwrap();
    assert_eq!((attr("epsilon"), attr("momentum")), (1e-5, 0.9));
    // The projection shortcut exists exactly where the stride or width changes.
    let downsample: Vec<&str> = g
        .node
        .iter()
        .filter(|n| n.name().ends_with("downsample.0"))
        .map(|n| n.name())
        .collect();
    assert_eq!(
        downsample,
        [
            "layer2.0.downsample.0",
            "layer3.0.downsample.0",
            "layer4.0.downsample.0"
        ]
    );
}

#[test]
fn every_arch_adapts_to_odd_and_tiny_inputs() {
    tch::set_num_threads(2);
    for arch in Arch::ALL {
        for input in [[1, 1, 1], [2, 7, 5], [3, 64, 48]] {
            if input[1] > 32 && matches!(arch, Arch::Vgg16 | Arch::Resnet18 | Arch::PreactResnet18) {
                continue; // covered by the smaller shapes; keeps the test fast
            }
            let proto = zoo::build(arch, input, 3, 0).unwrap();
            let model = Model::load(&zoo::to_bytes(&proto), None).unwrap_or_else(|e| panic!("{arch} {input:?}: {e}"));
            let (_, x) = batch(&[2, input[0], input[1], input[2]], 1);
            let y = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap_or_else(|e| panic!("{arch} {input:?}: {e}"));
            assert_eq!(y.size(), vec![2, 3], "{arch} {input:?}");
            assert!(to_vec(&y).iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn bad_requests_are_errors() {
    assert!(zoo::build(Arch::Nin, [0, 28, 28], 10, 0)
        .unwrap_err()
        .contains("at least 1"));
    assert!(zoo::build(Arch::Nin, [1, 28, 28], 0, 0)
        .unwrap_err()
        .contains("classes"));
    assert!(zoo::build(Arch::Vgg11, [1, 28, 1 << 20], 10, 0).is_err());
    // 64 x 1024 x 1024 features into a 128-unit Gemm: 32 GiB of weights, refused before allocating.
    let e = zoo::build(Arch::SmallCnn, [1, 4096, 4096], 10, 0).unwrap_err();
    assert!(e.contains("GiB"), "{e}");
    let e = "densenet".parse::<Arch>().unwrap_err();
    assert!(e.contains("preact-resnet18"), "{e}");
    for name in ["small-cnn", "nin", "vgg11", "vgg16", "resnet18", "preact-resnet18"] {
        assert_eq!(name.parse::<Arch>().unwrap().to_string(), name);
    }
}

/// The layer that produces the logits is never a neuron layer: a NiN's last conv (its class maps,
/// then a global pooling) as much as a CNN's last Gemm. The output layer's input is the
/// penultimate features.
#[test]
fn the_logits_layer_is_marked_output_for_every_arch() {
    for arch in [Arch::SmallCnn, Arch::Nin, Arch::Resnet18] {
        let model = Model::from_proto(zoo::build(arch, [1, 28, 28], CLASSES, 0).unwrap(), None).unwrap();
        let layers = model.layers();
        let outputs: Vec<_> = layers.iter().filter(|l| l.is_output).collect();
        assert_eq!(outputs.len(), 1, "{arch}: {outputs:?}");
        let last = layers.last().unwrap();
        assert!(
            last.is_output,
            "{arch}: the last layer {} is the logits layer",
            last.node
        );
        assert_eq!(last.channels, CLASSES, "{arch}");
        if arch == Arch::Nin {
            assert_eq!(last.op_type, "Conv", "NiN ends with its class-map conv");
        }
        assert!(last.input.is_some(), "{arch}");
    }
}

/// A reset inside a residual block follows the channel through the block's Add into the next
/// block's first conv (NONE's reference zeroes that input slice too), and stops at the next Add,
/// where the following skip path joins.
#[test]
fn reset_crosses_one_residual_add() {
    let proto = zoo::build(Arch::Resnet18, [3, 32, 32], CLASSES, 7).unwrap();
    let model = Model::load(&zoo::to_bytes(&proto), None).unwrap();
    let x = Tensor::randn([1, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
    let shapes = model.value_shapes(&x).unwrap();
    let layers = model.layers();
    let layer = layers
        .iter()
        .find(|l| l.node == "layer1.0.conv2")
        .expect("layer1.0.conv2");
    let weight = |name: &str| {
        let p = model
            .params
            .iter()
            .find(|p| p.name == format!("{name}.weight"))
            .unwrap_or_else(|| panic!("{name}"));
        p.tensor.shallow_clone()
    };
    let c = 5;
    let nonzero = |t: &Tensor| t.abs().sum(Kind::Double).double_value(&[]) > 0.0;
    assert!(nonzero(&weight("layer1.1.conv1").narrow(1, c, 1)));
    model.reset_neurons(layer, &[c], &shapes).unwrap();
    assert!(
        !nonzero(&weight("layer1.0.conv2").narrow(0, c, 1)),
        "the neuron's own filter"
    );
    assert!(
        !nonzero(&weight("layer1.1.conv1").narrow(1, c, 1)),
        "the next block's first conv, input slice c"
    );
    assert!(
        nonzero(&weight("layer1.1.conv1").narrow(1, c + 1, 1)),
        "other input channels stay"
    );
    assert!(
        nonzero(&weight("layer1.1.conv2").narrow(1, c, 1)),
        "inside the next block: untouched"
    );
    assert!(
        nonzero(&weight("layer2.0.conv1").narrow(1, c, 1)),
        "past the second Add: untouched"
    );
    assert!(
        nonzero(&weight("layer2.0.downsample.0").narrow(1, c, 1)),
        "past the second Add: untouched"
    );
}
