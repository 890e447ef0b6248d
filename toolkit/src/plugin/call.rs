//! Calling a plugin: lend the inputs as borrowed views, check every field of the answer, copy
//! the results into host memory, then hand the response back to the plugin's `release`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use audit_abi as abi;
use serde_json::{Map, Value};

use super::{host, LoadedPlugin, Op, PluginError};
use crate::data::{Images, LabeledSet, Pixels};

/// What to send.
#[derive(Debug)]
pub struct CallInput<'a> {
    pub op: Op,
    /// Validated parameters (see `Schema::resolve`).
    pub params: &'a Map<String, Value>,
    pub seed: u64,
    pub device: &'a str,
    pub model: Option<&'a [u8]>,
    pub data: Option<&'a LabeledSet>,
    pub clean: Option<&'a LabeledSet>,
    pub num_classes: usize,
}

/// A tensor copied out of the plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedTensor {
    U8(Vec<u8>),
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// What came back, owned by the host.
#[derive(Debug, Default)]
pub struct CallOutput {
    pub images: Option<Images>,
    pub labels: Option<Vec<i64>>,
    pub indices: Option<Vec<i64>>,
    pub model: Option<Vec<u8>>,
    pub report: Map<String, Value>,
    /// A warning the plugin attached to a successful answer.
    pub message: String,
}

fn tensor(shape: &[usize], dtype: u32, data: *const u8, byte_len: usize) -> abi::AuditTensor {
    let mut s = [0i64; abi::AUDIT_MAX_DIMS];
    for (d, &v) in s.iter_mut().zip(shape) {
        *d = v as i64;
    }
    abi::AuditTensor {
        dtype,
        ndim: shape.len() as u32,
        shape: s,
        data: data as *const _,
        byte_len,
    }
}

fn dataset_view(set: Option<&LabeledSet>, num_classes: usize) -> abi::AuditDataset {
    let Some(set) = set else {
        return abi::AuditDataset::ABSENT;
    };
    let im = &set.images;
    let shape = [im.n, im.c, im.h, im.w];
    let images = match &im.pixels {
        Pixels::U8(v) => tensor(&shape, abi::AUDIT_DTYPE_U8, v.as_ptr(), v.len()),
        Pixels::F32(v) => tensor(&shape, abi::AUDIT_DTYPE_F32, v.as_ptr() as *const u8, v.len() * 4),
    };
    let labels = tensor(
        &[set.labels.len()],
        abi::AUDIT_DTYPE_I64,
        set.labels.as_ptr() as *const u8,
        set.labels.len() * 8,
    );
    abi::AuditDataset {
        struct_size: std::mem::size_of::<abi::AuditDataset>() as u32,
        num_classes: num_classes as u32,
        images,
        labels,
    }
}

/// The header of a tensor a plugin returned, as plain values (no pointer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TensorHeader {
    pub dtype: u32,
    pub ndim: u32,
    pub shape: [i64; abi::AUDIT_MAX_DIMS],
    pub byte_len: usize,
    pub null_data: bool,
}

impl TensorHeader {
    fn of(t: &abi::AuditTensor) -> TensorHeader {
        TensorHeader {
            dtype: t.dtype,
            ndim: t.ndim,
            shape: t.shape,
            byte_len: t.byte_len,
            null_data: t.data.is_null(),
        }
    }
}

/// Checks a tensor header: dtype, rank, dimensions, `byte_len` against the shape, pointer.
/// `Ok(None)` when the tensor is absent, else its shape and element count.
pub(crate) fn check_tensor_header(t: &TensorHeader, what: &str) -> Result<Option<(Vec<usize>, usize)>, String> {
    if t.ndim == 0 && t.byte_len == 0 {
        return Ok(None);
    }
    let esize = abi::dtype_size(t.dtype);
    if esize == 0 {
        return Err(format!("{what}: unknown dtype {}", t.dtype));
    }
    if t.ndim as usize > abi::AUDIT_MAX_DIMS {
        return Err(format!("{what}: ndim {} exceeds {}", t.ndim, abi::AUDIT_MAX_DIMS));
    }
    let mut shape = Vec::with_capacity(t.ndim as usize);
    let mut elems: usize = 1;
    for &d in &t.shape[..t.ndim as usize] {
        let d = usize::try_from(d)
            .map_err(|_| format!("{what}: negative dimension in {:?}", &t.shape[..t.ndim as usize]))?;
        elems = elems.checked_mul(d).ok_or_else(|| format!("{what}: shape overflows"))?;
        shape.push(d);
    }
    if elems.checked_mul(esize) != Some(t.byte_len) {
        return Err(format!(
            "{what}: byte_len {} does not match shape {shape:?} of {esize}-byte elements",
            t.byte_len
        ));
    }
    if t.byte_len > 0 && t.null_data {
        return Err(format!("{what}: null data pointer with byte_len {}", t.byte_len));
    }
    Ok(Some((shape, elems)))
}

