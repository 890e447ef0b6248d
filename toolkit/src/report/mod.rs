//! Defense reports: one document for `audit compare` (several defenses) and `audit harden --report`
//! (one defense), rendered as a terminal table, JSON, Markdown or a self-contained HTML page.
//!
//! Every number in a report was measured by the host on the exported ONNX file (through
//! onnxruntime, or tract where it is missing); plugins' own reports ride along untouched in
//! `defense_report`.

pub mod grid;
mod html;
pub mod scan;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::input_error;
use crate::evaluate::Metrics;

pub use html::html;

/// Version of the report document; readers refuse documents with a newer one.
pub const SCHEMA_VERSION: u32 = 1;

/// The model every row starts from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub path: String,
    pub sha256: String,
}

/// The data the defenses saw and the evaluation used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataInfo {
    /// What was loaded (path and format).
    pub source: String,
    /// sha256 over the loaded training and test images and labels (`data::fingerprint`).
    pub fingerprint: String,
    pub num_classes: usize,
    pub n_train: usize,
    /// Test images every row is measured on (the same set for every row).
    pub n_eval: usize,
    /// Test images lent to defenses that need clean data (left out of `n_eval`).
    pub n_clean: usize,
    /// Poisoned training samples the data names (`poison_idx`), when known.
    pub n_poisoned: Option<usize>,
}

/// A plugin and the parameters it ran with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginRef {
    pub name: String,
    pub version: String,
    pub params: Value,
    /// The library that ran: canonical path (absent in reports written before it was recorded).
    #[serde(default)]
    pub library: Option<String>,
    /// sha256 of that library file (hex).
    #[serde(default)]
    pub sha256: Option<String>,
}

/// One model measured: the undefended input (`baseline`) or a defense's output (`rows`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// Defense plugin name (`undefended` for the baseline).
    pub defense: String,
    pub version: Option<String>,
    pub params: Value,
    /// `ok` or `failed`.
    pub status: String,
    pub error: Option<String>,
    pub clean_accuracy: Option<f64>,
    pub attack_success_rate: Option<f64>,
    pub robust_accuracy: Option<f64>,
    /// Defense effectiveness rating against the baseline (see [`der`]).
    pub der: Option<f64>,
    /// Wall time of the whole defense run (load, defend, export checks, evaluation).
    pub seconds: Option<f64>,
    /// Peak resident memory of the process that ran the defense.
    pub peak_rss_bytes: Option<u64>,
    /// Detect-and-drop defenses: their dropped training samples against `poison_idx`.
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub n_dropped: Option<usize>,
    pub per_class_accuracy: Vec<Option<f64>>,
    pub per_class_asr: Vec<Option<f64>>,
    pub output: Option<String>,
    pub output_sha256: Option<String>,
    /// The plugin's own report (summarised by the host).
    pub defense_report: Value,
    /// The defense plugin's library: canonical path (absent in older reports and the baseline).
    #[serde(default)]
    pub library: Option<String>,
    /// sha256 of the defense plugin's library file (hex).
    #[serde(default)]
    pub library_sha256: Option<String>,
    /// `--verify`: the detectors' verdict on this row's model (the undefended one for the
    /// baseline, the hardened one for a defense); absent without `--verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<scan::ScanVerdict>,
}

/// A report document (`schema_version` 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema_version: u32,
    /// `compare` or `harden`.
    pub command: String,
    pub toolkit_version: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub model: ModelInfo,
    pub data: DataInfo,
    pub eval_attack: Option<PluginRef>,
    pub seed: u64,
    pub device: String,
    pub baseline: Row,
    pub rows: Vec<Row>,
    /// Defense names holding the best value of each column (ties all listed).
    pub best: BTreeMap<String, Vec<String>>,
}

/// DER (BackdoorBench's documented formula): (max(0, ASR_b - ASR_a) - max(0, ACC_b - ACC_a) + 1) / 2,
/// in 0..1, higher is better. The accuracy term is subtracted: a defense that costs accuracy is
/// rated lower, never higher.
pub fn der(acc_before: f64, asr_before: f64, acc_after: f64, asr_after: f64) -> f64 {
    ((asr_before - asr_after).max(0.0) - (acc_before - acc_after).max(0.0) + 1.0) / 2.0
}

