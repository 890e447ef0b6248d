//! Fuzzing the loaders (issue 15): mutations of valid files (bit flips, byte edits, truncation,
//! inserted and removed runs, length-field edits as protobuf varints and as 32-bit integers) and
//! random bytes, fed to the ONNX loader (audit_nn::Model::load, then one forward pass when it
//! loads) and to the NPZ, IDX, CIFAR-10/100 and ImageFolder readers. Each must answer Ok or an
//! error: never panic, never allocate without bound (the process would be killed).
//!
//! `make test` runs a bounded number of cases per target (`AUDIT_FUZZ_CASES`, default 48);
//! `make fuzz` runs many more. Seeds are built here, deterministically, from tiny valid files.

use std::path::Path;

use audit::data::{self, write_npz, DataFormat, Images, NpzArray, Pixels};
use audit_nn::prost::Message;
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases() -> u32 {
    std::env::var("AUDIT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// A protobuf length field edit: a varint written over the bytes at the position.
    Varint(usize, u64),
    /// A header field edit: a 32-bit integer, big or little endian.
    U32(usize, u32, bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let big = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0x7f),
        Just(0xffff),
        Just(u32::MAX as u64),
        Just(1 << 40),
        Just(u64::MAX),
        any::<u64>()
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Mutation::Set(p, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, v)| Mutation::Insert(p, v)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Mutation::Remove(p, n)),
        (any::<usize>(), big).prop_map(|(p, v)| Mutation::Varint(p, v)),
        (any::<usize>(), any::<u32>(), any::<bool>()).prop_map(|(p, v, be)| Mutation::U32(p, v, be)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..5)
}

fn apply(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % len };
        match m {
            Mutation::Flip(p, bit) if !b.is_empty() => {
                let i = at(*p, b.len());
                b[i] ^= 1 << bit;
            }
            Mutation::Set(p, v) if !b.is_empty() => {
                let i = at(*p, b.len());
                b[i] = *v;
            }
            Mutation::Truncate(p) => b.truncate(at(*p, b.len() + 1)),
            Mutation::Insert(p, v) => {
                let i = at(*p, b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Mutation::Remove(p, n) if !b.is_empty() => {
                let i = at(*p, b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Mutation::Varint(p, v) => {
                let mut enc = Vec::new();
                let mut v = *v;
                loop {
                    let byte = (v & 0x7f) as u8;
                    v >>= 7;
                    if v == 0 {
                        enc.push(byte);
                        break;
                    }
                    enc.push(byte | 0x80);
                }
                let i = at(*p, b.len() + 1);
                let end = (i + enc.len()).min(b.len());
                b.splice(i..end, enc);
            }
            Mutation::U32(p, v, be) => {
                let enc = if *be { v.to_be_bytes() } else { v.to_le_bytes() };
                let i = at(*p, b.len() + 1);
                let end = (i + 4).min(b.len());
                b.splice(i..end, enc);
            }
            _ => {}
        }
    }
    b
}

// ---------------------------------------------------------------- ONNX

fn onnx_seeds() -> Vec<Vec<u8>> {
    use audit_nn::zoo::{build, Arch};
    let mut seeds = vec![build(Arch::SmallCnn, [1, 4, 4], 3, 7).unwrap().encode_to_vec()];
    // The seed corpus beside this file: small models exported by other tools.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    if let Ok(dir) = std::fs::read_dir(&corpus) {
        let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "onnx")) {
            seeds.push(std::fs::read(f).unwrap());
        }
    }
    seeds
}

