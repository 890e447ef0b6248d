"""Real exporter output: torchvision classifiers (random weights, no download) and a module of
the layers CNN classifiers use, exported with torch.onnx (TorchScript exporter) at several
opsets, with onnxruntime's outputs as the reference.

    .venv/bin/python sdk/nn/tests/gen_torch_exports.py OUT_DIR [--big | --only-big]
    AUDIT_NN_CONFORMANCE_EXTRA=OUT_DIR cargo test --release -p audit-nn --test conformance -- --nocapture
"""

import io
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper
from torch import nn

warnings.filterwarnings("ignore")
ort.set_default_logger_severity(3)
OUT = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "target/onnx-extra/torch-export"
BIG = "--big" in sys.argv
torch.manual_seed(0)


class Layers(nn.Module):
    """One of each layer family an image classifier uses."""

    def __init__(self, legacy=False):
        super().__init__()
        # Opsets 9 and 10 (Upsample, Resize-10) cannot express align_corners.
        self.legacy = legacy
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.deconv = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.gnorm = nn.GroupNorm(4, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = self.prelu(self.bn(self.conv(x)))
        x = F.leaky_relu(x, 0.1) + F.elu(x) * 0.5 - F.selu(x) * 0.1
        x = F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        x = self.deconv(x)
        x = self.inorm(x) + self.gnorm(x)
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(9, 7), mode="nearest")
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=not self.legacy)
        x = F.hardswish(x) + F.hardsigmoid(x) + torch.clamp(x, -0.5, 0.5) + F.softplus(x) + F.gelu(x)
        x = F.pad(x, (1, 2, 0, 1), mode="reflect")
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = torch.cat([x[:, :4], x[:, 4:][:, [3, 1, 2, 0]]], 1)
        x = x.permute(0, 2, 3, 1)
        x = self.ln(x).permute(0, 3, 1, 2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) + F.adaptive_max_pool2d(x, 1).flatten(1)
        x = self.drop(x)
        y = self.fc(x) + x.mean(-1, keepdim=True) * x.pow(2).sum(-1, keepdim=True).sqrt()
        return torch.log_softmax(y, -1), torch.softmax(y, 1), y.argmax(-1)


def export(name, model, shape, opsets):
    model.eval()
    x = torch.randn(*shape)
    for opset in opsets:
        buf = io.BytesIO()
        try:
            torch.onnx.export(model, (x,), buf, opset_version=opset, dynamo=False, input_names=["input"], do_constant_folding=True)
        except Exception as e:  # noqa: BLE001
            print(f"skip {name} opset {opset}: export: {str(e).splitlines()[0][:160]}")
            continue
        m = onnx.load_from_string(buf.getvalue())
        try:
            sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
            res = sess.run(None, {"input": x.numpy()})
        except Exception as e:  # noqa: BLE001
            print(f"skip {name} opset {opset}: onnxruntime: {str(e).splitlines()[0][:160]}")
            continue
        d = os.path.join(OUT, f"{name}_opset{opset}")
        os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
        onnx.save(m, os.path.join(d, "model.onnx"))
        onnx.save_tensor(numpy_helper.from_array(x.numpy()), os.path.join(d, "test_data_set_0", "input_0.pb"))
        for i, r in enumerate(res):
            onnx.save_tensor(numpy_helper.from_array(r), os.path.join(d, "test_data_set_0", f"output_{i}.pb"))
        print(f"{name} opset {opset}: {len(m.graph.node)} nodes")


tv = torchvision.models
export("layers", Layers(), (2, 3, 16, 12), [11, 13, 17, 18])
export("layers_legacy", Layers(legacy=True), (2, 3, 16, 12), [9, 10])
# LocalResponseNorm exports through If (rank-dependent); a CNN-style LRN in the graph comes from
# the wheel's light models and the single-op cases instead.
small = [
    ("resnet18", tv.resnet18, 64),
    ("mobilenet_v3_small", tv.mobilenet_v3_small, 64),
    ("mobilenet_v2", tv.mobilenet_v2, 64),
    ("squeezenet1_1", tv.squeezenet1_1, 64),
    ("shufflenet_v2_x0_5", tv.shufflenet_v2_x0_5, 64),
    ("mnasnet0_5", tv.mnasnet0_5, 64),
    ("efficientnet_b0", tv.efficientnet_b0, 64),
    ("regnet_y_400mf", tv.regnet_y_400mf, 64),
    ("googlenet", lambda: tv.googlenet(aux_logits=False, init_weights=True), 64),
    ("densenet121", tv.densenet121, 64),
    ("alexnet", tv.alexnet, 224),
    ("convnext_tiny", tv.convnext_tiny, 64),
]
big = [("vit_b_16", tv.vit_b_16, 224), ("swin_t", tv.swin_t, 224), ("inception_v3", lambda: tv.inception_v3(aux_logits=False, init_weights=True), 299)]
only_big = "--only-big" in sys.argv
for name, ctor, size in ([] if only_big else small) + (big if BIG or only_big else []):
    export(name, ctor(), (1, 3, size, size), [11, 13, 17])