impl Row {
    /// A measured row from evaluation metrics.
    pub fn measured(defense: &str, m: &Metrics) -> Row {
        Row {
            defense: defense.to_string(),
            status: "ok".into(),
            clean_accuracy: Some(m.clean_accuracy),
            attack_success_rate: m.attack_success_rate,
            robust_accuracy: m.robust_accuracy,
            per_class_accuracy: m.per_class_accuracy.clone(),
            per_class_asr: m.per_class_asr.clone().unwrap_or_default(),
            params: Value::Object(Default::default()),
            defense_report: Value::Null,
            ..Row::default()
        }
    }

    /// A row for a defense that failed: its error and nothing measured.
    pub fn failed(defense: &str, error: impl Into<String>) -> Row {
        Row {
            defense: defense.to_string(),
            status: "failed".into(),
            error: Some(error.into()),
            params: Value::Object(Default::default()),
            defense_report: Value::Null,
            ..Row::default()
        }
    }

    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The columns compared across defenses: (key, title, higher is better).
pub const COLUMNS: &[(&str, &str, bool)] = &[
    ("clean_accuracy", "ACC", true),
    ("attack_success_rate", "ASR", false),
    ("robust_accuracy", "RA", true),
    ("der", "DER", true),
    ("seconds", "time (s)", false),
    ("peak_rss_bytes", "peak memory", false),
    ("precision", "precision", true),
    ("recall", "recall", true),
];

/// The column of `--verify`'s verdicts: text, shown only when some row has one.
const SCAN_COLUMN: (&str, &str, bool) = ("scan", "scan verdict", false);

/// The columns of this report: [`COLUMNS`], and the scan verdict when a row has one.
fn columns(report: &Report) -> Vec<(&'static str, &'static str, bool)> {
    let mut c = COLUMNS.to_vec();
    if report.has_scan() {
        c.push(SCAN_COLUMN);
    }
    c
}

/// What the scan column means (the reports' notes add it when the column is there).
const SCAN_NOTE: &str = "Scan verdict (--verify): the model-level detectors' verdict on the undefended model (first row) and on each hardened model; the detector and the target classes it names in parentheses.";

fn column(row: &Row, key: &str) -> Option<f64> {
    match key {
        "clean_accuracy" => row.clean_accuracy,
        "attack_success_rate" => row.attack_success_rate,
        "robust_accuracy" => row.robust_accuracy,
        "der" => row.der,
        "seconds" => row.seconds,
        "peak_rss_bytes" => row.peak_rss_bytes.map(|b| b as f64),
        "precision" => row.precision,
        "recall" => row.recall,
        _ => None,
    }
}

impl Report {
    /// Fills `der` of every measured row against the baseline and recomputes `best`.
    pub fn finish(&mut self) {
        let b = &self.baseline;
        if let (Some(acc_b), Some(asr_b)) = (b.clean_accuracy, b.attack_success_rate) {
            for r in self.rows.iter_mut().filter(|r| r.ok()) {
                r.der = match (r.clean_accuracy, r.attack_success_rate) {
                    (Some(acc), Some(asr)) => Some(der(acc_b, asr_b, acc, asr)),
                    _ => None,
                };
            }
        }
        self.best.clear();
        for &(key, _, higher) in COLUMNS {
            let values: Vec<(&str, f64)> = self
                .rows
                .iter()
                .filter(|r| r.ok())
                .filter_map(|r| {
                    column(r, key)
                        .filter(|v| v.is_finite())
                        .map(|v| (r.defense.as_str(), v))
                })
                .collect();
            let pick = if higher { f64::max } else { f64::min };
            let Some(best) = values.iter().map(|v| v.1).reduce(pick) else {
                continue;
            };
            // A winner needs a contest: at least two defenses with a value.
            if values.len() < 2 {
                continue;
            }
            let names = values
                .iter()
                .filter(|v| (v.1 - best).abs() <= 1e-12 * best.abs().max(1.0))
                .map(|v| v.0.to_string())
                .collect();
            self.best.insert(key.to_string(), names);
        }
    }

