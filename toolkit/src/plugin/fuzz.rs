//! Property-based fuzzing of what the host accepts from a plugin (issue 15): arbitrary and mutated
//! responses (tensor headers, tensors, model bytes, indices, report JSON, status codes) must give
//! an error, never a panic, and whatever is accepted must satisfy the ABI's promises.
//!
//! Three layers: the pure header check, the pure validation of a copied response, and the real
//! ABI path (`LoadedPlugin::call` with `run`/`release` as `extern "C"` functions that hand back
//! responses built from the generated values, in honest buffers: the ABI's one promise the host
//! cannot check is that a pointer has `byte_len` readable bytes).
//!
//! `make test` runs a bounded number of cases (`DEFAULT_CASES`, well under a second in release);
//! `AUDIT_FUZZ_CASES=N` sets another number (50 000 take a few seconds).

use std::cell::RefCell;
use std::path::PathBuf;

use audit_abi as abi;
use proptest::prelude::*;
use serde_json::{Map, Value};

use super::call::{check_tensor_header, status_error, validate, RawResponse, TensorHeader};
use super::schema::Schema;
use super::{CallInput, Kind, LoadedPlugin, Op, OwnedTensor, PluginError};
use crate::data::{Images, LabeledSet, Pixels};

const DEFAULT_CASES: u32 = 2048;

fn config() -> ProptestConfig {
    let cases = std::env::var("AUDIT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const N: usize = 4;
const K: usize = 3;

fn dataset() -> LabeledSet {
    LabeledSet {
        images: Images {
            n: N,
            c: 1,
            h: 2,
            w: 2,
            pixels: Pixels::U8((0..(N * 4) as u8).collect()),
        },
        labels: vec![0, 1, 2, 1],
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Poison), Just(Op::Trigger), Just(Op::Scan), Just(Op::Defend)]
}

/// Dimensions: mostly the right ones, sometimes anything (negative, huge).
fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..6,
        1 => any::<i64>(),
        1 => Just(i64::MAX),
        1 => Just(-1i64),
    ]
}

fn header() -> impl Strategy<Value = TensorHeader> {
    (
        prop_oneof![3 => 1u32..4, 1 => any::<u32>()],
        prop_oneof![4 => 0u32..5, 1 => any::<u32>()],
        proptest::array::uniform8(dim()),
        prop_oneof![3 => 0usize..200, 1 => any::<usize>()],
        any::<bool>(),
    )
        .prop_map(|(dtype, ndim, shape, byte_len, null_data)| TensorHeader {
            dtype,
            ndim,
            shape,
            byte_len,
            null_data,
        })
}

/// A tensor as a plugin could hand it over: dtype, a shape (often the right one), and values
/// whose count may or may not match the shape.
fn tensor() -> impl Strategy<Value = Option<(Vec<usize>, OwnedTensor)>> {
    let shape = prop_oneof![
        Just(vec![N, 1, 2, 2]),
        Just(vec![N]),
        proptest::collection::vec(0usize..6, 0..6),
    ];
    let values = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(OwnedTensor::U8),
        proptest::collection::vec(any::<f32>(), 0..40).prop_map(OwnedTensor::F32),
        proptest::collection::vec(prop_oneof![-2i64..6, any::<i64>()], 0..40).prop_map(OwnedTensor::I64),
    ];
    proptest::option::of((shape, values))
}

