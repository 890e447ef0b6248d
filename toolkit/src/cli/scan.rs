//! `audit scan MODEL.onnx [--data DATA] [--detector NAME]...`: runs detector plugins on a model
//! and says whether it is backdoored. Exit 3 when any detector flags it, 0 when none does.
//!
//! Without `--detector`, every installed detector that can run on what was given runs: without
//! `--data` the data-free ones (no `needs-training-data`/`needs-clean-data` capability).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use serde_json::{Map, Value};

use super::args::{DataOptions, DeviceArg};
use super::harden::with_metadata;
use super::GlobalArgs;
use crate::data;
use crate::error::{input_error, input_error_hint, EXIT_FLAGGED, EXIT_OK};
use crate::output::Outputs;
use crate::plugin::{self, CallInput, Kind, LoadedPlugin, Op, PluginError};
use crate::report::scan::{Finding, ScanReport};
use crate::report::ModelInfo;

#[derive(Debug, Args)]
pub struct ScanArgs {
    pub model: PathBuf,
    /// Data for the detectors that need it (same forms as `eval --data`); without it only the
    /// data-free detectors run.
    #[arg(long)]
    pub data: Option<String>,
    #[command(flatten)]
    pub data_options: DataOptions,
    /// Detector plugin (repeatable); default: every installed detector that can run on what was given.
    #[arg(long = "detector", value_name = "NAME")]
    pub detectors: Vec<String>,
    /// Detector parameter DETECTOR:KEY=VALUE, or KEY=VALUE when one detector runs (repeatable).
    #[arg(long = "param", value_name = "[DETECTOR:]KEY=VALUE")]
    pub params: Vec<String>,
    /// Use the first N training samples only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// auto (CUDA when available), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Also write a report: .json, .md or .html (self-contained); repeatable.
    #[arg(long = "report", value_name = "FILE")]
    pub reports: Vec<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing report.
    #[arg(long)]
    pub force: bool,
    /// Print the scan document as JSON on stdout (instead of the table).
    #[arg(long)]
    pub json: bool,
}

const DATA_CAPS: u64 = audit_abi::AUDIT_CAP_NEEDS_TRAINING_DATA | audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA;

