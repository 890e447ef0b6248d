//! Plugin manifests (`NAME.plugin.json` beside each library) and discovery.
//!
//! Listing reads manifests only, so it runs no plugin code. Search order: `--plugin-dir` (in the
//! order given), `AUDIT_PLUGIN_PATH` (colon-separated), then `plugins/` beside the binary. When
//! two folders hold a plugin of the same name, the first wins and the others are reported shadowed
//! (see [`shadowing`]).
//!
//! Trust rules: a manifest's `library` names a file inside the manifest's own folder: no absolute
//! path, no `..`, and no symlink that resolves outside the folder; a manifest breaking them is
//! refused (exit 2) naming the manifest and the field. Libraries are opened by canonical path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{load, Kind, LoadedPlugin, PluginError};

/// File name suffix of a manifest.
pub const MANIFEST_SUFFIX: &str = ".plugin.json";
/// Manifest format version written by this host.
pub const MANIFEST_VERSION: u32 = 1;

/// What a manifest says about its plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub manifest_version: u32,
    pub name: String,
    pub kind: Kind,
    pub version: String,
    pub abi_version: u32,
    /// Library file, relative to the manifest's folder and inside it (see the module docs).
    pub library: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl Manifest {
    /// The manifest describing a loaded plugin whose library is `library` (file name).
    pub fn of(p: &LoadedPlugin, library: &str) -> Manifest {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            name: p.name.clone(),
            kind: p.kind,
            version: p.version.clone(),
            abi_version: p.abi_version,
            library: library.to_string(),
            description: p.description.clone(),
            capabilities: super::capability_names(p.capabilities)
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }
}

/// One manifest found during discovery.
#[derive(Debug)]
pub struct Discovered {
    pub manifest_path: PathBuf,
    /// Where the manifest's folder came from (`--plugin-dir`, `AUDIT_PLUGIN_PATH`, ...).
    pub source: &'static str,
    /// The library the manifest points at (when the manifest could be read and its `library`
    /// field names a file inside the manifest's folder).
    pub library_path: Option<PathBuf>,
    pub manifest: Result<Manifest, String>,
    /// Why the manifest's `library` field is refused (it points outside the folder).
    pub library_problem: Option<String>,
    /// Set when an earlier folder already had a plugin of this name.
    pub shadowed_by: Option<PathBuf>,
}

impl Discovered {
    /// Problems visible without running plugin code (bad manifest, missing library, ABI).
    pub fn problem(&self) -> Option<String> {
        match &self.manifest {
            Err(e) => Some(e.clone()),
            Ok(_) if self.library_problem.is_some() => self.library_problem.clone(),
            Ok(m) => {
                if m.abi_version != audit_abi::AUDIT_ABI_VERSION {
                    return Some(format!(
                        "built for plugin ABI v{}, this audit speaks v{}",
                        m.abi_version,
                        audit_abi::AUDIT_ABI_VERSION
                    ));
                }
                match &self.library_path {
                    Some(p) if !p.is_file() => Some(format!("library {} is missing", p.display())),
                    _ => self
                        .shadowed_by
                        .as_ref()
                        .map(|s| format!("shadowed by {}", s.display())),
                }
            }
        }
    }

    /// Loads and negotiates the plugin, checking that it is the one its manifest describes.
    pub fn load(&self) -> Result<std::sync::Arc<LoadedPlugin>, PluginError> {
        let bad = |reason: String| PluginError::BadManifest {
            path: self.library_path.clone().unwrap_or_else(|| match &self.manifest {
                Ok(m) => PathBuf::from(&m.library),
                Err(_) => self.manifest_path.clone(),
            }),
            manifest: self.manifest_path.clone(),
            reason,
        };
        let m = self.manifest.as_ref().map_err(|e| bad(e.clone()))?;
        if let Some(problem) = &self.library_problem {
            return Err(bad(problem.clone()));
        }
        let lib = self.library_path.as_ref().ok_or_else(|| bad("no library".into()))?;
        let p = load(lib)?;
        if p.name != m.name || p.kind != m.kind {
            return Err(bad(format!(
                "says {} `{}` but the library is {} `{}`; reinstall it with `audit plugins install`",
                m.kind, m.name, p.kind, p.name
            )));
        }
        Ok(p)
    }
}

