//! The C side of the SDK: negotiation, request decoding, panic guard and response ownership.
//! Used by `export_plugin!`; not part of the stable Rust API.

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::{json, Value};

use crate::data::{DatasetRef, Tensor};
use crate::{abi, Attack, Call, Defense, Detector, Error, Host, Params, PluginInfo, Result};

/// A descriptor with the storage its string views point into.
#[derive(Debug)]
pub struct Descriptor {
    raw: abi::AuditPluginDescriptor,
    _build_info: String,
}

// SAFETY: the raw pointers point at 'static strings or at `_build_info`, which is never mutated.
unsafe impl Sync for Descriptor {}
// SAFETY: as above.
unsafe impl Send for Descriptor {}

impl Descriptor {
    /// Builds the descriptor of a plugin.
    pub fn new(info: PluginInfo, kind: u32, run: abi::AuditRunFn, release: abi::AuditReleaseFn) -> Self {
        let build_info = format!(
            "audit-sdk {} (Rust), built for ABI v{}{}",
            env!("CARGO_PKG_VERSION"),
            abi::AUDIT_ABI_VERSION,
            option_env!("AUDIT_BUILD_EXTRA")
                .map(|s| format!(", {s}"))
                .unwrap_or_default()
        );
        let raw = abi::AuditPluginDescriptor {
            struct_size: std::mem::size_of::<abi::AuditPluginDescriptor>() as u32,
            kind,
            name: abi::AuditStr::from_str(info.name),
            version: abi::AuditStr::from_str(info.version),
            description: abi::AuditStr::from_str(info.description),
            params_schema: abi::AuditStr::from_str(info.params_schema),
            build_info: abi::AuditStr::from_str(""),
            capabilities: info.capabilities,
            run,
            release,
        };
        let mut d = Descriptor {
            raw,
            _build_info: build_info,
        };
        d.raw.build_info = abi::AuditStr {
            ptr: d._build_info.as_ptr(),
            len: d._build_info.len(),
        };
        d
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Negotiation: picks ABI v1 when the host offers it.
///
/// # Safety
/// `host` and `out` must be valid or null.
pub unsafe fn negotiate(
    host: *const abi::AuditHostApi,
    out: *mut abi::AuditNegotiation,
    descriptor: &'static Descriptor,
) -> i32 {
    if host.is_null() || out.is_null() {
        return abi::AUDIT_STATUS_INVALID_INPUT;
    }
    // SAFETY: non-null, provided by the host.
    let (host, out) = unsafe { (&*host, &mut *out) };
    if (out.struct_size as usize) < std::mem::size_of::<abi::AuditNegotiation>() {
        return abi::AUDIT_STATUS_INVALID_INPUT;
    }
    out.abi_version = abi::AUDIT_ABI_VERSION;
    if !(host.abi_min..=host.abi_max).contains(&abi::AUDIT_ABI_VERSION) {
        return abi::AUDIT_STATUS_UNSUPPORTED;
    }
    out.descriptor = &descriptor.raw;
    abi::AUDIT_STATUS_OK
}

/// What a dispatcher produces; turned into an `AuditResponse`.
#[derive(Debug, Default)]
pub struct Output {
    pub images: Option<Tensor>,
    pub labels: Option<Vec<i64>>,
    pub indices: Option<Vec<i64>>,
    pub model: Option<Vec<u8>>,
    pub report: Value,
}

/// Decoded request passed to dispatchers.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub op: u32,
    pub call: Call<'a>,
    pub model: &'a [u8],
    pub data: Option<DatasetRef<'a>>,
    pub clean: Option<DatasetRef<'a>>,
}

/// Owned storage behind a response, freed by `release`.
struct Owned {
    message: String,
    report: String,
    output: Output,
}

unsafe fn str_arg<'a>(s: &abi::AuditStr, what: &str) -> Result<&'a str> {
    if s.len == 0 {
        return Ok("");
    }
    if s.ptr.is_null() {
        return Err(Error::invalid(format!("{what}: null pointer")));
    }
    // SAFETY: the host lends `len` bytes for the call.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    std::str::from_utf8(bytes).map_err(|_| Error::invalid(format!("{what}: not UTF-8")))
}

unsafe fn decode<'a>(req: &'a abi::AuditRequest) -> Result<Decoded<'a>> {
    if (req.struct_size as usize) < std::mem::size_of::<abi::AuditRequest>() {
        return Err(Error::invalid(format!(
            "request struct_size {} is too small for ABI v1",
            req.struct_size
        )));
    }
    // SAFETY: the host table outlives the call.
    let host = Host::new(unsafe { req.host.as_ref() });
    // SAFETY: borrowed views of the request.
    let params_json = unsafe { str_arg(&req.params_json, "params_json")? };
    let params = if params_json.trim().is_empty() {
        serde_json::Map::new()
    } else {
        match serde_json::from_str::<Value>(params_json) {
            Ok(Value::Object(m)) => m,
            _ => return Err(Error::invalid("params_json is not a JSON object")),
        }
    };
    // SAFETY: borrowed views of the request.
    let device = unsafe { str_arg(&req.device, "device")? };
    let model = if req.model.len == 0 {
        &[][..]
    } else if req.model.ptr.is_null() {
        return Err(Error::invalid("model: null pointer"));
    } else {
        // SAFETY: the host lends `len` bytes.
        unsafe { std::slice::from_raw_parts(req.model.ptr, req.model.len) }
    };
    // SAFETY: views valid for the call.
    let data = unsafe { DatasetRef::from_abi(&req.data, "data")? };
    // SAFETY: views valid for the call.
    let clean = unsafe { DatasetRef::from_abi(&req.clean, "clean")? };
    Ok(Decoded {
        op: req.op,
        call: Call {
            host,
            params: Params(params),
            seed: req.seed,
            device,
        },
        model,
        data,
        clean,
    })
}