fn load_and_run(bytes: &[u8]) {
    if let Ok(proto) = audit_nn::model::parse(bytes) {
        let _ = audit_nn::model::unsupported_nodes(&proto);
    }
    let Ok(model) = audit_nn::Model::load(bytes, None) else {
        return;
    };
    let Some(input) = model.inputs.first() else {
        return;
    };
    let dims: Vec<i64> = input.dims.iter().map(|d| d.unwrap_or(1)).collect();
    let n: i64 = dims.iter().product();
    if dims.is_empty() || !(1..=4096).contains(&n) {
        return;
    }
    if let Err(e) = model.predict_f32(&vec![0.5; n as usize], &dims) {
        // The engine turns a libtorch panic inside an op into this error; in strict mode (`make
        // fuzz` reports them) each one is a finding: the op should have checked its input.
        if std::env::var_os("AUDIT_FUZZ_STRICT").is_some()
            && (e.to_string().contains("libtorch rejected it") || e.to_string().contains("internal error"))
        {
            panic!("guarded panic: {e}");
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_onnx_loader_mutations(pick in any::<usize>(), muts in mutations()) {
        let seeds = onnx_seeds();
        load_and_run(&apply(&seeds[pick % seeds.len()], &muts));
    }

    #[test]
    fn fuzz_onnx_loader_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        load_and_run(&bytes);
    }
}

/// Ops the structured edits switch nodes to: those whose shapes, axes or sizes come from inputs
/// or attributes, where a bad value could reach libtorch.
const OPS: &[&str] = &[
    "Reshape",
    "Gather",
    "Slice",
    "Concat",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Pad",
    "Tile",
    "Expand",
    "Range",
    "ConstantOfShape",
    "Resize",
    "Split",
    "MatMul",
    "Conv",
    "MaxPool",
    "AveragePool",
    "Softmax",
    "TopK",
    "Einsum",
    "GatherND",
    "ScatterND",
    "ScatterElements",
    "GatherElements",
    "CumSum",
    "Trilu",
    "DepthToSpace",
    "SpaceToDepth",
    "Flatten",
    "Gemm",
    "BatchNormalization",
    "ReduceMean",
    "ArgMax",
    "Clip",
    "Where",
    "Cast",
    "LRN",
    "LpNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "Hardmax",
    "Mod",
    "Pow",
    "Shape",
    "Size",
    "ConvTranspose",
    "GlobalAveragePool",
    "Upsample",
];

/// An edit of the model's structure (after which it is encoded and loaded).
#[derive(Debug, Clone)]
enum Edit {
    OpType(usize, usize),
    Attr(usize, usize, i64, Vec<i64>),
    IntInput(usize, usize, Vec<i64>),
    InitDims(usize, Vec<i64>),
    DropInput(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let v = || {
        proptest::collection::vec(
            prop_oneof![-3i64..8, Just(i64::MAX), Just(i64::MIN), Just(1 << 31), any::<i64>()],
            0..5,
        )
    };
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(n, o)| Edit::OpType(n, o)),
        (any::<usize>(), any::<usize>(), prop_oneof![-3i64..8, any::<i64>()], v())
            .prop_map(|(n, a, i, l)| Edit::Attr(n, a, i, l)),
        (any::<usize>(), 0usize..4, v()).prop_map(|(n, k, l)| Edit::IntInput(n, k, l)),
        (any::<usize>(), v()).prop_map(|(t, d)| Edit::InitDims(t, d)),
        (any::<usize>(), any::<usize>()).prop_map(|(n, k)| Edit::DropInput(n, k)),
    ]
}

fn apply_edits(seed: &audit_nn::proto::ModelProto, edits: &[Edit]) -> Vec<u8> {
    use audit_nn::proto::tensor_proto::DataType;
    let mut m = seed.clone();
    let g = m.graph.as_mut().unwrap();
    let n_nodes = g.node.len();
    for (k, e) in edits.iter().enumerate() {
        match e {
            Edit::OpType(n, o) => g.node[n % n_nodes].op_type = Some(OPS[o % OPS.len()].to_string()),
            Edit::Attr(n, a, i, l) => {
                let node = &mut g.node[n % n_nodes];
                if !node.attribute.is_empty() {
                    let len = node.attribute.len();
                    let attr = &mut node.attribute[a % len];
                    if attr.i.is_some() {
                        attr.i = Some(*i);
                    }
                    if !attr.ints.is_empty() {
                        attr.ints = l.clone();
                    }
                }
            }
            Edit::IntInput(n, slot, l) => {
                let name = format!("fuzz_ints_{k}");
                g.initializer.push(audit_nn::proto::TensorProto {
                    name: Some(name.clone()),
                    data_type: Some(DataType::Int64 as i32),
                    dims: vec![l.len() as i64],
                    int64_data: l.clone(),
                    ..Default::default()
                });
                let node = &mut g.node[n % n_nodes];
                if *slot < node.input.len() {
                    node.input[*slot] = name;
                } else {
                    node.input.push(name);
                }
            }
            Edit::InitDims(t, d) if !g.initializer.is_empty() => {
                let len = g.initializer.len();
                g.initializer[t % len].dims = d.clone();
            }
            Edit::DropInput(n, slot) => {
                let node = &mut g.node[n % n_nodes];
                if !node.input.is_empty() {
                    let len = node.input.len();
                    node.input[slot % len] = String::new();
                }
            }
            _ => {}
        }
    }
    m.encode_to_vec()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_onnx_structured_edits(edits in proptest::collection::vec(edit(), 1..4)) {
        let seed = audit_nn::zoo::build(audit_nn::zoo::Arch::SmallCnn, [1, 4, 4], 3, 7).unwrap();
        load_and_run(&apply_edits(&seed, &edits));
    }
}

// ---------------------------------------------------------------- datasets

fn images(n: usize, c: usize, h: usize, w: usize) -> Images {
    Images {
        n,
        c,
        h,
        w,
        pixels: Pixels::U8((0..n * c * h * w).map(|i| (i * 13 % 256) as u8).collect()),
    }
}