    /// Whether any row (the baseline included) carries a `--verify` verdict.
    pub fn has_scan(&self) -> bool {
        self.baseline.scan.is_some() || self.rows.iter().any(|r| r.scan.is_some())
    }

    /// True when `defense` holds the best value of column `key`.
    pub fn is_best(&self, key: &str, defense: &str) -> bool {
        self.best.get(key).is_some_and(|v| v.iter().any(|d| d == defense))
    }

    /// Reads a report written as JSON.
    pub fn read(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path).map_err(|e| input_error(format!("{}: {e}", path.display())))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| input_error(format!("{}: not JSON: {e}", path.display())))?;
        match v.get("schema_version").and_then(Value::as_u64) {
            Some(n) if n as u32 == SCHEMA_VERSION => {}
            Some(n) => {
                return Err(input_error(format!(
                    "{}: report schema_version {n}; this audit reads version {SCHEMA_VERSION}",
                    path.display()
                )))
            }
            None => {
                return Err(input_error(format!(
                    "{}: no `schema_version`: not an audit report",
                    path.display()
                )))
            }
        }
        serde_json::from_value(v).map_err(|e| input_error(format!("{}: not an audit report: {e}", path.display())))
    }

    /// Renders in the format `path`'s extension names (.json, .md, .html).
    pub fn render(&self, path: &Path) -> Result<String> {
        Ok(match Format::of(path)? {
            Format::Json => serde_json::to_string_pretty(self)? + "\n",
            Format::Markdown => markdown(self),
            Format::Html => html(self)?,
        })
    }
}

/// Report file formats, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Markdown,
    Html,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("json") => Ok(Format::Json),
            Some("md") | Some("markdown") => Ok(Format::Markdown),
            Some("html") | Some("htm") => Ok(Format::Html),
            _ => Err(input_error(format!(
                "--report {}: the extension must be .json, .md or .html",
                path.display()
            ))),
        }
    }
}

/// Now, as RFC 3339 UTC to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// `0.1234`, or `-` when absent.
pub fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.4}"))
}

/// `123.4 MiB`, or `-`.
pub fn fmt_bytes(v: Option<u64>) -> String {
    v.map_or("-".to_string(), |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
}

fn fmt_seconds(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |s| format!("{s:.1}"))
}

/// The cells of a row, in `COLUMNS` order: its text, and whether it is the best in its column.
fn cells(report: &Report, row: &Row, baseline: bool) -> Vec<(String, bool)> {
    columns(report)
        .into_iter()
        .map(|(key, _, _)| {
            let text = match key {
                "seconds" => fmt_seconds(row.seconds),
                "peak_rss_bytes" => fmt_bytes(row.peak_rss_bytes),
                "scan" => row.scan.as_ref().map_or("-".to_string(), scan::ScanVerdict::text),
                _ => fmt_ratio(column(row, key)),
            };
            (text, !baseline && row.ok() && report.is_best(key, &row.defense))
        })
        .collect()
}

fn header(report: &Report) -> Vec<String> {
    std::iter::once("defense".to_string())
        .chain(columns(report).iter().map(|c| c.1.to_string()))
        .collect()
}

/// The comparison as a terminal table (best values marked with *); failed rows carry their error.
pub fn terminal_table(report: &Report) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(header(report));
    let n_columns = columns(report).len();
    let mut add = |row: &Row, baseline: bool| {
        let mut r = vec![row.defense.clone()];
        if row.ok() {
            r.extend(
                cells(report, row, baseline)
                    .into_iter()
                    .map(|(t, best)| if best { format!("{t} *") } else { t }),
            );
        } else {
            r.push("FAILED (below)".to_string());
            r.extend((1..n_columns).map(|_| String::new()));
        }
        t.add_row(r);
    };
    add(&report.baseline, true);
    for row in &report.rows {
        add(row, false);
    }
    let mut s = format!("{t}\n* best among the defenses in that column");
    for row in report.rows.iter().filter(|r| !r.ok()) {
        s += &format!(
            "\n{} FAILED: {}",
            row.defense,
            one_line(row.error.as_deref().unwrap_or("unknown error"), 300)
        );
    }
    s
}

