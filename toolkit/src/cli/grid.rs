//! `audit grid`: a grid of models x attacks x defenses x seeds, planned once into a folder of
//! numbered jobs, run one job per scheduler task (Slurm array, Kubernetes Indexed Job, or local
//! processes), resumable, and merged into one report.
//!
//! The folder is the whole state: `grid.json` (what was planned, from which file, with which
//! binary and plugin folders), `jobs.jsonl` (one job a line, 0-based, each with its spec and a
//! stable spec hash), `inputs/` (model files the grid names, copied so a cluster node or a pod
//! that mounts the folder finds them), `models/` (each backdoored model with its poisoned
//! training set, trained once and shared by the jobs that harden it), `work/` (the hardened
//! models), `results/<index>-<spec hash>.json` (written atomically; a job whose result is there
//! with its hash and status ok is skipped) and `logs/`.
//!
//! A job is two child runs of this binary: `audit attack` (cached in `models/`, keyed by what the
//! training depends on) and `audit harden --json`. A defense or an attack that fails is a result
//! (`status: failed`, with its error), not a task failure: the task exits 0. A task exits 2 on a
//! bad folder or index, 1 when it cannot write its result, 130/143 when cancelled (nothing is
//! written then: the result of a killed job is missing, and the job is rerun).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::harden::HardenOutcome;
use super::plugins::find;
use super::GlobalArgs;
use crate::error::{input_error, EXIT_FAILURE, EXIT_OK};
use crate::plugin::{search_dirs, Kind};
use crate::report::grid::{GridReport, JobResult, RESULT_SCHEMA_VERSION};

/// Version of `grid.json` and `jobs.jsonl`; `grid run` refuses a folder planned by a newer one.
pub const PLAN_SCHEMA_VERSION: u32 = 1;

/// The scheduler variables a task's index is read from, in order of precedence (after
/// `--index`): our own override, Slurm's array task, Kubernetes' Indexed Job completion index.
pub const INDEX_VARS: &[&str] = &["AUDIT_GRID_INDEX", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

#[derive(Debug, Subcommand)]
pub enum GridCommand {
    /// Expand a grid file into DIR/jobs.jsonl (one job a line), refusing bad plugins or parameters.
    Plan(PlanArgs),
    /// Run one job (by --index, or the scheduler's index variable) or a shard of them.
    Run(RunArgs),
    /// Write a Slurm batch script or a Kubernetes Indexed Job, or run the jobs here (local).
    Emit(EmitArgs),
    /// Done, failed and missing jobs, and the array expression that resubmits the rest.
    Status(StatusArgs),
    /// Merge every result into one report (HTML, Markdown, JSON) and a tidy CSV.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The grid file (TOML; see the README's grid section).
    pub grid: PathBuf,
    /// The grid folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Plan again into a folder that has a plan (results whose spec hash is unchanged are kept).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The grid folder (from `audit grid plan`).
    pub dir: PathBuf,
    /// The job's index (default: $AUDIT_GRID_INDEX, $SLURM_ARRAY_TASK_ID or $JOB_COMPLETION_INDEX).
    #[arg(long, conflicts_with = "shard")]
    pub index: Option<usize>,
    /// Run every M-th job from K: jobs K, K+M, K+2M, ... (for clusters that limit array sizes);
    /// K may be `env` to read it from the scheduler's index variable.
    #[arg(long, value_name = "K/M")]
    pub shard: Option<String>,
    /// Run the job even when its result is there and ok.
    #[arg(long)]
    pub rerun: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// DIR/slurm.sbatch: an array job, one task per job (`sbatch DIR/slurm.sbatch`).
    Slurm,
    /// DIR/k8s-job.json: an Indexed Job over a volume holding DIR (`kubectl apply -f`).
    K8s,
    /// Run the missing jobs now on this machine, `--parallel` processes at a time.
    Local,
}

#[derive(Debug, Args)]
pub struct EmitArgs {
    pub dir: PathBuf,
    #[arg(long, value_enum)]
    pub backend: Backend,
    /// GPUs per task (Slurm `--gres=gpu:N`, Kubernetes `nvidia.com/gpu`); local: use the first N
    /// GPUs of this machine (default: all it has).
    #[arg(long)]
    pub gpus: Option<usize>,
    /// CPUs per task (default 1; local: this machine's CPUs shared among --parallel).
    #[arg(long)]
    pub cpus: Option<usize>,
    /// Tasks running at once (Slurm `%P`, Kubernetes `parallelism`, local processes). Default:
    /// Slurm and Kubernetes all, local 1.
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Slurm: the largest array the cluster accepts (MaxArraySize - 1 is the largest index); a
    /// bigger grid is run as that many shards.
    #[arg(long, default_value_t = 1000)]
    pub max_array: usize,
    /// Slurm: extra `#SBATCH` lines, e.g. `--partition=gpu` (repeatable).
    #[arg(long = "sbatch", value_name = "OPTION")]
    pub sbatch: Vec<String>,
    /// Kubernetes: the container image with `audit` and its plugins on PATH.
    #[arg(long, default_value = "audit:latest")]
    pub image: String,
    /// Kubernetes: the PersistentVolumeClaim holding the grid folder.
    #[arg(long, default_value = "audit-grid")]
    pub pvc: String,
    /// Kubernetes: where the claim is mounted in the pod.
    #[arg(long, default_value = "/grid")]
    pub mount: String,
    /// Replace an emitted file that exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    pub dir: PathBuf,
    /// Write the merged report here (.html, .md, .json, or .csv for the tidy table; repeatable).
    #[arg(long = "report", value_name = "FILE", required = true)]
    pub reports: Vec<PathBuf>,
    /// Replace report files that exist.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: GridCommand, global: &GlobalArgs) -> Result<i32> {
    match cmd {
        GridCommand::Plan(a) => plan(a, global),
        GridCommand::Run(a) => run_jobs(a, global),
        GridCommand::Emit(a) => emit(a, global),
        GridCommand::Status(a) => status(a),
        GridCommand::Merge(a) => merge(a),
    }
}

// ---------------------------------------------------------------------------------------------
// The grid file and the jobs it expands to.

/// The grid file, as written (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    /// Dataset of every job: `fashion-mnist`, `synthetic`, or a path (relative to the grid file).
    data: String,
    /// Training images per job (the first N), default all.
    #[serde(default)]
    limit: Option<usize>,
    /// Test images every job is measured on (the first N), default all.
    #[serde(default)]
    test_limit: Option<usize>,
    /// Epochs of the attack's training (`audit attack --epochs`).
    #[serde(default = "default_epochs")]
    epochs: usize,
    #[serde(default = "default_seeds")]
    seeds: Vec<u64>,
    /// `auto`, `cpu` or `cuda`.
    #[serde(default = "default_device")]
    device: String,
    /// Detectors that scan each hardened model (`audit harden --verify --verify-detector D`);
    /// empty: no scan. A flagged model is a result like any other.
    #[serde(default)]
    verify: Vec<toml::Spanned<String>>,
    #[serde(default)]
    models: Vec<toml::Spanned<ModelEntry>>,
    #[serde(default)]
    attacks: Vec<toml::Spanned<PluginEntry>>,
    #[serde(default)]
    defenses: Vec<toml::Spanned<PluginEntry>>,
}