/// Copies a plugin tensor after checking its header. `None` when absent.
unsafe fn copy_tensor(t: &abi::AuditTensor, what: &str) -> Result<Option<(Vec<usize>, OwnedTensor)>, String> {
    let Some((shape, elems)) = check_tensor_header(&TensorHeader::of(t), what)? else {
        return Ok(None);
    };
    let src = t.data as *const u8;
    // SAFETY (all three): the header is consistent and the pointer non-null when byte_len > 0;
    // the plugin promises `byte_len` readable bytes until `release`; we copy bytewise into a
    // buffer of exactly that many bytes, so source alignment does not matter.
    let out = unsafe {
        match t.dtype {
            abi::AUDIT_DTYPE_U8 if t.byte_len == 0 => OwnedTensor::U8(Vec::new()),
            abi::AUDIT_DTYPE_U8 => OwnedTensor::U8(std::slice::from_raw_parts(src, t.byte_len).to_vec()),
            abi::AUDIT_DTYPE_F32 => {
                let mut v = vec![0f32; elems];
                if t.byte_len > 0 {
                    std::ptr::copy_nonoverlapping(src, v.as_mut_ptr() as *mut u8, t.byte_len);
                }
                OwnedTensor::F32(v)
            }
            _ => {
                let mut v = vec![0i64; elems];
                if t.byte_len > 0 {
                    std::ptr::copy_nonoverlapping(src, v.as_mut_ptr() as *mut u8, t.byte_len);
                }
                OwnedTensor::I64(v)
            }
        }
    };
    Ok(Some((shape, out)))
}

unsafe fn copy_str(s: &abi::AuditStr, what: &str) -> Result<String, String> {
    if s.len == 0 {
        return Ok(String::new());
    }
    if s.ptr.is_null() {
        return Err(format!("{what}: null pointer with length {}", s.len));
    }
    // SAFETY: valid until `release`, per the ABI.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn i64_vec(t: Option<(Vec<usize>, OwnedTensor)>, what: &str) -> Result<Option<Vec<i64>>, String> {
    match t {
        None => Ok(None),
        Some((shape, OwnedTensor::I64(v))) if shape.len() == 1 && shape[0] == v.len() => Ok(Some(v)),
        Some((shape, OwnedTensor::I64(v))) if shape.len() == 1 => {
            Err(format!("{what}: {} values for shape {shape:?}", v.len()))
        }
        Some((shape, _)) => Err(format!(
            "{what}: expected a 1-D i64 tensor, got shape {shape:?} of another dtype"
        )),
    }
}

/// A successful response copied into host memory, before any check beyond the tensor headers.
/// Plain Rust values: the validation below runs on it without a plugin (and is fuzzed so).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RawResponse {
    pub message: String,
    pub report_json: String,
    pub images: Option<(Vec<usize>, OwnedTensor)>,
    pub labels: Option<(Vec<usize>, OwnedTensor)>,
    pub indices: Option<(Vec<usize>, OwnedTensor)>,
    pub model: Option<Vec<u8>>,
}

