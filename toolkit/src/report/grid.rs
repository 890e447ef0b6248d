//! The grid's documents: one job's result (`results/<index>-<spec hash>.json`) and the merged
//! report of every result (`audit grid merge`), as JSON, Markdown, self-contained HTML, and a
//! tidy CSV with BackdoorBench's columns first.
//!
//! The merged report groups the jobs by backdoored model (model, attack, seed and the training
//! settings): each group is an ordinary report document ([`Report`], the one `audit compare`
//! writes) whose baseline is the undefended backdoored model and whose rows are the group's jobs,
//! one per defense, so a group reads exactly like a compare report.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::html::{table_rows, STYLE};
use super::{columns, header, md_escape, provenance, DataInfo, ModelInfo, PluginRef, Report, Row};
use crate::cli::grid::{Job, PlanInfo};
use crate::cli::harden::{HardenOutcome, MeasuredMetrics};
use crate::error::input_error;

/// Version of a job's result document.
pub const RESULT_SCHEMA_VERSION: u32 = 1;
/// Version of the merged grid report.
pub const GRID_SCHEMA_VERSION: u32 = 1;

const TEMPLATE: &str = include_str!("grid.html");

/// What one job left: written atomically by `audit grid run`, read by `status` and `merge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    pub schema_version: u32,
    pub index: usize,
    pub spec_hash: String,
    pub spec: Value,
    /// `ok`: the defense ran and its model was measured; `failed`: the attack or the defense
    /// failed (`error` says which and why). Either is a result: the task exited 0.
    pub status: String,
    pub error: Option<String>,
    /// Where the task's index came from (`--index`, `$SLURM_ARRAY_TASK_ID`, ...).
    pub index_source: String,
    pub host: String,
    /// RFC 3339 UTC.
    pub started: String,
    pub wall_seconds: f64,
    pub toolkit_version: String,
    /// `audit attack --json` of the backdoored model, with the attack plugin's version, library
    /// and sha256.
    pub attack: Option<Value>,
    /// `audit harden --json`: the defense plugin, its parameters, before/after metrics, device.
    pub outcome: Option<HardenOutcome>,
}

/// One backdoored model and the defenses run on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridGroup {
    pub title: String,
    pub model: String,
    pub attack: String,
    pub seed: u64,
    /// The job index of each of `report.rows`, in order.
    pub jobs: Vec<usize>,
    /// Data set and poisoning share, for the CSV.
    pub dataset: String,
    pub poison_rate: Option<f64>,
    pub report: Report,
}

/// The merged report (`audit grid merge`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridReport {
    pub schema_version: u32,
    pub command: String,
    pub toolkit_version: String,
    pub created: String,
    /// The grid folder and the grid file it was planned from.
    pub grid: String,
    pub source: String,
    pub source_sha256: String,
    pub jobs: usize,
    pub done: usize,
    pub failed: usize,
    /// Jobs without a result (not run yet, or killed): listed, never counted as results.
    pub missing: Vec<usize>,
    pub groups: Vec<GridGroup>,
}

/// Output formats of `grid merge`, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Markdown,
    Html,
    Csv,
}

impl Format {
    /// The report formats of [`super::Format`], and `.csv`.
    pub fn of(path: &Path) -> Result<Format> {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            return Ok(Format::Csv);
        }
        Ok(
            match super::Format::of(path).map_err(|_| {
                input_error(format!(
                    "--report {}: the extension must be .json, .md, .html or .csv",
                    path.display()
                ))
            })? {
                super::Format::Json => Format::Json,
                super::Format::Markdown => Format::Markdown,
                super::Format::Html => Format::Html,
            },
        )
    }
}

fn measured_row(defense: &str, m: &MeasuredMetrics) -> Row {
    Row {
        defense: defense.to_string(),
        status: "ok".into(),
        clean_accuracy: Some(m.clean_accuracy).filter(|v| v.is_finite()),
        attack_success_rate: m.attack_success_rate,
        robust_accuracy: m.robust_accuracy,
        per_class_accuracy: m.per_class_accuracy.clone(),
        per_class_asr: m.per_class_attack_success_rate.clone().unwrap_or_default(),
        params: Value::Object(Default::default()),
        defense_report: Value::Null,
        ..Row::default()
    }
}

