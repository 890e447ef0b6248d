//! `audit compare MODEL.onnx --data DATA --defenses none,fine-pruning,abl,nad,finetune`: runs each
//! defense on the same model, data and seed, measures every hardened model on the same test
//! images through onnxruntime, and reports one row per defense plus the undefended model.
//!
//! Each defense runs as its own `audit harden` process: a defense that crashes (even a plugin
//! that aborts the process) gets its row with the error while the others still run, and each
//! row's peak memory is that process's own. The child's progress comes back as `@progress` lines
//! (`progress::LINES_ENV`) and is drawn here as one bar per defense under an overall bar.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};

use super::args::DataArgs;
use super::args::DefenseRunArgs;
use super::harden::HardenOutcome;
use super::GlobalArgs;
use crate::data;
use crate::error::{input_error, input_error_hint, EXIT_FAILURE, EXIT_OK};
use crate::evaluate::{evaluate, AttackSpec};
use crate::output::Outputs;
use crate::plugin::{Kind, PluginError};
use crate::progress::{self, LINES_ENV};
use crate::report::{self, Report, Row};

/// The defenses compared when `--defenses` is not given.
pub const DEFAULT_DEFENSES: &str = "none,fine-pruning,abl,nad,finetune";

#[derive(Debug, Args)]
pub struct CompareArgs {
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Defense plugins to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_DEFENSES)]
    pub defenses: Vec<String>,
    /// Parameter of one defense (or of the evaluation attack): NAME.KEY=VALUE, repeatable,
    /// e.g. `--param none.E2=5 --param nad.epochs=10`. Every row is measured on the same test
    /// images: the clean subset is left out of all of them.
    #[arg(long = "param", value_name = "NAME.KEY=VALUE")]
    pub params: Vec<String>,
    #[command(flatten)]
    pub run: DefenseRunArgs,
    /// Keep the hardened models in this folder (DEFENSE.onnx); by default they are discarded.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Replace existing reports and kept models.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also show the defenses' informational logs (epochs, pruning steps); warnings and errors
    /// are always shown.
    #[arg(long, short)]
    pub verbose: bool,
}

/// `NAME.KEY=VALUE` arguments grouped by NAME, checked against the known names.
fn split_params(params: &[String], names: &[&str]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in params {
        let (name, rest) = p
            .split_once('.')
            .filter(|(n, r)| names.contains(n) && r.contains('='))
            .ok_or_else(|| {
                input_error_hint(
                    format!(
                        "--param `{p}`: expected NAME.KEY=VALUE with NAME one of {}",
                        names.join(", ")
                    ),
                    "compare runs several plugins: say whose parameter it is, e.g. --param none.E2=5",
                )
            })?;
        out.entry(name.to_string()).or_default().push(rest.to_string());
    }
    Ok(out)
}

/// One defense to run: its plugin and resolved parameters.
struct Planned {
    name: String,
    version: String,
    /// The plugin's library (canonical path) and its sha256, for the report.
    library: String,
    sha256: String,
    raw_params: Vec<String>,
    params: Map<String, Value>,
}

/// A child's informational line (plugin info/debug logs, harden's own status line): shown only
/// with `--verbose`; warnings and errors always are.
fn is_chatter(line: &str) -> bool {
    let plugin_info = line.starts_with('[') && (line.contains("] info: ") || line.contains("] debug: "));
    // The parent resolved the same plugins and said so already; phase lines are for fault tests.
    let repeated = line.starts_with("warning: plugin `") || line.starts_with("@phase ");
    plugin_info || repeated || line.starts_with("hardening ") || line.trim().is_empty()
}

