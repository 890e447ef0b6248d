//! The model zoo: freshly initialised ONNX classifiers (small CNN, NiN, VGG-11/16, ResNet-18,
//! PreAct-ResNet-18) built from the core ops only (Conv, BatchNormalization, Gemm, MaxPool,
//! GlobalAveragePool, Relu, Flatten, Add), so `audit` can train a model from scratch.
//!
//! Every model has opset 17 and IR version 8, one input `input` (float, `[batch, C, H, W]` with a
//! symbolic batch) and one output `logits` (float, `[batch, classes]`). BatchNormalization is kept
//! (weight 1, bias 0, running mean 0, running variance 1, epsilon 1e-5, momentum 0.9). Conv and
//! Gemm weights are initialised like PyTorch's defaults for `Conv2d`/`Linear`
//! (`kaiming_uniform_(a = sqrt(5))`, i.e. uniform in `±1/sqrt(fan_in)`, and bias uniform in
//! `±1/sqrt(fan_in)`), from a small self-contained PRNG: the same `(arch, input, classes, seed)`
//! gives the same bytes on every machine and run. Each parameter draws from its own stream
//! (seeded by the model seed and the parameter's name), so one layer's values do not depend on
//! the layers before it.
//!
//! Initializers are raw little-endian float data named like the PyTorch state dict of the usual
//! reference implementation (`conv1.weight`, `layer1.0.bn1.running_mean`, `features.0.weight`,
//! ...). Nodes are named after the module they stand for and their output value carries the same
//! name (the final Gemm's output is `logits`), so a node's output can be tapped by its name.
//!
//! Architectures (CIFAR-style, adapted to the input size; a pool is skipped when it would shrink a
//! spatial dimension below 1, i.e. when a side is already smaller than 2):
//! - `small-cnn`: conv(32, 3x3, pad 1)-BN-ReLU-maxpool(2), conv(64)-BN-ReLU-maxpool(2), Flatten,
//!   Gemm(128)-ReLU, Gemm(classes). Convs have biases.
//! - `nin`: Network in Network, three mlpconv blocks (5x5 conv 192, 1x1 160, 1x1 96 / 5x5 192, 1x1
//!   192, 1x1 192 / 3x3 192, 1x1 192, 1x1 classes), BN-ReLU after every conv except the last,
//!   maxpool(3, stride 2, pad 1) after the first two blocks (the original's average pool is a max
//!   pool here), GlobalAveragePool, Flatten. Convs have biases.
//! - `vgg11`, `vgg16`: the standard VGG configurations with BN (conv 3x3 pad 1 with bias, BN,
//!   ReLU; maxpool(2) while both sides are >= 2), Flatten, one Gemm classifier (the CIFAR variant:
//!   512 features at 32x32 and 28x28).
//! - `resnet18`: CIFAR ResNet-18 (3x3 stem conv without maxpool, BasicBlocks [2, 2, 2, 2] of widths
//!   64-128-256-512, projection shortcut conv1x1+BN on a stride or width change, no conv biases),
//!   GlobalAveragePool, Flatten, Gemm. Names follow torchvision (`downsample`, `fc`).
//! - `preact-resnet18`: the pre-activation variant as in BackdoorBench / kuangliu's pytorch-cifar
//!   (BN-ReLU before each conv, the projection shortcut is a bare conv1x1 taken after the first
//!   BN-ReLU, no final BN), GlobalAveragePool, Flatten, Gemm (`linear`).

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use prost::Message;

use crate::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

/// Opset of the zoo's models.
pub const OPSET: i64 = 17;
/// IR version of the zoo's models.
pub const IR_VERSION: i64 = 8;
/// Name of the graph input.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output.
pub const OUTPUT_NAME: &str = "logits";
/// BatchNormalization epsilon.
pub const BN_EPSILON: f32 = 1e-5;
/// BatchNormalization momentum (ONNX convention: weight of the running value).
pub const BN_MOMENTUM: f32 = 0.9;

/// An architecture of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    SmallCnn,
    Nin,
    Vgg11,
    Vgg16,
    Resnet18,
    PreactResnet18,
}