fn need<'a, 'b>(d: Option<&'b DatasetRef<'a>>, op: &str) -> Result<&'b DatasetRef<'a>> {
    d.ok_or_else(|| Error::invalid(format!("{op}: the request carries no data")))
}

fn wrong_op(op: u32, kind: &str) -> Error {
    Error::unsupported(format!("operation {op} is not supported by this {kind} plugin"))
}

fn check_same_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::failed(format!(
            "plugin bug: {what} has {got} entries, expected {want}"
        )));
    }
    Ok(())
}

/// Dispatches an attack request.
pub fn dispatch_attack<T: Attack>(d: &Decoded<'_>) -> Result<Output> {
    let plugin = T::default();
    match d.op {
        abi::AUDIT_OP_POISON => {
            let data = need(d.data.as_ref(), "poison")?;
            let p = plugin.poison(&d.call, data)?;
            check_same_len("poisoned labels", p.labels.len(), data.len())?;
            check_same_len("poisoned images", p.images.numel(), data.images.numel())?;
            Ok(Output {
                images: Some(p.images),
                labels: Some(p.labels),
                indices: Some(p.indices),
                model: None,
                report: p.report,
            })
        }
        abi::AUDIT_OP_TRIGGER => {
            let data = need(d.data.as_ref(), "trigger")?;
            let t = plugin.trigger(&d.call, data)?;
            check_same_len("target labels", t.target_labels.len(), data.len())?;
            check_same_len("triggered images", t.images.numel(), data.images.numel())?;
            Ok(Output {
                images: Some(t.images),
                labels: Some(t.target_labels),
                indices: None,
                model: None,
                report: t.report,
            })
        }
        op => Err(wrong_op(op, "attack")),
    }
}

/// Dispatches a detector request.
pub fn dispatch_detector<T: Detector>(d: &Decoded<'_>) -> Result<Output> {
    if d.op != abi::AUDIT_OP_SCAN {
        return Err(wrong_op(d.op, "detector"));
    }
    let v = T::default().scan_with_clean(&d.call, d.model, d.data.as_ref(), d.clean.as_ref())?;
    let mut report = json!({
        "backdoored": v.backdoored,
        "target_classes": v.target_classes,
    });
    if let (Value::Object(r), Value::Object(extra)) = (&mut report, v.details) {
        for (k, val) in extra {
            r.entry(k).or_insert(val);
        }
    }
    Ok(Output {
        indices: Some(v.suspicious),
        report,
        ..Default::default()
    })
}

/// Dispatches a defense request.
pub fn dispatch_defense<T: Defense>(d: &Decoded<'_>) -> Result<Output> {
    if d.op != abi::AUDIT_OP_DEFEND {
        return Err(wrong_op(d.op, "defense"));
    }
    let h = T::default().defend(&d.call, d.model, d.data.as_ref(), d.clean.as_ref())?;
    Ok(Output {
        model: Some(h.model),
        indices: Some(h.dropped),
        report: h.report,
        ..Default::default()
    })
}