/// A group's key: the backdoored model (the cache key of its attack run) and the test subset.
fn group_key(job: &Job) -> String {
    format!("{}:{:?}", job.spec.model_key(), job.spec.test_limit)
}

impl GridReport {
    /// Groups the results by backdoored model, in plan order.
    pub fn build(dir: &Path, info: &PlanInfo, results: &[(Job, Option<JobResult>)]) -> GridReport {
        let mut order: Vec<String> = Vec::new();
        let mut members: BTreeMap<String, Vec<&(Job, Option<JobResult>)>> = BTreeMap::new();
        for r in results.iter().filter(|r| r.1.is_some()) {
            let k = group_key(&r.0);
            if !members.contains_key(&k) {
                order.push(k.clone());
            }
            members.entry(k).or_default().push(r);
        }
        let groups = order.iter().map(|k| group(&members[k])).collect();
        let count = |s: &str| {
            results
                .iter()
                .filter(|r| r.1.as_ref().is_some_and(|x| x.status == s))
                .count()
        };
        GridReport {
            schema_version: GRID_SCHEMA_VERSION,
            command: "grid merge".into(),
            toolkit_version: env!("CARGO_PKG_VERSION").into(),
            created: super::now_rfc3339(),
            grid: dir.display().to_string(),
            source: info.source.clone(),
            source_sha256: info.source_sha256.clone(),
            jobs: results.len(),
            done: count("ok"),
            failed: count("failed"),
            missing: results.iter().filter(|r| r.1.is_none()).map(|r| r.0.index).collect(),
            groups,
        }
    }

    /// One line: how many jobs are in the report.
    pub fn summary(&self) -> String {
        format!(
            "{} jobs: {} done, {} failed, {} missing{}; {} backdoored models",
            self.jobs,
            self.done,
            self.failed,
            self.missing.len(),
            if self.missing.is_empty() {
                String::new()
            } else {
                format!(" ({})", crate::cli::grid::array_expression(&self.missing))
            },
            self.groups.len()
        )
    }

    pub fn render(&self, path: &Path) -> Result<String> {
        Ok(match Format::of(path)? {
            Format::Json => serde_json::to_string_pretty(self)? + "\n",
            Format::Markdown => self.markdown(),
            Format::Html => self.html()?,
            Format::Csv => self.csv()?,
        })
    }