/// What a child run left: its outcome (`harden --json`) or its error.
fn run_child(
    exe: &Path,
    args: &[String],
    name: &str,
    verbose: bool,
    bars: &MultiProgress,
    bar: &ProgressBar,
) -> std::result::Result<HardenOutcome, String> {
    let mut child = Command::new(exe)
        .args(args)
        .env(LINES_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches this process only, which forwards it
        // (signals::register_child), so the child sees one SIGINT, not two.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    crate::signals::register_child(child.id());
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut error: Option<String> = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
            if let Some((phase, done, total)) = progress::parse_line(&line) {
                bar.set_length(total.max(done).max(1));
                bar.set_position(done);
                bar.set_message(phase);
                continue;
            }
            if let Some(e) = line.strip_prefix("audit: error: ") {
                error = Some(e.to_string());
            } else if let (Some(e), Some(h)) = (error.as_mut(), line.strip_prefix("hint: ")) {
                e.push_str(&format!(" (hint: {h})"));
            }
            if verbose || !is_chatter(&line) {
                bars.suspend(|| eprintln!("  {name} | {line}"));
            }
            tail.push_back(line);
            if tail.len() > 20 {
                tail.pop_front();
            }
        }
    }
    let status = child.wait();
    crate::signals::forget_child(child.id());
    let status = status.map_err(|e| format!("waiting for the defense run: {e}"))?;
    let stdout = reader.join().unwrap_or_default();
    // Exit 3: the hardened model was written and measured, and `--verify`'s detectors still flag
    // it; that is a result (the row's verdict), not a failed run.
    if status.success() || status.code() == Some(crate::error::EXIT_FLAGGED) {
        return serde_json::from_str(&stdout).map_err(|e| format!("the defense run printed no outcome document ({e})"));
    }
    let how = match status.code() {
        Some(c) => format!("exit code {c}"),
        None => {
            use std::os::unix::process::ExitStatusExt;
            format!("killed by signal {}", status.signal().unwrap_or(0))
        }
    };
    Err(match error {
        Some(e) => format!("{e} ({how})"),
        None => {
            let last: Vec<String> = tail.into_iter().filter(|l| !l.trim().is_empty()).collect();
            format!(
                "the defense run ended with {how}; its last output:\n{}",
                last.join("\n")
            )
        }
    })
}

