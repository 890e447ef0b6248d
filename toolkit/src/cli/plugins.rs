//! `audit plugins ...`: list, info, check, install, run, new.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::{json, Value};

use super::GlobalArgs;
use crate::data::{self, DataFormat, LabeledSet, NpzArray};
use crate::error::{input_error, input_error_hint, EXIT_OK, EXIT_USAGE};
use crate::output::Outputs;
use crate::plugin::{self, capability_names, CallInput, Discovered, Kind, LoadedPlugin, Op, PluginError};

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List the plugins found on the search path (reads manifests only; runs no plugin code).
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show a plugin's description, capabilities and parameters.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Load and negotiate with every plugin found; exit 2 if any is broken.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Copy plugin libraries into a plugin folder and write their manifests.
    Install {
        /// Shared libraries to install.
        #[arg(required = true)]
        libraries: Vec<PathBuf>,
        /// Destination folder (default: `plugins/` beside the audit binary).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Run one plugin operation on a dataset (poison, trigger, scan or defend).
    Run(PluginRunArgs),
    /// Write a new plugin project from the templates.
    New(super::templates::NewArgs),
}

#[derive(Debug, Args)]
pub struct PluginRunArgs {
    /// Plugin name.
    pub name: String,
    /// Operation (default: trigger for attacks, scan for detectors, defend for defenses).
    #[arg(long, value_enum)]
    pub op: Option<Op>,
    /// Dataset: a folder of IDX files, CIFAR-10/100 binary batches or an image folder (train/ and test/ with a folder per class), an NPZ file, `fashion-mnist`, or `synthetic`.
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub data_format: DataFormat,
    /// Use only the first N samples of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// ONNX model (scan, defend).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Plugin parameter KEY=VALUE (repeatable); checked against the plugin's schema.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
    /// Write the result: for poison an NPZ dataset (x_train, y_train, x_test, y_test, poison_idx) that
    /// `--data` reads back; for trigger an NPZ (x, y = target labels); for defend the ONNX model.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: PluginsCommand, global: &GlobalArgs) -> Result<i32> {
    let dirs = plugin::search_dirs(&global.plugin_dirs);
    match cmd {
        PluginsCommand::List { json } => list(&dirs, json),
        PluginsCommand::Info { name, json } => info(&*find(&dirs, &name)?, json),
        PluginsCommand::Check { json } => {
            note_unmanaged(&dirs);
            check(&plugin::discover(&dirs), json)
        }
        PluginsCommand::Install { libraries, dir, force } => {
            let dir = match dir {
                Some(d) => d,
                None => dirs
                    .last()
                    .map(|(d, _)| d.clone())
                    .context("cannot tell where the audit binary is")?,
            };
            for lib in &libraries {
                let (m, path) = plugin::install(lib, &dir, force)?;
                eprintln!("installed {} `{}` {} -> {}", m.kind, m.name, m.version, path.display());
            }
            Ok(EXIT_OK)
        }
        PluginsCommand::Run(args) => run_plugin(&dirs, args),
        PluginsCommand::New(args) => super::templates::new(args),
    }
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t
}