impl Arch {
    /// Every architecture, in a stable order.
    pub const ALL: [Arch; 6] = [
        Arch::SmallCnn,
        Arch::Nin,
        Arch::Vgg11,
        Arch::Vgg16,
        Arch::Resnet18,
        Arch::PreactResnet18,
    ];

    /// The name used on the command line (`small-cnn`, `preact-resnet18`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Arch::SmallCnn => "small-cnn",
            Arch::Nin => "nin",
            Arch::Vgg11 => "vgg11",
            Arch::Vgg16 => "vgg16",
            Arch::Resnet18 => "resnet18",
            Arch::PreactResnet18 => "preact-resnet18",
        }
    }

    /// The names of every architecture, comma separated (for messages).
    pub fn names() -> String {
        Arch::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;

    /// Parses a name, case-insensitively, with `_` accepted for `-` (`preact_resnet18`).
    fn from_str(s: &str) -> Result<Arch, String> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Arch::ALL
            .iter()
            .copied()
            .find(|a| a.name() == norm)
            .ok_or_else(|| format!("unknown architecture `{s}` (known: {})", Arch::names()))
    }
}

/// Builds a freshly initialised model of `arch` for inputs of shape `input` = `[C, H, W]` with
/// `classes` outputs. Deterministic for a given `seed`.
pub fn build(arch: Arch, input: [i64; 3], classes: i64, seed: u64) -> Result<ModelProto, String> {
    let [c, h, w] = input;
    if c < 1 || h < 1 || w < 1 {
        return Err(format!("input shape {c}x{h}x{w}: every dimension must be at least 1"));
    }
    if c > 1024 || h > 4096 || w > 4096 {
        return Err(format!(
            "input shape {c}x{h}x{w} is too large for the zoo (at most 1024x4096x4096)"
        ));
    }
    if classes < 1 {
        return Err(format!("{classes} classes: need at least 1"));
    }
    if classes > 100_000 {
        return Err(format!("{classes} classes is too many for the zoo (at most 100000)"));
    }
    let mut g = Graph::new(seed);
    let x = Value {
        name: INPUT_NAME.to_string(),
        c,
        h,
        w,
    };
    match arch {
        Arch::SmallCnn => small_cnn(&mut g, x, classes),
        Arch::Nin => nin(&mut g, x, classes),
        Arch::Vgg11 => vgg(&mut g, x, classes, VGG11),
        Arch::Vgg16 => vgg(&mut g, x, classes, VGG16),
        Arch::Resnet18 => resnet18(&mut g, x, classes),
        Arch::PreactResnet18 => preact_resnet18(&mut g, x, classes),
    }
    g.finish(arch, input, classes, seed)
}