pub fn run(args: CompareArgs, global: &GlobalArgs) -> Result<i32> {
    let dirs = crate::plugin::search_dirs(&global.plugin_dirs);
    let mut seen = HashSet::new();
    let names: Vec<String> = args
        .defenses
        .iter()
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    if names.is_empty() {
        return Err(input_error("--defenses: name at least one defense"));
    }
    if let Some(d) = names.iter().find(|d| !seen.insert(d.as_str())) {
        return Err(input_error(format!("--defenses names `{d}` twice")));
    }
    let mut known: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Some(a) = &args.run.eval_attack {
        if known.contains(&a.as_str()) {
            return Err(input_error(format!(
                "`{a}` is both a defense and the evaluation attack"
            )));
        }
        known.push(a);
    }
    let mut by_name = split_params(&args.params, &known)?;

    // Every plugin and parameter is checked before anything runs.
    let mut planned = Vec::new();
    for name in &names {
        let p = super::plugins::find(&dirs, name)?;
        if p.kind != Kind::Defense {
            return Err(input_error(format!(
                "--defenses: `{}` is a {} plugin, not a defense",
                p.name, p.kind
            )));
        }
        let raw = by_name.remove(name).unwrap_or_default();
        let params = p.schema.resolve_args(&raw).map_err(|e| PluginError::InvalidInput {
            name: p.name.clone(),
            path: p.path.clone(),
            message: e.to_string(),
        })?;
        planned.push(Planned {
            name: p.name.clone(),
            version: p.version.clone(),
            library: p.path.display().to_string(),
            sha256: p.sha256.clone(),
            raw_params: raw,
            params,
        });
    }
    let attack = args
        .run
        .eval_attack
        .as_deref()
        .map(|n| super::plugins::find(&dirs, n))
        .transpose()?;
    let mut attack_raw = args.run.attack_params.clone();
    if let Some(a) = &attack {
        if a.kind != Kind::Attack {
            return Err(input_error(format!(
                "--eval-attack `{}` is a {} plugin",
                a.name, a.kind
            )));
        }
        attack_raw.extend(by_name.remove(&a.name).unwrap_or_default());
    } else if !attack_raw.is_empty() {
        return Err(input_error("--attack-param needs --eval-attack NAME"));
    }
    let attack_params = attack
        .as_ref()
        .map(|a| {
            a.schema
                .resolve_args(&attack_raw)
                .map_err(|e| PluginError::InvalidInput {
                    name: a.name.clone(),
                    path: a.path.clone(),
                    message: e.to_string(),
                })
        })
        .transpose()?;

    let scanner = args.run.scanner(&dirs)?;

    // Outputs: refuse to clobber anything before the long run.
    let data_path = Path::new(&args.data.data);
    let mut inputs: Vec<&Path> = vec![&args.model];
    if data_path.exists() {
        inputs.push(data_path);
    }
    let mut outputs = Outputs::new(args.force, &inputs);
    for r in &args.run.reports {
        report::Format::of(r)?;
        outputs.plan("--report", r)?;
    }
    let keep_dir = args.out_dir.clone();
    if let Some(d) = &keep_dir {
        std::fs::create_dir_all(d).map_err(|e| input_error(format!("--out-dir {}: {e}", d.display())))?;
        for p in &planned {
            outputs.plan("--out-dir", &d.join(format!("{}.onnx", p.name)))?;
        }
    }
    // The children write into a scratch folder; the kept models are staged from there and land
    // with the reports at the end, so a failed or cancelled comparison leaves nothing half done.
    let scratch = tempfile::Builder::new()
        .prefix("audit-compare-")
        .tempdir()
        .context("creating a scratch folder")?;
    let model_dir = scratch.path();

    // The undefended model, measured on the evaluation set every row shares.
    crate::signals::phase("compare:load");
    let (original, norm) = args.data.model_and_normalization(&args.model)?;
    let ds = args.data.load(args.run.seed)?;
    crate::evaluate::check_model_fits_data(&original, &args.model.display().to_string(), &ds)?;
    let n_test = ds.test.len();
    let clean_size = args.run.clean_size_for(n_test)?;
    let n_eval = args
        .run
        .test_limit
        .map_or(n_test - clean_size, |k| k.min(n_test - clean_size));
    if n_eval == 0 {
        return Err(input_error("--test-limit 0 leaves nothing to measure"));
    }
    let test = ds.test.head(n_eval);
    let train_len = args.run.limit.map_or(ds.train.len(), |k| k.min(ds.train.len()));
    let n_poisoned = ds
        .poison_idx
        .as_ref()
        .map(|ix| ix.iter().filter(|&&i| (i as usize) < train_len).count());
    let (_, device_name) = args.run.device.resolve()?;
    let spec = attack
        .as_ref()
        .zip(attack_params.as_ref())
        .map(|(p, params)| AttackSpec {
            plugin: p,
            params,
            seed: args.run.seed,
        });
    eprintln!(
        "comparing {} defense(s) on {} ({} training samples; {n_eval} test images measured, {} lent as clean data; {device_name})",
        planned.len(),
        args.model.display(),
        train_len,
        clean_size
    );
    let mut baseline = Row::measured(
        "undefended",
        &evaluate(&original, &test, ds.num_classes, &norm, spec.as_ref())?,
    );
    // `--verify`: the model every defense starts from is scanned once, here; each child scans
    // only its hardened model, with the same detectors and parameters.
    if let Some(s) = &scanner {
        crate::signals::phase("compare:verify");
        let clean = s.needs_clean().then(|| super::scan::clean_images(&ds));
        let lent = super::harden::with_metadata(&original, &norm.metadata())?;
        let findings = s.run(
            &args.model.display().to_string(),
            &lent,
            None,
            clean.as_ref(),
            ds.num_classes,
            device_name,
            args.run.seed,
        )?;
        baseline.scan = Some(report::scan::ScanVerdict::of(&findings));
    }

    // The child command line every defense shares.
    let exe = super::grid::self_exe()?;
    let mut common: Vec<String> = Vec::new();
    for d in &global.plugin_dirs {
        common.extend(["--plugin-dir".into(), d.display().to_string()]);
    }
    common.extend([
        "harden".into(),
        args.model.display().to_string(),
        "--data".into(),
        args.data.data.clone(),
    ]);
    common.extend(args.data.options.to_args());
    common.extend([
        "--device".into(),
        device_name.into(),
        "--seed".into(),
        args.run.seed.to_string(),
        "--clean-size".into(),
        clean_size.to_string(),
        "--test-limit".into(),
        n_eval.to_string(),
        "--json".into(),
        "--force".into(),
    ]);
    if let Some(k) = args.run.limit {
        common.extend(["--limit".into(), k.to_string()]);
    }
    if let Some(s) = &scanner {
        common.push("--verify-after-only".into());
        for name in s.names() {
            common.extend(["--verify-detector".into(), name.to_string()]);
        }
        for p in &args.run.verify_params {
            common.extend(["--verify-param".into(), p.clone()]);
        }
    }
    if let Some(a) = &attack {
        common.extend(["--eval-attack".into(), a.name.clone()]);
        for p in &attack_raw {
            common.extend(["--attack-param".into(), p.clone()]);
        }
    }

    let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let overall = bars.add(ProgressBar::new(planned.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("compare [{bar:30}] {pos}/{len} defenses {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    crate::signals::phase("compare:train");
    let mut rows = Vec::new();
    for p in &planned {
        if crate::signals::is_cancelled() {
            break;
        }
        overall.set_message(format!("now: {}", p.name));
        let bar = bars.add(ProgressBar::new(1));
        bar.set_style(
            ProgressStyle::with_template("  {prefix:>14} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(p.name.clone());
        let out = model_dir.join(format!("{}.onnx", p.name));
        let mut child_args = common.clone();
        child_args.extend([
            "--defense".into(),
            p.name.clone(),
            "--out".into(),
            out.display().to_string(),
        ]);
        for kv in &p.raw_params {
            child_args.extend(["--param".into(), kv.clone()]);
        }
        let started = std::time::Instant::now();
        let row = match run_child(&exe, &child_args, &p.name, args.verbose, &bars, &bar) {
            Ok(outcome) => {
                let mut row = outcome.row();
                row.output = None;
                if let Some(d) = &keep_dir {
                    let kept = d.join(format!("{}.onnx", p.name));
                    let bytes = std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
                    outputs.stage(&kept, &bytes)?;
                    row.output = Some(kept.display().to_string());
                }
                row
            }
            Err(e) => {
                let mut row = Row::failed(&p.name, e);
                row.version = Some(p.version.clone());
                row.library = Some(p.library.clone());
                row.library_sha256 = Some(p.sha256.clone());
                row.params = Value::Object(p.params.clone());
                row.seconds = Some(started.elapsed().as_secs_f64());
                row
            }
        };
        bar.finish_and_clear();
        bars.remove(&bar);
        bars.suspend(|| {
            eprintln!(
                "{}: {}",
                p.name,
                if row.ok() {
                    format!(
                        "ACC {} ASR {} ({:.1}s)",
                        report::fmt_ratio(row.clean_accuracy),
                        report::fmt_ratio(row.attack_success_rate),
                        row.seconds.unwrap_or(0.0)
                    )
                } else {
                    format!("FAILED: {}", report::one_line(row.error.as_deref().unwrap_or(""), 200))
                }
            )
        });
        rows.push(row);
        overall.inc(1);
    }
    overall.finish_and_clear();
    if crate::signals::is_cancelled() {
        return Err(crate::error::cancelled());
    }

    crate::signals::phase("compare:write");
    let mut r = Report {
        schema_version: report::SCHEMA_VERSION,
        command: "compare".into(),
        toolkit_version: env!("CARGO_PKG_VERSION").into(),
        created: report::now_rfc3339(),
        model: report::ModelInfo {
            path: args.model.display().to_string(),
            sha256: audit_nn::export::sha256_hex(&original),
        },
        data: report::DataInfo {
            source: ds.source.clone(),
            fingerprint: data::fingerprint(&[&ds.train, &ds.test]),
            num_classes: ds.num_classes,
            n_train: train_len,
            n_eval,
            n_clean: clean_size,
            n_poisoned,
        },
        eval_attack: attack
            .as_ref()
            .zip(attack_params.as_ref())
            .map(|(a, p)| report::PluginRef {
                name: a.name.clone(),
                version: a.version.clone(),
                params: Value::Object(p.clone()),
                library: Some(a.path.display().to_string()),
                sha256: Some(a.sha256.clone()),
            }),
        seed: args.run.seed,
        device: device_name.into(),
        baseline,
        rows,
        best: BTreeMap::new(),
    };
    r.finish();
    for path in &args.run.reports {
        outputs.stage(path, r.render(path)?.as_bytes())?;
    }
    crate::signals::phase("compare:commit");
    outputs.commit()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", report::terminal_table(&r));
        for path in &args.run.reports {
            println!("wrote {}", path.display());
        }
    }
    let failed = r.rows.iter().filter(|row| !row.ok()).count();
    if failed > 0 {
        eprintln!("audit: {failed} of {} defense(s) failed (see their rows)", r.rows.len());
        return Ok(EXIT_FAILURE);
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_informational_child_lines_are_hidden() {
        assert!(is_chatter("[nad] info: NAD epoch 1/20: loss 0.3"));
        assert!(is_chatter("hardening m.onnx with `none` on 100 training samples (cpu)"));
        assert!(!is_chatter("[abl] warning: the isolated samples' loss is below 1e-6"));
        assert!(!is_chatter("audit: error: something broke"));
        assert!(!is_chatter("thread 'main' panicked at src/x.rs:1:1"));
        assert!(is_chatter(
            "warning: plugin `none` is in 2 plugin folders: using /a (manifest /b); shadowed: /c"
        ));
    }

    #[test]
    fn params_are_grouped_by_plugin_and_unknown_owners_refused() {
        let names = ["none", "nad", "badnets"];
        let g = split_params(
            &["none.E2=5".into(), "nad.betas=1,2".into(), "none.lr=0.1".into()],
            &names,
        )
        .unwrap();
        assert_eq!(g["none"], vec!["E2=5", "lr=0.1"]);
        assert_eq!(g["nad"], vec!["betas=1,2"]);
        for bad in ["E2=5", "abl.epochs=1", "none.E2"] {
            let e = split_params(&[bad.into()], &names).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("NAME.KEY=VALUE"), "{e}");
        }
    }
}