fn default_epochs() -> usize {
    2
}
fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_device() -> String {
    "auto".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    /// A zoo architecture, trained fresh by the attack.
    #[serde(default)]
    arch: Option<String>,
    /// An ONNX file (relative to the grid file), fine-tuned by the attack.
    #[serde(default)]
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginEntry {
    name: String,
    #[serde(default)]
    params: toml::Table,
}

/// The model of a job: a zoo architecture or a copied file (relative to the grid folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSpec {
    Arch(String),
    File { path: String, sha256: String },
}

impl ModelSpec {
    /// How reports name it.
    pub fn label(&self) -> String {
        match self {
            ModelSpec::Arch(a) => a.clone(),
            ModelSpec::File { path, .. } => Path::new(path)
                .file_name()
                .map_or(path.clone(), |f| f.to_string_lossy().into_owned()),
        }
    }
}

/// A plugin with the parameters the grid gives it (the rest are the plugin's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginSpec {
    pub name: String,
    pub params: BTreeMap<String, Value>,
}

impl PluginSpec {
    /// `KEY=VALUE` assignments for a child command line.
    fn args(&self) -> Vec<String> {
        self.params
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect()
    }

    /// `name k=v k=v`.
    pub fn label(&self) -> String {
        std::iter::once(self.name.clone())
            .chain(self.args())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Everything a job depends on. Its hash names the job's result; a changed spec is a new job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: ModelSpec,
    pub attack: PluginSpec,
    pub defense: PluginSpec,
    pub seed: u64,
    pub data: String,
    pub limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub epochs: usize,
    pub device: String,
    /// Detectors run on the input and the hardened model (`harden --verify`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify: Vec<String>,
}

impl JobSpec {
    /// sha256 of the spec's JSON (fields in declaration order, parameters sorted), 16 hex digits.
    pub fn hash(&self) -> String {
        short_hash(&serde_json::to_string(self).unwrap_or_default())
    }

    /// What the backdoored model depends on (not the defense, not the test subset): jobs with
    /// the same key share one attack run in `models/`.
    pub fn model_key(&self) -> String {
        let v = json!([
            self.model,
            self.attack,
            self.seed,
            self.data,
            self.limit,
            self.epochs,
            self.device
        ]);
        short_hash(&v.to_string())
    }
}

fn short_hash(s: &str) -> String {
    audit_nn::export::sha256_hex(s.as_bytes())[..16].to_string()
}

/// One line of `jobs.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub index: usize,
    pub spec_hash: String,
    pub spec: JobSpec,
}

impl Job {
    fn result_path(&self, dir: &Path) -> PathBuf {
        dir.join("results")
            .join(format!("{}-{}.json", self.index, self.spec_hash))
    }
}

/// `grid.json`: the plan's provenance and what every task needs to find.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanInfo {
    pub schema_version: u32,
    pub toolkit_version: String,
    pub created: String,
    /// The grid file planned (canonical path) and its sha256.
    pub source: String,
    pub source_sha256: String,
    pub jobs: usize,
    /// The binary that planned (the Slurm script runs it; a pod runs the image's `audit`).
    pub audit: String,
    /// Plugin folders given to `plan` (canonical), passed on to every task.
    pub plugin_dirs: Vec<String>,
}

/// Line `n` (1-based) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A TOML parameter value as the JSON the plugin schema checks (scalars only: schemas have
/// number, integer, boolean and string parameters).
fn toml_scalar(v: &toml::Value) -> Option<Value> {
    Some(match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number)?,
        toml::Value::Boolean(b) => Value::Bool(*b),
        _ => return None,
    })
}

/// A model file the grid names and where the plan copies it (relative to the grid folder).
type Copy = (PathBuf, String);