/// The model's protobuf bytes.
pub fn to_bytes(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Number of trainable scalars of a model: the Conv and Gemm weights and biases and the
/// BatchNormalization scales and biases that are initializers (running statistics excluded), the
/// same count as PyTorch's `sum(p.numel() for p in model.parameters())`.
pub fn param_count(model: &ModelProto) -> i64 {
    let Some(g) = model.graph.as_ref() else { return 0 };
    let mut trainable: HashSet<&str> = HashSet::new();
    for n in &g.node {
        let slots: &[usize] = match n.op_type() {
            "Conv" | "Gemm" | "BatchNormalization" => &[1, 2],
            _ => &[],
        };
        trainable.extend(slots.iter().filter_map(|&s| n.input.get(s)).map(String::as_str));
    }
    g.initializer
        .iter()
        .filter(|t| trainable.contains(t.name()))
        .map(|t| t.dims.iter().product::<i64>())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Architectures.

/// A 4-D feature map (or, after Flatten, `c` features with `h = w = 1`).
#[derive(Debug, Clone)]
struct Value {
    name: String,
    c: i64,
    h: i64,
    w: i64,
}

/// Conv, BN, ReLU with the given module prefix names (`conv`, `bn`, `relu`).
fn conv_bn_relu(g: &mut Graph, x: &Value, names: [&str; 3], out: i64, k: i64, pad: i64, bias: bool) -> Value {
    let y = g.conv(names[0], x, out, k, 1, pad, bias);
    let y = g.bn(names[1], &y);
    g.relu(names[2], &y)
}

/// MaxPool(kernel 2, stride 2) unless a side is already below 2.
fn pool2(g: &mut Graph, name: &str, x: Value) -> Value {
    if x.h >= 2 && x.w >= 2 {
        g.maxpool(name, &x, 2, 2, 0)
    } else {
        x
    }
}

fn small_cnn(g: &mut Graph, x: Value, classes: i64) {
    let y = conv_bn_relu(g, &x, ["conv1", "bn1", "relu1"], 32, 3, 1, true);
    let y = pool2(g, "pool1", y);
    let y = conv_bn_relu(g, &y, ["conv2", "bn2", "relu2"], 64, 3, 1, true);
    let y = pool2(g, "pool2", y);
    let y = g.flatten("flatten", &y, None);
    let y = g.gemm("fc1", &y, 128, None);
    let y = g.relu("relu3", &y);
    g.gemm("fc2", &y, classes, Some(OUTPUT_NAME));
}

fn nin(g: &mut Graph, x: Value, classes: i64) {
    // (out channels, kernel, padding) of the three convs of each block.
    let blocks: [[(i64, i64, i64); 3]; 3] = [
        [(192, 5, 2), (160, 1, 0), (96, 1, 0)],
        [(192, 5, 2), (192, 1, 0), (192, 1, 0)],
        [(192, 3, 1), (192, 1, 0), (classes, 1, 0)],
    ];
    let mut y = x;
    for (b, convs) in blocks.iter().enumerate() {
        let p = format!("block{}", b + 1);
        for (i, &(out, k, pad)) in convs.iter().enumerate() {
            let i = i + 1;
            if b == 2 && i == 3 {
                // The classifier conv: class maps, averaged below.
                y = g.conv(&format!("{p}.conv{i}"), &y, out, k, 1, pad, true);
            } else {
                y = conv_bn_relu(
                    g,
                    &y,
                    [&format!("{p}.conv{i}"), &format!("{p}.bn{i}"), &format!("{p}.relu{i}")],
                    out,
                    k,
                    pad,
                    true,
                );
            }
        }
        if b < 2 && y.h >= 2 && y.w >= 2 {
            y = g.maxpool(&format!("{p}.pool"), &y, 3, 2, 1);
        }
    }
    let y = g.global_avg_pool("avgpool", &y);
    g.flatten("flatten", &y, Some(OUTPUT_NAME));
}

/// VGG configurations: a channel count is conv-BN-ReLU, 0 is a maxpool.
const VGG11: &[i64] = &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
const VGG16: &[i64] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];

fn vgg(g: &mut Graph, x: Value, classes: i64, cfg: &[i64]) {
    // Names follow the indices of PyTorch's `features` Sequential (conv, BN, ReLU, pool), also for
    // a pool skipped because the map is already 1 wide.
    let mut y = x;
    let mut idx = 0;
    for &c in cfg {
        if c == 0 {
            y = pool2(g, &format!("features.{idx}"), y);
            idx += 1;
        } else {
            let names = [
                format!("features.{idx}"),
                format!("features.{}", idx + 1),
                format!("features.{}", idx + 2),
            ];
            y = conv_bn_relu(g, &y, [&names[0], &names[1], &names[2]], c, 3, 1, true);
            idx += 3;
        }
    }
    let y = g.flatten("flatten", &y, None);
    g.gemm("classifier", &y, classes, Some(OUTPUT_NAME));
}

const RESNET_WIDTHS: [i64; 4] = [64, 128, 256, 512];

fn resnet18(g: &mut Graph, x: Value, classes: i64) {
    let y = g.conv("conv1", &x, 64, 3, 1, 1, false);
    let y = g.bn("bn1", &y);
    let mut y = g.relu("relu", &y);
    for (l, &width) in RESNET_WIDTHS.iter().enumerate() {
        for b in 0..2 {
            let p = format!("layer{}.{b}", l + 1);
            let stride = if l > 0 && b == 0 { 2 } else { 1 };
            let shortcut = if stride != 1 || y.c != width {
                let s = g.conv(&format!("{p}.downsample.0"), &y, width, 1, stride, 0, false);
                g.bn(&format!("{p}.downsample.1"), &s)
            } else {
                y.clone()
            };
            let o = g.conv(&format!("{p}.conv1"), &y, width, 3, stride, 1, false);
            let o = g.bn(&format!("{p}.bn1"), &o);
            let o = g.relu(&format!("{p}.relu1"), &o);
            let o = g.conv(&format!("{p}.conv2"), &o, width, 3, 1, 1, false);
            let o = g.bn(&format!("{p}.bn2"), &o);
            let o = g.add(&format!("{p}.add"), &o, &shortcut);
            y = g.relu(&format!("{p}.relu2"), &o);
        }
    }
    let y = g.global_avg_pool("avgpool", &y);
    let y = g.flatten("flatten", &y, None);
    g.gemm("fc", &y, classes, Some(OUTPUT_NAME));
}

fn preact_resnet18(g: &mut Graph, x: Value, classes: i64) {
    let mut y = g.conv("conv1", &x, 64, 3, 1, 1, false);
    for (l, &width) in RESNET_WIDTHS.iter().enumerate() {
        for b in 0..2 {
            let p = format!("layer{}.{b}", l + 1);
            let stride = if l > 0 && b == 0 { 2 } else { 1 };
            let a = g.bn(&format!("{p}.bn1"), &y);
            let a = g.relu(&format!("{p}.relu1"), &a);
            let shortcut = if stride != 1 || y.c != width {
                g.conv(&format!("{p}.shortcut.0"), &a, width, 1, stride, 0, false)
            } else {
                y.clone()
            };
            let o = g.conv(&format!("{p}.conv1"), &a, width, 3, stride, 1, false);
            let o = g.bn(&format!("{p}.bn2"), &o);
            let o = g.relu(&format!("{p}.relu2"), &o);
            let o = g.conv(&format!("{p}.conv2"), &o, width, 3, 1, 1, false);
            y = g.add(&format!("{p}.add"), &o, &shortcut);
        }
    }
    let y = g.global_avg_pool("avgpool", &y);
    let y = g.flatten("flatten", &y, None);
    g.gemm("linear", &y, classes, Some(OUTPUT_NAME));
}

// ---------------------------------------------------------------------------------------------
// Graph construction.

/// SplitMix64: a tiny, well-mixed PRNG; plenty for weight initialisation.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        (2.0 * u - 1.0) * bound
    }
}