/// Says once per process on stderr that a search folder the user named is missing.
fn warn_missing_dir(dir: &Path, from: &str) {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let problem = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => return,
        Ok(_) => "is not a folder",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
        Err(_) => "cannot be read",
    };
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.get_or_insert_with(HashSet::new).insert(dir.to_path_buf()) {
        eprintln!("warning: plugin folder {} ({from}) {problem}; ignored", dir.display());
    }
}

/// The folders searched, in order, with where each came from. A folder named by `--plugin-dir`
/// or `AUDIT_PLUGIN_PATH` that does not exist is kept (so messages list it) and warned about on
/// stderr, once per process.
pub fn search_dirs(cli: &[PathBuf]) -> Vec<(PathBuf, &'static str)> {
    let mut dirs: Vec<(PathBuf, &'static str)> = cli.iter().map(|d| (d.clone(), "--plugin-dir")).collect();
    if let Some(env) = std::env::var_os("AUDIT_PLUGIN_PATH") {
        dirs.extend(
            std::env::split_paths(&env)
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| (p, "AUDIT_PLUGIN_PATH")),
        );
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.join("plugins")))
    {
        dirs.push((dir, "beside the binary"));
    }
    for (dir, from) in &dirs {
        if *from != "beside the binary" {
            warn_missing_dir(dir, from);
        }
    }
    dirs
}

/// Resolves a manifest's `library` field against its folder, refusing anything outside it.
fn library_in_folder(dir: &Path, library: &str) -> Result<PathBuf, String> {
    use std::path::Component;
    let lib = Path::new(library);
    let refuse = |why: String| {
        Err(format!(
            "field `library`: {library:?} {why}; a manifest's library must be a file in the manifest's own folder"
        ))
    };
    if library.is_empty() {
        return refuse("is empty".into());
    }
    if lib.is_absolute() {
        return refuse("is an absolute path".into());
    }
    if lib
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return refuse("leaves the folder (`..`)".into());
    }
    let joined = dir.join(lib);
    // A symlink (the file or a folder on the way) may still lead elsewhere.
    if let (Ok(real_dir), Ok(real_lib)) = (std::fs::canonicalize(dir), std::fs::canonicalize(&joined)) {
        if !real_lib.starts_with(&real_dir) {
            return refuse(format!(
                "resolves through a symlink to {}, outside {}",
                real_lib.display(),
                real_dir.display()
            ));
        }
    }
    Ok(joined)
}

fn read_manifest(path: &Path) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("manifest {}: {e}", path.display()))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("manifest {}: {e}", path.display()))?;
    if m.manifest_version != MANIFEST_VERSION {
        return Err(format!(
            "manifest {}: manifest_version {} (this audit reads {MANIFEST_VERSION})",
            path.display(),
            m.manifest_version
        ));
    }
    Ok(m)
}

/// Reads every manifest in `dirs` (missing folders are skipped). Runs no plugin code.
pub fn discover(dirs: &[(PathBuf, &'static str)]) -> Vec<Discovered> {
    let mut found: Vec<Discovered> = Vec::new();
    for (dir, source) in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(MANIFEST_SUFFIX))
            })
            .collect();
        paths.sort();
        for manifest_path in paths {
            let manifest = read_manifest(&manifest_path);
            let resolved = manifest.as_ref().ok().map(|m| library_in_folder(dir, &m.library));
            let library_problem = resolved.as_ref().and_then(|r| r.as_ref().err().cloned());
            let library_path = resolved.and_then(Result::ok);
            let shadowed_by = manifest.as_ref().ok().and_then(|m| {
                found
                    .iter()
                    .find(|d| d.manifest.as_ref().is_ok_and(|o| o.name == m.name) && d.shadowed_by.is_none())
                    .map(|d| d.manifest_path.clone())
            });
            found.push(Discovered {
                manifest_path,
                source,
                library_path,
                manifest,
                library_problem,
                shadowed_by,
            });
        }
    }
    found
}

