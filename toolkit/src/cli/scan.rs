//! `audit scan MODEL.onnx [--data DATA] [--detector NAME]...`: runs detector plugins on a model
//! and says whether it is backdoored. Exit 3 when any detector flags it, 0 when none does.
//!
//! Without `--detector`, every installed detector that can run on what was given runs: without
//! `--data` the data-free ones (no `needs-training-data`/`needs-clean-data` capability).

use std::path::{Path, PathBuf};

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};

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
    /// Write the images detectors return (Neural Cleanse's mask and trigger of each flagged
    /// class) as PNG files DETECTOR-CAPTION.png into this folder (created; it must be empty unless
    /// --force).
    #[arg(long = "images", value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Input-level detectors (STRIP) are run again on held-out clean test images and the same
    /// images triggered by this attack, and report their false rejection (FRR) and false
    /// acceptance (FAR) rates; needs --data.
    #[arg(long, value_name = "NAME")]
    pub eval_attack: Option<String>,
    /// Parameter of --eval-attack KEY=VALUE (repeatable).
    #[arg(long = "attack-param", value_name = "KEY=VALUE", requires = "eval_attack")]
    pub attack_params: Vec<String>,
    /// --eval-attack: clean test images judged (after the 1,000 lent as the clean subset), and as
    /// many triggered (those whose true class is the attack's label are left out).
    #[arg(long, default_value_t = 500, requires = "eval_attack")]
    pub eval_size: usize,
}