/// Says on stderr which libraries in the plugin folders have no manifest (never used).
fn note_unmanaged(dirs: &[(PathBuf, &'static str)]) -> Vec<PathBuf> {
    let stray = plugin::unmanaged_libraries(dirs);
    for lib in &stray {
        eprintln!("{}", plugin::unmanaged_note(lib));
    }
    stray
}

fn list(dirs: &[(PathBuf, &'static str)], json: bool) -> Result<i32> {
    let found = &plugin::discover(dirs);
    let stray = note_unmanaged(dirs);
    let rows: Vec<Value> = found
        .iter()
        .map(|d| {
            let m = d.manifest.as_ref().ok();
            json!({
                "name": m.map(|m| m.name.as_str()),
                "kind": m.map(|m| m.kind.as_str()),
                "version": m.map(|m| m.version.as_str()),
                "abi_version": m.map(|m| m.abi_version),
                "description": m.map(|m| m.description.as_str()),
                "capabilities": m.map(|m| m.capabilities.clone()),
                "path": d.library_path.as_ref().map(|p| p.display().to_string()),
                "manifest": d.manifest_path.display().to_string(),
                "status": if d.problem().is_some() { "problem" } else { "ok" },
                "problem": d.problem(),
            })
        })
        .collect();
    if json {
        let unmanaged: Vec<String> = stray.iter().map(|p| p.display().to_string()).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"schema_version": 1, "plugins": rows, "unmanaged": unmanaged}))?
        );
        return Ok(EXIT_OK);
    }
    if found.is_empty() {
        eprintln!("no plugins found; searched --plugin-dir, AUDIT_PLUGIN_PATH and plugins/ beside the binary");
        return Ok(EXIT_OK);
    }
    let mut t = table();
    t.set_header(["name", "kind", "version", "ABI", "path", "description"]);
    for (r, d) in rows.iter().zip(found) {
        let s = |k: &str| r[k].as_str().unwrap_or("?").to_string();
        let mut desc = s("description");
        if let Some(p) = d.problem() {
            desc = format!("PROBLEM: {p}");
        }
        t.add_row([
            s("name"),
            s("kind"),
            s("version"),
            r["abi_version"].to_string(),
            s("path"),
            desc,
        ]);
    }
    println!("{t}");
    Ok(EXIT_OK)
}

/// `--eval-attack NAME` with its `--attack-param KEY=VALUE`s: the attack plugin and its resolved
/// parameters (another kind of plugin, or a bad parameter, is an input error naming it).
pub fn eval_attack(
    dirs: &[(PathBuf, &'static str)],
    name: &str,
    params: &[String],
) -> Result<(Arc<LoadedPlugin>, serde_json::Map<String, Value>)> {
    let a = find(dirs, name)?;
    if a.kind != Kind::Attack {
        return Err(input_error(format!(
            "--eval-attack `{}` is a {} plugin, not an attack",
            a.name, a.kind
        )));
    }
    let params = a.schema.resolve_args(params).map_err(|e| PluginError::InvalidInput {
        name: a.name.clone(),
        path: a.path.clone(),
        message: e.to_string(),
    })?;
    Ok((a, params))
}

/// Finds a plugin by name on the search path and loads it.
pub fn find(dirs: &[(PathBuf, &'static str)], name: &str) -> Result<Arc<LoadedPlugin>> {
    let found = plugin::discover(dirs);
    let hit = found
        .iter()
        .find(|d| d.shadowed_by.is_none() && d.manifest.as_ref().is_ok_and(|m| m.name == name));
    match hit {
        Some(d) => {
            if let Some(line) = plugin::shadowing(&found, name) {
                eprintln!("warning: {line}");
            }
            Ok(d.load()?)
        }
        None => {
            let stray: Vec<String> = plugin::unmanaged_libraries(dirs)
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let names: Vec<&str> = found
                .iter()
                .filter_map(|d| d.manifest.as_ref().ok())
                .map(|m| m.name.as_str())
                .collect();
            let searched: Vec<String> = dirs
                .iter()
                .map(|(d, from)| format!("{} ({from})", d.display()))
                .collect();
            Err(input_error_hint(
                format!(
                    "no plugin named `{name}`{}",
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" (found: {})", names.join(", "))
                    }
                ),
                format!(
                    "searched {}; `audit plugins install LIB` adds one{}",
                    searched.join(", "),
                    if stray.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (libraries without a manifest, never used: {}; run audit plugins install on them)",
                            stray.join(", ")
                        )
                    }
                ),
            ))
        }
    }
}

fn describe(p: &LoadedPlugin) -> Value {
    json!({
        "name": p.name, "kind": p.kind.as_str(), "version": p.version, "abi_version": p.abi_version,
        "path": p.path.display().to_string(), "sha256": p.sha256,
        "description": p.description, "build_info": p.build_info,
        "capabilities": capability_names(p.capabilities),
    })
}

