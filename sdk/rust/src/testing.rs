//! The test kit of plugin authors (cargo feature `testing`; bundled plugins take it as a
//! dev-dependency): owned datasets lent as [`DatasetRef`] exactly as the host lends them (through
//! the ABI views), calls with parameters resolved from a schema, a call the host has cancelled,
//! a lock for tests that draw from libtorch's global generator, and a run through a plugin's
//! exported C entry point, the way the host makes it.

use serde_json::Value;

use crate::abi::{self, AuditDataset, AuditTensor};
use crate::rng::Rng;
use crate::{Call, DatasetRef, Host, Params, Tensor, TensorData, TensorRef};

/// An owned labelled image set (NCHW) that lends itself as a [`DatasetRef`].
#[derive(Debug)]
pub struct TestData {
    // The ABI views in `raw` point into these buffers (heap storage: moving `TestData` keeps them).
    _images: TensorData,
    labels: Vec<i64>,
    raw: AuditDataset,
}

fn view(dtype: u32, shape: &[usize], data: *const u8, byte_len: usize) -> AuditTensor {
    let mut s = [0i64; abi::AUDIT_MAX_DIMS];
    for (d, &x) in s.iter_mut().zip(shape) {
        *d = x as i64;
    }
    AuditTensor {
        dtype,
        ndim: shape.len() as u32,
        shape: s,
        data: data.cast(),
        byte_len,
    }
}

impl TestData {
    fn new(shape: [usize; 4], images: TensorData, labels: Vec<i64>, num_classes: usize) -> TestData {
        let (dtype, ptr, bytes) = match &images {
            TensorData::U8(v) => (abi::AUDIT_DTYPE_U8, v.as_ptr(), v.len()),
            TensorData::F32(v) => (abi::AUDIT_DTYPE_F32, v.as_ptr().cast::<u8>(), v.len() * 4),
            TensorData::I64(v) => (abi::AUDIT_DTYPE_I64, v.as_ptr().cast::<u8>(), v.len() * 8),
        };
        let raw = AuditDataset {
            struct_size: std::mem::size_of::<AuditDataset>() as u32,
            num_classes: num_classes as u32,
            images: view(dtype, &shape, ptr, bytes),
            labels: view(
                abi::AUDIT_DTYPE_I64,
                &[labels.len()],
                labels.as_ptr().cast(),
                labels.len() * 8,
            ),
        };
        TestData {
            _images: images,
            labels,
            raw,
        }
    }

    /// u8 images of `shape` (N, C, H, W).
    pub fn u8(shape: [usize; 4], pixels: Vec<u8>, labels: Vec<i64>, num_classes: usize) -> TestData {
        assert_eq!(
            pixels.len(),
            shape.iter().product::<usize>(),
            "pixels do not match the shape"
        );
        TestData::new(shape, TensorData::U8(pixels), labels, num_classes)
    }

    /// f32 images of `shape` (N, C, H, W).
    pub fn f32(shape: [usize; 4], pixels: Vec<f32>, labels: Vec<i64>, num_classes: usize) -> TestData {
        assert_eq!(
            pixels.len(),
            shape.iter().product::<usize>(),
            "pixels do not match the shape"
        );
        TestData::new(shape, TensorData::F32(pixels), labels, num_classes)
    }

    /// Random u8 images (seeded), labels `i % num_classes`.
    pub fn random_u8(shape: [usize; 4], num_classes: usize, seed: u64) -> TestData {
        let mut rng = Rng::new(seed);
        let pixels = (0..shape.iter().product::<usize>())
            .map(|_| rng.below(256) as u8)
            .collect();
        let labels = (0..shape[0]).map(|i| (i % num_classes) as i64).collect();
        TestData::u8(shape, pixels, labels, num_classes)
    }

    /// The same random images as [`TestData::random_u8`], as f32 in 0..1.
    pub fn random_f32(shape: [usize; 4], num_classes: usize, seed: u64) -> TestData {
        let mut rng = Rng::new(seed);
        let pixels = (0..shape.iter().product::<usize>())
            .map(|_| rng.below(256) as f32 / 255.0)
            .collect();
        let labels = (0..shape[0]).map(|i| (i % num_classes) as i64).collect();
        TestData::f32(shape, pixels, labels, num_classes)
    }