/// The stream of one parameter: the model seed mixed with the FNV-1a hash of its name.
fn stream(seed: u64, name: &str) -> SplitMix64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut s = SplitMix64(seed ^ h.rotate_left(17));
    s.next_u64();
    s
}

/// Most parameter bytes a zoo model may hold: protobuf messages (and so ONNX files without
/// external data) cannot exceed 2 GiB.
const MAX_PARAM_BYTES: u64 = (1 << 31) - (64 << 20);

struct Graph {
    seed: u64,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Parameter bytes so far (counted even once over the limit, for the message).
    param_bytes: u64,
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn float_tensor(name: &str, dims: &[i64], data: impl IntoIterator<Item = f32>) -> TensorProto {
    let raw: Vec<u8> = data.into_iter().flat_map(f32::to_le_bytes).collect();
    debug_assert_eq!(raw.len() as i64, 4 * dims.iter().product::<i64>());
    TensorProto {
        name: Some(name.into()),
        data_type: Some(DataType::Float as i32),
        dims: dims.to_vec(),
        raw_data: Some(raw),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value as Dim, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => Dim::DimValue(*v),
                None => Dim::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Graph {
    fn new(seed: u64) -> Graph {
        Graph {
            seed,
            nodes: Vec::new(),
            inits: Vec::new(),
            param_bytes: 0,
        }
    }

    fn node(&mut self, op: &str, name: &str, inputs: Vec<String>, output: &str, attribute: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output.to_string()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute,
            ..Default::default()
        });
    }

    /// A weight and bias drawn like PyTorch's `reset_parameters` of Conv2d/Linear.
    /// Counts `n` more parameters; false (and no data should be made) once over the limit.
    fn reserve(&mut self, n: i64) -> bool {
        self.param_bytes += 4 * n as u64;
        self.param_bytes <= MAX_PARAM_BYTES
    }

    fn uniform_param(&mut self, name: &str, dims: &[i64], fan_in: i64) -> String {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n = dims.iter().product::<i64>();
        if self.reserve(n) {
            let mut rng = stream(self.seed, name);
            self.inits
                .push(float_tensor(name, dims, (0..n).map(|_| rng.uniform(bound))));
        }
        name.to_string()
    }

    fn const_param(&mut self, name: &str, n: i64, v: f32) -> String {
        if self.reserve(n) {
            self.inits
                .push(float_tensor(name, &[n], std::iter::repeat_n(v, n as usize)));
        }
        name.to_string()
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(&mut self, name: &str, x: &Value, out: i64, k: i64, stride: i64, pad: i64, bias: bool) -> Value {
        let fan_in = x.c * k * k;
        let mut inputs = vec![
            x.name.clone(),
            self.uniform_param(&format!("{name}.weight"), &[out, x.c, k, k], fan_in),
        ];
        if bias {
            inputs.push(self.uniform_param(&format!("{name}.bias"), &[out], fan_in));
        }
        let attrs = vec![
            attr_ints("dilations", &[1, 1]),
            attr_int("group", 1),
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("pads", &[pad, pad, pad, pad]),
            attr_ints("strides", &[stride, stride]),
        ];
        self.node("Conv", name, inputs, name, attrs);
        let size = |s: i64| (s + 2 * pad - k) / stride + 1;
        Value {
            name: name.to_string(),
            c: out,
            h: size(x.h),
            w: size(x.w),
        }
    }

    fn bn(&mut self, name: &str, x: &Value) -> Value {
        let inputs = vec![
            x.name.clone(),
            self.const_param(&format!("{name}.weight"), x.c, 1.0),
            self.const_param(&format!("{name}.bias"), x.c, 0.0),
            self.const_param(&format!("{name}.running_mean"), x.c, 0.0),
            self.const_param(&format!("{name}.running_var"), x.c, 1.0),
        ];
        self.node(
            "BatchNormalization",
            name,
            inputs,
            name,
            vec![attr_float("epsilon", BN_EPSILON), attr_float("momentum", BN_MOMENTUM)],
        );
        Value {
            name: name.to_string(),
            ..x.clone()
        }
    }

    fn relu(&mut self, name: &str, x: &Value) -> Value {
        self.node("Relu", name, vec![x.name.clone()], name, vec![]);
        Value {
            name: name.to_string(),
            ..x.clone()
        }
    }

    fn maxpool(&mut self, name: &str, x: &Value, k: i64, stride: i64, pad: i64) -> Value {
        let attrs = vec![
            attr_int("ceil_mode", 0),
            attr_ints("dilations", &[1, 1]),
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("pads", &[pad, pad, pad, pad]),
            attr_ints("strides", &[stride, stride]),
        ];
        self.node("MaxPool", name, vec![x.name.clone()], name, attrs);
        let size = |s: i64| (s + 2 * pad - k) / stride + 1;
        Value {
            name: name.to_string(),
            c: x.c,
            h: size(x.h),
            w: size(x.w),
        }
    }

    fn add(&mut self, name: &str, a: &Value, b: &Value) -> Value {
        debug_assert!((a.c, a.h, a.w) == (b.c, b.h, b.w), "{name}: adding {a:?} and {b:?}");
        self.node("Add", name, vec![a.name.clone(), b.name.clone()], name, vec![]);
        Value {
            name: name.to_string(),
            ..a.clone()
        }
    }

    fn global_avg_pool(&mut self, name: &str, x: &Value) -> Value {
        self.node("GlobalAveragePool", name, vec![x.name.clone()], name, vec![]);
        Value {
            name: name.to_string(),
            c: x.c,
            h: 1,
            w: 1,
        }
    }

    fn flatten(&mut self, name: &str, x: &Value, output: Option<&str>) -> Value {
        let output = output.unwrap_or(name);
        self.node("Flatten", name, vec![x.name.clone()], output, vec![attr_int("axis", 1)]);
        Value {
            name: output.to_string(),
            c: x.c * x.h * x.w,
            h: 1,
            w: 1,
        }
    }

    /// A Linear layer as Gemm(x, W^T) + b with `W` stored `[out, in]` (as torch exports it).
    fn gemm(&mut self, name: &str, x: &Value, out: i64, output: Option<&str>) -> Value {
        let fan_in = x.c;
        let inputs = vec![
            x.name.clone(),
            self.uniform_param(&format!("{name}.weight"), &[out, fan_in], fan_in),
            self.uniform_param(&format!("{name}.bias"), &[out], fan_in),
        ];
        let output = output.unwrap_or(name);
        let attrs = vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)];
        self.node("Gemm", name, inputs, output, attrs);
        Value {
            name: output.to_string(),
            c: out,
            h: 1,
            w: 1,
        }
    }