/// Report JSON: valid objects, mutated ones (bytes flipped, cut short), other JSON, junk.
fn report_json() -> impl Strategy<Value = String> {
    let valid = prop_oneof![
        Just(r#"{"backdoored": true, "scores": [1.0, 2.5]}"#.to_string()),
        Just(r#"{"backdoored": false}"#.to_string()),
        Just(r#"{"note": "x"}"#.to_string()),
        Just(String::new()),
    ];
    prop_oneof![
        valid.clone(),
        (valid, any::<usize>(), any::<u8>()).prop_map(|(s, at, b)| {
            let mut bytes = s.into_bytes();
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] = b;
                bytes.truncate(i + 1 + at % 3);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }),
        Just("[1, 2, 3]".to_string()),
        Just("\"backdoored\"".to_string()),
        Just("[".repeat(300)),
        ".{0,60}",
    ]
}

fn raw_response() -> impl Strategy<Value = RawResponse> {
    (
        ".{0,20}",
        report_json(),
        tensor(),
        tensor(),
        tensor(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
    )
        .prop_map(|(message, report_json, images, labels, indices, model)| RawResponse {
            message,
            report_json,
            images,
            labels,
            indices,
            model,
        })
}

fn input<'a>(op: Op, params: &'a Map<String, Value>, data: Option<&'a LabeledSet>) -> CallInput<'a> {
    CallInput {
        op,
        params,
        seed: 0,
        device: "cpu",
        model: None,
        data,
        clean: None,
        num_classes: K,
    }
}

/// What an accepted answer must satisfy, whatever the plugin sent.
fn assert_sound(out: &super::CallOutput, op: Op, data: Option<&LabeledSet>) {
    let n = data.map_or(0, LabeledSet::len);
    if let Some(im) = &out.images {
        let len = match &im.pixels {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        };
        assert_eq!(len, im.n * im.c * im.h * im.w);
    }
    if let Some(ix) = &out.indices {
        assert!(ix.iter().all(|&i| i >= 0 && (i as usize) < n), "{ix:?}");
    }
    match op {
        Op::Poison | Op::Trigger => {
            let l = out.labels.as_ref().expect("labels");
            assert_eq!(l.len(), n);
            assert!(l.iter().all(|&x| (0..K as i64).contains(&x)));
            let im = out.images.as_ref().expect("images");
            assert_eq!(im.n, n);
        }
        Op::Scan => assert!(out.report["backdoored"].is_boolean()),
        Op::Defend => assert!(out.model.as_ref().is_some_and(|m| !m.is_empty())),
    }
}

// --- the real ABI path: a plugin whose `run` answers with the generated response ---

/// A generated response held in buffers the fake plugin lends until `release`.
#[derive(Debug, Clone)]
struct Lent {
    status: i32,
    message: Vec<u8>,
    report: Vec<u8>,
    model: Vec<u8>,
    /// (header, data buffer of exactly `byte_len` bytes, or none for a null pointer).
    tensors: [(TensorHeader, Option<Vec<u8>>); 3],
}

thread_local! {
    static LENT: RefCell<Option<Lent>> = const { RefCell::new(None) };
    static RELEASED: RefCell<u32> = const { RefCell::new(0) };
}

fn abi_tensor(h: &TensorHeader, buf: &Option<Vec<u8>>) -> abi::AuditTensor {
    abi::AuditTensor {
        dtype: h.dtype,
        ndim: h.ndim,
        shape: h.shape,
        data: buf.as_ref().map_or(std::ptr::null(), |b| b.as_ptr() as *const _),
        byte_len: h.byte_len,
    }
}

unsafe extern "C" fn fake_run(_req: *const abi::AuditRequest, resp: *mut abi::AuditResponse) -> i32 {
    LENT.with(|l| {
        let l = l.borrow();
        let l = l.as_ref().expect("a response to lend");
        // SAFETY: the host hands a valid, writable response.
        let r = unsafe { &mut *resp };
        r.message = abi::AuditStr {
            ptr: l.message.as_ptr(),
            len: l.message.len(),
        };
        r.report_json = abi::AuditStr {
            ptr: l.report.as_ptr(),
            len: l.report.len(),
        };
        r.model = abi::AuditBytes {
            ptr: l.model.as_ptr(),
            len: l.model.len(),
        };
        r.images = abi_tensor(&l.tensors[0].0, &l.tensors[0].1);
        r.labels = abi_tensor(&l.tensors[1].0, &l.tensors[1].1);
        r.indices = abi_tensor(&l.tensors[2].0, &l.tensors[2].1);
        l.status
    })
}

unsafe extern "C" fn fake_release(_resp: *mut abi::AuditResponse) {
    RELEASED.with(|r| *r.borrow_mut() += 1);
}

fn fake_plugin(kind: Kind) -> LoadedPlugin {
    LoadedPlugin {
        path: PathBuf::from("/fuzz/libfake.so"),
        sha256: String::new(),
        abi_version: abi::AUDIT_ABI_VERSION,
        kind,
        name: "fake".into(),
        version: "0".into(),
        description: String::new(),
        build_info: String::new(),
        schema_json: "{}".into(),
        schema: Schema::parse(r#"{"type":"object","additionalProperties":false,"properties":{}}"#).unwrap(),
        capabilities: 0,
        run: fake_run,
        release: fake_release,
    }
}

/// A header whose buffer is honest: `byte_len` bytes are really there (bounded), or the pointer
/// is null. Headers are built to be right for the op now and then, so acceptance is reached too.
fn lent_tensor() -> impl Strategy<Value = (TensorHeader, Option<Vec<u8>>)> {
    let exact = prop_oneof![
        // Images of the request's shape, u8.
        Just((abi::AUDIT_DTYPE_U8, vec![N as i64, 1, 2, 2], N * 4)),
        // N labels or indices, i64.
        Just((abi::AUDIT_DTYPE_I64, vec![N as i64], N * 8)),
        Just((abi::AUDIT_DTYPE_I64, vec![2], 16)),
        Just((abi::AUDIT_DTYPE_F32, vec![N as i64, 1, 2, 2], N * 16)),
    ]
    .prop_map(|(dtype, dims, byte_len)| {
        let mut shape = [0i64; abi::AUDIT_MAX_DIMS];
        shape[..dims.len()].copy_from_slice(&dims);
        TensorHeader {
            dtype,
            ndim: dims.len() as u32,
            shape,
            byte_len,
            null_data: false,
        }
    });
    let any_header = header().prop_map(|mut h| {
        // Keep the buffer allocatable: the header is free, the lent bytes are honest.
        h.byte_len %= 4096;
        h
    });
    (prop_oneof![exact, any_header], any::<u8>(), any::<bool>()).prop_map(|(h, fill, small)| {
        let buf = (!h.null_data).then(|| {
            // Small values half the time, so that i64 labels/indices are sometimes in range.
            let b = if small { fill % 3 } else { fill };
            let mut v = vec![0u8; h.byte_len];
            for (i, x) in v.iter_mut().enumerate() {
                *x = if i % 8 == 0 {
                    b
                } else if small {
                    0
                } else {
                    fill
                };
            }
            v
        });
        (h, buf)
    })
}

fn lent() -> impl Strategy<Value = Lent> {
    (
        prop_oneof![4 => Just(abi::AUDIT_STATUS_OK), 1 => any::<i32>()],
        proptest::collection::vec(any::<u8>(), 0..20),
        report_json().prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..8),
        lent_tensor(),
        lent_tensor(),
        lent_tensor(),
    )
        .prop_map(|(status, message, report, model, a, b, c)| Lent {
            status,
            message,
            report,
            model,
            tensors: [a, b, c],
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_tensor_headers_are_checked_without_panicking(h in header()) {
        if let Ok(Some((shape, elems))) = check_tensor_header(&h, "t") {
            let esize = abi::dtype_size(h.dtype);
            prop_assert!(esize > 0);
            prop_assert_eq!(elems.checked_mul(esize), Some(h.byte_len));
            prop_assert_eq!(shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)), Some(elems));
            prop_assert!(h.byte_len == 0 || !h.null_data);
        }
    }

    #[test]
    fn fuzz_copied_responses_are_validated_without_panicking(
        raw in raw_response(),
        op in op(),
        with_data in any::<bool>(),
    ) {
        let set = dataset();
        let params = Map::new();
        let data = with_data.then_some(&set);
        if let Ok(out) = validate(raw, &input(op, &params, data)) {
            assert_sound(&out, op, data);
        }
    }

    #[test]
    fn fuzz_status_codes_map_to_errors(status in any::<i32>(), message in ".{0,30}") {
        prop_assume!(status != abi::AUDIT_STATUS_OK);
        let e = status_error(status, message.clone(), "fake", std::path::Path::new("/x.so"));
        let text = e.to_string();
        prop_assert!(text.contains("fake") && text.contains("/x.so"), "{}", text);
        match e {
            PluginError::Cancelled { .. } => prop_assert_eq!(status, abi::AUDIT_STATUS_CANCELLED),
            PluginError::InvalidInput { .. } => prop_assert!(
                status == abi::AUDIT_STATUS_INVALID_INPUT || status == abi::AUDIT_STATUS_UNSUPPORTED
            ),
            PluginError::Failed { message: m, .. } => {
                prop_assert!(m == message || (message.trim().is_empty() && m.contains("without a message")));
            }
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn fuzz_responses_through_the_real_abi_path(l in lent(), op in op()) {
        let plugin = fake_plugin(op.kind());
        let set = dataset();
        let params = Map::new();
        let status = l.status;
        LENT.with(|c| *c.borrow_mut() = Some(l));
        RELEASED.with(|r| *r.borrow_mut() = 0);
        let res = plugin.call(&input(op, &params, Some(&set)));
        LENT.with(|c| *c.borrow_mut() = None);
        prop_assert_eq!(RELEASED.with(|r| *r.borrow()), 1, "release runs exactly once");
        match res {
            Ok(out) => {
                prop_assert_eq!(status, abi::AUDIT_STATUS_OK);
                assert_sound(&out, op, Some(&set));
            }
            Err(e) => prop_assert!(e.to_string().contains("fake"), "{}", e),
        }
    }
}

/// Found by the fuzzer: a trigger answer's indices were never range-checked (and `plugins run
/// --json` prints them).
#[test]
fn fuzz_finding_trigger_indices_out_of_range_are_refused() {
    let set = dataset();
    let params = Map::new();
    let raw = RawResponse {
        images: Some((vec![N, 1, 2, 2], OwnedTensor::U8(vec![7; N * 4]))),
        labels: Some((vec![N], OwnedTensor::I64(vec![0; N]))),
        indices: Some((vec![2], OwnedTensor::I64(vec![1, 4_412_750_543_122_677_053]))),
        ..RawResponse::default()
    };
    let e = validate(raw, &input(Op::Trigger, &params, Some(&set))).unwrap_err();
    assert!(e.contains("index 4412750543122677053 outside 0..4"), "{e}");
}

/// The fuzzers above must reach acceptance too, or they test only the error paths.
#[test]
fn fuzz_generators_reach_accepted_answers() {
    let set = dataset();
    let params = Map::new();
    let labels: Vec<i64> = vec![2; N];
    let raw = RawResponse {
        images: Some((vec![N, 1, 2, 2], OwnedTensor::U8(vec![7; N * 4]))),
        labels: Some((vec![N], OwnedTensor::I64(labels))),
        ..RawResponse::default()
    };
    let out = validate(raw.clone(), &input(Op::Trigger, &params, Some(&set))).unwrap();
    assert_sound(&out, Op::Trigger, Some(&set));
    // The same answer without the request's data is an error, not a panic (it once was one).
    let e = validate(raw, &input(Op::Trigger, &params, None)).unwrap_err();
    assert!(e.contains("without data"), "{e}");
    // And through the ABI path.
    let mut shape = [0i64; abi::AUDIT_MAX_DIMS];
    shape[0] = N as i64;
    let lab: Vec<u8> = [1i64; N].iter().flat_map(|x| x.to_ne_bytes()).collect();
    let mut im_shape = [0i64; abi::AUDIT_MAX_DIMS];
    im_shape[..4].copy_from_slice(&[N as i64, 1, 2, 2]);
    let h = |dtype, ndim, shape, byte_len| TensorHeader {
        dtype,
        ndim,
        shape,
        byte_len,
        null_data: false,
    };
    LENT.with(|c| {
        *c.borrow_mut() = Some(Lent {
            status: abi::AUDIT_STATUS_OK,
            message: vec![],
            report: vec![],
            model: vec![],
            tensors: [
                (h(abi::AUDIT_DTYPE_U8, 4, im_shape, N * 4), Some(vec![1; N * 4])),
                (h(abi::AUDIT_DTYPE_I64, 1, shape, N * 8), Some(lab)),
                (h(0, 0, [0; 8], 0), None),
            ],
        })
    });
    let out = fake_plugin(Kind::Attack)
        .call(&input(Op::Trigger, &params, Some(&set)))
        .unwrap();
    assert_eq!(out.labels, Some(vec![1; N]));
    LENT.with(|c| *c.borrow_mut() = None);
}