    /// The set as the host lends it.
    pub fn dataset(&self) -> DatasetRef<'_> {
        if self.labels.is_empty() {
            // `DatasetRef::from_abi` cannot lend an empty set: the SDK views a 0-byte tensor as a
            // dangling `&[u8]` and `as_i64` then builds a misaligned `&[i64]` (a debug-build abort).
            // Assemble the empty view by hand instead.
            // SAFETY: as below; a u8 image tensor has no alignment requirement.
            let images = unsafe { TensorRef::from_abi(&self.raw.images, "data.images") };
            let images = images.expect("valid test images").expect("images present");
            return DatasetRef {
                images,
                labels: &[],
                num_classes: self.raw.num_classes as usize,
            };
        }
        // SAFETY: `raw` points into `self`'s own buffers, which live (unmoved on the heap) as long
        // as the borrow of `self`.
        unsafe { DatasetRef::from_abi(&self.raw, "data") }
            .expect("valid test dataset")
            .expect("dataset present")
    }
}

/// `overrides` (a JSON object) resolved against `schema`: defaults filled, values checked.
/// Panics when an override is invalid.
pub fn params(schema: &str, overrides: Value) -> Params {
    let given = Params(overrides.as_object().cloned().expect("overrides must be a JSON object"));
    given
        .resolve(schema)
        .unwrap_or_else(|e| panic!("invalid test parameters: {e}"))
}

/// A call with no host (progress and logs are no-ops), device "cpu".
pub fn call(params: Params, seed: u64) -> Call<'static> {
    Call {
        host: Host::new(None),
        params,
        seed,
        device: "cpu",
    }
}

/// Serialises the tests of one test binary that draw from libtorch's random generator, which is
/// global to the process: parallel tests would interleave their draws (shuffles, initialisation)
/// and a test's outcome would depend on what ran beside it. Hold the guard for the whole test.
pub fn torch_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

unsafe extern "C" fn always_cancelled(_ctx: *mut std::ffi::c_void) -> i32 {
    1
}

/// A call whose host reports the run as cancelled from the start (as after Ctrl-C).
pub fn cancelled_call(params: Params) -> Call<'static> {
    let api: &'static abi::AuditHostApi = Box::leak(Box::new(abi::AuditHostApi {
        struct_size: std::mem::size_of::<abi::AuditHostApi>() as u32,
        abi_min: abi::AUDIT_ABI_VERSION,
        abi_max: abi::AUDIT_ABI_VERSION,
        _reserved: 0,
        ctx: std::ptr::null_mut(),
        log: None,
        progress: None,
        is_cancelled: Some(always_cancelled),
    }));
    Call {
        host: Host::new(Some(api)),
        params,
        seed: 0,
        device: "cpu",
    }
}

/// `n` 1x28x28 images of 10 classes that a small CNN learns in an epoch or two: class k is a
/// bright 6x6 block at one of ten positions, over faint noise.
pub fn blocks(n: usize, seed: u64) -> TestData {
    let mut rng = Rng::new(seed);
    let mut pixels = vec![0u8; n * 28 * 28];
    let labels: Vec<i64> = (0..n).map(|i| (i % 10) as i64).collect();
    for (i, &y) in labels.iter().enumerate() {
        let img = &mut pixels[i * 784..(i + 1) * 784];
        for p in img.iter_mut() {
            *p = rng.below(40) as u8;
        }
        let (r0, c0) = (2 + 12 * (y as usize / 5), 1 + 5 * (y as usize % 5));
        for r in r0..r0 + 6 {
            for c in c0..c0 + 6 {
                img[r * 28 + c] = 200 + rng.below(56) as u8;
            }
        }
    }
    TestData::u8([n, 1, 28, 28], pixels, labels, 10)
}

/// The elements of a u8 tensor (panics otherwise).
pub fn u8_pixels(t: &Tensor) -> &[u8] {
    match &t.data {
        TensorData::U8(v) => v,
        other => panic!("expected u8 images, got {:?}", std::mem::discriminant(other)),
    }
}