    fn finish(self, arch: Arch, input: [i64; 3], classes: i64, seed: u64) -> Result<ModelProto, String> {
        if self.param_bytes > MAX_PARAM_BYTES {
            let [c, h, w] = input;
            return Err(format!(
                "{arch} for {c}x{h}x{w} inputs and {classes} classes would hold {:.1} GiB of parameters, \
                 more than an ONNX file can (2 GiB): use a smaller input",
                self.param_bytes as f64 / (1u64 << 30) as f64
            ));
        }
        let mut seen = HashSet::new();
        for n in &self.nodes {
            if !seen.insert(n.name()) {
                return Err(format!("internal error: node name `{}` is used twice", n.name()));
            }
        }
        let mut values = HashSet::new();
        for name in self
            .nodes
            .iter()
            .flat_map(|n| &n.output)
            .chain(self.inits.iter().filter_map(|t| t.name.as_ref()))
        {
            if !values.insert(name.as_str()) {
                return Err(format!("internal error: value `{name}` is produced twice"));
            }
        }
        if !values.contains(OUTPUT_NAME) {
            return Err(format!("internal error: no node produces `{OUTPUT_NAME}`"));
        }
        let [c, h, w] = input;
        let graph = GraphProto {
            node: self.nodes,
            name: Some(format!("audit-zoo-{arch}")),
            initializer: self.inits,
            input: vec![value_info(INPUT_NAME, &[None, Some(c), Some(h), Some(w)])],
            output: vec![value_info(OUTPUT_NAME, &[None, Some(classes)])],
            doc_string: Some(format!(
                "{arch} for {c}x{h}x{w} inputs and {classes} classes, seed {seed}, freshly initialised"
            )),
            ..Default::default()
        };
        let meta = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        Ok(ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("audit".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            graph: Some(graph),
            metadata_props: vec![
                meta("audit.zoo.arch", arch.name().into()),
                meta("audit.zoo.input", format!("{c}x{h}x{w}")),
                meta("audit.zoo.classes", classes.to_string()),
                meta("audit.zoo.seed", seed.to_string()),
            ],
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!("PreAct_ResNet18".parse::<Arch>().unwrap(), Arch::PreactResnet18);
        assert!("resnet50".parse::<Arch>().unwrap_err().contains("small-cnn"));
    }

    #[test]
    fn uniform_stays_in_bounds() {
        let mut r = stream(7, "w");
        let xs: Vec<f32> = (0..10_000).map(|_| r.uniform(0.5)).collect();
        assert!(xs.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.02, "{mean}");
        let max = xs.iter().cloned().fold(f32::MIN, f32::max);
        assert!(max > 0.49, "{max}");
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(build(Arch::SmallCnn, [0, 28, 28], 10, 0).is_err());
        assert!(build(Arch::SmallCnn, [1, 28, 28], 0, 0).is_err());
    }
}