    /// The tidy table: one line per job with a result, BackdoorBench's columns first.
    pub fn csv(&self) -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record([
            "dataset",
            "model",
            "attack",
            "defense",
            "poison_rate",
            "ACC",
            "ASR",
            "RA",
            "DER",
            "seed",
            "job",
            "spec_hash",
            "status",
            "ACC_before",
            "ASR_before",
            "RA_before",
            "precision",
            "recall",
            "seconds",
            "device",
            "attack_params",
            "defense_params",
            "error",
        ])?;
        let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6}"));
        for g in &self.groups {
            let b = &g.report.baseline;
            for (row, &job) in g.report.rows.iter().zip(&g.jobs) {
                w.write_record([
                    g.dataset.clone(),
                    g.model.clone(),
                    g.report
                        .eval_attack
                        .as_ref()
                        .map_or(g.attack.clone(), |a| a.name.clone()),
                    row.defense.clone(),
                    f(g.poison_rate),
                    f(row.clean_accuracy),
                    f(row.attack_success_rate),
                    f(row.robust_accuracy),
                    f(row.der),
                    g.seed.to_string(),
                    job.to_string(),
                    row.defense_report["spec_hash"].as_str().unwrap_or("").to_string(),
                    row.status.clone(),
                    f(b.clean_accuracy),
                    f(b.attack_success_rate),
                    f(b.robust_accuracy),
                    f(row.precision),
                    f(row.recall),
                    f(row.seconds),
                    g.report.device.clone(),
                    g.report
                        .eval_attack
                        .as_ref()
                        .map_or(String::new(), |a| a.params.to_string()),
                    row.params.to_string(),
                    row.error.clone().unwrap_or_default(),
                ])?;
            }
        }
        Ok(String::from_utf8(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?)
    }

    fn markdown(&self) -> String {
        let mut s = format!("# audit grid report\n\n- grid: {}\n", md_escape(&self.grid));
        s += &format!(
            "- planned from: {} (sha256 {})\n- created: {}, audit {}\n- {}\n",
            md_escape(&self.source),
            self.source_sha256,
            self.created,
            self.toolkit_version,
            md_escape(&self.summary())
        );
        for g in &self.groups {
            let r = &g.report;
            s += &format!("\n## {}\n\n", md_escape(&g.title));
            for (k, v) in provenance(r) {
                s += &format!("- {k}: {}\n", md_escape(&v));
            }
            let cols = columns(r);
            s += &format!("\n| job | {} |\n|---|", header(r).join(" | "));
            s += &"---|".repeat(cols.len() + 1);
            s += "\n";
            for (row, job) in table_rows(r)
                .iter()
                .zip(std::iter::once(None).chain(g.jobs.iter().map(Some)))
            {
                let job = job.map_or("-".to_string(), |j| j.to_string());
                if row.failed {
                    s += &format!(
                        "| {job} | {} | FAILED: {} |{}\n",
                        md_escape(&row.defense),
                        md_escape(&row.error),
                        " |".repeat(cols.len() - 1)
                    );
                } else {
                    let c: Vec<String> = row
                        .cells
                        .iter()
                        .map(|c| {
                            if c.best {
                                format!("**{}**", c.text)
                            } else {
                                c.text.clone()
                            }
                        })
                        .collect();
                    s += &format!("| {job} | {} | {} |\n", md_escape(&row.defense), c.join(" | "));
                }
            }
        }
        s += "\nPer group: the first row is the undefended backdoored model; bold, the best among the defenses. ACC: clean accuracy; ASR: attack success rate; RA: robust accuracy; DER: (max(0, ASR drop) - max(0, ACC drop) + 1) / 2.\n";
        s
    }

    fn html(&self) -> Result<String> {
        #[derive(Serialize)]
        struct G {
            title: String,
            provenance: Vec<(String, String)>,
            header: Vec<String>,
            columns: usize,
            rows: Vec<Value>,
        }
        let groups: Vec<G> = self
            .groups
            .iter()
            .map(|g| {
                let r = &g.report;
                let rows = table_rows(r)
                    .into_iter()
                    .zip(std::iter::once(None).chain(g.jobs.iter().map(Some)))
                    .map(|(row, job)| json!({"job": job.map_or("-".to_string(), |j| j.to_string()), "row": row}))
                    .collect();
                G {
                    title: g.title.clone(),
                    provenance: provenance(r).into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    header: header(r),
                    columns: columns(r).len(),
                    rows,
                }
            })
            .collect();
        let mut env = Environment::new();
        env.add_template("style.html", STYLE)?;
        env.add_template("grid.html", TEMPLATE)?;
        Ok(env.get_template("grid.html")?.render(context! {
            grid => &self.grid,
            source => &self.source,
            source_sha256 => &self.source_sha256,
            created => &self.created,
            toolkit_version => &self.toolkit_version,
            summary => self.summary(),
            groups => groups,
        })?)
    }
}