/// The detectors to run: the named ones, or every installed detector that can run.
fn choose(dirs: &[(PathBuf, &'static str)], args: &ScanArgs) -> Result<Vec<std::sync::Arc<LoadedPlugin>>> {
    if !args.detectors.is_empty() {
        let mut out = Vec::new();
        for name in &args.detectors {
            let p = super::plugins::find(dirs, name)?;
            if p.kind != Kind::Detector {
                return Err(input_error(format!(
                    "--detector `{}` is a {} plugin, not a detector",
                    p.name, p.kind
                )));
            }
            if p.capabilities & DATA_CAPS != 0 && args.data.is_none() {
                return Err(input_error(format!(
                    "--detector `{}` needs data ({}): pass --data DATA",
                    p.name,
                    plugin::capability_names(p.capabilities & DATA_CAPS).join(", ")
                )));
            }
            if out.iter().any(|q: &std::sync::Arc<LoadedPlugin>| q.name == p.name) {
                return Err(input_error(format!("--detector `{}` is given twice", p.name)));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for d in plugin::discover(dirs) {
        let Ok(m) = &d.manifest else { continue };
        if m.kind != Kind::Detector || d.shadowed_by.is_some() {
            continue;
        }
        let p = d.load()?;
        if p.capabilities & DATA_CAPS != 0 && args.data.is_none() {
            skipped.push(p.name.clone());
            continue;
        }
        out.push(p);
    }
    if !skipped.is_empty() {
        eprintln!("not run without --data: {}", skipped.join(", "));
    }
    if out.is_empty() {
        return Err(input_error_hint(
            "no detector plugin can run on this input",
            if skipped.is_empty() {
                "none is installed: `audit plugins list` shows what is; `make build` installs the bundled ones"
                    .to_string()
            } else {
                format!("{} need data: pass --data DATA", skipped.join(", "))
            },
        ));
    }
    Ok(out)
}

/// Splits `--param` values over the detectors: `NAME:KEY=VALUE`, or `KEY=VALUE` with one detector.
fn params_for(detectors: &[std::sync::Arc<LoadedPlugin>], given: &[String]) -> Result<Vec<Vec<String>>> {
    let mut per: Vec<Vec<String>> = vec![Vec::new(); detectors.len()];
    for g in given {
        let (name, kv) = match g.split_once(':') {
            Some((n, kv)) if !n.contains('=') => (Some(n), kv),
            _ => (None, g.as_str()),
        };
        let i = match name {
            Some(n) => detectors.iter().position(|d| d.name == n).ok_or_else(|| {
                input_error(format!(
                    "--param {g}: no detector `{n}` runs in this scan (running: {})",
                    detectors.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?,
            None if detectors.len() == 1 => 0,
            None => {
                return Err(input_error(format!(
                    "--param {g}: {} detectors run; name the one it is for as DETECTOR:KEY=VALUE",
                    detectors.len()
                )))
            }
        };
        per[i].push(kv.to_string());
    }
    Ok(per)
}

/// The number of classes of a model whose first output is [N, K] with K known.
fn output_classes(bytes: &[u8]) -> Option<usize> {
    let m = audit_nn::Model::load(bytes, None).ok()?;
    match m.outputs.first()?.dims[..] {
        [_, Some(k)] if k >= 2 => Some(k as usize),
        _ => None,
    }
}

pub fn run(args: ScanArgs, global: &GlobalArgs) -> Result<i32> {
    let dirs = plugin::search_dirs(&global.plugin_dirs);
    let detectors = choose(&dirs, &args)?;
    let per_params = params_for(&detectors, &args.params)?;
    let mut resolved = Vec::new();
    for (d, given) in detectors.iter().zip(&per_params) {
        resolved.push(d.schema.resolve_args(given).map_err(|e| PluginError::InvalidInput {
            name: d.name.clone(),
            path: d.path.clone(),
            message: e.to_string(),
        })?);
    }
    let mut inputs: Vec<&Path> = vec![&args.model];
    if let Some(d) = &args.data {
        if Path::new(d).exists() {
            inputs.push(Path::new(d));
        }
    }
    let mut outputs = Outputs::new(args.force, &inputs);
    for r in &args.reports {
        crate::report::Format::of(r)?;
        outputs.plan("--report", r)?;
    }
    crate::signals::phase("scan:load");
    let (original, norm) = args.data_options.model_and_normalization(&args.model)?;
    let lent = with_metadata(&original, &norm.metadata())?;
    let ds = match &args.data {
        Some(d) => {
            let ds = data::load(d, args.data_options.data_format, args.seed)?;
            crate::evaluate::check_model_fits_data(&original, &args.model.display().to_string(), &ds)?;
            Some(ds)
        }
        None => None,
    };
    let train = ds.as_ref().map(|ds| match args.limit {
        Some(k) => ds.train.head(k),
        None => ds.train.clone(),
    });
    let clean = ds.as_ref().map(|ds| ds.test.head(1000));
    let num_classes = ds
        .as_ref()
        .map(|d| d.num_classes)
        .or_else(|| output_classes(&original))
        .unwrap_or(0);
    let (_, device_name) = args.device.resolve()?;

    crate::signals::phase("scan:run");
    let mut findings = Vec::new();
    for (d, params) in detectors.iter().zip(&resolved) {
        eprintln!("scanning {} with `{}` ({device_name})", args.model.display(), d.name);
        let started = std::time::Instant::now();
        let needs_clean = d.capabilities & audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA != 0;
        let result = d.call(&CallInput {
            op: Op::Scan,
            params,
            seed: args.seed,
            device: device_name,
            model: Some(&lent),
            data: train.as_ref(),
            clean: if needs_clean { clean.as_ref() } else { None },
            num_classes,
        });
        let seconds = started.elapsed().as_secs_f64();
        let base = Finding {
            detector: d.name.clone(),
            version: d.version.clone(),
            params: Value::Object(params.clone()),
            library: d.path.display().to_string(),
            library_sha256: d.sha256.clone(),
            status: "ok".into(),
            error: None,
            backdoored: None,
            target_classes: vec![],
            score: None,
            score_name: None,
            level: None,
            summary: None,
            n_suspicious: 0,
            seconds,
            report: Value::Null,
        };
        match result {
            Ok(out) => {
                if !out.message.is_empty() {
                    eprintln!("[{}] warning: {}", d.name, out.message);
                }
                let r: Map<String, Value> = out.report;
                let text = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
                findings.push(Finding {
                    backdoored: r.get("backdoored").and_then(Value::as_bool),
                    target_classes: r
                        .get("target_classes")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_i64).collect())
                        .unwrap_or_default(),
                    score: r.get("score").and_then(Value::as_f64),
                    score_name: text("score_name"),
                    level: text("level"),
                    summary: text("summary"),
                    n_suspicious: out.indices.as_ref().map_or(0, Vec::len),
                    report: Value::Object(r),
                    ..base
                });
            }
            // Cancellation and input the user can fix stop the scan (exit 130, 2); a detector that
            // fails otherwise is a result, reported beside the others.
            Err(e @ (PluginError::Cancelled { .. } | PluginError::InvalidInput { .. })) => return Err(e.into()),
            Err(e) => {
                eprintln!("`{}` failed: {e}", d.name);
                findings.push(Finding {
                    status: "failed".into(),
                    error: Some(e.to_string()),
                    ..base
                });
            }
        }
    }
    let report = ScanReport::new(
        ModelInfo {
            path: args.model.display().to_string(),
            sha256: audit_nn::export::sha256_hex(&original),
        },
        ds.as_ref().map(|d| d.source.clone()),
        args.seed,
        device_name,
        findings,
    );
    crate::signals::phase("scan:commit");
    for r in &args.reports {
        let text = report.render(r)?;
        outputs.stage(r, text.as_bytes())?;
    }
    outputs.commit()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.table());
    }
    let failed: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.status != "ok")
        .map(|f| f.detector.as_str())
        .collect();
    eprintln!(
        "{}",
        if report.flagged {
            "verdict: FLAGGED (exit 3)".to_string()
        } else if failed.is_empty() {
            "verdict: not flagged".to_string()
        } else {
            format!(
                "verdict: not flagged by the detectors that ran; failed: {}",
                failed.join(", ")
            )
        }
    );
    // Not flagged is only a verdict when every detector ran: a failed one makes it exit 1.
    Ok(if report.flagged {
        EXIT_FLAGGED
    } else if !failed.is_empty() {
        crate::error::EXIT_FAILURE
    } else {
        EXIT_OK
    })
}