/// Copies the response of a successful call (checking tensor headers and pointers first).
unsafe fn copy_response(resp: &abi::AuditResponse) -> Result<RawResponse, String> {
    // SAFETY (block): every pointer in `resp` is valid until `release`, per the ABI; each is
    // checked for null against its length before it is read.
    unsafe {
        let model = if resp.model.len == 0 {
            None
        } else if resp.model.ptr.is_null() {
            return Err("model: null pointer".into());
        } else {
            Some(std::slice::from_raw_parts(resp.model.ptr, resp.model.len).to_vec())
        };
        Ok(RawResponse {
            message: copy_str(&resp.message, "message")?,
            report_json: copy_str(&resp.report_json, "report_json")?,
            images: copy_tensor(&resp.images, "images")?,
            labels: copy_tensor(&resp.labels, "labels")?,
            indices: copy_tensor(&resp.indices, "indices")?,
            model,
        })
    }
}

/// Copies and checks the response of a successful call.
unsafe fn collect(resp: &abi::AuditResponse, input: &CallInput<'_>) -> Result<CallOutput, String> {
    // SAFETY: forwarded from the caller (a response the plugin filled, before `release`).
    validate(unsafe { copy_response(resp)? }, input)
}

/// Checks a copied response against the request: report JSON, tensor kinds and ranks, and
/// everything `check_for_op` requires of the operation.
pub(crate) fn validate(raw: RawResponse, input: &CallInput<'_>) -> Result<CallOutput, String> {
    let RawResponse {
        message,
        report_json,
        images,
        labels,
        indices,
        model,
    } = raw;
    let report = if report_json.trim().is_empty() {
        Map::new()
    } else {
        match serde_json::from_str::<Value>(&report_json) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err("report_json is not a JSON object".into()),
            Err(e) => return Err(format!("report_json is not valid JSON: {e}")),
        }
    };
    let labels = i64_vec(labels, "labels")?;
    let indices = i64_vec(indices, "indices")?;
    let images = match images {
        None => None,
        Some((shape, t)) => {
            let [n, c, h, w] = shape[..] else {
                return Err(format!("images: expected NCHW, got shape {shape:?}"));
            };
            let pixels = match t {
                OwnedTensor::U8(v) => Pixels::U8(v),
                OwnedTensor::F32(v) => Pixels::F32(v),
                OwnedTensor::I64(_) => return Err("images: i64 is not an image dtype".into()),
            };
            let len = match &pixels {
                Pixels::U8(v) => v.len(),
                Pixels::F32(v) => v.len(),
            };
            if n.checked_mul(c)
                .and_then(|x| x.checked_mul(h))
                .and_then(|x| x.checked_mul(w))
                != Some(len)
            {
                return Err(format!("images: {len} pixels for shape {shape:?}"));
            }
            Some(Images { n, c, h, w, pixels })
        }
    };
    let out = CallOutput {
        images,
        labels,
        indices,
        model,
        report,
        message,
    };
    check_for_op(&out, input)?;
    Ok(out)
}

/// Checks that the answer is complete and consistent for the operation.
fn check_for_op(out: &CallOutput, input: &CallInput<'_>) -> Result<(), String> {
    let n = input.data.map_or(0, LabeledSet::len);
    let k = input.num_classes as i64;
    let check_images = |what: &str| -> Result<(), String> {
        let Some(im) = &out.images else {
            return Err(format!("{what}: no images returned"));
        };
        let Some(d) = input.data.map(|d| &d.images) else {
            return Err(format!("{what}: images returned for a request without data"));
        };
        if (im.n, im.c, im.h, im.w) != (d.n, d.c, d.h, d.w) {
            return Err(format!(
                "{what}: images of shape [{}, {}, {}, {}] for input of shape [{}, {}, {}, {}]",
                im.n, im.c, im.h, im.w, d.n, d.c, d.h, d.w
            ));
        }
        Ok(())
    };
    let check_labels = |what: &str| -> Result<(), String> {
        let Some(l) = &out.labels else {
            return Err(format!("{what}: no labels returned"));
        };
        if l.len() != n {
            return Err(format!("{what}: {} labels for {n} images", l.len()));
        }
        if let Some(bad) = l.iter().find(|&&x| x < 0 || x >= k) {
            return Err(format!("{what}: label {bad} outside 0..{k}"));
        }
        Ok(())
    };
    let check_indices = |what: &str, required: bool| -> Result<(), String> {
        match &out.indices {
            None if required => Err(format!("{what}: no indices returned")),
            None => Ok(()),
            Some(ix) => match ix.iter().find(|&&i| i < 0 || i as usize >= n) {
                Some(bad) => Err(format!("{what}: index {bad} outside 0..{n}")),
                None => Ok(()),
            },
        }
    };
    match input.op {
        Op::Poison => {
            check_images("poison")?;
            check_labels("poison")?;
            check_indices("poison", true)
        }
        Op::Trigger => {
            check_images("trigger")?;
            check_labels("trigger")?;
            // Not asked for, but whatever comes back is checked before anything prints it.
            check_indices("trigger", false)
        }
        Op::Scan => {
            if !out.report.get("backdoored").is_some_and(Value::is_boolean) {
                return Err("scan: report has no boolean `backdoored`".into());
            }
            check_indices("scan", false)
        }
        Op::Defend => match &out.model {
            Some(m) if !m.is_empty() => check_indices("defend", false),
            _ => Err("defend: no model returned".into()),
        },
    }
}

