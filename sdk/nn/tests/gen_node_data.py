"""Writes the ONNX node test cases (one op each, ~1900 of them) that the `onnx` wheel can generate
but does not ship as data, in the backend test layout, for the conformance harness:

    .venv/bin/python sdk/nn/tests/gen_node_data.py OUT_DIR
    AUDIT_NN_CONFORMANCE_EXTRA=OUT_DIR cargo test --release -p audit-nn --test conformance -- --nocapture

Expected outputs come from the ONNX reference (numpy); where it and onnxruntime disagree (Resize
align_corners with non-integral scaled sizes) the engine follows onnxruntime.
"""

import os
import sys

import onnx
import onnx.backend.test.case.node as node_test
from onnx import numpy_helper

out = sys.argv[1] if len(sys.argv) > 1 else "target/onnx-extra/onnx-node"
n = 0
for case in node_test.collect_testcases():
    d = os.path.join(out, case.name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "model.onnx"), "wb") as f:
        f.write(case.model.SerializeToString())
    for i, (inputs, outputs) in enumerate(case.data_sets):
        ds = os.path.join(d, f"test_data_set_{i}")
        os.makedirs(ds, exist_ok=True)
        for kind, arrays in (("input", inputs), ("output", outputs)):
            for j, x in enumerate(arrays):
                try:
                    data = x.SerializeToString() if isinstance(x, onnx.TensorProto) else numpy_helper.from_array(x).SerializeToString()
                except Exception:  # noqa: BLE001 - sequences, optionals, maps: left out (those cases fail)
                    continue
                with open(os.path.join(ds, f"{kind}_{j}.pb"), "wb") as f:
                    f.write(data)
    n += 1
print(f"{n} node cases in {out}")