/// Reads and checks the grid file and expands it into jobs (models x attacks x defenses x
/// seeds, in that nesting order: the defenses of one backdoored model are neighbours). Plugin
/// names and parameters are checked against the installed plugins; an error names the file,
/// the line and the key.
fn expand(path: &Path, text: &str, global: &GlobalArgs) -> Result<(Vec<Job>, Vec<Copy>)> {
    let file = path.display();
    let grid: GridFile = toml::from_str(text).map_err(|e| input_error(format!("{file}: {e}")))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for (key, n) in [
        ("models", grid.models.len()),
        ("attacks", grid.attacks.len()),
        ("defenses", grid.defenses.len()),
    ] {
        if n == 0 {
            return Err(input_error(format!(
                "{file}: no [[{key}]] entries: a grid needs at least one"
            )));
        }
    }
    if grid.seeds.is_empty() {
        return Err(input_error(format!("{file}: `seeds` is empty")));
    }
    if !["auto", "cpu", "cuda"].contains(&grid.device.as_str()) {
        return Err(input_error(format!(
            "{file}: `device` is `{}`; it must be auto, cpu or cuda",
            grid.device
        )));
    }
    if grid.epochs == 0 {
        return Err(input_error(format!("{file}: `epochs` must be at least 1")));
    }
    let data = if ["fashion-mnist", "synthetic"].contains(&grid.data.as_str()) {
        grid.data.clone()
    } else {
        let p = base.join(&grid.data);
        let p = p
            .canonicalize()
            .map_err(|e| input_error(format!("{file}: `data` {}: {e}", p.display())))?;
        p.display().to_string()
    };

    let mut models = Vec::new();
    let mut copies = Vec::new();
    for (i, m) in grid.models.iter().enumerate() {
        let at = format!("{file} line {}: models[{i}]", line_of(text, m.span().start));
        models.push(match (&m.get_ref().arch, &m.get_ref().file) {
            (Some(a), None) => {
                a.parse::<audit_nn::zoo::Arch>()
                    .map_err(|e| input_error(format!("{at} arch: {e}")))?;
                ModelSpec::Arch(a.clone())
            }
            (None, Some(f)) => {
                let p = base.join(f);
                let bytes = std::fs::read(&p).map_err(|e| input_error(format!("{at} file {}: {e}", p.display())))?;
                audit_nn::model::parse(&bytes).map_err(|e| input_error(format!("{at} file {}: {e}", p.display())))?;
                let sha = audit_nn::export::sha256_hex(&bytes);
                let name = p
                    .file_name()
                    .map_or("model.onnx".into(), |f| f.to_string_lossy().into_owned());
                let rel = format!("inputs/{}-{name}", &sha[..12]);
                copies.push((p, rel.clone()));
                ModelSpec::File { path: rel, sha256: sha }
            }
            _ => return Err(input_error(format!("{at}: give exactly one of `arch` or `file`"))),
        });
    }
    let dirs = search_dirs(&global.plugin_dirs);
    let check = |list: &[toml::Spanned<PluginEntry>], key: &str, kind: Kind| -> Result<Vec<PluginSpec>> {
        let mut specs = Vec::new();
        for (i, e) in list.iter().enumerate() {
            let entry = e.get_ref();
            let at = format!(
                "{file} line {}: {key}[{i}] `{}`",
                line_of(text, e.span().start),
                entry.name
            );
            let plugin = find(&dirs, &entry.name).map_err(|err| input_error(format!("{at}: {err:#}")))?;
            if plugin.kind != kind {
                return Err(input_error(format!("{at}: is a {} plugin, not {kind}", plugin.kind)));
            }
            let mut params = BTreeMap::new();
            for (k, v) in &entry.params {
                let v = toml_scalar(v).ok_or_else(|| {
                    input_error(format!(
                        "{at} parameter `{k}`: {v} is not a number, integer, boolean or string"
                    ))
                })?;
                params.insert(k.clone(), v);
            }
            let given: Map<String, Value> = params.clone().into_iter().collect();
            plugin
                .schema
                .resolve(&given)
                .map_err(|err| input_error(format!("{at}: {err}")))?;
            specs.push(PluginSpec {
                name: plugin.name.clone(),
                params,
            });
        }
        Ok(specs)
    };
    let mut verify = Vec::new();
    for (i, d) in grid.verify.iter().enumerate() {
        let at = format!(
            "{file} line {}: verify[{i}] `{}`",
            line_of(text, d.span().start),
            d.get_ref()
        );
        let plugin = find(&dirs, d.get_ref()).map_err(|err| input_error(format!("{at}: {err:#}")))?;
        if plugin.kind != Kind::Detector {
            return Err(input_error(format!(
                "{at}: is a {} plugin, not a detector",
                plugin.kind
            )));
        }
        verify.push(plugin.name.clone());
    }
    let attacks = check(&grid.attacks, "attacks", Kind::Attack)?;
    let defenses = check(&grid.defenses, "defenses", Kind::Defense)?;
    let mut jobs = Vec::new();
    for model in &models {
        for attack in &attacks {
            for &seed in &grid.seeds {
                for defense in &defenses {
                    let spec = JobSpec {
                        model: model.clone(),
                        attack: attack.clone(),
                        defense: defense.clone(),
                        seed,
                        data: data.clone(),
                        limit: grid.limit,
                        test_limit: grid.test_limit,
                        epochs: grid.epochs,
                        device: grid.device.clone(),
                        verify: verify.clone(),
                    };
                    jobs.push(Job {
                        index: jobs.len(),
                        spec_hash: spec.hash(),
                        spec,
                    });
                }
            }
        }
    }
    Ok((jobs, copies))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename: readers
/// see the old file or the new one, never half of one. Not `Outputs`: its planning sweeps a
/// folder's stale partial files by process id, which on a folder shared by several nodes would
/// take another node's live partial for a dead one.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing into {}", dir.display()))?;
    crate::signals::register_partial(tmp.path());
    let written = tmp
        .write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()));
    let tmp_path = tmp.path().to_path_buf();
    let result = written.and_then(|_| {
        tmp.persist(path)
            .map(|_| ())
            .map_err(|e| anyhow::Error::new(e.error).context(format!("renaming into {}", path.display())))
    });
    crate::signals::forget_partial(&tmp_path);
    result
}