/// The elements of an f32 tensor (panics otherwise).
pub fn f32_pixels(t: &Tensor) -> &[f32] {
    match &t.data {
        TensorData::F32(v) => v,
        other => panic!("expected f32 images, got {:?}", std::mem::discriminant(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_data_round_trips_through_the_abi_views() {
        let t = TestData::random_u8([5, 3, 4, 6], 3, 1);
        let d = t.dataset();
        assert_eq!(d.len(), 5);
        assert_eq!(d.chw(), (3, 4, 6));
        assert_eq!(d.labels, &[0, 1, 2, 0, 1]);
        assert_eq!(d.images.as_u8().unwrap().len(), 5 * 72);
        let f = TestData::random_f32([2, 1, 2, 2], 2, 1);
        let fd = f.dataset();
        assert!(fd.images.as_f32().unwrap().iter().all(|v| (0.0..=1.0).contains(v)));
        let e = TestData::u8([0, 1, 2, 2], vec![], vec![], 2);
        assert!(e.dataset().is_empty());
    }
}

/// What a plugin answered through the C ABI, copied out before `release`.
#[derive(Debug, Clone)]
pub struct AbiOutcome {
    /// The descriptor's name.
    pub name: String,
    /// The descriptor's parameter schema.
    pub schema: String,
    /// The descriptor's capabilities.
    pub capabilities: u64,
    /// `AUDIT_STATUS_*` of the run.
    pub status: i32,
    /// The response message.
    pub message: String,
    /// The report (`Null` when empty).
    pub report: Value,
    /// The returned images' shape and raw bytes.
    pub image_shape: Vec<i64>,
    /// Raw bytes of the returned images.
    pub image_bytes: Vec<u8>,
    /// Returned labels.
    pub labels: Vec<i64>,
    /// Returned indices.
    pub indices: Vec<i64>,
}

fn copy_i64(t: &AuditTensor) -> Vec<i64> {
    if t.byte_len == 0 {
        return Vec::new();
    }
    // SAFETY: the plugin filled the view with `byte_len` valid, aligned bytes of i64.
    unsafe { std::slice::from_raw_parts(t.data.cast::<i64>(), t.byte_len / 8) }.to_vec()
}

fn copy_str(s: &abi::AuditStr) -> String {
    if s.len == 0 {
        return String::new();
    }
    // SAFETY: the plugin filled the view with `len` valid bytes.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(s.ptr, s.len) }).into_owned()
}

/// Runs `op` on `data` through a plugin's exported entry point, the way the host does: negotiate,
/// `run` with `params_json`, copy the response, `release`.
pub fn run_through_abi(
    negotiate: abi::AuditNegotiateFn,
    op: u32,
    params_json: &str,
    seed: u64,
    data: &TestData,
) -> AbiOutcome {
    let host = abi::AuditHostApi {
        struct_size: std::mem::size_of::<abi::AuditHostApi>() as u32,
        abi_min: abi::AUDIT_ABI_VERSION,
        abi_max: abi::AUDIT_ABI_VERSION,
        _reserved: 0,
        ctx: std::ptr::null_mut(),
        log: None,
        progress: None,
        is_cancelled: None,
    };
    let mut neg = abi::AuditNegotiation {
        struct_size: std::mem::size_of::<abi::AuditNegotiation>() as u32,
        abi_version: 0,
        descriptor: std::ptr::null(),
    };
    // SAFETY: valid host table and out-struct.
    assert_eq!(unsafe { negotiate(&host, &mut neg) }, abi::AUDIT_STATUS_OK);
    // SAFETY: negotiation succeeded, so the descriptor is valid for the life of the process.
    let desc = unsafe { &*neg.descriptor };
    let request = abi::AuditRequest {
        struct_size: std::mem::size_of::<abi::AuditRequest>() as u32,
        op,
        host: &host,
        params_json: abi::AuditStr::from_str(params_json),
        seed,
        device: abi::AuditStr::from_str("cpu"),
        model: abi::AuditBytes::EMPTY,
        data: data.raw,
        clean: AuditDataset::ABSENT,
    };
    // SAFETY: all-zero is a valid AuditResponse (null pointers, zero lengths).
    let mut resp: abi::AuditResponse = unsafe { std::mem::zeroed() };
    resp.struct_size = std::mem::size_of::<abi::AuditResponse>() as u32;
    let run = desc.run.expect("descriptor has run");
    // SAFETY: valid request (its views borrow `data`, alive here) and a zeroed response.
    let status = unsafe { run(&request, &mut resp) };
    let report = copy_str(&resp.report_json);
    let image_bytes = if resp.images.byte_len == 0 {
        Vec::new()
    } else {
        // SAFETY: the plugin filled the view with `byte_len` valid bytes.
        unsafe { std::slice::from_raw_parts(resp.images.data.cast::<u8>(), resp.images.byte_len) }.to_vec()
    };
    let outcome = AbiOutcome {
        name: copy_str(&desc.name),
        schema: copy_str(&desc.params_schema),
        capabilities: desc.capabilities,
        status,
        message: copy_str(&resp.message),
        report: if report.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&report).expect("report JSON")
        },
        image_shape: resp.images.shape[..resp.images.ndim as usize].to_vec(),
        image_bytes,
        labels: copy_i64(&resp.labels),
        indices: copy_i64(&resp.indices),
    };
    let release = desc.release.expect("descriptor has release");
    // SAFETY: filled by `run`, released once.
    unsafe { release(&mut resp) };
    outcome
}
