"""Single-op ONNX cases with onnxruntime as the reference, for the semantics the wheel's model tests
do not reach: older opsets (Resize-10, Upsample, Slice-1, Pad-2, Clip-6, Split-2, Softmax-11 ...)
and attribute combinations exporters emit.

    .venv/bin/python sdk/nn/tests/gen_ort_cases.py OUT_DIR
    AUDIT_NN_CONFORMANCE_EXTRA=OUT_DIR cargo test --release -p audit-nn --test conformance -- --nocapture

Each case is OUT_DIR/<name>/model.onnx + test_data_set_0/{input,output}_<i>.pb, as in the ONNX
backend test data.
"""

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = sys.argv[1] if len(sys.argv) > 1 else "target/onnx-extra/ort-ops"
rng = np.random.default_rng(0)
ort.set_default_logger_severity(3)
count = 0


def case(name, op, inputs, attrs=None, opset=13, n_out=1, inits=None, out_names=None):
    """inputs: list of (name, array or None); arrays named in `inits` become initializers."""
    global count
    inits = inits or {}
    node_inputs = [n if a is not None or n in inits else "" for n, a in inputs]
    outs = out_names or [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, node_inputs, outs, **(attrs or {}))
    g_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs if a is not None and n not in inits]
    g_outputs = [onnx.ValueInfoProto(name=o) for o in outs if o]
    initializers = [numpy_helper.from_array(a, n) for n, a in inits.items()]
    graph = helper.make_graph([node], name, g_inputs, g_outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    feeds = {n: a for n, a in inputs if a is not None and n not in inits}
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        res = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        print(f"skip {name}: {str(e).splitlines()[0][:160]}")
        return
    d = os.path.join(OUT, name)
    os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
    # Output types from onnxruntime.
    for o, r in zip(g_outputs, res):
        o.type.CopyFrom(helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(r.dtype), r.shape))
    onnx.save(model, os.path.join(d, "model.onnx"))
    for i, (n, a) in enumerate([(n, a) for n, a in inputs if a is not None and n not in inits]):
        onnx.save_tensor(numpy_helper.from_array(a, n), os.path.join(d, "test_data_set_0", f"input_{i}.pb"))
    for i, r in enumerate(res):
        onnx.save_tensor(numpy_helper.from_array(r), os.path.join(d, "test_data_set_0", f"output_{i}.pb"))
    count += 1


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def i64(*v):
    return np.array(v, dtype=np.int64)


def fl(*v):
    return np.array(v, dtype=np.float32)


x4 = f32(2, 3, 5, 7)
img = f32(1, 2, 4, 6)

# --- Resize / Upsample -------------------------------------------------------------------------
for sc, tag in [((1, 1, 2, 3), "up"), ((1, 1, 0.5, 0.6), "down"), ((1, 1, 1.7, 2.5), "frac")]:
    s = fl(*sc)
    for mode in ["nearest", "linear"]:
        case(f"resize10_{mode}_{tag}", "Resize", [("x", img), ("scales", s)], {"mode": mode}, opset=10, inits={"scales": s})
        if tag != "down" and (mode == "nearest" and tag == "up" or mode == "linear"):
            case(f"upsample9_{mode}_{tag}", "Upsample", [("x", img), ("scales", s)], {"mode": mode}, opset=9, inits={"scales": s})
    if tag == "up":
        case("upsample7_nearest", "Upsample", [("x", img)], {"mode": "nearest", "scales": list(map(float, sc))}, opset=7)
        case("upsample7_linear", "Upsample", [("x", img)], {"mode": "linear", "scales": list(map(float, sc))}, opset=7)
    for coord in ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"]:
        modes = ["nearest", "linear", "cubic"] if coord != "tf_half_pixel_for_nn" else ["nearest"]
        for mode in modes:
            nms = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"] if mode == "nearest" else ["round_prefer_floor"]
            for nm in nms:
                for opset in [11, 13]:
                    attrs = {"mode": mode, "coordinate_transformation_mode": coord, "nearest_mode": nm}
                    roi = fl() if opset == 11 else None
                    ins = [("x", img), ("roi", roi), ("scales", s)]
                    case(f"resize{opset}_{mode}_{coord}_{nm}_{tag}", "Resize", ins, attrs, opset=opset, inits={"scales": s, **({"roi": roi} if roi is not None else {})})