/// The first line of `s`, cut to `max` characters.
pub fn one_line(s: &str, max: usize) -> String {
    let line = s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    if line.chars().count() > max {
        format!("{}...", line.chars().take(max).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Untrusted text (plugin names, parameters, error texts, paths) as inert Markdown: HTML
/// special characters become entities, Markdown punctuation is backslash-escaped, and the text
/// stays on one line so it cannot end a table cell or start a block.
pub fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' | '\r' => out.push(' '),
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A fenced code block holding `text` verbatim: the fence is longer than any run of backticks
/// in the text, so the text cannot close it (inside a fence, HTML is not interpreted).
fn md_fenced(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}\n{text}\n{fence}")
}

/// The report as Markdown: provenance, the table (best in bold), failures, parameters.
pub fn markdown(report: &Report) -> String {
    let mut s = format!("# audit {} report\n\n", report.command);
    s += &provenance(report)
        .iter()
        .map(|(k, v)| format!("- {k}: {}\n", md_escape(v)))
        .collect::<String>();
    let cols = columns(report);
    s += "\n| defense | ";
    s += &cols.iter().map(|c| c.1).collect::<Vec<_>>().join(" | ");
    s += " |\n|---|";
    s += &"---|".repeat(cols.len());
    s += "\n";
    let mut add = |row: &Row, baseline: bool| {
        if row.ok() {
            let c: Vec<String> = cells(report, row, baseline)
                .into_iter()
                .map(|(t, best)| if best { format!("**{t}**") } else { t })
                .collect();
            s += &format!("| {} | {} |\n", md_escape(&row.defense), c.join(" | "));
        } else {
            s += &format!(
                "| {} | FAILED: {} |{}\n",
                md_escape(&row.defense),
                md_escape(&one_line(row.error.as_deref().unwrap_or("unknown error"), 200)),
                " |".repeat(cols.len() - 1)
            );
        }
    };
    add(&report.baseline, true);
    for row in &report.rows {
        add(row, false);
    }
    s += "\nBold: the best value among the defenses. ACC: clean accuracy; ASR: attack success rate; RA: robust accuracy (triggered inputs still given their true class); DER: (max(0, ASR drop) - max(0, ACC drop) + 1) / 2; precision/recall: the training samples a defense dropped against the data's poison_idx.\n";
    if report.has_scan() {
        s += &format!("\n{SCAN_NOTE}\n");
    }
    let failed: Vec<&Row> = report.rows.iter().filter(|r| !r.ok()).collect();
    if !failed.is_empty() {
        s += "\n## Failures\n\n";
        for r in failed {
            s += &format!(
                "### {}\n\n{}\n\n",
                md_escape(&r.defense),
                md_fenced(r.error.as_deref().unwrap_or("").trim())
            );
        }
    }
    s += "\n## Defenses\n\n| defense | version | parameters | dropped samples | output sha256 | plugin library | library sha256 |\n|---|---|---|---|---|---|---|\n";
    let or_dash = |v: Option<&str>| v.map_or("-".to_string(), md_escape);
    for r in &report.rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            md_escape(&r.defense),
            or_dash(r.version.as_deref()),
            md_escape(&r.params.to_string()),
            r.n_dropped.map_or("-".to_string(), |n| n.to_string()),
            or_dash(r.output_sha256.as_deref()),
            or_dash(r.library.as_deref()),
            or_dash(r.library_sha256.as_deref()),
        );
    }
    s
}