fn npz_seed() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.npz");
    let x = images(3, 1, 2, 2);
    write_npz(
        &p,
        &[
            ("x_train", NpzArray::Images(&x)),
            ("y_train", NpzArray::I64(&[0, 1, 2])),
            ("x_test", NpzArray::Images(&x)),
            ("y_test", NpzArray::I64(&[2, 1, 0])),
            ("poison_idx", NpzArray::I64(&[1])),
        ],
    )
    .unwrap();
    std::fs::read(p).unwrap()
}

fn load(path: &Path, format: DataFormat) {
    let _ = data::load(path.to_str().unwrap(), format, 0);
}

fn idx(dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// The four IDX files of a 2-train, 1-test set of 2x2 images.
fn idx_seed() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("train-images-idx3-ubyte", idx(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8])),
        ("train-labels-idx1-ubyte", idx(&[2], &[0, 9])),
        ("t10k-images-idx3-ubyte", idx(&[1, 2, 2], &[9, 8, 7, 6])),
        ("t10k-labels-idx1-ubyte", idx(&[1], &[3])),
    ]
}

fn cifar_record(label: &[u8]) -> Vec<u8> {
    let mut r = label.to_vec();
    r.extend((0..3072).map(|p| (p % 251) as u8));
    r
}

fn cifar_seed(hundred: bool) -> Vec<(&'static str, Vec<u8>)> {
    if hundred {
        let b = [cifar_record(&[1, 42]), cifar_record(&[19, 99])].concat();
        vec![("train.bin", b.clone()), ("test.bin", b)]
    } else {
        let b = [cifar_record(&[3]), cifar_record(&[9])].concat();
        [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
            "test_batch.bin",
        ]
        .into_iter()
        .map(|n| (n, b.clone()))
        .collect()
    }
}

fn png(w: u32, h: u32, v: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([v, 255 - v, v / 2]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Writes `files` into a fresh folder, the one at `pick` mutated.
fn write_mutated(dir: &Path, files: &[(&str, Vec<u8>)], pick: usize, muts: &[Mutation]) {
    let k = pick % files.len();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let b = if i == k { apply(bytes, muts) } else { bytes.clone() };
        std::fs::write(p, b).unwrap();
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_npz_reader(muts in mutations()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.npz");
        std::fs::write(&p, apply(&npz_seed(), &muts)).unwrap();
        load(&p, DataFormat::Npz);
    }

    #[test]
    fn fuzz_npz_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.npz");
        // A zip signature first, so the reader gets past the magic more often.
        let mut b = b"PK\x03\x04".to_vec();
        b.extend(bytes);
        std::fs::write(&p, b).unwrap();
        load(&p, DataFormat::Npz);
    }

    #[test]
    fn fuzz_idx_reader(pick in any::<usize>(), gz in any::<bool>(), muts in mutations()) {
        let dir = tempfile::tempdir().unwrap();
        let mut files = idx_seed();
        if gz {
            files = files.into_iter().map(|(n, b)| (n, gzip(&b))).collect();
        }
        write_mutated(dir.path(), &files, pick, &muts);
        load(dir.path(), DataFormat::Idx);
    }

    #[test]
    fn fuzz_cifar_reader(pick in any::<usize>(), hundred in any::<bool>(), muts in mutations()) {
        let dir = tempfile::tempdir().unwrap();
        write_mutated(dir.path(), &cifar_seed(hundred), pick, &muts);
        load(dir.path(), if hundred { DataFormat::Cifar100 } else { DataFormat::Cifar10 });
    }

    #[test]
    fn fuzz_image_folder_reader(pick in any::<usize>(), muts in mutations()) {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            ("train/cat/a.png", png(3, 2, 10)),
            ("train/dog/b.png", png(3, 2, 90)),
            ("test/cat/c.png", png(3, 2, 30)),
            ("test/dog/d.png", png(3, 2, 200)),
        ];
        write_mutated(dir.path(), &files, pick, &muts);
        load(dir.path(), DataFormat::ImageFolder);
    }
}

#[test]
fn mutations_change_the_seed_and_stay_in_bounds() {
    // The harness itself: every mutation kind applies without going out of bounds, even on
    // empty input, and changes a seed.
    let seed = b"0123456789".to_vec();
    for m in [
        Mutation::Flip(3, 1),
        Mutation::Set(99, b'x'),
        Mutation::Truncate(4),
        Mutation::Insert(100, vec![1, 2]),
        Mutation::Remove(8, 50),
        Mutation::Varint(2, u64::MAX),
        Mutation::U32(9, 0xdead_beef, true),
    ] {
        assert_ne!(apply(&seed, std::slice::from_ref(&m)), seed, "{m:?}");
        let _ = apply(&[], &[m]);
    }
    assert_eq!(apply(&seed, &[Mutation::Varint(0, 300)])[..2], [0xac, 0x02]);
}