/// The error for a call that returned `status` (not OK) with `message`.
pub(crate) fn status_error(status: i32, message: String, name: &str, path: &std::path::Path) -> PluginError {
    let message = if message.trim().is_empty() {
        format!("status {status} without a message")
    } else {
        message
    };
    let (name, path) = (name.to_string(), path.to_path_buf());
    match status {
        abi::AUDIT_STATUS_INVALID_INPUT => PluginError::InvalidInput { name, path, message },
        abi::AUDIT_STATUS_CANCELLED => PluginError::Cancelled { name, path },
        abi::AUDIT_STATUS_UNSUPPORTED => PluginError::InvalidInput {
            name,
            path,
            message: format!("unsupported: {message}"),
        },
        _ => PluginError::Failed { name, path, message },
    }
}

impl LoadedPlugin {
    /// Runs one operation. The inputs are lent for the duration of the call; the answer is
    /// validated and copied before the plugin's `release` runs.
    pub fn call(&self, input: &CallInput<'_>) -> Result<CallOutput, PluginError> {
        let bad_input = |message: String| PluginError::InvalidInput {
            name: self.name.clone(),
            path: self.path.clone(),
            message,
        };
        if input.op.kind() != self.kind {
            return Err(bad_input(format!(
                "is a {} plugin; it cannot run `{:?}`",
                self.kind, input.op
            )));
        }
        let params = serde_json::to_string(input.params).expect("JSON map serialises");
        let model = input.model.unwrap_or(&[]);
        let request = abi::AuditRequest {
            struct_size: std::mem::size_of::<abi::AuditRequest>() as u32,
            op: input.op.code(),
            host: host::api(),
            params_json: abi::AuditStr::from_str(&params),
            seed: input.seed,
            device: abi::AuditStr::from_str(input.device),
            model: abi::AuditBytes {
                ptr: model.as_ptr(),
                len: model.len(),
            },
            data: dataset_view(input.data, input.num_classes),
            clean: dataset_view(input.clean, input.num_classes),
        };
        // SAFETY: all-zero is a valid AuditResponse (null pointers, zero lengths).
        let mut response: abi::AuditResponse = unsafe { std::mem::zeroed() };
        response.struct_size = std::mem::size_of::<abi::AuditResponse>() as u32;

        if let Ok(mut cur) = host::state().current.lock() {
            cur.clone_from(&self.name);
        }
        // Whatever the plugin prints on stdout goes to stderr (see `stdio`), from `run` through
        // `release`.
        let _quiet = super::stdio::StdoutToStderr::new();
        // SAFETY: request and response are valid for the call; the plugin honours the ABI. A Rust
        // plugin built with the SDK catches its own panics; the guard here is for our callbacks.
        let status = catch_unwind(AssertUnwindSafe(|| unsafe { (self.run)(&request, &mut response) }))
            .unwrap_or(abi::AUDIT_STATUS_PANIC);
        host::state().progress.finish();

        // SAFETY: the response is valid until release.
        let result = unsafe {
            if status == abi::AUDIT_STATUS_OK {
                collect(&response, input).map_err(|reason| PluginError::BadResponse {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    reason,
                })
            } else {
                let message = copy_str(&response.message, "message").unwrap_or_default();
                Err(status_error(status, message, &self.name, &self.path))
            }
        };
        // SAFETY: hand the response back exactly once.
        unsafe { (self.release)(&mut response) };
        result
    }
}