fn info(p: &LoadedPlugin, json: bool) -> Result<i32> {
    if json {
        let mut v = describe(p);
        v["schema_version"] = json!(1);
        v["params_schema"] = serde_json::from_str(&p.schema_json).unwrap_or(Value::Null);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(EXIT_OK);
    }
    println!(
        "{} ({} plugin, version {}, ABI v{})",
        p.name, p.kind, p.version, p.abi_version
    );
    println!("  {}", p.description);
    println!("  library:      {}", p.path.display());
    println!("  sha256:       {}", p.sha256);
    println!("  built:        {}", p.build_info);
    let caps = capability_names(p.capabilities);
    println!(
        "  capabilities: {}",
        if caps.is_empty() {
            "none".into()
        } else {
            caps.join(", ")
        }
    );
    if p.schema.params.is_empty() {
        println!("  parameters:   none");
        return Ok(EXIT_OK);
    }
    let mut t = table();
    t.set_header(["parameter", "type", "default", "description"]);
    for prm in &p.schema.params {
        t.add_row([
            prm.name.clone(),
            prm.type_summary(),
            prm.default.to_string(),
            prm.description.clone(),
        ]);
    }
    println!("{t}");
    Ok(EXIT_OK)
}

fn check(found: &[Discovered], json: bool) -> Result<i32> {
    let mut rows = Vec::new();
    let mut broken = 0;
    for d in found {
        let res = match d.problem() {
            Some(p) if d.manifest.is_err() || d.shadowed_by.is_none() => {
                Err(format!("{}: {p}", d.manifest_path.display()))
            }
            _ => d.load().map_err(|e| e.to_string()),
        };
        let name = d
            .manifest
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_else(|_| "?".into());
        match res {
            Ok(p) => rows.push(json!({"name": name, "ok": true, "plugin": describe(&p)})),
            Err(e) => {
                broken += 1;
                rows.push(
                    json!({"name": name, "ok": false, "error": e, "manifest": d.manifest_path.display().to_string()}),
                );
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"schema_version": 1, "plugins": rows, "broken": broken}))?
        );
    } else {
        let mut t = table();
        t.set_header(["name", "status"]);
        for r in &rows {
            let status = if r["ok"] == true {
                format!("ok (ABI v{})", r["plugin"]["abi_version"])
            } else {
                format!("BROKEN: {}", r["error"].as_str().unwrap_or(""))
            };
            t.add_row([r["name"].as_str().unwrap_or("?").to_string(), status]);
        }
        println!("{t}");
        eprintln!("{} plugin(s) ok, {broken} broken", rows.len() - broken);
    }
    Ok(if broken > 0 { EXIT_USAGE } else { EXIT_OK })
}

fn count_changed(before: &LabeledSet, after: &crate::data::Images) -> usize {
    let per = before.images.image_len();
    let (a, b) = (before.images.to_u8(), after.to_u8());
    a.chunks_exact(per.max(1))
        .zip(b.chunks_exact(per.max(1)))
        .filter(|(x, y)| x != y)
        .count()
}