/// The report of one backdoored model: its jobs (all with a result), one row each.
fn group(members: &[&(Job, Option<JobResult>)]) -> GridGroup {
    let first = &members[0].0;
    let spec = &first.spec;
    let outcomes: Vec<&HardenOutcome> = members
        .iter()
        .filter_map(|m| m.1.as_ref().and_then(|r| r.outcome.as_ref()))
        .collect();
    let attack_doc = members.iter().find_map(|m| m.1.as_ref().and_then(|r| r.attack.clone()));
    let attack_error = members.iter().find_map(|m| {
        m.1.as_ref()
            .and_then(|r| r.attack.is_none().then(|| r.error.clone()).flatten())
    });
    let n_poisoned = attack_doc.as_ref().and_then(|d| d["n_poisoned"].as_u64());
    let n_train = attack_doc.as_ref().and_then(|d| d["n_train"].as_u64());
    let (model, data, device, baseline) = match outcomes.first() {
        Some(o) => (
            o.model.clone(),
            DataInfo {
                source: o.data.clone(),
                fingerprint: o.data_fingerprint.clone(),
                num_classes: o.before.per_class_accuracy.len(),
                n_train: o.n_train,
                n_eval: o.n_test,
                n_clean: o.n_clean.unwrap_or(0),
                n_poisoned: n_poisoned.map(|n| n as usize),
            },
            o.device.clone(),
            measured_row("undefended", &o.before),
        ),
        None => (
            ModelInfo {
                path: spec.model.label(),
                sha256: "-".into(),
            },
            DataInfo {
                source: spec.data.clone(),
                fingerprint: "-".into(),
                num_classes: 0,
                n_train: 0,
                n_eval: 0,
                n_clean: 0,
                n_poisoned: None,
            },
            spec.device.clone(),
            Row::failed(
                "undefended",
                attack_error.unwrap_or_else(|| "no defense run measured this model".into()),
            ),
        ),
    };
    let mut rows = Vec::new();
    let mut jobs = Vec::new();
    for (job, result) in members {
        let Some(r) = result else { continue };
        let mut row = match &r.outcome {
            Some(o) => o.row(),
            None => Row::failed(
                &job.spec.defense.name,
                r.error.clone().unwrap_or_else(|| "unknown error".into()),
            ),
        };
        if r.outcome.is_none() {
            row.params = serde_json::to_value(&job.spec.defense.params).unwrap_or(Value::Null);
        }
        if !row.defense_report.is_object() {
            row.defense_report = json!({});
        }
        row.defense_report["spec_hash"] = json!(job.spec_hash);
        row.seconds = Some(r.wall_seconds);
        rows.push(row);
        jobs.push(job.index);
    }
    let eval_attack = Some(PluginRef {
        name: spec.attack.name.clone(),
        version: attack_doc
            .as_ref()
            .and_then(|d| d["version"].as_str())
            .unwrap_or("-")
            .to_string(),
        params: attack_doc
            .as_ref()
            .map(|d| d["params"].clone())
            .filter(|p| p.is_object())
            .unwrap_or_else(|| serde_json::to_value(&spec.attack.params).unwrap_or(Value::Null)),
        library: attack_doc
            .as_ref()
            .and_then(|d| d["library"].as_str().map(String::from)),
        sha256: attack_doc.as_ref().and_then(|d| d["sha256"].as_str().map(String::from)),
    });
    let mut report = Report {
        schema_version: super::SCHEMA_VERSION,
        command: "grid".into(),
        toolkit_version: env!("CARGO_PKG_VERSION").into(),
        created: super::now_rfc3339(),
        model,
        data,
        eval_attack,
        seed: spec.seed,
        device,
        baseline,
        rows,
        best: BTreeMap::new(),
    };
    report.finish();
    let dataset = match spec.data.as_str() {
        d @ ("fashion-mnist" | "synthetic") => d.to_string(),
        d => Path::new(d)
            .file_name()
            .map_or(d.to_string(), |f| f.to_string_lossy().into_owned()),
    };
    GridGroup {
        title: format!("{} / {} / seed {}", spec.model.label(), spec.attack.label(), spec.seed),
        model: spec.model.label(),
        attack: spec.attack.label(),
        seed: spec.seed,
        jobs,
        dataset,
        poison_rate: match (n_poisoned, n_train) {
            (Some(p), Some(n)) if n > 0 => Some(p as f64 / n as f64),
            _ => None,
        },
        report,
    }
}