/// When more than one folder holds a plugin named `name`: which one is used and which are
/// shadowed, as one line for stderr.
pub fn shadowing(found: &[Discovered], name: &str) -> Option<String> {
    let same: Vec<&Discovered> = found
        .iter()
        .filter(|d| d.manifest.as_ref().is_ok_and(|m| m.name == name))
        .collect();
    let (used, shadowed) = same.split_first()?;
    if shadowed.is_empty() {
        return None;
    }
    let describe = |d: &Discovered| {
        let lib = d
            .library_path
            .as_ref()
            .map_or_else(|| "refused library".to_string(), |p| p.display().to_string());
        format!("{lib} (manifest {}, from {})", d.manifest_path.display(), d.source)
    };
    Some(format!(
        "plugin `{name}` is in {} plugin folders: using {}; shadowed: {}",
        same.len(),
        describe(used),
        shadowed.iter().map(|d| describe(d)).collect::<Vec<_>>().join("; ")
    ))
}

/// Shared libraries in the plugin folders that no manifest in their folder names: a library
/// copied in by hand, never installed. Runs no plugin code.
pub fn unmanaged_libraries(dirs: &[(PathBuf, &'static str)]) -> Vec<PathBuf> {
    let found = discover(dirs);
    let mut out = Vec::new();
    for (dir, _) in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        let mut libs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(".so") || n.contains(".so."))
            })
            .collect();
        libs.sort();
        for lib in libs {
            let real = std::fs::canonicalize(&lib).ok();
            let named = found.iter().any(|d| {
                d.manifest_path.parent() == Some(dir.as_path())
                    && d.manifest.as_ref().is_ok_and(|m| {
                        let target = dir.join(&m.library);
                        target == lib || (real.is_some() && std::fs::canonicalize(&target).ok() == real)
                    })
            });
            if !named && !out.contains(&lib) {
                out.push(lib);
            }
        }
    }
    out
}

/// The stderr line for a library no manifest names.
pub fn unmanaged_note(lib: &Path) -> String {
    format!(
        "note: {}: no manifest: run audit plugins install {} (a library without a manifest is not used)",
        lib.display(),
        lib.display()
    )
}

/// Installs a plugin library into `dir`: loads and negotiates it (so a broken plugin is refused
/// here), copies the library, and writes its manifest. Refuses to replace another plugin's files
/// unless `force`.
pub fn install(lib: &Path, dir: &Path, force: bool) -> anyhow::Result<(Manifest, PathBuf)> {
    use anyhow::Context;
    // `load` opens the canonical path: a bare `libfoo.so` is the file in the current folder,
    // never one found on the loader's search path.
    let plugin = load(lib)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file_name = lib
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| crate::error::input_error(format!("{}: not a file name", lib.display())))?;
    let dest = dir.join(file_name);
    let manifest_path = dir.join(format!("{}{MANIFEST_SUFFIX}", plugin.name));
    let same_file = std::fs::canonicalize(lib).ok() == std::fs::canonicalize(&dest).ok();
    if !force {
        for existing in [&manifest_path, &dest] {
            if existing.exists() && !(same_file && *existing == dest) {
                return Err(crate::error::input_error_hint(
                    format!("{} already exists", existing.display()),
                    "pass --force to replace it",
                ));
            }
        }
    }
    // Existence was checked above (a library installed in place is its own destination).
    let mut outputs = crate::output::Outputs::new(true, &[]);
    if !same_file {
        // The very file that was loaded (canonical path), and only if it did not change since.
        let bytes = std::fs::read(&plugin.path).with_context(|| format!("reading {}", plugin.path.display()))?;
        if super::loader::file_sha256(&bytes) != plugin.sha256 {
            return Err(crate::error::input_error(format!(
                "{}: the file changed while it was being installed; nothing installed",
                plugin.path.display()
            )));
        }
        outputs.plan("library", &dest)?;
        outputs.stage(&dest, &bytes)?;
    }
    let manifest = Manifest::of(&plugin, file_name);
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    outputs.plan("manifest", &manifest_path)?;
    outputs.stage(&manifest_path, text.as_bytes())?;
    // The library and its manifest land together, or neither does.
    outputs.commit()?;
    Ok((manifest, manifest_path))
}