fn run_plugin(dirs: &[(PathBuf, &'static str)], args: PluginRunArgs) -> Result<i32> {
    let p = find(dirs, &args.name)?;
    let op = args.op.unwrap_or(match p.kind {
        Kind::Attack => Op::Trigger,
        Kind::Detector => Op::Scan,
        Kind::Defense => Op::Defend,
    });
    if op.kind() != p.kind {
        return Err(input_error(format!(
            "`{}` is a {} plugin; --op {:?} needs a {}",
            p.name,
            p.kind,
            op,
            op.kind()
        )));
    }
    let params = p
        .schema
        .resolve_args(&args.params)
        .map_err(|e| PluginError::InvalidInput {
            name: p.name.clone(),
            path: p.path.clone(),
            message: e.to_string(),
        })?;
    let model = match &args.model {
        Some(m) => Some(std::fs::read(m).map_err(|e| input_error(format!("{}: {e}", m.display())))?),
        None if op == Op::Defend || p.capabilities & audit_abi::AUDIT_CAP_NEEDS_MODEL != 0 => {
            return Err(input_error(format!(
                "`{}` needs a model: pass --model MODEL.onnx",
                p.name
            )));
        }
        None => None,
    };
    // The model and the data are inputs: --out may name neither, even with --force.
    let mut inputs: Vec<&Path> = args.model.iter().map(PathBuf::as_path).collect();
    inputs.push(Path::new(&args.data));
    let mut outputs = Outputs::new(args.force, &inputs);
    if let Some(out) = &args.out {
        outputs.plan("--out", out)?;
    }
    let ds = data::load(&args.data, args.data_format, args.seed)?;
    let (split_name, split) = match op {
        Op::Trigger => ("test", &ds.test),
        _ => ("train", &ds.train),
    };
    let set = match args.limit {
        Some(k) => split.head(k),
        None => split.clone(),
    };
    if set.is_empty() {
        return Err(input_error(format!("{}: the {split_name} split is empty", ds.source)));
    }
    let wants_clean = audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA | audit_abi::AUDIT_CAP_USES_CLEAN_DATA;
    let clean = (p.capabilities & wants_clean != 0 && !ds.test.is_empty()).then(|| ds.test.head(1000));
    let started = std::time::Instant::now();
    let out = p.call(&CallInput {
        op,
        params: &params,
        seed: args.seed,
        device: &args.device,
        model: model.as_deref(),
        data: Some(&set),
        clean: clean.as_ref(),
        num_classes: ds.num_classes,
    })?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.message.is_empty() {
        eprintln!("[{}] warning: {}", p.name, out.message);
    }
    let changed = out.images.as_ref().map(|im| count_changed(&set, im));
    let label_changes = out
        .labels
        .as_ref()
        .map(|l| l.iter().zip(&set.labels).filter(|(a, b)| a != b).count());
    if let Some(path) = &args.out {
        match (op, &out.images, &out.labels, &out.model) {
            (Op::Poison, Some(im), Some(labels), _) => {
                let test = match args.limit {
                    Some(k) => ds.test.head(k),
                    None => ds.test.clone(),
                };
                let idx = out.indices.as_deref().unwrap_or(&[]);
                outputs.stage_with(path, |f| {
                    data::write_npz_to(
                        f,
                        path,
                        &[
                            ("x_train", NpzArray::Images(im)),
                            ("y_train", NpzArray::I64(labels)),
                            ("x_test", NpzArray::Images(&test.images)),
                            ("y_test", NpzArray::I64(&test.labels)),
                            ("poison_idx", NpzArray::I64(idx)),
                        ],
                    )
                })?;
            }
            (Op::Trigger, Some(im), Some(labels), _) => {
                outputs.stage_with(path, |f| {
                    data::write_npz_to(f, path, &[("x", NpzArray::Images(im)), ("y", NpzArray::I64(labels))])
                })?;
            }
            (Op::Defend, _, _, Some(m)) => outputs.stage(path, m)?,
            _ => {
                return Err(input_error(format!(
                    "--out: a {op:?} result has nothing to write to a file"
                )))
            }
        }
    }
    outputs.commit()?;
    if args.json {
        let doc = json!({
            "schema_version": 1,
            "plugin": describe(&p),
            "op": format!("{op:?}").to_lowercase(),
            "data": {"source": ds.source, "split": split_name, "n": set.len()},
            "params": params,
            "seed": args.seed,
            "seconds": seconds,
            "changed_images": changed,
            "changed_labels": label_changes,
            "indices": out.indices,
            "report": out.report,
            "output": args.out.as_ref().map(|p| p.display().to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(EXIT_OK);
    }
    println!(
        "{} ({} {}) {:?} on {} {split_name}[..{}] in {seconds:.2}s",
        p.name,
        p.kind,
        p.version,
        op,
        ds.source,
        set.len()
    );
    if let Some(c) = changed {
        println!("  images changed: {c} of {}", set.len());
    }
    if let Some(c) = label_changes {
        println!("  labels changed: {c} of {}", set.len());
    }
    if let Some(ix) = &out.indices {
        let head: Vec<String> = ix.iter().take(10).map(i64::to_string).collect();
        println!(
            "  indices ({}): {}{}",
            ix.len(),
            head.join(", "),
            if ix.len() > 10 { ", ..." } else { "" }
        );
    }
    println!("  report: {}", Value::Object(out.report.clone()));
    if let Some(path) = &args.out {
        println!("  wrote {}", path.display());
    }
    Ok(EXIT_OK)
}