fn tensor_view(t: &Tensor) -> abi::AuditTensor {
    let mut shape = [0i64; abi::AUDIT_MAX_DIMS];
    let n = t.shape.len().min(abi::AUDIT_MAX_DIMS);
    shape[..n].copy_from_slice(&t.shape[..n]);
    let (ptr, len) = t.as_ptr_len();
    abi::AuditTensor {
        dtype: t.dtype().code(),
        ndim: n as u32,
        shape,
        data: ptr as *const _,
        byte_len: len,
    }
}

fn vec_view(v: &[i64]) -> abi::AuditTensor {
    let mut shape = [0i64; abi::AUDIT_MAX_DIMS];
    shape[0] = v.len() as i64;
    abi::AuditTensor {
        dtype: abi::AUDIT_DTYPE_I64,
        ndim: 1,
        shape,
        data: v.as_ptr() as *const _,
        byte_len: v.len() * 8,
    }
}

fn fill(resp: &mut abi::AuditResponse, owned: Box<Owned>) {
    resp.message = abi::AuditStr {
        ptr: owned.message.as_ptr(),
        len: owned.message.len(),
    };
    resp.report_json = abi::AuditStr {
        ptr: owned.report.as_ptr(),
        len: owned.report.len(),
    };
    let o = &owned.output;
    if let Some(m) = &o.model {
        resp.model = abi::AuditBytes {
            ptr: m.as_ptr(),
            len: m.len(),
        };
    }
    if let Some(t) = &o.images {
        resp.images = tensor_view(t);
    }
    if let Some(l) = &o.labels {
        resp.labels = vec_view(l);
    }
    if let Some(i) = &o.indices {
        resp.indices = vec_view(i);
    }
    resp.plugin_state = Box::into_raw(owned) as *mut _;
}

/// Runs a request through `dispatch` with a panic guard and fills `response`.
///
/// # Safety
/// `request` and `response` must be valid (ABI contract); `response` must be zeroed with its
/// `struct_size` set.
pub unsafe fn run(
    request: *const abi::AuditRequest,
    response: *mut abi::AuditResponse,
    dispatch: fn(&Decoded<'_>) -> Result<Output>,
) -> i32 {
    if request.is_null() || response.is_null() {
        return abi::AUDIT_STATUS_INVALID_INPUT;
    }
    // SAFETY: non-null, per contract.
    let (req, resp) = unsafe { (&*request, &mut *response) };
    if (resp.struct_size as usize) < std::mem::size_of::<abi::AuditResponse>() {
        return abi::AUDIT_STATUS_INVALID_INPUT;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: per contract.
        let decoded = unsafe { decode(req)? };
        dispatch(&decoded)
    }));
    let (status, owned) = match result {
        Ok(Ok(output)) => {
            let report = if output.report.is_null() {
                "{}".to_string()
            } else {
                output.report.to_string()
            };
            (
                abi::AUDIT_STATUS_OK,
                Owned {
                    message: String::new(),
                    report,
                    output,
                },
            )
        }
        Ok(Err(e)) => (
            e.status.code(),
            Owned {
                message: e.message,
                report: String::new(),
                output: Output::default(),
            },
        ),
        Err(payload) => (
            abi::AUDIT_STATUS_PANIC,
            Owned {
                message: format!("plugin panicked: {}", panic_message(payload.as_ref())),
                report: String::new(),
                output: Output::default(),
            },
        ),
    };
    fill(resp, Box::new(owned));
    status
}

/// Frees a response filled by `run`.
///
/// # Safety
/// `response` must have been filled by `run` and not released before.
pub unsafe fn release(response: *mut abi::AuditResponse) {
    if response.is_null() {
        return;
    }
    // SAFETY: per contract.
    let resp = unsafe { &mut *response };
    if !resp.plugin_state.is_null() {
        // SAFETY: created by Box::into_raw in `fill`.
        drop(unsafe { Box::from_raw(resp.plugin_state as *mut Owned) });
    }
    let size = resp.struct_size;
    // SAFETY: plain-old-data struct; zeroing is a valid state.
    *resp = unsafe { std::mem::zeroed() };
    resp.struct_size = size;
}