fn plan(args: PlanArgs, global: &GlobalArgs) -> Result<i32> {
    let text = std::fs::read_to_string(&args.grid).map_err(|e| input_error(format!("{}: {e}", args.grid.display())))?;
    let jobs_path = args.out.join("jobs.jsonl");
    if jobs_path.exists() && !args.force {
        return Err(input_error(format!(
            "{} has a plan already (--force plans again; results whose spec is unchanged are kept)",
            args.out.display()
        )));
    }
    if args.out.exists() && !args.out.is_dir() {
        return Err(input_error(format!("--out {}: not a folder", args.out.display())));
    }
    let (jobs, copies) = expand(&args.grid, &text, global)?;
    for sub in ["inputs", "models", "work", "results", "logs"] {
        std::fs::create_dir_all(args.out.join(sub)).with_context(|| format!("creating {}", args.out.display()))?;
    }
    for (from, rel) in &copies {
        let to = args.out.join(rel);
        if !to.exists() {
            let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
            write_atomic(&to, &bytes)?;
        }
    }
    let exe = std::env::current_exe().context("locating the audit binary")?;
    let info = PlanInfo {
        schema_version: PLAN_SCHEMA_VERSION,
        toolkit_version: env!("CARGO_PKG_VERSION").into(),
        created: crate::report::now_rfc3339(),
        source: args
            .grid
            .canonicalize()
            .unwrap_or(args.grid.clone())
            .display()
            .to_string(),
        source_sha256: audit_nn::export::sha256_hex(text.as_bytes()),
        jobs: jobs.len(),
        audit: exe.canonicalize().unwrap_or(exe).display().to_string(),
        plugin_dirs: global
            .plugin_dirs
            .iter()
            .map(|d| d.canonicalize().unwrap_or(d.clone()).display().to_string())
            .collect(),
    };
    let mut lines = String::new();
    for j in &jobs {
        lines += &serde_json::to_string(j)?;
        lines.push('\n');
    }
    // jobs.jsonl last: a folder with it is a complete plan.
    write_atomic(
        &args.out.join("grid.json"),
        (serde_json::to_string_pretty(&info)? + "\n").as_bytes(),
    )?;
    write_atomic(&jobs_path, lines.as_bytes())?;
    let kept = jobs.iter().filter(|j| j.result_path(&args.out).exists()).count();
    eprintln!(
        "planned {} jobs into {} ({} with a result already){}",
        jobs.len(),
        jobs_path.display(),
        kept,
        if jobs.is_empty() {
            ""
        } else {
            "; next: audit grid emit DIR --backend slurm|k8s|local"
        }
    );
    Ok(EXIT_OK)
}

/// A planned grid folder.
struct Grid {
    dir: PathBuf,
    info: PlanInfo,
    jobs: Vec<Job>,
}

