//! The engine against real exporters: a CNN exported by the venv's PyTorch (BatchNormalization
//! kept, and folded) loads, matches torch's outputs, trains, and exports a model that
//! onnxruntime runs with the same outputs.

use std::path::Path;

mod common;
use common::{ort_parity, rel_diff, run_py};

use audit_nn::train::{DeviceData, Hooks, Preprocess, TrainConfig, Trainer};
use audit_nn::{Mode, Model};
use tch::{Device, Kind, Tensor};

const EXPORT: &str = r#"
import sys, torch, numpy as np
torch.manual_seed(0)
out, fold = sys.argv[1], sys.argv[2] == "fold"
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.c = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    def forward(self, x):
        return self.c(self.f(x))
m = Net()
# Non-trivial BN statistics.
m.train()
with torch.no_grad():
    for _ in range(3):
        m(torch.rand(16, 1, 28, 28))
m.eval()
x = torch.rand(4, 1, 28, 28)
mode = torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE
torch.onnx.export(m, (x,), out + "/model.onnx", input_names=["input"], output_names=["logits"], opset_version=13,
                  dynamic_axes={"input": {0: "batch"}}, training=mode, do_constant_folding=True, dynamo=False)
np.save(out + "/x.npy", x.numpy())
np.save(out + "/y.npy", m(x).detach().numpy())
import onnx
print(sorted({n.op_type for n in onnx.load(out + "/model.onnx").graph.node}))
"#;

fn exercise(fold: bool) {
    let dir = tempfile::tempdir().unwrap();
    let ops = run_py(EXPORT, &[dir.path(), Path::new(if fold { "fold" } else { "keep" })]);
    assert_eq!(ops.contains("BatchNormalization"), !fold, "exported ops: {ops}");
    let mut model = Model::load_file(&dir.path().join("model.onnx")).unwrap();
    let x = Tensor::read_npy(dir.path().join("x.npy")).unwrap();
    let y = Tensor::read_npy(dir.path().join("y.npy")).unwrap();
    let ours = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap();
    assert!(rel_diff(&ours, &y) < 1e-5, "engine vs torch: {}", rel_diff(&ours, &y));

    // Neurons: two convs and the hidden linear are monitored; the last linear is the output.
    let layers = model.layers();
    let monitored: Vec<_> = layers.iter().filter(|l| !l.is_output).map(|l| l.channels).collect();
    assert_eq!(monitored, vec![8, 16, 32], "{layers:#?}");

    // Train a few steps on random data; parameters move, BN stats move when kept.
    model.to_device(Device::Cpu);
    let data = DeviceData::new(
        &Tensor::randint(256, [64, 1, 28, 28], (Kind::Uint8, Device::Cpu)),
        &Tensor::randint(10, [64], (Kind::Int64, Device::Cpu)),
        Device::Cpu,
    );
    let before = model
        .params
        .iter()
        .map(|p| p.tensor.detach().copy())
        .collect::<Vec<_>>();
    let mut trainer = Trainer::new(
        &model,
        TrainConfig {
            epochs: 1,
            batch_size: 16,
            lr: 0.05,
            ..Default::default()
        },
    )
    .unwrap();
    let stats = trainer
        .epoch(&model, &data, &Preprocess::default(), &mut Hooks::none())
        .unwrap();
    assert!(stats.loss.is_finite() && stats.samples == 64);
    let changed = model
        .params
        .iter()
        .zip(&before)
        .filter(|(p, b)| !p.tensor.detach().equal(b))
        .count();
    let trainable = model
        .params
        .iter()
        .filter(|p| p.role != audit_nn::ParamRole::Constant)
        .count();
    assert_eq!(changed, trainable, "every weight, bias and BN statistic should change");

    // Reset a neuron of the first conv: its output channel is exactly zero afterwards.
    let shapes = model.value_shapes(&x.narrow(0, 0, 1)).unwrap();
    let first = &model.layers()[0];
    model.reset_neurons(first, &[3], &shapes).unwrap();
    let (_, taps) = tch::no_grad(|| model.forward_with_taps(&[&x], Mode::Eval, &[first.value])).unwrap();
    assert_eq!(taps[0].narrow(1, 3, 1).abs().max().double_value(&[]), 0.0);

    // Export and check onnxruntime agrees with the engine.
    let bytes = model.export(&[("audit.test".into(), "1".into())]).unwrap();
    let reloaded = Model::load(&bytes, None).unwrap();
    assert_eq!(reloaded.metadata("audit.test"), Some("1"));
    let ours = tch::no_grad(|| model.forward(&x, Mode::Eval)).unwrap();
    let diff = ort_parity(dir.path(), "trained", &bytes, &dir.path().join("x.npy"), &ours);
    assert!(diff < 1e-4, "onnxruntime vs engine after training: {diff}");
}

#[test]
fn torch_export_with_batchnorm_kept() {
    exercise(false);
}

#[test]
fn torch_export_with_batchnorm_folded() {
    exercise(true);
}