/// Key facts a reviewer signs off: what was measured, on what, with what.
pub fn provenance(report: &Report) -> Vec<(&'static str, String)> {
    let d = &report.data;
    let mut v = vec![
        (
            "model",
            format!("{} (sha256 {})", report.model.path, report.model.sha256),
        ),
        (
            "data",
            format!(
                "{} (fingerprint sha256 {}); {} training samples{}, {} classes",
                d.source,
                d.fingerprint,
                d.n_train,
                d.n_poisoned.map_or(String::new(), |n| format!(" ({n} named in poison_idx)")),
                d.num_classes
            ),
        ),
        (
            "evaluation",
            format!(
                "{} test images, the same for every row; {} further test images lent as the clean subset to defenses that need one",
                d.n_eval, d.n_clean
            ),
        ),
    ];
    v.push((
        "attack measured",
        match &report.eval_attack {
            Some(a) => format!(
                "{} {} with {}{}",
                a.name,
                a.version,
                a.params,
                match (&a.library, &a.sha256) {
                    (Some(l), Some(h)) => format!(" (library {l}, sha256 {h})"),
                    (Some(l), None) => format!(" (library {l})"),
                    _ => String::new(),
                }
            ),
            None => "none (no ASR or RA)".to_string(),
        },
    ));
    v.push(("seed", report.seed.to_string()));
    v.push(("device", report.device.clone()));
    v.push((
        "toolkit",
        format!("audit {} ({})", report.toolkit_version, report.created),
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn der_follows_the_documented_formula() {
        // ASR 0.95 -> 0.05 (drop 0.90), ACC 0.90 -> 0.86 (drop 0.04): (0.90 - 0.04 + 1) / 2.
        assert!((der(0.90, 0.95, 0.86, 0.05) - 0.93).abs() < 1e-12);
        // The variant that adds the accuracy term would give 0.97: a costlier defense must not
        // rate higher.
        assert!(der(0.90, 0.95, 0.86, 0.05) < der(0.90, 0.95, 0.90, 0.05));
        // Accuracy gains and ASR increases are clipped at zero.
        assert!((der(0.80, 0.50, 0.85, 0.60) - 0.5).abs() < 1e-12);
        // Perfect: the backdoor gone at no cost.
        assert!((der(0.9, 1.0, 0.9, 0.0) - 1.0).abs() < 1e-12);
        // Worst: nothing removed, all accuracy lost.
        assert!(der(1.0, 1.0, 0.0, 1.0).abs() < 1e-12);
    }

    pub(crate) fn sample() -> Report {
        let m = |acc: f64, asr: f64| Metrics {
            clean_accuracy: acc,
            attack_success_rate: Some(asr),
            robust_accuracy: Some(1.0 - asr),
            per_class_accuracy: vec![Some(acc); 3],
            per_class_asr: Some(vec![None, Some(asr), Some(asr / 2.0)]),
            n_test: 50,
            n_attack: Some(30),
        };
        let mut a = Row::measured("none", &m(0.88, 0.01));
        a.seconds = Some(30.0);
        a.peak_rss_bytes = Some(900 << 20);
        a.precision = Some(0.3);
        a.recall = Some(0.99);
        a.n_dropped = Some(17);
        a.library = Some("/plugins/libaudit_plugin_none.so".into());
        a.library_sha256 = Some("12".repeat(32));
        let mut b = Row::measured("finetune", &m(0.89, 0.90));
        b.seconds = Some(10.0);
        b.peak_rss_bytes = Some(800 << 20);
        let c = Row::failed("nad", "nad: unknown layer `x`\nmore");
        let mut r = Report {
            schema_version: SCHEMA_VERSION,
            command: "compare".into(),
            toolkit_version: "0.1.0".into(),
            created: "2026-11-26T12:00:00Z".into(),
            model: ModelInfo {
                path: "m.onnx".into(),
                sha256: "ab".repeat(32),
            },
            data: DataInfo {
                source: "fashion-mnist <x> & y".into(),
                fingerprint: "cd".repeat(32),
                num_classes: 3,
                n_train: 100,
                n_eval: 50,
                n_clean: 10,
                n_poisoned: Some(5),
            },
            eval_attack: Some(PluginRef {
                name: "badnets".into(),
                version: "0.1.0".into(),
                params: json!({"target": 0}),
                library: Some("/plugins/libaudit_plugin_badnets.so".into()),
                sha256: Some("ef".repeat(32)),
            }),
            seed: 0,
            device: "cpu".into(),
            baseline: Row::measured("undefended", &m(0.89, 0.99)),
            rows: vec![a, b, c],
            best: BTreeMap::new(),
        };
        r.finish();
        r
    }

    #[test]
    fn scan_verdicts_get_a_column_only_when_a_row_has_one() {
        use scan::{DetectorVerdict, ScanVerdict};
        let mut r = sample();
        for text in [terminal_table(&r), markdown(&r), html(&r).unwrap()] {
            assert!(!text.contains("scan verdict") && !text.contains("Scan verdict"));
        }
        let d = |name: &str, backdoored: Option<bool>, targets: Vec<i64>| DetectorVerdict {
            detector: name.into(),
            status: if backdoored.is_some() { "ok" } else { "failed" }.into(),
            backdoored,
            target_classes: targets,
            score: Some(0.01),
            score_name: Some("p-value".into()),
        };
        let flagged = ScanVerdict {
            flagged: true,
            detectors: vec![d("mmbd", Some(true), vec![0, 2]), d("nc", Some(false), vec![])],
        };
        let clean = ScanVerdict {
            flagged: false,
            detectors: vec![d("mmbd", Some(false), vec![]), d("nc", None, vec![])],
        };
        assert_eq!(flagged.text(), "FLAGGED (mmbd: 0 2)");
        assert_eq!(clean.text(), "not flagged (mmbd); failed: nc");
        r.baseline.scan = Some(flagged);
        r.rows[0].scan = Some(clean);
        r.finish();
        assert!(!r.best.contains_key("scan"), "a verdict is no contest");
        let t = terminal_table(&r);
        assert!(t.contains("scan verdict") && t.contains("FLAGGED (mmbd: 0 2)"), "{t}");
        let md = markdown(&r);
        assert!(
            md.contains("| scan verdict |") && md.contains("| not flagged (mmbd); failed: nc |"),
            "{md}"
        );
        assert!(md.contains("Scan verdict (--verify)"), "{md}");
        // The failed row still spans every column, the verdict's included.
        assert!(
            md.contains(&format!("| nad | FAILED: {}", md_escape("nad: unknown layer `x`"))),
            "{md}"
        );
        let page = html(&r).unwrap();
        assert!(page.contains("<th>scan verdict</th>") && page.contains("FLAGGED (mmbd: 0 2)"));
        assert!(page.contains("colspan=\"9\""), "the failed row spans the 9 columns");
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
    }

    #[test]
    fn best_values_are_marked_per_column() {
        let r = sample();
        assert_eq!(r.best["attack_success_rate"], vec!["none"]);
        assert_eq!(r.best["clean_accuracy"], vec!["finetune"]);
        assert_eq!(r.best["seconds"], vec!["finetune"]);
        assert_eq!(r.best["der"], vec!["none"]);
        assert!(!r.best.contains_key("recall"), "one value is no contest");
        // DER of `none`: (0.98 - 0.01 + 1) / 2.
        assert!((r.rows[0].der.unwrap() - 0.985).abs() < 1e-12);
        assert_eq!(r.rows[2].der, None, "a failed row has no DER");
        let t = terminal_table(&r);
        assert!(t.contains("0.0100 *"), "{t}");
        assert!(t.contains("nad FAILED: nad: unknown layer `x`"), "{t}");
        let md = markdown(&r);
        assert!(md.contains("| none | 0.8800 | **0.0100** |"), "{md}");
        assert!(md.contains("| nad | FAILED: nad: unknown layer \\`x\\` |"), "{md}");
        assert!(md.contains("## Failures"), "{md}");
        assert!(md.contains("| 17 |"), "dropped samples listed: {md}");
    }

    /// Lines of `md` outside fenced code blocks (where HTML would be interpreted).
    fn outside_fences(md: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut fence: Option<usize> = None;
        for line in md.lines() {
            let ticks = line.chars().take_while(|&c| c == '`').count();
            match fence {
                Some(n) if ticks >= n && line.trim_end().chars().all(|c| c == '`') => fence = None,
                Some(_) => {}
                None if ticks >= 3 => fence = Some(ticks),
                None => out.push(line),
            }
        }
        assert!(fence.is_none(), "unclosed fence in:\n{md}");
        out
    }

    #[test]
    fn finding_low_markdown_escapes_html_from_untrusted_fields() {
        let mut r = sample();
        let evil = "<img src=x onerror=alert(1)>";
        r.model.path = format!("/m/{evil}.onnx");
        r.rows[0].defense = "<script>alert(1)</script>".into();
        r.rows[0].params = json!({ "k": evil, "pipe": "a|b", "tick": "`x`" });
        r.rows[0].library = Some(format!("/p/{evil}.so"));
        r.rows[2].error = Some(format!("boom ```\n{evil}\n```` and more"));
        r.eval_attack.as_mut().unwrap().params = json!({ "x": "[click](javascript:alert(1))" });
        let md = markdown(&r);
        for line in outside_fences(&md) {
            assert!(!line.contains('<'), "raw HTML outside a code fence: {line}\n{md}");
            let link = line
                .match_indices("](")
                .any(|(i, _)| i == 0 || line.as_bytes()[i - 1] != b'\\');
            assert!(!link, "a link can form: {line}");
        }
        assert!(md.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{md}");
        // The error text is kept verbatim inside a fence it cannot close.
        assert!(md.contains(&format!("{evil}\n```` and more")), "{md}");
        // A pipe in a parameter does not split the table row: each Defenses row keeps 7 cells.
        let row = md
            .lines()
            .find(|l| l.contains("&lt;script&gt;") && l.contains("pipe"))
            .unwrap();
        let unescaped_pipes = row.len() - row.replace('|', "").len() - row.matches("\\|").count();
        assert_eq!(unescaped_pipes, 8, "{row}");
    }

    #[test]
    fn finding_13d_reports_record_plugin_library_and_sha256() {
        let r = sample();
        let md = markdown(&r);
        assert!(md.contains("/plugins/libaudit\\_plugin\\_none.so"), "{md}");
        assert!(md.contains(&"12".repeat(32)), "{md}");
        assert!(
            md.contains(&format!("sha256 {}", "ef".repeat(32))),
            "eval attack's library: {md}"
        );
        let page = html(&r).unwrap();
        assert!(page.contains("libaudit_plugin_none.so") && page.contains(&"12".repeat(32)));
        assert!(page.contains(&"ef".repeat(32)));
        // JSON keeps them, and a report written before they existed still reads.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, r.render(&p).unwrap()).unwrap();
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["rows"][0]["library_sha256"], "12".repeat(32));
        assert_eq!(v["eval_attack"]["sha256"], "ef".repeat(32));
        for row in v["rows"].as_array_mut().unwrap() {
            let row = row.as_object_mut().unwrap();
            row.remove("library");
            row.remove("library_sha256");
        }
        v["baseline"].as_object_mut().unwrap().remove("library");
        v["baseline"].as_object_mut().unwrap().remove("library_sha256");
        v["eval_attack"].as_object_mut().unwrap().remove("library");
        v["eval_attack"].as_object_mut().unwrap().remove("sha256");
        std::fs::write(&p, v.to_string()).unwrap();
        let old = Report::read(&p).unwrap();
        assert_eq!(old.rows[0].library, None);
        assert_eq!(old.eval_attack.unwrap().sha256, None);
        assert!(markdown(&Report::read(&p).unwrap()).contains("| - | - |"));
    }

    #[test]
    fn json_round_trips_and_newer_schemas_are_refused() {
        let r = sample();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, r.render(&p).unwrap()).unwrap();
        assert_eq!(Report::read(&p).unwrap(), r);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["schema_version"] = json!(2);
        std::fs::write(&p, v.to_string()).unwrap();
        let e = Report::read(&p).unwrap_err().to_string();
        assert!(e.contains("schema_version 2"), "{e}");
        std::fs::write(&p, "{}").unwrap();
        assert!(Report::read(&p).unwrap_err().to_string().contains("schema_version"));
        assert!(Format::of(Path::new("r.txt")).is_err());
    }
}
