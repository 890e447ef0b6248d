//! Real exporters: torchvision resnet18, vgg11_bn and mobilenet_v2 (10 classes, 3x32x32),
//! exported by the venv's PyTorch at opsets 13 and 18 (BatchNormalization folded, and kept).
//! Each loads, matches torch's outputs, trains a step, exports, and onnxruntime reproduces the
//! engine's outputs on the export.

use std::path::Path;

use audit_nn::tch::{self, Device, Kind, Tensor};
use audit_nn::train::{DeviceData, Hooks, Preprocess, TrainConfig, Trainer};
use audit_nn::{Mode, Model};

mod common;
use common::{ort_parity, rel_diff, run_py};

fn check_folder(dir: &Path, keep_bn: bool) {
    let mut args: Vec<&Path> = vec![dir];
    if keep_bn {
        args.push(Path::new("--keep-bn"));
    }
    run_py("tests/fixtures/python/export_torchvision.py", &args);
    let x = Tensor::read_npy(dir.join("input.npy")).unwrap();
    for model_name in ["resnet18", "vgg11_bn", "mobilenet_v2"] {
        for opset in [13, 18] {
            let stem = format!("{model_name}_opset{opset}");
            let mut model =
                Model::load_file(&dir.join(format!("{stem}.onnx"))).unwrap_or_else(|e| panic!("{stem}: {e}"));
            let expected = Tensor::read_npy(dir.join(format!("{stem}.expected.npy"))).unwrap();
            let ours = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap();
            let d = rel_diff(&ours, &expected);
            assert!(d < 1e-4, "{stem} (keep_bn {keep_bn}): engine vs torch {d}");

            model.to_device(Device::Cpu);
            let data = DeviceData::new(
                &Tensor::randint(256, [8, 3, 32, 32], (Kind::Uint8, Device::Cpu)),
                &Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)),
                Device::Cpu,
            );
            let before: Vec<Tensor> = model.trainable().iter().map(|t| t.detach().copy()).collect();
            let mut trainer = Trainer::new(
                &model,
                TrainConfig {
                    batch_size: 8,
                    lr: 0.01,
                    ..Default::default()
                },
            )
            .unwrap();
            let stats = trainer
                .epoch(&model, &data, &Preprocess::default(), &mut Hooks::none())
                .unwrap();
            assert!(stats.loss.is_finite(), "{stem}: loss {}", stats.loss);
            let moved = model
                .trainable()
                .iter()
                .zip(&before)
                .filter(|(a, b)| !a.detach().equal(b))
                .count();
            assert!(
                moved * 10 >= before.len() * 9,
                "{stem}: only {moved} of {} parameters moved",
                before.len()
            );

            let bytes = model.export(&[]).unwrap();
            let ours = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap();
            let parity = ort_parity(dir, &format!("{stem}.trained"), &bytes, &dir.join("input.npy"), &ours);
            assert!(parity < 1e-4, "{stem}: onnxruntime vs engine after a step {parity}");
            eprintln!(
                "{stem} keep_bn={keep_bn}: torch {d:.1e}, after a step onnxruntime {parity:.1e}, {} params",
                model.parameter_count()
            );
        }
    }
}

#[test]
fn torchvision_exports_with_batchnorm_folded() {
    check_folder(tempfile::tempdir().unwrap().path(), false);
}

#[test]
fn torchvision_exports_with_batchnorm_kept() {
    check_folder(tempfile::tempdir().unwrap().path(), true);
}