for sizes in [(1, 2, 9, 4), (1, 2, 3, 13), (1, 2, 1, 1)]:
    sz = i64(*sizes)
    for mode in ["nearest", "linear", "cubic"]:
        for coord in ["half_pixel", "align_corners", "pytorch_half_pixel"]:
            tag = "x".join(map(str, sizes))
            case(f"resize13_sizes_{mode}_{coord}_{tag}", "Resize", [("x", img), ("roi", None), ("scales", None), ("sizes", sz)], {"mode": mode, "coordinate_transformation_mode": coord}, opset=13, inits={"sizes": sz})
case("resize13_cubic_exclude_outside", "Resize", [("x", img), ("roi", None), ("scales", fl(1, 1, 2, 1.5))], {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, opset=13, inits={"scales": fl(1, 1, 2, 1.5)})
case("resize18_axes_not_larger", "Resize", [("x", img), ("roi", None), ("scales", None), ("sizes", i64(8, 8))], {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, opset=18, inits={"sizes": i64(8, 8)})
case("resize13_tf_crop_and_resize", "Resize", [("x", img), ("roi", fl(0, 0, 0.2, 0.3, 1, 1, 0.9, 0.8)), ("scales", None), ("sizes", i64(1, 2, 3, 5))], {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 2.0}, opset=13, inits={"sizes": i64(1, 2, 3, 5), "roi": fl(0, 0, 0.2, 0.3, 1, 1, 0.9, 0.8)})

# --- ConvTranspose -----------------------------------------------------------------------------
w = f32(3, 2, 3, 3)
b = f32(2)
for name, attrs in [
    ("plain", {}),
    ("stride2", {"strides": [2, 2]}),
    ("pads", {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    ("outpad", {"strides": [3, 2], "output_padding": [2, 1], "pads": [1, 1, 1, 1]}),
    ("same_upper", {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("same_lower", {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("output_shape", {"strides": [2, 2], "output_shape": [10, 14]}),
    ("output_shape_same_upper", {"strides": [2, 2], "output_shape": [10, 14], "auto_pad": "SAME_UPPER"}),
    ("dilated", {"dilations": [2, 2], "strides": [2, 1]}),
]:
    case(f"convtranspose11_{name}", "ConvTranspose", [("x", f32(1, 3, 5, 7)), ("w", w), ("b", b)], attrs, opset=11, inits={"w": w})
wg = f32(4, 3, 2, 3)
case("convtranspose11_group2", "ConvTranspose", [("x", f32(2, 4, 5, 4)), ("w", wg), ("b", f32(6))], {"group": 2, "strides": [2, 3], "dilations": [1, 2]}, opset=11, inits={"w": wg})
w1 = f32(2, 3, 4)
case("convtranspose11_1d", "ConvTranspose", [("x", f32(1, 2, 6)), ("w", w1)], {"strides": [3], "pads": [1, 2]}, opset=11, inits={"w": w1})
w3 = f32(2, 1, 2, 2, 3)
case("convtranspose11_3d", "ConvTranspose", [("x", f32(1, 2, 3, 4, 3)), ("w", w3)], {"strides": [2, 1, 2]}, opset=11, inits={"w": w3})

# --- Pools ---------------------------------------------------------------------------------------
for name, attrs in [
    ("k3s2", {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("ceil", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("ceil_pads", {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1]}),
    ("ceil_pads_cip", {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("pads_asym", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1]}),
    ("pads_asym_cip", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1], "count_include_pad": 1}),
    ("pads_cip", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("same_upper", {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("same_lower", {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("valid", {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "VALID"}),
]:
    case(f"averagepool11_{name}", "AveragePool", [("x", x4)], attrs, opset=11)
    case(f"maxpool12_{name}", "MaxPool", [("x", x4)], {k: v for k, v in attrs.items() if k != "count_include_pad"}, opset=12)
case("averagepool7_1d", "AveragePool", [("x", f32(2, 3, 9))], {"kernel_shape": [4], "strides": [2], "pads": [1, 2]}, opset=7)
case("averagepool11_3d_ceil", "AveragePool", [("x", f32(1, 2, 5, 4, 6))], {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2], "ceil_mode": 1, "pads": [0, 1, 1, 1, 0, 0]}, opset=11)
case("maxpool12_bigpads", "MaxPool", [("x", x4)], {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]}, opset=12)
case("globalmaxpool", "GlobalMaxPool", [("x", x4)], opset=13)

# --- Shape ops -----------------------------------------------------------------------------------
xs = f32(4, 5, 6)
case("slice1_attrs", "Slice", [("x", xs)], {"starts": [1, -4], "ends": [1000, -1], "axes": [0, 2]}, opset=1)
case("slice1_noaxes", "Slice", [("x", xs)], {"starts": [1, 0], "ends": [3, -2]}, opset=1)
for name, (st, en, ax, sp) in {
    "neg_step": ((-1, 4), (-1000, 0), (0, 2), (-1, -2)),
    "int_max": ((1,), (2**63 - 1,), (1,), (2,)),
    "int_min_neg": ((2**63 - 1,), (-(2**63),), (2,), (-3,)),
    "neg_axes": ((0, 1), (2, 4), (-1, -3), (1, 1)),
    "empty": ((3,), (1,), (0,), (1,)),
}.items():
    arrs = [i64(*st), i64(*en), i64(*ax), i64(*sp)]
    case(f"slice13_{name}", "Slice", [("x", xs), ("s", arrs[0]), ("e", arrs[1]), ("a", arrs[2]), ("p", arrs[3])], opset=13, inits=dict(zip("seap", arrs)))
xp = f32(1, 2, 4, 5)
for mode in ["constant", "reflect", "edge"]:
    case(f"pad2_{mode}", "Pad", [("x", xp)], {"mode": mode, "pads": [0, 0, 2, 1, 0, 1, 3, 2], "value": 1.5}, opset=2)
    pads = i64(0, 1, 3, 2, 0, 0, 1, 4)
    cv = np.array(-2.0, dtype=np.float32)
    case(f"pad11_{mode}", "Pad", [("x", xp), ("pads", pads), ("cv", cv)], {"mode": mode}, opset=11, inits={"pads": pads, "cv": cv})
case("pad13_negative", "Pad", [("x", xp), ("pads", i64(0, 0, -1, 2, 0, 0, 1, -2))], {"mode": "constant"}, opset=13, inits={"pads": i64(0, 0, -1, 2, 0, 0, 1, -2)})
case("pad18_axes", "Pad", [("x", xp), ("pads", i64(2, 1, 3, 0)), ("cv", None), ("axes", i64(-1, 1))], {"mode": "reflect"}, opset=18, inits={"pads": i64(2, 1, 3, 0), "axes": i64(-1, 1)})
case("pad19_wrap", "Pad", [("x", xp), ("pads", i64(0, 0, 1, 2, 0, 0, 2, 1))], {"mode": "wrap"}, opset=19, inits={"pads": i64(0, 0, 1, 2, 0, 0, 2, 1)})
case("split2_attr", "Split", [("x", xs)], {"axis": 1, "split": [2, 3]}, opset=2, n_out=2)
case("split11_equal", "Split", [("x", xs)], {"axis": -1}, opset=11, n_out=3)
case("split13_input", "Split", [("x", xs), ("s", i64(1, 3))], {"axis": 0}, opset=13, n_out=2, inits={"s": i64(1, 3)})
case("split18_num_outputs", "Split", [("x", xs)], {"axis": 1, "num_outputs": 3}, opset=18, n_out=3)
case("squeeze1", "Squeeze", [("x", f32(1, 3, 1, 2))], {"axes": [0, 2]}, opset=1)
case("squeeze11_all", "Squeeze", [("x", f32(1, 3, 1, 2))], {}, opset=11)
case("squeeze13_input", "Squeeze", [("x", f32(1, 3, 1, 2)), ("a", i64(-2))], opset=13, inits={"a": i64(-2)})
case("unsqueeze1", "Unsqueeze", [("x", f32(3, 2))], {"axes": [0, 3]}, opset=1)
case("unsqueeze11_neg", "Unsqueeze", [("x", f32(3, 2))], {"axes": [-1, 0]}, opset=11)
case("unsqueeze13_input", "Unsqueeze", [("x", f32(3, 2)), ("a", i64(1, -1))], opset=13, inits={"a": i64(1, -1)})
case("gather13_scalar_neg", "Gather", [("x", xs), ("i", np.array(-2, dtype=np.int64))], {"axis": 1}, opset=13, inits={"i": np.array(-2, dtype=np.int64)})
case("gather13_2d", "Gather", [("x", xs), ("i", np.array([[0, -1], [2, 1]], dtype=np.int64))], {"axis": -1}, opset=13)
case("gather13_int32", "Gather", [("x", xs), ("i", np.array([3, 0, 1], dtype=np.int32))], {"axis": 0}, opset=13)
case("reshape5", "Reshape", [("x", xs), ("s", i64(0, -1))], opset=5, inits={"s": i64(0, -1)})
case("reshape14_allowzero", "Reshape", [("x", xs), ("s", i64(6, 4, 5))], {"allowzero": 1}, opset=14, inits={"s": i64(6, 4, 5)})
case("transpose_default", "Transpose", [("x", xs)], opset=13)
case("transpose_perm", "Transpose", [("x", xs)], {"perm": [1, 2, 0]}, opset=13)
case("concat4_neg", "Concat", [("a", f32(2, 3)), ("b", f32(2, 1))], {"axis": -1}, opset=11)
case("shape15_start_end", "Shape", [("x", xs)], {"start": -2, "end": 10}, opset=15)
case("constantofshape_int", "ConstantOfShape", [("s", i64(2, 3))], {"value": numpy_helper.from_array(np.array([7], dtype=np.int64))}, opset=9)
case("cast_float_int", "Cast", [("x", fl(-1.7, 2.5, 0.2))], {"to": TensorProto.INT64}, opset=13)
case("tile", "Tile", [("x", f32(2, 3)), ("r", i64(2, 3))], opset=13, inits={"r": i64(2, 3)})
case("expand_bidir", "Expand", [("x", f32(3, 1)), ("s", i64(2, 1, 4))], opset=13, inits={"s": i64(2, 1, 4)})
case("depthtospace_dcr", "DepthToSpace", [("x", f32(1, 8, 2, 3))], {"blocksize": 2}, opset=13)
case("depthtospace_crd", "DepthToSpace", [("x", f32(1, 8, 2, 3))], {"blocksize": 2, "mode": "CRD"}, opset=13)

# --- Element-wise and normalisations -----------------------------------------------------------
xe = f32(2, 3, 4, 5)
case("clip6_attrs", "Clip", [("x", xe)], {"min": -0.5, "max": 0.7}, opset=6)
case("clip11_min_only", "Clip", [("x", xe), ("lo", np.array(-0.2, dtype=np.float32))], opset=11, inits={"lo": np.array(-0.2, dtype=np.float32)})
case("clip12_int", "Clip", [("x", i64(-5, 0, 3, 9)), ("lo", np.array(-1, dtype=np.int64)), ("hi", np.array(4, dtype=np.int64))], opset=12)
for opset in [1, 11, 13]:
    case(f"softmax{opset}_default", "Softmax", [("x", xe)], opset=opset)
    case(f"softmax{opset}_axis2", "Softmax", [("x", xe)], {"axis": 2}, opset=opset)
    case(f"logsoftmax{opset}_axis_neg1", "LogSoftmax", [("x", xe)], {"axis": -1}, opset=max(opset, 11))
    case(f"hardmax{opset}_axis2", "Hardmax", [("x", xe)], {"axis": 2}, opset=opset)
for size in [1, 2, 3, 4, 5]:
    case(f"lrn_size{size}", "LRN", [("x", xe)], {"size": size, "alpha": 0.02, "beta": 0.6, "bias": 1.5}, opset=13)
case("prelu9_channel", "PRelu", [("x", xe), ("s", f32(3, 1, 1))], opset=9, inits={"s": f32(3, 1, 1)})
case("prelu16_scalar", "PRelu", [("x", xe), ("s", fl(0.3))], opset=16, inits={"s": fl(0.3)})
case("leakyrelu_default", "LeakyRelu", [("x", xe)], opset=16)
case("elu_alpha", "Elu", [("x", xe)], {"alpha": 0.5}, opset=6)
case("selu_custom", "Selu", [("x", xe)], {"alpha": 1.5, "gamma": 2.0}, opset=6)
case("hardsigmoid_default", "HardSigmoid", [("x", xe * 4)], opset=6)
case("hardswish", "HardSwish", [("x", xe * 4)], opset=14)
for op in ["Softplus", "Erf", "Sqrt", "Abs", "Neg", "Exp", "Sigmoid", "Tanh", "Sign", "Softsign", "Reciprocal", "Floor", "Ceil", "Round"]:
    v = np.abs(xe) + 0.1 if op in ("Sqrt", "Reciprocal") else xe
    case(f"unary_{op.lower()}", op, [("x", v)], opset=13)
case("pow_broadcast", "Pow", [("x", np.abs(xe) + 0.5), ("e", f32(5))], opset=13)
case("pow_int_exp", "Pow", [("x", xe), ("e", np.array(3, dtype=np.int64))], opset=15)
case("div_int", "Div", [("a", i64(7, -7, 9, -9)), ("b", i64(2, 2, -4, -4))], opset=13)
case("sub_broadcast", "Sub", [("a", xe), ("b", f32(4, 1))], opset=13)
case("mul_broadcast", "Mul", [("a", xe), ("b", f32(3, 1, 1))], opset=13)
case("sum_variadic", "Sum", [("a", xe), ("b", f32(5)), ("c", f32(3, 1, 1))], opset=13)
case("max_variadic", "Max", [("a", xe), ("b", f32(5)), ("c", f32(3, 1, 1))], opset=13)
case("min_variadic", "Min", [("a", xe), ("b", f32(4, 1))], opset=13)
case("mean_variadic", "Mean", [("a", xe), ("b", f32(5))], opset=13)
case("matmul_1d_3d", "MatMul", [("a", f32(4)), ("b", f32(2, 4, 3))], opset=13)
case("matmul_bcast", "MatMul", [("a", f32(2, 1, 3, 4)), ("b", f32(5, 4, 2))], opset=13)
case("matmul_3d_1d", "MatMul", [("a", f32(2, 3, 4)), ("b", f32(4))], opset=13)
case("instancenorm", "InstanceNormalization", [("x", xe), ("s", f32(3)), ("b", f32(3))], {"epsilon": 1e-3}, opset=6)
case("layernorm17_axis1", "LayerNormalization", [("x", xe), ("s", f32(3, 4, 5)), ("b", f32(3, 4, 5))], {"axis": 1}, opset=17)
case("layernorm17_stats", "LayerNormalization", [("x", xe), ("s", f32(5))], {"epsilon": 1e-2}, opset=17, n_out=3)
case("layernorm17_bcast_scale", "LayerNormalization", [("x", xe), ("s", f32(1, 5)), ("b", f32(5))], {"axis": -2}, opset=17)
case("groupnorm18", "GroupNormalization", [("x", f32(2, 6, 3, 3)), ("s", f32(3)), ("b", f32(3))], {"num_groups": 3}, opset=18)
case("groupnorm21", "GroupNormalization", [("x", f32(2, 6, 3, 3)), ("s", f32(6)), ("b", f32(6))], {"num_groups": 2}, opset=21)
case("dropout7_eval", "Dropout", [("x", xe)], {"ratio": 0.3}, opset=7)
case("dropout12_ratio_mask", "Dropout", [("x", xe), ("r", np.array(0.4, dtype=np.float32))], opset=12, n_out=2, inits={"r": np.array(0.4, dtype=np.float32)})
case("dropout13_training_false", "Dropout", [("x", xe), ("r", np.array(0.4, dtype=np.float32)), ("t", np.array(False))], opset=13, inits={"r": np.array(0.4, dtype=np.float32), "t": np.array(False)})

# --- Reductions ----------------------------------------------------------------------------------
for op in ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"]:
    case(f"{op.lower()}11_axes_keep0", op, [("x", xe)], {"axes": [1, -1], "keepdims": 0}, opset=11)
    case(f"{op.lower()}11_all", op, [("x", xe)], {}, opset=11)
    case(f"{op.lower()}18_input_axes", op, [("x", xe), ("a", i64(0, 2))], opset=18, inits={"a": i64(0, 2)})
    case(f"{op.lower()}18_noop", op, [("x", xe)], {"noop_with_empty_axes": 1}, opset=18)
case("reducesum13_input_axes", "ReduceSum", [("x", xe), ("a", i64(-1))], {"keepdims": 0}, opset=13, inits={"a": i64(-1)})
case("argmax_keep0", "ArgMax", [("x", xe)], {"axis": 1, "keepdims": 0}, opset=13)
case("argmin_last", "ArgMin", [("x", np.array([[1, 0, 0, 2]], dtype=np.float32))], {"axis": 1, "select_last_index": 1}, opset=13)

print(f"{count} cases in {OUT}")