impl Grid {
    fn open(dir: &Path) -> Result<Grid> {
        let bad = |what: &str, e: String| input_error(format!("{}: {what}: {e}", dir.display()));
        let info_text = std::fs::read_to_string(dir.join("grid.json"))
            .map_err(|e| bad("grid.json", format!("{e} (is this a folder from `audit grid plan`?)")))?;
        let info: PlanInfo = serde_json::from_str(&info_text).map_err(|e| bad("grid.json", e.to_string()))?;
        if info.schema_version > PLAN_SCHEMA_VERSION {
            return Err(bad(
                "grid.json",
                format!(
                    "schema_version {}; this audit reads up to {PLAN_SCHEMA_VERSION}",
                    info.schema_version
                ),
            ));
        }
        let text = std::fs::read_to_string(dir.join("jobs.jsonl")).map_err(|e| bad("jobs.jsonl", e.to_string()))?;
        let mut jobs = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let job: Job =
                serde_json::from_str(line).map_err(|e| bad(&format!("jobs.jsonl line {}", n + 1), e.to_string()))?;
            if job.index != jobs.len() || job.spec_hash != job.spec.hash() {
                return Err(bad(
                    &format!("jobs.jsonl line {}", n + 1),
                    "index or spec_hash does not match the line (edited by hand? plan again)".into(),
                ));
            }
            jobs.push(job);
        }
        Ok(Grid {
            dir: dir.to_path_buf(),
            info,
            jobs,
        })
    }

    fn job(&self, index: usize) -> Result<&Job> {
        self.jobs.get(index).ok_or_else(|| {
            input_error(format!(
                "{}: job index {index} is out of range: the plan has {} jobs (0-{})",
                self.dir.display(),
                self.jobs.len(),
                self.jobs.len().saturating_sub(1)
            ))
        })
    }

    /// The job's result, if one with its spec hash is there and readable.
    fn result(&self, job: &Job) -> Option<JobResult> {
        let text = std::fs::read_to_string(job.result_path(&self.dir)).ok()?;
        serde_json::from_str::<JobResult>(&text)
            .ok()
            .filter(|r| r.spec_hash == job.spec_hash)
    }

    /// `--plugin-dir` arguments for a child: the plan's folders and this process's.
    fn plugin_args(&self, global: &GlobalArgs) -> Vec<String> {
        let mut dirs: Vec<String> = global.plugin_dirs.iter().map(|d| d.display().to_string()).collect();
        for d in &self.info.plugin_dirs {
            if !dirs.contains(d) && Path::new(d).is_dir() {
                dirs.push(d.clone());
            }
        }
        dirs.into_iter().flat_map(|d| ["--plugin-dir".to_string(), d]).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Running jobs.

/// The task's index from the first scheduler variable that is set, and its name.
fn env_index() -> Result<(usize, String)> {
    let Some((var, raw)) = INDEX_VARS.iter().find_map(|&var| {
        let raw = std::env::var(var).ok()?.trim().to_string();
        (!raw.is_empty()).then_some((var, raw))
    }) else {
        return Err(input_error(format!(
            "no job index: give --index N or --shard K/M, or run under a scheduler that sets one of {}",
            INDEX_VARS
                .iter()
                .map(|v| format!("${v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let i = raw
        .parse()
        .map_err(|_| input_error(format!("${var} is `{raw}`, not a job index")))?;
    Ok((i, format!("${var}")))
}

/// `K/M` (K may be `env`): the indices K, K+M, ... below `n`.
fn shard_indices(spec: &str, n: usize) -> Result<(Vec<usize>, String)> {
    let bad = || input_error(format!("--shard {spec}: expected K/M with 0 <= K < M (K may be `env`)"));
    let (k, m) = spec.split_once('/').ok_or_else(bad)?;
    let m: usize = m.trim().parse().map_err(|_| bad())?;
    let (k, source) = if k.trim() == "env" {
        env_index()?
    } else {
        (k.trim().parse().map_err(|_| bad())?, "--shard".to_string())
    };
    if m == 0 || k >= m {
        return Err(bad());
    }
    Ok(((k..n).step_by(m).collect(), format!("shard {k}/{m} from {source}")))
}

fn run_jobs(args: RunArgs, global: &GlobalArgs) -> Result<i32> {
    let grid = Grid::open(&args.dir)?;
    let (indices, source) = match (&args.index, &args.shard) {
        (Some(i), _) => (vec![*i], "--index".to_string()),
        (None, Some(s)) => shard_indices(s, grid.jobs.len())?,
        (None, None) => {
            let (i, source) = env_index()?;
            (vec![i], source)
        }
    };
    for &i in &indices {
        grid.job(i)?;
    }
    eprintln!(
        "grid {}: {} job(s) ({source}): {:?}",
        grid.dir.display(),
        indices.len(),
        indices
    );
    for i in indices {
        if crate::signals::is_cancelled() {
            return Err(crate::error::cancelled());
        }
        let job = grid.job(i)?;
        if !args.rerun {
            if let Some(r) = grid.result(job).filter(|r| r.status == "ok") {
                eprintln!(
                    "job {i} ({}): skipped, its result is there (ok, {:.0} s)",
                    job.spec_hash, r.wall_seconds
                );
                continue;
            }
        }
        let result = run_one(&grid, job, &source, global)?;
        let path = job.result_path(&grid.dir);
        write_atomic(&path, (serde_json::to_string_pretty(&result)? + "\n").as_bytes())?;
        eprintln!(
            "job {i} ({}): {} in {:.1} s -> {}",
            job.spec_hash,
            result.status,
            result.wall_seconds,
            path.display()
        );
    }
    Ok(EXIT_OK)
}

/// The binary to start children with: this very one, even if a rebuild replaced the file.
pub(crate) fn self_exe() -> Result<PathBuf> {
    match Path::new("/proc/self/exe") {
        p if p.exists() => Ok(p.to_path_buf()),
        _ => std::env::current_exe().context("locating the audit binary"),
    }
}

/// Runs `audit ARGS`; its stderr goes on to ours (the task's log). Ok(stdout) when it exited 0
/// (or 3, a flagged `--verify`, which is a result), else the error it printed.
fn child(args: &[String]) -> Result<std::result::Result<String, String>> {
    let exe = self_exe()?;
    let mut c = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    crate::signals::register_child(c.id());
    let stdout = c.stdout.take().context("child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let mut error: Option<String> = None;
    let mut tail: VecDeque<String> = VecDeque::new();
    if let Some(stderr) = c.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
            eprintln!("  | {line}");
            if let Some(e) = line.strip_prefix("audit: error: ") {
                error = Some(e.to_string());
            }
            tail.push_back(line);
            if tail.len() > 12 {
                tail.pop_front();
            }
        }
    }
    let status = c.wait();
    crate::signals::forget_child(c.id());
    let status = status.context("waiting for the child run")?;
    let stdout = reader.join().unwrap_or_default();
    if crate::signals::is_cancelled() {
        return Err(crate::error::cancelled());
    }
    if status.success() || status.code() == Some(crate::error::EXIT_FLAGGED) {
        return Ok(Ok(stdout));
    }
    let how = match status.code() {
        Some(c) => format!("exit code {c}"),
        None => {
            use std::os::unix::process::ExitStatusExt;
            format!("killed by signal {}", status.signal().unwrap_or(0))
        }
    };
    Ok(Err(match error {
        Some(e) => format!("{e} ({how})"),
        None => format!("{how}; last output:\n{}", Vec::from(tail).join("\n")),
    }))
}

/// The backdoored model and its poisoned training set for `job`: trained by `audit attack`
/// into a private folder and renamed into `models/<key>`, under a lock so that tasks sharing the
/// key train it once (a task that finds it there reuses it).
fn attacked_model(
    grid: &Grid,
    job: &Job,
    global: &GlobalArgs,
) -> Result<std::result::Result<(PathBuf, Value), String>> {
    let s = &job.spec;
    let dir = grid.dir.join("models").join(s.model_key());
    let doc_path = dir.join("attack.json");
    // One task trains, the others with the same key wait for it (an advisory lock on a file
    // beside the folder; released when the file closes, also when the task dies).
    let lock_path = grid.dir.join("models").join(format!("{}.lock", s.model_key()));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if let Err(e) = lock.lock() {
        eprintln!(
            "job {}: cannot lock {} ({e}); training without it",
            job.index,
            lock_path.display()
        );
    }
    if let Ok(text) = std::fs::read_to_string(&doc_path) {
        if let Ok(doc) = serde_json::from_str::<Value>(&text) {
            eprintln!("job {}: backdoored model from {}", job.index, dir.display());
            return Ok(Ok((dir, doc)));
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}-", s.model_key()))
        .tempdir_in(grid.dir.join("models"))
        .context("creating a folder under models/")?;
    let mut a = grid.plugin_args(global);
    a.extend(["attack".into(), s.attack.name.clone(), "--data".into(), s.data.clone()]);
    match &s.model {
        ModelSpec::Arch(arch) => a.extend(["--arch".into(), arch.clone()]),
        ModelSpec::File { path, .. } => a.extend(["--model".into(), grid.dir.join(path).display().to_string()]),
    }
    a.extend([
        "--out".into(),
        tmp.path().join("model.onnx").display().to_string(),
        "--poisoned-data".into(),
        tmp.path().join("train.npz").display().to_string(),
        "--epochs".into(),
        s.epochs.to_string(),
        "--seed".into(),
        s.seed.to_string(),
        "--device".into(),
        s.device.clone(),
        "--json".into(),
    ]);
    if let Some(k) = s.limit {
        a.extend(["--limit".into(), k.to_string()]);
    }
    if let Some(k) = s.test_limit {
        a.extend(["--test-limit".into(), k.to_string()]);
    }
    for p in s.attack.args() {
        a.extend(["--param".into(), p]);
    }
    let stdout = match child(&a)? {
        Ok(out) => out,
        Err(e) => return Ok(Err(format!("attack `{}`: {e}", s.attack.name))),
    };
    let doc: Value = serde_json::from_str(&stdout).context("`audit attack --json` printed no document")?;
    std::fs::write(
        tmp.path().join("attack.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another task put it there first: use that one.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let doc = serde_json::from_str(
        &std::fs::read_to_string(&doc_path).with_context(|| format!("reading {}", doc_path.display()))?,
    )?;
    Ok(Ok((dir, doc)))
}

fn run_one(grid: &Grid, job: &Job, source: &str, global: &GlobalArgs) -> Result<JobResult> {
    let started = Instant::now();
    let created = crate::report::now_rfc3339();
    let s = &job.spec;
    eprintln!(
        "job {}: {} / {} / {} / seed {}",
        job.index,
        s.model.label(),
        s.attack.label(),
        s.defense.label(),
        s.seed
    );
    let mut result = JobResult {
        schema_version: RESULT_SCHEMA_VERSION,
        index: job.index,
        spec_hash: job.spec_hash.clone(),
        spec: serde_json::to_value(s)?,
        status: "failed".into(),
        error: None,
        index_source: source.to_string(),
        host: hostname(),
        started: created,
        wall_seconds: 0.0,
        toolkit_version: env!("CARGO_PKG_VERSION").into(),
        attack: None,
        outcome: None,
    };
    match attacked_model(grid, job, global)? {
        Err(e) => result.error = Some(e),
        Ok((model_dir, attack_doc)) => {
            result.attack = Some(attack_doc);
            let work = grid.dir.join("work").join(format!("{}-{}", job.index, job.spec_hash));
            std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
            let mut a = grid.plugin_args(global);
            a.extend([
                "harden".into(),
                model_dir.join("model.onnx").display().to_string(),
                "--data".into(),
                model_dir.join("train.npz").display().to_string(),
                "--defense".into(),
                s.defense.name.clone(),
                "--out".into(),
                work.join("hardened.onnx").display().to_string(),
                "--eval-attack".into(),
                s.attack.name.clone(),
                "--seed".into(),
                s.seed.to_string(),
                "--device".into(),
                s.device.clone(),
                "--json".into(),
                "--force".into(),
            ]);
            if let Some(k) = s.test_limit {
                a.extend(["--test-limit".into(), k.to_string()]);
            }
            for p in s.defense.args() {
                a.extend(["--param".into(), p]);
            }
            if !s.verify.is_empty() {
                a.push("--verify".into());
                for d in &s.verify {
                    a.extend(["--verify-detector".into(), d.clone()]);
                }
            }
            for p in s.attack.args() {
                a.extend(["--attack-param".into(), p]);
            }
            match child(&a)? {
                Err(e) => result.error = Some(format!("defense `{}`: {e}", s.defense.name)),
                Ok(stdout) => match serde_json::from_str::<HardenOutcome>(&stdout) {
                    Ok(o) => {
                        result.status = "ok".into();
                        result.outcome = Some(o);
                    }
                    Err(e) => result.error = Some(format!("the harden run printed no outcome document ({e})")),
                },
            }
        }
    }
    result.wall_seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Status, emit, merge.

/// Per job: `done`, `failed` or `missing`.
fn states(grid: &Grid) -> Vec<(&Job, &'static str, Option<JobResult>)> {
    grid.jobs
        .iter()
        .map(|j| match grid.result(j) {
            Some(r) if r.status == "ok" => (j, "done", Some(r)),
            Some(r) => (j, "failed", Some(r)),
            None => (j, "missing", None),
        })
        .collect()
}

/// `0-3,7,9-10`: the indices as Slurm's `--array` expression.
pub fn array_expression(indices: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let mut end = start;
        while i + 1 < indices.len() && indices[i + 1] == end + 1 {
            i += 1;
            end = indices[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

fn status(args: StatusArgs) -> Result<i32> {
    let grid = Grid::open(&args.dir)?;
    let st = states(&grid);
    let count = |s: &str| st.iter().filter(|x| x.1 == s).count();
    let rerun: Vec<usize> = st.iter().filter(|x| x.1 != "done").map(|x| x.0.index).collect();
    if args.json {
        let doc = json!({
            "dir": grid.dir.display().to_string(),
            "jobs": grid.jobs.len(),
            "done": count("done"),
            "failed": count("failed"),
            "missing": count("missing"),
            "resubmit": array_expression(&rerun),
            "per_job": st.iter().map(|(j, s, r)| json!({
                "index": j.index, "spec_hash": j.spec_hash, "status": s,
                "error": r.as_ref().and_then(|r| r.error.clone()),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(EXIT_OK);
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(["job", "status", "model", "attack", "defense", "seed", "ACC", "ASR", "s"]);
    for (j, s, r) in &st {
        let o = r.as_ref().and_then(|r| r.outcome.as_ref());
        t.add_row([
            j.index.to_string(),
            s.to_string(),
            j.spec.model.label(),
            j.spec.attack.label(),
            j.spec.defense.label(),
            j.spec.seed.to_string(),
            crate::report::fmt_ratio(o.map(|o| o.after.clean_accuracy)),
            crate::report::fmt_ratio(o.and_then(|o| o.after.attack_success_rate)),
            r.as_ref().map_or("-".into(), |r| format!("{:.0}", r.wall_seconds)),
        ]);
    }
    println!("{t}");
    for (j, _, r) in st.iter().filter(|x| x.1 == "failed") {
        let e = r.as_ref().and_then(|r| r.error.as_deref()).unwrap_or("");
        println!("job {} failed: {}", j.index, crate::report::one_line(e, 300));
    }
    println!(
        "{} jobs: {} done, {} failed, {} missing",
        grid.jobs.len(),
        count("done"),
        count("failed"),
        count("missing")
    );
    if !rerun.is_empty() {
        println!(
            "resubmit the rest: sbatch --array={} {}",
            array_expression(&rerun),
            grid.dir.join("slurm.sbatch").display()
        );
    }
    Ok(EXIT_OK)
}

/// Shell-quotes `s` (single quotes).
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The Slurm batch script: an array of one task per job (or per shard when the grid is larger
/// than `max_array`), each running `audit grid run DIR`, logs in DIR/logs.
pub fn slurm_script(dir: &Path, audit: &str, plugin_args: &[String], n: usize, a: &EmitArgs) -> String {
    let tasks = n.min(a.max_array.max(1));
    let sharded = tasks < n;
    let parallel = a.parallel.map_or(String::new(), |p| format!("%{p}"));
    let mut s = String::from("#!/bin/bash\n# Written by `audit grid emit --backend slurm`. Submit: sbatch THIS_FILE\n");
    s += "# Resubmit some tasks only (see `audit grid status`): sbatch --array=3,7-9 THIS_FILE\n";
    s += "#SBATCH --job-name=audit-grid\n";
    s += &format!("#SBATCH --array=0-{}{parallel}\n", tasks.saturating_sub(1));
    s += &format!("#SBATCH --output={}/logs/%a.log\n", dir.display());
    s += &format!("#SBATCH --cpus-per-task={}\n", a.cpus.unwrap_or(1));
    if let Some(g) = a.gpus.filter(|&g| g > 0) {
        s += &format!("#SBATCH --gres=gpu:{g}\n");
    }
    for o in &a.sbatch {
        s += &format!("#SBATCH {o}\n");
    }
    s += "set -euo pipefail\nexport OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}\n";
    let mut cmd = vec![sh_quote(audit)];
    cmd.extend(plugin_args.iter().map(|x| sh_quote(x)));
    cmd.extend(["grid".into(), "run".into(), sh_quote(&dir.display().to_string())]);
    if sharded {
        cmd.push(format!("--shard env/{tasks}"));
    }
    s += &format!("exec {}\n", cmd.join(" "));
    s
}

/// The Kubernetes Indexed Job: one completion per job, `parallelism` at a time, the grid folder
/// on a PersistentVolumeClaim; a task that exits 2 (bad input) fails its index at once, other
/// failures are retried twice per index.
pub fn k8s_manifest(name: &str, n: usize, a: &EmitArgs) -> Value {
    let cpus = a.cpus.unwrap_or(1);
    let mut resources = json!({"requests": {"cpu": cpus.to_string()}});
    if let Some(g) = a.gpus.filter(|&g| g > 0) {
        resources["limits"] = json!({"nvidia.com/gpu": g.to_string()});
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "audit-grid"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": a.parallel.unwrap_or(n).max(1),
            "backoffLimitPerIndex": 2,
            "maxFailedIndexes": n,
            "podFailurePolicy": {"rules": [
                {"action": "FailIndex", "onExitCodes": {"containerName": "audit", "operator": "In", "values": [2]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
            ]},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "audit-grid"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "audit",
                        "image": a.image,
                        "command": ["audit", "grid", "run", a.mount],
                        "env": [{"name": "OMP_NUM_THREADS", "value": cpus.to_string()}],
                        "resources": resources,
                        "volumeMounts": [{"name": "grid", "mountPath": a.mount}]
                    }],
                    "volumes": [{"name": "grid", "persistentVolumeClaim": {"claimName": a.pvc}}]
                }
            }
        }
    })
}

fn emit(args: EmitArgs, global: &GlobalArgs) -> Result<i32> {
    let grid = Grid::open(&args.dir)?;
    let n = grid.jobs.len();
    let dir = grid.dir.canonicalize().unwrap_or(grid.dir.clone());
    if args.parallel == Some(0) || args.cpus == Some(0) {
        return Err(input_error("--parallel and --cpus must be at least 1"));
    }
    let write = |name: &str, text: String| -> Result<PathBuf> {
        let path = dir.join(name);
        if path.exists() && !args.force {
            return Err(input_error(format!("{} exists (--force replaces it)", path.display())));
        }
        write_atomic(&path, text.as_bytes())?;
        Ok(path)
    };
    match args.backend {
        Backend::Slurm => {
            let audit = std::env::current_exe()
                .ok()
                .and_then(|p| p.canonicalize().ok())
                .map_or(grid.info.audit.clone(), |p| p.display().to_string());
            let script = slurm_script(&dir, &audit, &grid.plugin_args(global), n, &args);
            let path = write("slurm.sbatch", script)?;
            println!(
                "wrote {} ({n} jobs); submit with: sbatch {}",
                path.display(),
                path.display()
            );
            Ok(EXIT_OK)
        }
        Backend::K8s => {
            let name = format!("audit-grid-{}", &grid.info.source_sha256[..10]);
            let doc = k8s_manifest(&name, n, &args);
            let path = write("k8s-job.json", serde_json::to_string_pretty(&doc)? + "\n")?;
            println!(
                "wrote {} ({n} completions, the grid folder on claim `{}` at {}); apply with: kubectl apply -f {}",
                path.display(),
                args.pvc,
                args.mount,
                path.display()
            );
            Ok(EXIT_OK)
        }
        Backend::Local => local(&grid, &args, global),
    }
}

/// Runs every job without an ok result, `--parallel` child processes at a time, each job on one
/// GPU of this machine in turn when it has any. Exit 0 when every job has a result (ok or
/// failed), 1 when a task could not write one.
fn local(grid: &Grid, args: &EmitArgs, global: &GlobalArgs) -> Result<i32> {
    let pending: VecDeque<usize> = states(grid)
        .iter()
        .filter(|x| x.1 != "done")
        .map(|x| x.0.index)
        .collect();
    let parallel = args.parallel.unwrap_or(1);
    let gpus = match args.gpus {
        Some(g) => g,
        None => audit_nn::tch::Cuda::device_count().max(0) as usize,
    };
    let cpus = args
        .cpus
        .unwrap_or_else(|| (std::thread::available_parallelism().map_or(1, |n| n.get()) / parallel).max(1));
    eprintln!(
        "local: {} of {} jobs to run, {parallel} at a time, {cpus} CPU thread(s) each{}",
        pending.len(),
        grid.jobs.len(),
        if gpus > 0 {
            format!(", over {gpus} GPU(s)")
        } else {
            String::new()
        }
    );
    let started = Instant::now();
    let queue = Arc::new(Mutex::new(pending));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let exe = self_exe()?;
    let mut workers = Vec::new();
    for w in 0..parallel {
        let queue = Arc::clone(&queue);
        let failures = Arc::clone(&failures);
        let exe = exe.clone();
        let mut base = grid.plugin_args(global);
        base.extend(["grid".into(), "run".into(), grid.dir.display().to_string()]);
        let logs = grid.dir.join("logs");
        workers.push(std::thread::spawn(move || loop {
            if crate::signals::is_cancelled() {
                return;
            }
            let Some(i) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                return;
            };
            let log = logs.join(format!("{i}.log"));
            let mut cmd = Command::new(&exe);
            cmd.args(&base)
                .args(["--index", &i.to_string()])
                .env("OMP_NUM_THREADS", cpus.to_string())
                .stdin(Stdio::null())
                .process_group(0);
            if gpus > 0 {
                cmd.env("CUDA_VISIBLE_DEVICES", ((i + w) % gpus).to_string());
            }
            let outcome = std::fs::File::create(&log)
                .and_then(|f| {
                    let f2 = f.try_clone()?;
                    cmd.stdout(f).stderr(f2).spawn()
                })
                .and_then(|mut c| {
                    crate::signals::register_child(c.id());
                    let s = c.wait();
                    crate::signals::forget_child(c.id());
                    s
                });
            match outcome {
                Ok(s) if s.success() => eprintln!("local: job {i} finished (log {})", log.display()),
                Ok(s) => {
                    let msg = format!("job {i}: the task exited with {s} (log {})", log.display());
                    eprintln!("local: {msg}");
                    if let Ok(mut f) = failures.lock() {
                        f.push(msg);
                    }
                }
                Err(e) => {
                    if let Ok(mut f) = failures.lock() {
                        f.push(format!("job {i}: {e}"));
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    if crate::signals::is_cancelled() {
        return Err(crate::error::cancelled());
    }
    let st = states(grid);
    let count = |s: &str| st.iter().filter(|x| x.1 == s).count();
    println!(
        "local: {} jobs: {} done, {} failed, {} missing ({:.0} s)",
        grid.jobs.len(),
        count("done"),
        count("failed"),
        count("missing"),
        started.elapsed().as_secs_f64()
    );
    let failed = failures.lock().map(|f| f.len()).unwrap_or(0);
    Ok(if failed == 0 && count("missing") == 0 {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

fn merge(args: MergeArgs) -> Result<i32> {
    let grid = Grid::open(&args.dir)?;
    let st = states(&grid);
    let mut outputs = crate::output::Outputs::new(args.force, &[]);
    for p in &args.reports {
        crate::report::grid::Format::of(p)?;
        outputs.plan("--report", p)?;
    }
    let results: Vec<(Job, Option<JobResult>)> = st.into_iter().map(|(j, _, r)| (j.clone(), r)).collect();
    let report = GridReport::build(&grid.dir, &grid.info, &results);
    for p in &args.reports {
        outputs.stage(p, report.render(p)?.as_bytes())?;
    }
    outputs.commit()?;
    println!("{}", report.summary());
    for p in &args.reports {
        println!("wrote {}", p.display());
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_expressions_compress_runs() {
        assert_eq!(array_expression(&[]), "");
        assert_eq!(array_expression(&[4]), "4");
        assert_eq!(array_expression(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
    }

    #[test]
    fn shards_step_through_the_jobs() {
        assert_eq!(shard_indices("1/3", 8).unwrap().0, vec![1, 4, 7]);
        assert_eq!(shard_indices("0/1", 3).unwrap().0, vec![0, 1, 2]);
        for bad in ["3/3", "1", "a/2", "1/0"] {
            assert!(shard_indices(bad, 8).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_hash_is_stable_and_covers_every_field() {
        let spec = JobSpec {
            model: ModelSpec::Arch("small-cnn".into()),
            attack: PluginSpec {
                name: "badnets".into(),
                params: BTreeMap::from([("rate".into(), json!(0.05))]),
            },
            defense: PluginSpec {
                name: "none".into(),
                params: BTreeMap::new(),
            },
            seed: 0,
            data: "fashion-mnist".into(),
            limit: Some(2000),
            test_limit: None,
            epochs: 1,
            device: "cpu".into(),
            verify: vec![],
        };
        assert_eq!(spec.hash(), spec.clone().hash());
        assert_eq!(spec.hash().len(), 16);
        let mut other = spec.clone();
        other.seed = 1;
        assert_ne!(spec.hash(), other.hash());
        assert_ne!(spec.model_key(), other.model_key());
        let mut d = spec.clone();
        d.defense.name = "abl".into();
        assert_ne!(spec.hash(), d.hash());
        assert_eq!(
            spec.model_key(),
            d.model_key(),
            "defenses of one model share its attack run"
        );
    }

    #[test]
    fn plugin_params_become_command_line_assignments() {
        let p = PluginSpec {
            name: "blend".into(),
            params: BTreeMap::from([("alpha".into(), json!(0.2)), ("pattern".into(), json!("noise"))]),
        };
        assert_eq!(p.args(), vec!["alpha=0.2", "pattern=noise"]);
        assert_eq!(p.label(), "blend alpha=0.2 pattern=noise");
    }

    #[test]
    fn the_slurm_script_runs_one_task_per_job_or_shards() {
        let a = EmitArgs {
            dir: "g".into(),
            backend: Backend::Slurm,
            gpus: Some(1),
            cpus: Some(2),
            parallel: Some(3),
            max_array: 1000,
            sbatch: vec!["--partition=gpu".into()],
            image: String::new(),
            pvc: String::new(),
            mount: String::new(),
            force: false,
        };
        let s = slurm_script(Path::new("/g"), "/bin/audit", &[], 12, &a);
        assert!(s.contains("#SBATCH --array=0-11%3\n"), "{s}");
        assert!(s.contains("#SBATCH --gres=gpu:1\n") && s.contains("#SBATCH --partition=gpu\n"));
        assert!(s.contains("exec /bin/audit grid run /g\n"), "{s}");
        let small = EmitArgs { max_array: 5, ..a };
        let s = slurm_script(Path::new("/g"), "/bin/audit", &[], 12, &small);
        assert!(
            s.contains("#SBATCH --array=0-4%3\n") && s.contains("--shard env/5"),
            "{s}"
        );
    }

    #[test]
    fn the_k8s_job_is_indexed_and_exit_2_is_not_retried() {
        let a = EmitArgs {
            dir: "g".into(),
            backend: Backend::K8s,
            gpus: None,
            cpus: None,
            parallel: Some(2),
            max_array: 1000,
            sbatch: vec![],
            image: "audit:1".into(),
            pvc: "claim".into(),
            mount: "/grid".into(),
            force: false,
        };
        let m = k8s_manifest("audit-grid-x", 7, &a);
        assert_eq!(m["spec"]["completionMode"], "Indexed");
        assert_eq!(m["spec"]["completions"], 7);
        assert_eq!(m["spec"]["parallelism"], 2);
        assert_eq!(m["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"][0], 2);
        assert_eq!(m["spec"]["template"]["spec"]["restartPolicy"], "Never");
    }
}
