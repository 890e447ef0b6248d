//! Loading a plugin library, negotiating the ABI and validating the descriptor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use audit_abi as abi;

use super::schema::Schema;
use super::{host, Kind, PluginError};

/// A negotiated, validated plugin. Its library stays loaded for the life of the process.
#[derive(Debug)]
pub struct LoadedPlugin {
    /// The library file, canonical (absolute, symlinks resolved): what was dlopen'ed.
    pub path: PathBuf,
    /// sha256 of the library file's bytes as read just before loading it (hex).
    pub sha256: String,
    pub abi_version: u32,
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub description: String,
    pub build_info: String,
    pub schema_json: String,
    pub schema: Schema,
    pub capabilities: u64,
    pub(crate) run: unsafe extern "C" fn(*const abi::AuditRequest, *mut abi::AuditResponse) -> i32,
    pub(crate) release: unsafe extern "C" fn(*mut abi::AuditResponse),
}

type Cache = Mutex<HashMap<PathBuf, Arc<LoadedPlugin>>>;
static LOADED: OnceLock<Cache> = OnceLock::new();

/// Copies a descriptor string; `what` names the field for errors.
unsafe fn desc_str(s: &abi::AuditStr, what: &str, max: usize) -> Result<String, String> {
    if s.len == 0 {
        return Ok(String::new());
    }
    if s.ptr.is_null() {
        return Err(format!("{what} has a null pointer and length {}", s.len));
    }
    if s.len > max {
        return Err(format!("{what} is {} bytes long (at most {max})", s.len));
    }
    // SAFETY: the plugin promises `len` readable bytes, valid for the life of the process.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

/// The rule for a plugin's name: 1-64 characters of a-z, 0-9 and `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The text of a libloading error with its sources (dlerror's message is in there).
fn error_text(e: &libloading::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = inner.source();
    }
    s
}

/// Hex sha256 of a file's bytes.
pub(crate) fn file_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads (once per process) and negotiates with the plugin at `path`.
///
/// The library is always opened by its canonical absolute path, never by a bare name: `dlopen`
/// would look a bare name up on the loader's search path (LD_LIBRARY_PATH, system folders), not
/// in the current folder, and could load a different file than the one checked here. Loading
/// and negotiation run with stdout redirected to stderr (a library constructor may print).
pub fn load(path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
    let key = std::fs::canonicalize(path).map_err(|e| PluginError::NotALibrary {
        path: path.to_path_buf(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            "no such file".into()
        } else {
            e.to_string()
        },
    })?;
    let cache = LOADED.get_or_init(Default::default);
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(p);
    }
    let plugin = {
        let _quiet = super::stdio::StdoutToStderr::new();
        Arc::new(load_uncached(&key)?)
    };
    if let Ok(mut c) = cache.lock() {
        c.insert(key, plugin.clone());
    }
    Ok(plugin)
}

/// `path` is canonical (absolute).
fn load_uncached(path: &Path) -> Result<LoadedPlugin, PluginError> {
    let path_buf = path.to_path_buf();
    if !path.is_file() {
        return Err(PluginError::NotALibrary {
            path: path_buf,
            reason: "not a regular file".into(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| PluginError::NotALibrary {
        path: path_buf.clone(),
        reason: format!("cannot read it: {e}"),
    })?;
    let sha256 = file_sha256(&bytes);
    drop(bytes);
    // SAFETY: loading a library runs its initialisers; plugins are trusted code by design
    // (the user put them on the search path). The library is never unloaded. `path` is
    // absolute, so dlopen opens exactly this file.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::NotALibrary {
        path: path_buf.clone(),
        reason: error_text(&e),
    })?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // SAFETY: the symbol's type is fixed by the ABI (it never changes across versions).
    let negotiate: abi::AuditNegotiateFn = unsafe {
        *lib.get::<abi::AuditNegotiateFn>(abi::AUDIT_ENTRY_SYMBOL.as_bytes())
            .map_err(|_| PluginError::NoEntry { path: path_buf.clone() })?
    };
    let host = host::api();
    let mut out = abi::AuditNegotiation {
        struct_size: std::mem::size_of::<abi::AuditNegotiation>() as u32,
        abi_version: 0,
        descriptor: std::ptr::null(),
    };
    // SAFETY: valid pointers to host-owned structs, per the ABI.
    let status = unsafe { negotiate(host, &mut out) };
    let in_range = (host.abi_min..=host.abi_max).contains(&out.abi_version);
    if status == abi::AUDIT_STATUS_UNSUPPORTED || (status == abi::AUDIT_STATUS_OK && !in_range) {
        return Err(PluginError::AbiMismatch {
            path: path_buf,
            plugin: out.abi_version,
            host_min: host.abi_min,
            host_max: host.abi_max,
        });
    }
    if status != abi::AUDIT_STATUS_OK {
        return Err(PluginError::NegotiationFailed { path: path_buf, status });
    }
    let bad = |reason: String| PluginError::BadDescriptor {
        path: path_buf.clone(),
        reason,
    };
    if out.descriptor.is_null() {
        return Err(bad("negotiation succeeded but the descriptor pointer is null".into()));
    }
    // SAFETY: non-null; the plugin keeps it alive for the life of the process. We read only the
    // first 4 bytes until we know the struct is large enough.
    let size = unsafe { std::ptr::read_unaligned(out.descriptor as *const u32) };
    if (size as usize) < std::mem::size_of::<abi::AuditPluginDescriptor>() {
        return Err(bad(format!(
            "descriptor struct_size is {size}, ABI v1 needs at least {}",
            std::mem::size_of::<abi::AuditPluginDescriptor>()
        )));
    }
    // SAFETY: size checked; alignment is the plugin's promise (a static struct).
    let d = unsafe { &*out.descriptor };
    let kind = Kind::from_code(d.kind).ok_or_else(|| bad(format!("unknown kind {}", d.kind)))?;
    // SAFETY: descriptor strings live as long as the library.
    let (name, version, description, schema_json, build_info) = unsafe {
        (
            desc_str(&d.name, "name", 64).map_err(bad)?,
            desc_str(&d.version, "version", 64).map_err(bad)?,
            desc_str(&d.description, "description", 4096).map_err(bad)?,
            desc_str(&d.params_schema, "params_schema", 1 << 20).map_err(bad)?,
            desc_str(&d.build_info, "build_info", 4096).map_err(bad)?,
        )
    };
    if !valid_name(&name) {
        return Err(bad(format!("name {name:?} must be 1-64 characters of a-z, 0-9 and -")));
    }
    let (Some(run), Some(release)) = (d.run, d.release) else {
        return Err(bad("run or release is null".into()));
    };
    let schema = Schema::parse(&schema_json).map_err(|e| PluginError::BadSchema {
        path: path_buf.clone(),
        reason: e.to_string(),
    })?;
    Ok(LoadedPlugin {
        path: path_buf,
        sha256,
        abi_version: out.abi_version,
        kind,
        name,
        version,
        description,
        build_info,
        schema_json,
        schema,
        capabilities: d.capabilities,
        run,
        release,
    })
}