/// `--images DIR`: created when missing; refused when it is not a folder, or holds anything and
/// --force is not given (the file names depend on the results, so they are checked up front).
fn prepare_images_dir(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(input_error(format!("--images {}: not a folder", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(|e| input_error(format!("--images {}: {e}", dir.display())))?;
    let mut entries = std::fs::read_dir(dir).map_err(|e| input_error(format!("--images {}: {e}", dir.display())))?;
    if !force && entries.next().is_some() {
        return Err(input_error_hint(
            format!("--images {}: the folder is not empty", dir.display()),
            "name a new or empty folder, or pass --force to replace files in it",
        ));
    }
    Ok(())
}

/// `nc-class-0-mask.png` from detector `nc` and caption `class 0: mask`; unique among `taken`.
fn image_file_name(detector: &str, caption: &str, taken: &mut std::collections::HashSet<String>) -> String {
    let mut slug = String::new();
    for c in caption.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_matches('-');
    let stem = format!("{detector}-{}", if slug.is_empty() { "image" } else { slug });
    let mut name = format!("{stem}.png");
    let mut i = 2;
    while !taken.insert(name.clone()) {
        name = format!("{stem}-{i}.png");
        i += 1;
    }
    name
}

const DATA_CAPS: u64 = audit_abi::AUDIT_CAP_NEEDS_TRAINING_DATA | audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA;

/// What a scan can lend the detectors, and what to tell the user about the rest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offer {
    /// The training set (sample-level detectors need it).
    pub training: bool,
    /// Clean test images (Neural Cleanse and the like need them).
    pub clean: bool,
    /// Without named detectors, run only those that need no data at all.
    pub default_data_free: bool,
    /// How the user gets a detector the offer cannot run (the hint of the refusal).
    pub hint: &'static str,
}

impl Offer {
    /// `audit scan`: everything when `--data` is given, nothing otherwise.
    pub fn scan(has_data: bool) -> Offer {
        Offer {
            training: has_data,
            clean: has_data,
            default_data_free: false,
            hint: "pass --data DATA",
        }
    }

    /// `harden --verify` and `compare --verify`: the model is scanned, not the training set, so
    /// detectors that judge training samples are out; clean test images are there.
    pub fn verify() -> Offer {
        Offer {
            training: false,
            clean: true,
            default_data_free: true,
            hint: "--verify judges the model, not its training set: scan the data with `audit scan MODEL --data DATA`",
        }
    }

    /// The capabilities `caps` asks for that this offer lacks.
    fn missing(&self, caps: u64) -> u64 {
        let mut m = 0;
        if !self.training {
            m |= caps & audit_abi::AUDIT_CAP_NEEDS_TRAINING_DATA;
        }
        if !self.clean {
            m |= caps & audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA;
        }
        m
    }
}

/// Detectors chosen and their parameters resolved: what `audit scan`, `harden --verify` and
/// `compare --verify` run. Everything the user named is checked here, before any long work.
pub(crate) struct Scanner {
    detectors: Vec<Arc<LoadedPlugin>>,
    params: Vec<Map<String, Value>>,
}

impl Scanner {
    /// The named detectors (`names`), or every installed detector the offer can run, with their
    /// `[DETECTOR:]KEY=VALUE` parameters checked against their schemas.
    pub fn new(dirs: &[(PathBuf, &'static str)], names: &[String], given: &[String], offer: Offer) -> Result<Scanner> {
        let detectors = choose(dirs, names, offer)?;
        let mut params = Vec::new();
        for (d, given) in detectors.iter().zip(params_for(&detectors, given)?) {
            params.push(d.schema.resolve_args(&given).map_err(|e| PluginError::InvalidInput {
                name: d.name.clone(),
                path: d.path.clone(),
                message: e.to_string(),
            })?);
        }
        Ok(Scanner { detectors, params })
    }

    /// The chosen detectors' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.detectors.iter().map(|d| d.name.as_str())
    }

    /// Whether any chosen detector needs clean data.
    pub fn needs_clean(&self) -> bool {
        self.detectors
            .iter()
            .any(|d| d.capabilities & audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA != 0)
    }

    /// Runs every detector on `model` (ONNX bytes carrying the preprocessing metadata). A
    /// detector that fails is a finding with status `failed`; cancellation and input the user can
    /// fix stop the scan.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        what: &str,
        model: &[u8],
        train: Option<&data::LabeledSet>,
        clean: Option<&data::LabeledSet>,
        num_classes: usize,
        device: &str,
        seed: u64,
    ) -> Result<Vec<Finding>> {
        let mut findings = Vec::new();
        for i in 0..self.detectors.len() {
            findings.push(self.run_one(i, what, model, train, clean, num_classes, device, seed)?);
        }
        Ok(findings)
    }

    /// Runs detector `i` (see [`Scanner::run`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run_one(
        &self,
        i: usize,
        what: &str,
        model: &[u8],
        train: Option<&data::LabeledSet>,
        clean: Option<&data::LabeledSet>,
        num_classes: usize,
        device: &str,
        seed: u64,
    ) -> Result<Finding> {
        let (d, params) = (&self.detectors[i], &self.params[i]);
        eprintln!("scanning {what} with `{}` ({device})", d.name);
        let started = std::time::Instant::now();
        let needs_clean = d.capabilities & audit_abi::AUDIT_CAP_NEEDS_CLEAN_DATA != 0;
        let result = d.call(&CallInput {
            op: Op::Scan,
            params,
            seed,
            device,
            model: Some(model),
            data: train,
            clean: if needs_clean { clean } else { None },
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
            suspicious: vec![],
            vs_poison_idx: None,
            input_eval: None,
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
                Ok(Finding {
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
                    suspicious: out.indices.unwrap_or_default(),
                    report: Value::Object(r),
                    ..base
                })
            }
            Err(e @ (PluginError::Cancelled { .. } | PluginError::InvalidInput { .. })) => Err(e.into()),
            Err(e) => {
                eprintln!("`{}` failed: {e}", d.name);
                Ok(Finding {
                    status: "failed".into(),
                    error: Some(e.to_string()),
                    ..base
                })
            }
        }
    }
}

/// The detectors to run: the named ones, or every installed detector the offer can run.
fn choose(dirs: &[(PathBuf, &'static str)], names: &[String], offer: Offer) -> Result<Vec<Arc<LoadedPlugin>>> {
    if !names.is_empty() {
        let mut out = Vec::new();
        for name in names {
            let p = super::plugins::find(dirs, name)?;
            if p.kind != Kind::Detector {
                return Err(input_error(format!(
                    "--detector `{}` is a {} plugin, not a detector",
                    p.name, p.kind
                )));
            }
            let missing = offer.missing(p.capabilities);
            if missing != 0 {
                return Err(input_error_hint(
                    format!(
                        "detector `{}` needs data this run does not lend it ({})",
                        p.name,
                        plugin::capability_names(missing).join(", ")
                    ),
                    offer.hint,
                ));
            }
            if out.iter().any(|q: &Arc<LoadedPlugin>| q.name == p.name) {
                return Err(input_error(format!("detector `{}` is named twice", p.name)));
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
        let needs = if offer.default_data_free {
            p.capabilities & DATA_CAPS
        } else {
            offer.missing(p.capabilities)
        };
        if needs != 0 {
            skipped.push(p.name.clone());
            continue;
        }
        out.push(p);
    }
    if !skipped.is_empty() && !offer.default_data_free {
        eprintln!("not run without --data: {}", skipped.join(", "));
    }
    if out.is_empty() {
        return Err(input_error_hint(
            "no detector plugin can run on this input",
            if skipped.is_empty() {
                "none is installed: `audit plugins list` shows what is; `make build` installs the bundled ones"
                    .to_string()
            } else if offer.default_data_free {
                format!(
                    "none is data-free; name one with --verify-detector (installed: {})",
                    skipped.join(", ")
                )
            } else {
                format!("{} need data: {}", skipped.join(", "), offer.hint)
            },
        ));
    }
    Ok(out)
}

/// Splits `--param` values over the detectors: `NAME:KEY=VALUE`, or `KEY=VALUE` with one detector.
fn params_for(detectors: &[Arc<LoadedPlugin>], given: &[String]) -> Result<Vec<Vec<String>>> {
    let mut per: Vec<Vec<String>> = vec![Vec::new(); detectors.len()];
    for g in given {
        let (name, kv) = match g.split_once(':') {
            Some((n, kv)) if !n.contains('=') => (Some(n), kv),
            _ => (None, g.as_str()),
        };
        let i = match name {
            Some(n) => detectors.iter().position(|d| d.name == n).ok_or_else(|| {
                input_error(format!(
                    "parameter {g}: no detector `{n}` runs in this scan (running: {})",
                    detectors.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?,
            None if detectors.len() == 1 => 0,
            None => {
                return Err(input_error(format!(
                    "parameter {g}: {} detectors run; name the one it is for as DETECTOR:KEY=VALUE",
                    detectors.len()
                )))
            }
        };
        per[i].push(kv.to_string());
    }
    Ok(per)
}

/// The clean images a detector is lent: the first 1,000 test images (the same in `scan` and
/// `--verify`, so a model gets the same verdict from both).
pub(crate) fn clean_images(ds: &data::Dataset) -> data::LabeledSet {
    ds.test.head(1000)
}

/// `--eval-attack`'s inputs: held-out clean test images, then the same images triggered (those
/// whose true class is already the attack's label left out).
struct TriggeredInputs {
    set: data::LabeledSet,
    n_clean: usize,
    n_triggered: usize,
}

fn triggered_inputs(
    ds: &data::Dataset,
    attack: &LoadedPlugin,
    params: &Map<String, Value>,
    size: usize,
    seed: u64,
) -> Result<TriggeredInputs> {
    let lent = clean_images(ds).len();
    let held_out = ds.test.range(lent, size);
    if held_out.is_empty() {
        return Err(input_error(format!(
            "--eval-attack: {} has {} test images, all lent to the detectors as clean data (the first {lent}); \
             FAR/FRR need held-out test images after them",
            ds.source,
            ds.test.len()
        )));
    }
    let out = attack.call(&CallInput {
        op: Op::Trigger,
        params,
        seed,
        device: "cpu",
        model: None,
        data: Some(&held_out),
        clean: None,
        num_classes: ds.num_classes,
    })?;
    let triggered = data::LabeledSet {
        images: out.images.context("the attack's trigger returned no images")?,
        labels: out.labels.context("the attack's trigger returned no labels")?,
    };
    if triggered.len() != held_out.len() {
        return Err(anyhow::anyhow!(
            "the attack `{}` triggered {} of {} images",
            attack.name,
            triggered.len(),
            held_out.len()
        ));
    }
    let keep: Vec<usize> = (0..held_out.len())
        .filter(|&i| held_out.labels[i] != triggered.labels[i])
        .collect();
    let triggered = triggered.select(&keep);
    let images = held_out
        .images
        .concat(&triggered.images)
        .context("the attack's triggered images have another shape")?;
    Ok(TriggeredInputs {
        n_clean: held_out.len(),
        n_triggered: triggered.len(),
        set: data::LabeledSet {
            images,
            labels: [held_out.labels, triggered.labels].concat(),
        },
    })
}

impl TriggeredInputs {
    /// FRR (clean inputs flagged) and FAR (triggered inputs not flagged) of a finding on these
    /// inputs, among those it judged (`n_judged`).
    fn rates(&self, attack: &str, params: &Map<String, Value>, f: &Finding) -> Value {
        let judged = f.report["n_judged"]
            .as_u64()
            .map_or(self.set.len(), |n| (n as usize).min(self.set.len()));
        let n_clean = self.n_clean.min(judged);
        let n_triggered = judged.saturating_sub(self.n_clean);
        let flagged = |lo: usize, hi: usize| {
            f.suspicious
                .iter()
                .filter(|&&i| i >= 0 && (i as usize) >= lo && (i as usize) < hi)
                .count()
        };
        let (fc, ft) = (flagged(0, n_clean), flagged(self.n_clean, self.n_clean + n_triggered));
        let share = |k: usize, n: usize| {
            if n == 0 {
                Value::Null
            } else {
                json!(k as f64 / n as f64)
            }
        };
        json!({
            "attack": attack,
            "params": params,
            "n_clean": n_clean,
            "n_triggered": n_triggered,
            "flagged_clean": fc,
            "flagged_triggered": ft,
            "frr": share(fc, n_clean),
            "far": share(n_triggered - ft, n_triggered),
            "seconds": f.seconds,
        })
    }
}

/// The number of classes of a model whose first output is [N, K] with K known.
pub(crate) fn output_classes(bytes: &[u8]) -> Option<usize> {
    let m = audit_nn::Model::load(bytes, None).ok()?;
    match m.outputs.first()?.dims[..] {
        [_, Some(k)] if k >= 2 => Some(k as usize),
        _ => None,
    }
}

pub fn run(args: ScanArgs, global: &GlobalArgs) -> Result<i32> {
    let dirs = plugin::search_dirs(&global.plugin_dirs);
    let scanner = Scanner::new(&dirs, &args.detectors, &args.params, Offer::scan(args.data.is_some()))?;
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
    if let Some(d) = &args.images {
        prepare_images_dir(d, args.force)?;
    }
    let eval_attack = match &args.eval_attack {
        None => None,
        Some(_) if args.data.is_none() => {
            return Err(input_error(
                "--eval-attack triggers test images of --data: give --data DATA",
            ))
        }
        Some(_) if args.eval_size == 0 => return Err(input_error("--eval-size must be at least 1")),
        Some(name) => Some(super::plugins::eval_attack(&dirs, name, &args.attack_params)?),
    };
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
    let clean = ds.as_ref().map(clean_images);
    let num_classes = ds
        .as_ref()
        .map(|d| d.num_classes)
        .or_else(|| output_classes(&original))
        .unwrap_or(0);
    let (_, device_name) = args.device.resolve()?;

    crate::signals::phase("scan:run");
    let mut findings = scanner.run(
        &args.model.display().to_string(),
        &lent,
        train.as_ref(),
        clean.as_ref(),
        num_classes,
        device_name,
        args.seed,
    )?;
    // Detectors that judge training samples are scored against the data's poisoned ones: among
    // the first `n_judged` (report key) when the detector judged only those.
    if let (Some(ix), Some(train)) = (ds.as_ref().and_then(|d| d.poison_idx.as_ref()), &train) {
        for f in findings.iter_mut().filter(|f| f.status == "ok") {
            if matches!(f.level.as_deref(), Some("sample" | "input")) || !f.suspicious.is_empty() {
                let judged = f.report["n_judged"]
                    .as_u64()
                    .map_or(train.len(), |n| (n as usize).min(train.len()));
                let truth: std::collections::HashSet<i64> = ix
                    .iter()
                    .copied()
                    .filter(|&i| i >= 0 && (i as usize) < judged)
                    .collect();
                f.vs_poison_idx = Some(crate::evaluate::precision_recall(&f.suspicious, &truth));
            }
        }
    }
    if let (Some((attack, attack_params)), Some(ds)) = (&eval_attack, &ds) {
        let inputs = triggered_inputs(ds, attack, attack_params, args.eval_size, args.seed)?;
        for (i, finding) in findings.iter_mut().enumerate() {
            if finding.status != "ok" || finding.level.as_deref() != Some("input") {
                continue;
            }
            eprintln!(
                "judging {} clean and {} `{}`-triggered held-out test inputs",
                inputs.n_clean, inputs.n_triggered, attack.name
            );
            let f = scanner.run_one(
                i,
                "the held-out test inputs",
                &lent,
                Some(&inputs.set),
                clean.as_ref(),
                num_classes,
                device_name,
                args.seed,
            )?;
            finding.input_eval = Some(match f.status.as_str() {
                "ok" => inputs.rates(&attack.name, attack_params, &f),
                _ => json!({"attack": attack.name, "error": f.error}),
            });
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
    let mut images = Vec::new();
    if let Some(dir) = &args.images {
        use base64ct::Encoding;
        let mut taken = std::collections::HashSet::new();
        for f in &report.findings {
            for (caption, data) in crate::report::scan::report_images(&f.report) {
                let Ok(bytes) = base64ct::Base64::decode_vec(&data) else {
                    eprintln!(
                        "[{}] warning: image `{caption}` is not valid base64; not written",
                        f.detector
                    );
                    continue;
                };
                let path = dir.join(image_file_name(&f.detector, &caption, &mut taken));
                outputs.plan("--images", &path)?;
                outputs.stage(&path, &bytes)?;
                images.push(path);
            }
        }
    }
    outputs.commit()?;
    for p in &images {
        eprintln!("wrote {}", p.display());
    }
    if args.images.is_some() && images.is_empty() {
        eprintln!("no detector returned images (Neural Cleanse does for the classes it flags)");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_file_names_are_slugs_and_unique() {
        let mut taken = std::collections::HashSet::new();
        assert_eq!(
            image_file_name("nc", "class 0: mask", &mut taken),
            "nc-class-0-mask.png"
        );
        assert_eq!(
            image_file_name("nc", "class 0: mask", &mut taken),
            "nc-class-0-mask-2.png"
        );
        assert_eq!(
            image_file_name("nc", "../../etc/passwd", &mut taken),
            "nc-etc-passwd.png"
        );
        assert_eq!(image_file_name("nc", " :: ", &mut taken), "nc-image.png");
    }

    #[test]
    fn the_images_folder_must_be_new_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("new");
        prepare_images_dir(&fresh, false).unwrap();
        assert!(fresh.is_dir());
        std::fs::write(fresh.join("x.png"), b"x").unwrap();
        let e = prepare_images_dir(&fresh, false).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        prepare_images_dir(&fresh, true).unwrap();
        let e = prepare_images_dir(&fresh.join("x.png"), true).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
    }
}
